"""The package's layers import only downwards, and every command speaks the same error language.

Walks every module's imports (module level and inside functions) with `ast`: a module may
import its own layer and the layers listed before it, never one after. The package root holds
the commands (which may import anything), `errors` and the public names.
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
# Third-party imports allowed inside functions: optional peers, imported only when asked for.
LAZY_OK = {"torch", "peft", "transformers"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        yield ".".join(("longlora_jax", *rel.parts)).removesuffix(".__init__"), path


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
                # `from longlora_jax import x` imports the module longlora_jax.x when x is one
                name = f"{base}.{alias.name}" if base == "longlora_jax" else base
                yield name, node.lineno, local


def test_every_module_is_in_a_layer():
    for module, _ in _modules():
        layer = _layer(module)
        if layer == "root":
            continue
        assert layer in LAYERS or layer in COMMANDS, f"{module} is in no layer"


def test_layers_import_only_downwards():
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for module, path in _modules():
        layer = _layer(module)
        if layer in COMMANDS or module == "longlora_jax":
            continue  # commands and the package's public names sit on top
        for imported, line, _ in _imports(path, module):
            if not imported.startswith("longlora_jax"):
                continue
            target = _layer(imported)
            if target in COMMANDS or target == "root" or rank[target] > rank[layer]:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{line} ({layer}) imports "
                           f"{imported} ({target})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_public_names_come_from_low_layers():
    """`import longlora_jax` loads the model layer, not training or the commands."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    for imported, _, _ in _imports(PACKAGE / "__init__.py", "longlora_jax"):
        if imported.startswith("longlora_jax."):
            assert rank[_layer(imported)] <= rank["modeling"], imported


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
