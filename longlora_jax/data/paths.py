"""`data.paths` entries (files, directories, glob patterns) -> a sorted list of files."""

from __future__ import annotations

import glob
import pathlib
from collections.abc import Sequence

from longlora_jax.errors import DataError


def resolve_paths(paths: str | Sequence[str], *, source: str) -> list[pathlib.Path]:
    """Expands files, directories (every non-hidden file below, sorted) and globs, in order.

    Raises DataError naming the first entry that does not exist or matches nothing.
    """
    entries = [paths] if isinstance(paths, str) else list(paths)
    if not entries:
        raise DataError(f"data.source={source!r} needs data.paths; got none")
    files: list[pathlib.Path] = []
    for entry in entries:
        path = pathlib.Path(entry).expanduser()
        if any(ch in str(entry) for ch in "*?["):
            found = sorted(pathlib.Path(p) for p in glob.glob(str(path), recursive=True))
            found = [p for p in found if p.is_file()]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".")
                                                      for part in p.relative_to(path).parts))
        elif path.is_file():
            found = [path]
        else:
            raise DataError(f"data.paths entry {str(entry)!r} does not exist "
                            f"(source {source!r})")
        if not found:
            raise DataError(f"data.paths entry {str(entry)!r} matches no file (source {source!r})")
        files.extend(found)
    return files
