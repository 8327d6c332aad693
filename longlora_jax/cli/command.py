"""One command-line scheme and one error convention for every command.

    python -m longlora_jax.CMD [WORD ...] [--config FILE[:VARIANT]] [--config.a.b=VALUE ...]
                                          [--KEY=VALUE ...]

A command reads one `ml_collections.ConfigDict`: its own default, or `--config FILE` (required
where the command has no default, as `train`). `--config.a.b=VALUE` (or `--config.a.b VALUE`)
overrides any key; a top-level key, and the few short names a command declares, may drop the
`config.` prefix (`--workdir DIR`, `--lengths 2048,4096`, `--model smollm2`); a bool key given
without a value is set to true; a tuple key given again accumulates (`--model a --model b`).
Bare words fill the keys a command names as positional (`bench train`, `assets fetch books`).

`run_command` returns the exit status: 0 on success, 2 with one line `error: ...` on stderr
for a `UserError` (bad input); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence

import ml_collections

from longlora_jax.cli import overrides, renames, startup
from longlora_jax.errors import ConfigError, UserError, first_line


@dataclasses.dataclass(frozen=True)
class Command:
    """A command: how to build its config, and the one library call it makes with it.

    name: as typed after `python -m longlora_jax.` (and a subcommand word, if any).
    doc: the help text (the command module's docstring).
    run: config -> exit status (None = 0).
    default_config: the command's own config; None means `--config FILE` is required.
    positional: config keys that bare words fill, in order.
    aliases: short flag name -> config key, beyond the automatic top-level ones.
    required: keys that must end up non-empty.
    renamed: retired spellings of keys, still accepted for one release (`cli.renames`).
    """

    name: str
    doc: str
    run: Callable[[ml_collections.ConfigDict], int | None]
    default_config: Callable[[], ml_collections.ConfigDict] | None = None
    positional: tuple[str, ...] = ()
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    required: tuple[str, ...] = ()
    renamed: tuple[renames.Renamed, ...] = ()


def _help(command: Command, config: ml_collections.ConfigDict | None) -> str:
    lines = [command.doc.strip(), "", "config keys (--config.KEY=VALUE; top-level keys also "
             "as --KEY=VALUE):"]
    if config is None:
        lines.append("  (from --config FILE)")
    else:
        lines += [f"  {key} = {value!r}" for key, value in overrides.flat_items(config)]
    if command.aliases:
        lines.append("short names: " + ", ".join(
            f"--{alias} = --config.{key}" for alias, key in command.aliases.items()))
    return "\n".join(lines)


def _split(arg: str) -> tuple[str, str | None]:
    name, eq, value = arg[2:].partition("=")
    return name, (value if eq else None)


def _config_file(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a FILE (e.g. --config configs/demo_cpu.py)")
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse(command: Command, argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The command's config with `argv` applied (see the module docstring).

    Raises ConfigError for anything it cannot use; prints help and exits 0 for -h/--help.
    """
    argv = list(argv)
    path = _config_file(argv)
    if path is not None:
        config = overrides.load_config_file(path)
    elif command.default_config is not None:
        config = command.default_config()
    elif any(a in ("-h", "--help") for a in argv):
        config = None
    else:
        raise ConfigError(f"{command.name} needs --config FILE (e.g. --config "
                          "configs/demo_cpu.py)")
    if any(a in ("-h", "--help") for a in argv):
        print(_help(command, config))
        raise SystemExit(0)
    config = ml_collections.ConfigDict(config.to_dict())  # the caller's object stays as it was
    if path is not None:
        renames.upgrade(config, command.renamed)
    aliases = {k.replace("-", "_"): v for k, v in command.aliases.items()}
    words: list[str] = []
    given: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--config" or arg.startswith("--config="):
            i += arg == "--config"
            continue
        if not arg.startswith("--"):
            words.append(arg)
            continue
        name, value = _split(arg)
        if name.startswith("config."):
            key = name[len("config."):]
        else:
            key = aliases.get(name.replace("-", "_"), name.replace("-", "_"))
            top = key.split(".")[0]
            if (key == name.replace("-", "_") and renames.lookup(command.renamed, key) is None
                    and (top != key or top not in config)):
                raise ConfigError(f"unknown option --{name}; use --config.KEY=VALUE (see --help)")
        rename = renames.lookup(command.renamed, key)
        if rename is not None:
            renames.warn_renamed(rename.old, rename.new)
            key = rename.new
        if value is None:
            if _is_bool(config, key):
                value = "true"
            elif i < len(argv):
                value, i = argv[i], i + 1
            else:
                raise ConfigError(f"--{name} needs a value")
        if rename is not None and rename.fold is not None:
            value = rename.fold(_get(config, key), value)
        overrides.set_key(config, key, value, accumulate=key in given)
        given.add(key)
    if len(words) > len(command.positional):
        extra = words[len(command.positional):]
        raise ConfigError(f"unexpected argument(s) {' '.join(extra)!r}; {command.name} takes "
                          f"{len(command.positional)} word(s)"
                          + (f": {', '.join(command.positional)}" if command.positional else ""))
    for key, word in zip(command.positional, words, strict=False):
        overrides.set_key(config, key, word)
    return config


def check_required(command: Command, config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first required key that is empty."""
    for key in command.required:
        if not _get(config, key):
            flag = f"--{key}" if "." not in key else f"--config.{key}"
            raise ConfigError(f"{key} is required ({flag}=...)")


def _get(config: ml_collections.ConfigDict, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _is_bool(config: ml_collections.ConfigDict, key: str) -> bool:
    try:
        return isinstance(_get(config, key), bool)
    except KeyError:
        return False


def run_command(command: Command, argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (default sys.argv[1:]) and runs the command; returns the exit status."""
    startup.quiet_accelerator_probing()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            config = parse(command, sys.argv[1:] if argv is None else argv)
        check_required(command, config)
        return int(command.run(config) or 0)
    except UserError as err:
        print(f"error: {first_line(err)}", file=sys.stderr, flush=True)
        return 2


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning about the command line as one `warning: ...` line (deprecated keys)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def dispatch(name: str, doc: str, subcommands: Mapping[str, Command],
             argv: Sequence[str] | None = None) -> int:
    """A command made of subcommands chosen by its first word (`bench train`, `assets fetch`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(doc.strip() + "\n\nsubcommands: " + ", ".join(subcommands))
        return 0 if argv else 2
    if argv[0] not in subcommands:
        print(f"error: unknown {name} subcommand {argv[0]!r}; valid: {', '.join(subcommands)}",
              file=sys.stderr)
        return 2
    return run_command(subcommands[argv[0]], argv[1:])
