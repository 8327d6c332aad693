"""The package's layers import only downwards, and every command speaks the same error language.

Walks every module's imports (module level and inside functions) with `ast`: a module may
import its own layer and the layers listed before it, never one after, and the modules of one
layer import each other without a cycle. The package root holds the commands (which may
import anything), `errors` and the public names.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

PACKAGE = pathlib.Path(REPO_ROOT) / "longlora_jax"
# Bottom to top; a layer may import itself and anything before it.
LAYERS = ("errors", "cli", "parallel", "modeling", "data", "io", "inference", "evaluation",
          "training", "benchmarks", "experiments")
COMMANDS = ("train", "evaluate", "generate", "export", "aot", "bench", "assets", "miniature")
# Commands that hand their arguments to another tool's command line (lm-eval's): its help and
# errors are that tool's (tests/test_lm_harness.py checks ours).
PASSTHROUGH = ("harness",)
# Third-party imports allowed inside functions: optional peers, imported only when asked for.
LAZY_OK = {"torch", "peft", "transformers", "bitsandbytes", "hqq"}


def _modules(package: pathlib.Path = PACKAGE) -> list[tuple[str, pathlib.Path]]:
    """(module name, path) of every module of the package; fails when it finds none."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).with_suffix("")
        found.append((".".join(("longlora_jax", *rel.parts)).removesuffix(".__init__"), path))
    assert found, f"no modules found under {package}: the layer checks would check nothing"
    return found


def _is_module(name: str) -> bool:
    """Whether `name` (longlora_jax.a.b) is a module or package of the project."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return parts[1]


def _imports(path: pathlib.Path, module: str):
    """(imported module, line, inside a function) for every import of `path`."""
    tree = ast.parse(path.read_text())
    functions = {id(n) for f in ast.walk(tree)
                 if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        local = id(node) in functions
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, local
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                # `from package import x` imports the module package.x when x is one
                name = f"{base}.{alias.name}"
                yield (name if _is_module(name) else base), node.lineno, local


def test_every_module_is_in_a_layer():
    for module, _ in _modules():
        layer = _layer(module)
        if layer == "root":
            continue
        assert layer in LAYERS or layer in COMMANDS + PASSTHROUGH, f"{module} is in no layer"


def _project_imports(module: str, path: pathlib.Path):
    """(imported project module, line, inside a function) for every import of the project."""
    return [(imported, line, local) for imported, line, local in _imports(path, module)
            if imported == "longlora_jax" or imported.startswith("longlora_jax.")]


def test_every_import_names_a_module():
    """An import of a project module that does not exist (a stale path) is a readable failure."""
    unknown = [f"{path.relative_to(REPO_ROOT)}:{line} imports {imported}, which is no module "
               "of the package" for module, path in _modules()
               for imported, line, _ in _project_imports(module, path)
               if not _is_module(imported)]
    assert not unknown, "\n".join(unknown)


def test_layers_import_only_downwards():
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for module, path in _modules():
        layer = _layer(module)
        if layer in COMMANDS + PASSTHROUGH or module == "longlora_jax":
            continue  # commands and the package's public names sit on top
        for imported, line, _ in _project_imports(module, path):
            target = _layer(imported)
            where = f"{path.relative_to(REPO_ROOT)}:{line} ({layer}) imports {imported}"
            if target not in rank:
                bad.append(f"{where}, which is in no layer below the commands ({target})")
            elif rank[target] > rank[layer]:
                bad.append(f"{where} ({target}, a higher layer)")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_inside_a_layer():
    graph: dict[str, set[str]] = {}
    for module, path in _modules():
        graph[module] = {imported for imported, _, local in _project_imports(module, path)
                         if not local and imported != module
                         and _layer(imported) == _layer(module) != "root"}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_a_stale_import_path_is_no_module():
    assert _is_module("longlora_jax.parallel.mesh") and _is_module("longlora_jax.cli")
    assert not _is_module("longlora_jax.sharding")


def test_the_module_walk_fails_on_an_empty_package(tmp_path):
    with pytest.raises(AssertionError, match="no modules found"):
        _modules(tmp_path)


def test_public_names_come_from_low_layers():
    """`import longlora_jax` loads the model layer, not training or the commands."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    for imported, _, _ in _project_imports("longlora_jax", PACKAGE / "__init__.py"):
        assert rank.get(_layer(imported), len(LAYERS)) <= rank["modeling"], imported


def test_no_function_local_imports():
    """Imports sit at the top of a module (no hidden cycles), except optional peers."""
    local = [f"{path.relative_to(REPO_ROOT)}:{line} imports {imported}"
             for module, path in _modules()
             for imported, line, inside in _imports(path, module)
             if inside and imported.split(".")[0] not in LAZY_OK]
    assert not local, "\n".join(local)


def test_the_layers_test_would_catch_an_upward_import(tmp_path):
    """The walk sees `from longlora_jax.training import x` inside a modeling function."""
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from longlora_jax.training.loop import train\n")
    found = list(_imports(path, "longlora_jax.modeling.bad"))
    assert found == [("longlora_jax.training.loop", 2, True)]


# ----------------------------------------------------------------------------- commands

BAD_ARGUMENTS = {
    "train": ["--config", "configs/tiny_cpu.py", "--workdir", "{tmp}", "--config.lora.rnk=4"],
    "evaluate": ["--model", "preset:tiny", "--lengths", "12a"],
    "generate": ["--model", "preset:tiny", "--prompt", "hi", "--temperature", "hot"],
    "export": ["--workdir", "{tmp}/nothing", "--out", "{tmp}/out"],
    "aot": ["--config", "configs/tiny_cpu.py", "--topology", "v9-8"],
    "bench": ["attention", "--heads", "nine"],
    "assets": ["fetch", "everything"],
    "miniature": ["--quick", "maybe"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_turns_bad_input_into_one_error_line(command, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in BAD_ARGUMENTS[command]]
    proc = subprocess.run([sys.executable, "-m", f"longlora_jax.{command}", *argv],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == "", proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    argv = ["attention", "--help"] if command == "bench" else (
        ["fetch", "--help"] if command == "assets" else ["--help"])
    proc = subprocess.run([sys.executable, "-m", f"longlora_jax.{command}", *argv],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "python -m longlora_jax" in proc.stdout and proc.stderr == ""
