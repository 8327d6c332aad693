"""What every benchmark shares: side-by-side timing, the machine's description, the report.

Speed and memory are measured as ratios of variants timed in one process, round-robin (load
drifts on a shared machine hit every variant alike), never as absolute timed assertions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from longlora_jax.cli.renames import Renamed


@dataclasses.dataclass
class Variant:
    """One implementation, ready to time: `run()` does one unit of work (blocking)."""

    name: str
    run: Callable[[], Any] | None  # None: not timed (see `skipped`)
    flops: float | None = None
    temp_bytes: int | None = None
    compile_seconds: float | None = None
    skipped: str | None = None
    seconds: list[float] = dataclasses.field(default_factory=list)


# Retired spellings of the timing settings, accepted (with a warning) until the next release.
TIMING_RENAMED = (Renamed("max_seconds", "timeout_s"),)


def timing_config(*, timeout_s: float) -> ml_collections.ConfigDict:
    """repeats (timed runs; the min is reported), warmup, timeout_s (a variant whose runs
    took this long sits the remaining rounds out), torch (time the PyTorch peer), json."""
    return ml_collections.ConfigDict(dict(repeats=3, warmup=1, timeout_s=timeout_s,
                                          torch=True, json=""))


def time_round_robin(variants: Sequence[Variant], config: ml_collections.ConfigDict) -> None:
    """Warm-up run(s), then `repeats` rounds over all variants; after its first timed run, a
    variant whose runs took `timeout_s` sits the remaining rounds out. A variant that runs
    out of device memory (XLA's RESOURCE_EXHAUSTED) is marked skipped and not run again."""

    def timed_run(v: Variant) -> float:
        start = time.perf_counter()
        try:
            v.run()
        except jax.errors.JaxRuntimeError as e:  # out of memory is a result, not a crash
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            v.run, v.skipped = None, "out of memory"
            return 0.0
        return time.perf_counter() - start

    warm = {v.name: [timed_run(v) for _ in range(config.warmup) if v.run] for v in variants}
    for _ in range(config.repeats):
        for v in variants:
            if v.run and (sum(v.seconds) + sum(warm[v.name]) < config.timeout_s
                          or not v.seconds):
                seconds = timed_run(v)
                if v.run:
                    v.seconds.append(seconds)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """rows -> a GitHub markdown table with the given column order (None prints as "-")."""

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """The backend, devices, CPU count and jax version the numbers were measured on."""
    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(), "jax": jax.__version__}


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def report(rows: list[dict[str, Any]], columns: Sequence[str], json_path: str,
           meta: dict[str, Any]) -> None:
    """Prints the markdown table and (with `json_path`) writes {"meta", "rows"} as JSON."""
    print(markdown_table(rows, columns))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": {**machine(), **meta}, "rows": rows}, f, indent=2)
