"""Old spellings of config keys, kept working for one release with a deprecation warning.

A command lists its retired keys as `Renamed(old, new)`; `--config.OLD=VALUE` on the command
line and an OLD key left in a `--config FILE` then land on NEW, each with one FutureWarning
naming both keys (a command prints it as one `warning: ...` line). `fold` merges an old key
that now is part of a new one (`rope.factor` into `rope.scaling`): (value of new, old value)
-> value of new.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Renamed:
    old: str
    new: str
    fold: Callable[[Any, Any], Any] | None = None


def warn_renamed(old: str, new: str) -> None:
    """The deprecation warning for one retired key."""
    warnings.warn(f"config key {old!r} is deprecated and will be removed in the next release; "
                  f"use {new!r}", FutureWarning, stacklevel=3)


def lookup(renames: Sequence[Renamed], key: str) -> Renamed | None:
    """The rename of the dotted `key`, if it is a retired spelling."""
    return next((r for r in renames if r.old == key), None)


def _node(config: ml_collections.ConfigDict, dotted: str):
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None, leaf
        node = node[part]
    return (node if isinstance(node, ml_collections.ConfigDict) else None), leaf


def upgrade(config: ml_collections.ConfigDict, renames: Sequence[Renamed]) -> None:
    """Moves every retired key present in `config` (e.g. set by a config file) to its new key."""
    for rename in renames:
        node, leaf = _node(config, rename.old)
        if node is None or leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
            continue
        value = node[leaf]
        del node[leaf]
        warn_renamed(rename.old, rename.new)
        target, new_leaf = _node(config, rename.new)
        target[new_leaf] = rename.fold(target[new_leaf], value) if rename.fold else value
