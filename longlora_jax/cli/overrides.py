"""Config files and `--config.a.b=value` overrides, with one-line errors.

A config file is a `.py` file with `get_config()` (optionally `get_config(variant)`, picked with
`FILE:VARIANT`) returning an `ml_collections.ConfigDict`. An override's text is parsed by the
type of the value it replaces: bools (`true`/`false`/`1`/`0`), ints, floats, strings, tuples
(`a,b,c` or a Python literal; elements typed like the default's) and dicts (a Python literal).
Keys must exist, except inside a section whose default is empty (e.g. `model.overrides`),
which takes new keys with literal values.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
from typing import Any

import ml_collections

from longlora_jax.errors import ConfigError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path.py` or `path.py:variant` -> the ConfigDict its `get_config` returns."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    if not path.endswith(".py"):
        raise ConfigError(f"config file {path!r} must be a .py file with get_config()")
    name = "_longlora_config_" + pathlib.Path(path).stem
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"config file {path!r} defines no get_config()")
    config = get_config(variant) if variant else get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() of {path!r} returned a {type(config).__name__}, "
                          "not an ml_collections.ConfigDict")
    return config


def _literal(key: str, text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"config key {key}: {text!r} is not a Python literal") from None


def _scalar(key: str, text: str, like: Any) -> Any:
    """`text` parsed as the type of `like` (bool, int, float or str)."""
    if isinstance(like, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key {key}: {text!r} is not a bool (true or false)")
    for kind, name in ((int, "an integer"), (float, "a number")):
        if isinstance(like, kind):
            try:
                return kind(text)
            except ValueError:
                raise ConfigError(f"config key {key}: {text!r} is not {name}") from None
    return text


def parse_value(key: str, text: str, current: Any) -> Any:
    """The value `text` means for a key whose current value is `current`."""
    if isinstance(current, tuple | list):
        if text.strip()[:1] in ("(", "["):
            value = _literal(key, text)
            return tuple(value) if isinstance(value, list | tuple) else (value,)
        like = current[0] if current else ""
        return tuple(_scalar(key, part.strip(), like) for part in text.split(",") if part.strip())
    if isinstance(current, ml_collections.ConfigDict | dict):
        value = _literal(key, text)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: {text!r} is not a dict literal")
        return value
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return _scalar(key, text, current)


def set_key(config: ml_collections.ConfigDict, dotted: str, text: str, *,
            accumulate: bool = False) -> None:
    """Applies one override `dotted=text` to `config` in place (ConfigError if it cannot).

    accumulate: a tuple key given again extends the value set earlier on the same command line.
    """
    parts = dotted.split(".")
    node: Any = config
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            _unknown(config, parts[:depth + 1])
        node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict):
        _unknown(config, parts)
    if leaf not in node:
        if len(node) or node is config:
            _unknown(config, parts)
        node[leaf] = parse_value(dotted, text, None)  # an open section (empty by default)
        return
    current = node[leaf]
    value = parse_value(dotted, text, current)
    if accumulate and isinstance(current, tuple):
        value = tuple(current) + tuple(value)
    try:
        node[leaf] = value
    except TypeError as err:
        raise ConfigError(f"config key {dotted}: {text!r} does not fit ({err})") from None


def _unknown(config: ml_collections.ConfigDict, parts: list[str]) -> None:
    node: Any = config
    for part in parts[:-1]:
        node = node[part]
    where = ".".join(parts[:-1]) or "the config"
    valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) \
        else "(none: not a section)"
    raise ConfigError(f"unknown config key {'.'.join(parts)!r}; keys of {where}: {valid}")


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf, in the config's order (for --help)."""
    items = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            items += flat_items(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items
