"""One vocabulary: every setting has one key, spelled the same in every command's config.

The table below is the vocabulary (written out here, not read from the code it checks): each
setting, the key that spells it, the commands whose `--help` must show that key, and the
spellings it retired, which no command's `--help` may show any more but which still work for
one release with a deprecation warning. Also: every subpackage's docstring names all its
modules.
"""

import ast
import contextlib
import io
import pathlib
import re
import warnings

import pytest

from longlora_jax import aot, assets, bench, evaluate, export, generate, miniature, train
from longlora_jax.cli import parse, run_command
from longlora_jax.modeling.config import RopeScaling
from longlora_jax.training.config import model_config
from tests.helpers import REPO_ROOT, TINY_CONFIG

TRAINING = ("train", "aot")
# setting: (its key, commands that have it, retired spellings)
VOCABULARY = {
    "S2 group size / length": ("attention.group_size_ratio",
                               (*TRAINING, "evaluate", "bench attention", "bench train"),
                               ("group_ratio", "group_size_ratio", "s2_group_size_ratio")),
    "RoPE scaling (base|default|linear:F|dynamic:F|yarn:F)": (
        "rope.scaling", (*TRAINING, "evaluate", "generate"), ("rope", "rope.type", "rope.factor")),
    "attentions evaluated with": ("attention.eval", ("evaluate",), ("attention",)),
    "windows per forward in evaluation": ("eval.batch", (*TRAINING, "evaluate"), ()),
    "evaluation windows": ("eval.protocol", (*TRAINING, "evaluate"), ("protocol",)),
    "windows per evaluation": ("eval.max_windows", (*TRAINING, "evaluate"), ("max_windows",)),
    "official-protocol stride": ("eval.stride", ("evaluate",), ("stride",)),
    "frozen weights' storage dtype": ("model.frozen_dtype", (*TRAINING, "bench train"),
                                      ("frozen_dtype",)),
    "rematerialization": ("model.remat", (*TRAINING, "bench train"), ("remat",)),
    "memory budget (GiB)": ("memory_gb", ("bench attention", "bench longest"),
                            ("memory_budget_gb", "memory_budget")),
    "time limit (seconds)": ("timeout_s", ("bench attention", "bench train", "bench longest"),
                             ("max_seconds",)),
}
# Sections of the training config: a section everywhere, never a single value.
SECTIONS = ("attention", "rope", "eval", "data", "mesh")

COMMANDS = {
    "train": (train.COMMAND, ["--config", TINY_CONFIG]),
    "aot": (aot.COMMAND, []),
    "evaluate": (evaluate.COMMAND, []),
    "generate": (generate.COMMAND, []),
    "export": (export.COMMAND, []),
    "miniature": (miniature.COMMAND, []),
    **{f"bench {name}": (command, []) for name, command in bench.SUBCOMMANDS.items()},
    **{f"assets {name}": (command, []) for name, command in assets.SUBCOMMANDS.items()},
}


def _help(name: str) -> str:
    command, argv = COMMANDS[name]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse(command, [*argv, "--help"])
    return out.getvalue()


def _keys(help_text: str) -> set[str]:
    """The config keys a --help lists (`  key = value` lines)."""
    return {m.group(1) for m in re.finditer(r"^  ([\w.]+) = ", help_text, re.M)}


def _flags(help_text: str) -> set[str]:
    """Every `--name` the help text spells (short names, examples), as a key."""
    return {m.group(1).replace("-", "_").removeprefix("config.")
            for m in re.finditer(r"--([\w.-]+)", help_text)}


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {name: _help(name) for name in COMMANDS}


@pytest.mark.parametrize("setting", VOCABULARY)
def test_every_command_spells_the_setting_with_its_key(setting, helps):
    key, commands, _ = VOCABULARY[setting]
    missing = [name for name in commands if key not in _keys(helps[name])]
    assert not missing, f"{setting}: {key} missing from the --help of {missing}"


