"""Checksum manifests of checkpoint directories: `manifest.json` in a step's directory lists
every file of each item (relative path -> size in bytes and sha256), and `verify` says what no
longer holds, naming the item.

    {"version": 1, "algorithm": "sha256",
     "items": {"trainable": {"d/4860c4...": [1234, "9f86d0..."], ...}, "meta": {...}, ...}}

Verification first compares every listed file's size (a `stat` each: a truncated or missing
file is found without reading anything), then reads and hashes them in 1 MiB chunks: its cost
is one sequential read of the items verified. Files an item holds that the manifest does not
list are ignored. No jax here; `io.run` and `training.checkpoint` decide when to write and
verify (see `training.checkpoint` for the rules).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

MANIFEST = "manifest.json"
VERSION = 1
ALGORITHM = "sha256"
_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.new(ALGORITHM)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(item_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in item_dir.rglob("*") if p.is_file())


def build(step_dir: str | os.PathLike, items: Iterable[str]) -> dict[str, Any]:
    """The manifest of `items` (subdirectories of `step_dir`): every file, its size and hash."""
    step_dir = pathlib.Path(step_dir)
    listed: dict[str, dict[str, list]] = {}
    for item in items:
        item_dir = step_dir / item
        if not item_dir.is_dir():
            raise FileNotFoundError(f"checkpoint item {item!r} is missing: {item_dir}")
        listed[item] = {p.relative_to(item_dir).as_posix(): [p.stat().st_size, file_digest(p)]
                        for p in _files(item_dir)}
    return {"version": VERSION, "algorithm": ALGORITHM, "items": listed}


def write(step_dir: str | os.PathLike, items: Iterable[str]) -> pathlib.Path:
    """Writes `step_dir/manifest.json` for `items` (under a temporary name, synced, then
    renamed: a torn manifest is never left behind); returns its path."""
    step_dir = pathlib.Path(step_dir)
    text = json.dumps(build(step_dir, items), indent=1, sort_keys=True)
    path, tmp = step_dir / MANIFEST, step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def exists(step_dir: str | os.PathLike) -> bool:
    """Whether `step_dir` has a manifest (valid or not)."""
    return (pathlib.Path(step_dir) / MANIFEST).is_file()


def verify(step_dir: str | os.PathLike, items: Iterable[str] | None = None) -> str | None:
    """None when `items` (default: every item the manifest lists) match the manifest; else
    what does not, one phrase naming the item ("item 'trainable' is damaged: ...").

    The manifest itself missing or unreadable is a problem too ("its manifest ..."); callers
    that accept checkpoints without one check `exists` first.
    """
    step_dir = pathlib.Path(step_dir)
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        listed = manifest["items"]
        if manifest.get("algorithm", ALGORITHM) != ALGORITHM:
            return f"its {MANIFEST} uses {manifest['algorithm']!r}, not {ALGORITHM}"
    except FileNotFoundError:
        return f"its {MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST} is damaged ({type(err).__name__}: {err})"
    wanted = list(listed) if items is None else list(items)
    for item in wanted:
        if item not in listed:
            return f"item {item!r} is not in its {MANIFEST}"
        if not (step_dir / item).is_dir():
            return f"item {item!r} is missing (no directory {item}/)"
    for item in wanted:  # sizes first: cheap, and catches truncation and missing files
        for rel, (size, _) in listed[item].items():
            path = step_dir / item / rel
            try:
                have = path.stat().st_size
            except OSError:
                return f"item {item!r} is damaged: file {rel} is missing"
            if have != size:
                what = "truncated" if have < size else "grown"
                return (f"item {item!r} is damaged: file {rel} is {have} bytes, the manifest "
                        f"says {size} ({what})")
    for item in wanted:
        for rel, (_, digest) in listed[item].items():
            try:
                have = file_digest(step_dir / item / rel)
            except OSError as err:
                return f"item {item!r} is damaged: file {rel} cannot be read ({err.strerror})"
            if have != digest:
                return f"item {item!r} is damaged: file {rel} fails its {ALGORITHM} checksum"
    return None
