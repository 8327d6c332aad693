"""Which step settings are fastest on this machine: `python -m longlora_jax.bench settings`.

Our LongLoRA train step as `bench train` builds it (S2-Attn G = N/4, LoRA+ r=8, chunked loss,
AdamW, fp32 compute) for every combination of `model.frozen_dtype` x `model.remat` x
`loss_chunk`, timed round-robin in one process (min of the timed steps). Each row: seconds
per step, its speed relative to `reference` (the setting a config uses), the step's
temporary memory from XLA's compiled memory analysis, and its compile time (what a short
run, or a test, mostly waits for). A combination whose temporaries exceed
`memory_fraction` of the host's memory is reported, not run. A config changes its setting
only where the difference exceeds the spread of the timed steps (docs/speed.md says which).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import jax
import ml_collections

from longlora_jax.benchmarks import train_step
from longlora_jax.benchmarks.common import (
    Variant,
    physical_memory_bytes,
    report,
    time_round_robin,
    timing_config,
)
from longlora_jax.errors import ConfigError
from longlora_jax.modeling.config import REMAT_POLICIES

FROZEN_DTYPES = ("bfloat16", "float32")


def default_config() -> ml_collections.ConfigDict:
    """lengths, preset and layers (the model's shape, as `bench train`), the grid
    (frozen_dtypes x remats x loss_chunks), reference ("frozen_dtype,remat,loss_chunk": the
    row the others are compared with), memory_fraction, attention.group_size_ratio, and the
    timing settings (`common`; `torch` is unused)."""
    c = timing_config(timeout_s=300.0)
    c.lengths = (2048,)
    c.preset = "smollm2-135m"
    c.layers = 30
    c.frozen_dtypes = FROZEN_DTYPES
    c.remats = ("none", "dots", "full")
    c.loss_chunks = (512, 1024, 2048)
    c.reference = "bfloat16,none,512"  # configs/demo_cpu.py before this benchmark
    c.memory_fraction = 0.7
    c.attention = ml_collections.ConfigDict(dict(group_size_ratio=0.25))
    return c


def _setting_name(frozen_dtype: str, remat: str, loss_chunk: int) -> str:
    return f"{frozen_dtype},{remat},{loss_chunk}"


def _check(config: ml_collections.ConfigDict) -> list[tuple[str, str, int]]:
    for key, values, valid in (("frozen_dtypes", config.frozen_dtypes, FROZEN_DTYPES),
                               ("remats", config.remats, REMAT_POLICIES)):
        if not values or set(values) - set(valid):
            raise ConfigError(f"{key}={tuple(values)}; valid: one or more of {', '.join(valid)}")
    bad = [n for n in config.loss_chunks for length in config.lengths if n < 1 or length % n]
    if not config.loss_chunks or bad:
        raise ConfigError(f"loss_chunks={tuple(config.loss_chunks)}; each must divide every "
                          f"length {tuple(config.lengths)}")
    grid = list(itertools.product(config.frozen_dtypes, config.remats, config.loss_chunks))
    if config.reference not in [_setting_name(*g) for g in grid]:
        raise ConfigError(f"reference={config.reference!r} is not in the grid; valid: "
                          + ", ".join(_setting_name(*g) for g in grid))
    return grid


def _variant(n: int, config: ml_collections.ConfigDict, frozen_dtype: str, remat: str,
             loss_chunk: int, budget: float, shared: dict[str, Any]) -> Variant:
    """One setting's step, compiled ahead of time. Every setting steps one shared optimizer
    state and one frozen base per dtype (`shared`), so the grid costs one model's memory."""
    setting = ml_collections.ConfigDict(dict(
        preset=config.preset, layers=config.layers, loss_chunk=loss_chunk,
        model=dict(remat=remat, frozen_dtype=frozen_dtype),
        attention=dict(group_size_ratio=config.attention.group_size_ratio)))
    step_fn, state, frozen, batch = train_step.our_step_parts(n, setting)
    shared.setdefault("state", state)
    frozen = shared.setdefault(frozen_dtype, frozen)
    start = time.perf_counter()
    compiled = step_fn.lower(shared["state"], frozen, batch).compile()
    compile_seconds = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    name = _setting_name(frozen_dtype, remat, loss_chunk)
    if temp > budget:
        return Variant(name, None, temp_bytes=temp, compile_seconds=compile_seconds,
                       skipped=f"temporaries {temp / 2**30:.1f} GiB > {budget / 2**30:.1f}")

    def run():
        shared["state"], metrics = compiled(shared["state"], frozen, batch)
        jax.block_until_ready(metrics)

    return Variant(name, run, temp_bytes=temp, compile_seconds=compile_seconds)


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Seconds per step for every setting at every length, relative to `reference`."""
    grid = _check(config)
    budget = config.memory_fraction * physical_memory_bytes()
    rows = []
    for n in config.lengths:
        shared: dict[str, Any] = {}
        variants = [_variant(n, config, *g, budget, shared) for g in grid]
        time_round_robin(variants, config)
        best = {v.name: min(v.seconds) if v.seconds else None for v in variants}
        reference = best[config.reference]
        for (frozen_dtype, remat, loss_chunk), v in zip(grid, variants, strict=True):
            rows.append({
                "N": n, "frozen_dtype": frozen_dtype, "remat": remat, "loss_chunk": loss_chunk,
                "s/step": best[v.name] or v.skipped, "seconds": v.seconds,
                "speed vs reference": reference / best[v.name]
                if reference and best[v.name] else None,
                "temp GiB": v.temp_bytes / 2**30, "compile s": v.compile_seconds})
        print(f"done N={n}", flush=True)
    meta = {"command": "settings", "model": f"{config.preset} shape, {config.layers} layers",
            "batch": 1, "mode": "lora_plus r=8",
            "attention": f"S2 G=N*{config.attention.group_size_ratio}",
            "reference": config.reference,
            "timing": "min wall seconds of a full optimizer step, variants interleaved"}
    report(rows, ("N", "frozen_dtype", "remat", "loss_chunk", "s/step", "speed vs reference",
                  "temp GiB", "compile s"), config.json, meta)
    return rows
