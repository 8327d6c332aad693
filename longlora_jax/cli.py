"""Shared command-line plumbing: `--config FILE [--config.a.b=v ...]` and one-line errors.

Configs are ml_collections `.py` files parsed by `ml_collections.config_flags`; overrides of
keys the config does not have, a missing file or a bad value end the program with one line
naming the problem, never a traceback. `run(main)` does the same for the project's own
input errors (bad config values, missing data, mismatched checkpoints).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags


class UsageError(ValueError):
    """The command line is wrong; the message says how."""


def _check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
    """Raises UsageError naming the first `--config.x.y=` override whose key is unknown."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config."):].split("=", 1)[0]
        node: Any = config
        walked = []
        for part in dotted.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = "config." + ".".join(walked) if walked else "config"
                valid = ", ".join(sorted(node.keys())) if isinstance(
                    node, ml_collections.ConfigDict) else "(none: not a section)"
                raise UsageError(
                    f"unknown config key {dotted!r} in {arg!r}; keys of {where}: {valid}"
                )
            walked.append(part)
            node = node[part]


def parse(
    argv: Sequence[str] | None,
    *,
    description: str,
    workdir: bool = False,
    define: Callable[[flags.FlagValues], None] | None = None,
) -> flags.FlagValues:
    """Parses `--config FILE`, its overrides, `--workdir` (if asked) and extra flags.

    `define(flag_values)` may declare more absl flags. Returns the parsed FlagValues
    (`.config` is the ConfigDict, `.workdir` the directory).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    full_argv = ["prog", *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (.py)",
                                    flag_values=values, lock_config=True, sys_argv=full_argv)
    if workdir:
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)",
                            flag_values=values)
    if define is not None:
        define(values)
    if any(a in ("-h", "--help", "--helpshort") for a in argv):
        print(description)
        print(values.get_help())
        raise SystemExit(0)
    config_path = _config_path(argv)
    if config_path is None:
        raise UsageError("--config FILE is required (e.g. --config configs/demo_cpu.py)")
    if not os.path.isfile(config_path.split(":", 1)[0]):
        raise UsageError(f"config file {config_path!r} does not exist")
    base = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=base,
                                    sys_argv=["prog", f"--config={config_path}"])
    base(["prog", f"--config={config_path}"])
    _check_overrides(base.config, argv)
    try:
        values(full_argv)
    except flags.Error as err:
        raise UsageError(str(err).splitlines()[0]) from None
    if workdir and not values.workdir:
        raise UsageError("--workdir DIR is required")
    return values


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (reported in one line, exit status 2)."""
    from longlora_jax.checkpointing import CheckpointMismatchError
    from longlora_jax.data.config import DataError
    from longlora_jax.io.hf import CheckpointError
    from longlora_jax.modeling.config import ConfigError
    from longlora_jax.modeling.lora import LoraError
    from longlora_jax.sharding import MeshError

    return (UsageError, ConfigError, DataError, CheckpointError, CheckpointMismatchError,
            LoraError, MeshError, FileNotFoundError)


def run(main: Callable[[], int]) -> int:
    """Calls `main()`; a user error becomes `error: <one line>` on stderr and status 2."""
    try:
        return main()
    except user_errors() as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