@pytest.mark.parametrize("name", COMMANDS)
def test_no_help_spells_a_retired_key(name, helps):
    retired = {old for _, _, olds in VOCABULARY.values() for old in olds}
    text = helps[name]
    short_names = set(COMMANDS[name][0].aliases)  # `--rope` is rope.scaling's short name
    assert not retired & _keys(text), f"{name} --help lists retired keys"
    assert not retired & (_flags(text) - short_names), f"{name} --help spells a retired --flag"
    sections_as_values = {key for key in _keys(text) if key in SECTIONS}
    assert not sections_as_values, f"{name}: {sections_as_values} are sections elsewhere"


OLD_SPELLINGS = [
    ("evaluate", ["--group_size_ratio", "0.5"], "attention.group_size_ratio", 0.5),
    ("evaluate", ["--config.batch=3"], "eval.batch", 3),
    ("evaluate", ["--attention", "full,s2"], "attention.eval", ("full", "s2")),
    ("evaluate", ["--max-windows", "2"], "eval.max_windows", 2),
    ("generate", ["--config.rope=linear:2"], "rope.scaling", "linear:2"),
    ("bench attention", ["--group_ratio", "0.5"], "attention.group_size_ratio", 0.5),
    ("bench attention", ["--memory_budget_gb=2"], "memory_gb", 2.0),
    ("bench train", ["--max_seconds", "5"], "timeout_s", 5.0),
    ("bench train", ["--frozen_dtype", "bfloat16"], "model.frozen_dtype", "bfloat16"),
    ("train", ["--config.rope.type=yarn", "--config.rope.factor=4"], "rope.scaling", "yarn:4"),
    ("train", ["--config.rope.type=none"], "rope.scaling", "base"),
]


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("name, argv, key, value", OLD_SPELLINGS)
def test_an_old_spelling_still_works_and_warns(name, argv, key, value):
    command, base = COMMANDS[name]
    with pytest.warns(FutureWarning, match=re.escape(repr(key))):
        config = parse(command, [*base, *argv])
    assert _get(config, key) == value


def test_old_keys_in_a_config_file_still_work(tmp_path):
    path = tmp_path / "old.py"
    path.write_text(f"import runpy\n\ndef get_config():\n"
                    f"    c = runpy.run_path({TINY_CONFIG!r})['get_config']()\n"
                    "    c.rope.type = 'dynamic'\n    c.rope.factor = 2.0\n    return c\n")
    with pytest.warns(FutureWarning, match="'rope.factor'"):
        config = parse(train.COMMAND, ["--config", str(path)])
    assert config.rope.scaling == "dynamic:2" and "type" not in config.rope


def test_old_and_new_spelling_build_the_same_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = parse(train.COMMAND, ["--config", TINY_CONFIG, "--config.rope.type=linear",
                                    "--config.rope.factor=4"])
    new = parse(train.COMMAND, ["--config", TINY_CONFIG, "--rope", "linear:4"])
    assert model_config(old)[0] == model_config(new)[0]
    assert model_config(new)[0].rope_scaling == RopeScaling("linear", factor=4.0)


def test_a_command_prints_the_deprecation_as_one_warning_line(capsys):
    code = run_command(train.COMMAND, ["--config", TINY_CONFIG, "--config.rope.factor=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: workdir is required")
    assert err[:-1] == ["warning: config key 'rope.factor' is deprecated and will be removed in "
                        "the next release; use 'rope.scaling'"]


# ------------------------------------------------------------------- package docstrings

PACKAGES = sorted(p.parent for p in pathlib.Path(REPO_ROOT, "longlora_jax").glob("*/__init__.py"))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_every_module_is_named_in_its_package_docstring(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    modules = sorted(p.stem for p in package.glob("*.py") if p.name != "__init__.py")
    assert modules, f"{package.name} has no modules"
    missing = [m for m in modules if f"`{m}`" not in doc]
    assert not missing, f"longlora_jax.{package.name}'s docstring does not name {missing}"
