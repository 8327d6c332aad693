"""Attention kernels against PyTorch peers doing the same work: `python -m longlora_jax.bench
attention`.

Forward + backward, fp32, batch 1, G = N/4 by default, for each length and head shape, four
variants: our S2 ("s2") and the official S2 in PyTorch ("torch_s2": roll, SDPA per group, roll
back; `benchmarks.torch_peers`), both with the wrap-around roll by default so they compute the
same thing; our full causal attention ("full") and PyTorch's fused causal SDPA ("torch"). Wall
time (round-robin, min of the repeats), the compiled XLA FLOPs (cost analysis of an unrolled
copy: XLA counts a loop body once) and compiled temporary memory. Ratios are reported apart:
ours against the peer on the same algorithm (implementation), and S2 against full attention
(algorithm: S2 does about a quarter of the work).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from longlora_jax.benchmarks import torch_peers
from longlora_jax.benchmarks.common import (
    TIMING_RENAMED,
    Variant,
    physical_memory_bytes,
    report,
    time_round_robin,
    timing_config,
)
from longlora_jax.cli.renames import Renamed
from longlora_jax.errors import ConfigError
from longlora_jax.modeling import attention, kernels


@dataclasses.dataclass(frozen=True)
class HeadShape:
    """Hq query heads of dim D reading Hkv kv heads, parsed from "HqxD" or "HqxD/Hkv"."""

    hq: int
    d: int
    hkv: int

    @classmethod
    def parse(cls, text: str) -> HeadShape:
        try:
            heads, _, kv = text.partition("/")
            hq, d = (int(x) for x in heads.split("x"))
            return cls(hq, d, int(kv) if kv else hq)
        except ValueError:
            raise ConfigError(
                f"heads {text!r} must look like 9x64/3 (Hq x head_dim / Hkv) or 32x128"
            ) from None

    def __str__(self):
        return f"{self.hq}x{self.d}" + (f"/{self.hkv}" if self.hkv != self.hq else "")


def _jax_variant(name, attn, inputs, budget: int, cost_attn=None) -> Variant:
    """Compiles q, k, v, dout -> (dq, dk, dv) for `attn`; FLOPs from `cost_attn` (unrolled)."""

    def fwd_bwd(fn):
        def run(q, k, v, dout):
            return jax.vjp(fn, q, k, v)[1](dout)

        return jax.jit(run)

    compiled = fwd_bwd(attn).lower(*inputs).compile()
    with mock.patch.object(kernels, "SCORES_PER_STEP", 1 << 62):  # one step: loops unrolled
        costed = fwd_bwd(cost_attn or attn).lower(*inputs).compile()
    variant = Variant(name, None, flops=costed.cost_analysis().get("flops"),
                       temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
    if variant.temp_bytes > budget:
        variant.skipped = f"needs {variant.temp_bytes / 2**30:.0f} GiB temp"
    else:
        variant.run = lambda: jax.block_until_ready(compiled(*inputs))
    return variant


def _torch_variants(inputs, hs: HeadShape, group: int) -> list[Variant]:
    """PyTorch's fused causal SDPA ("torch") and the official S2 on it ("torch_s2")."""
    import torch  # the peers; imported only when asked for

    q, k, v, dout = (torch.from_numpy(np.array(x)).transpose(1, 2).contiguous()
                     for x in inputs)  # [B, H, N, D]
    for x in (q, k, v):
        x.requires_grad_(True)

    def timed(attend):
        def run():
            attend().backward(dout)
            q.grad = k.grad = v.grad = None

        return run

    full = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=hs.hkv != hs.hq))
    s2 = timed(lambda: torch_peers.s2_attention(q, k, v, group))
    return [Variant("torch", full), Variant("torch_s2", s2)]


def _attention_case(n: int, hs: HeadShape, config) -> dict[str, Any]:
    group = max(2, round(n * config.attention.group_size_ratio) // 2 * 2)
    rng = np.random.default_rng(0)
    inputs = [jnp.asarray(rng.standard_normal((config.batch, n, h, hs.d)), jnp.float32)
              for h in (hs.hq, hs.hkv, hs.hkv, hs.hq)]
    budget = int(config.memory_gb * 2**30)
    wrap = config.attention.wrap
    variants = [
        _jax_variant("s2", lambda q, k, v: attention.s2_attention(q, k, v, group_size=group,
                                                                  wrap=wrap), inputs, budget),
        _jax_variant("full", lambda q, k, v: attention.causal_attention(q, k, v), inputs, budget),
    ]
    if config.torch:
        if not wrap:
            raise ConfigError("the official S2 peer always wraps around; "
                              "attention.wrap=False needs torch=False")
        variants += _torch_variants(inputs, hs, group)
    time_round_robin([v for v in variants if v.run is not None], config)
    by_name = {v.name: v for v in variants}
    row: dict[str, Any] = {"N": n, "heads": str(hs), "G": group}
    for v in variants:
        row[f"{v.name} s"] = min(v.seconds) if v.seconds else v.skipped
        if v.flops is not None:
            row[f"{v.name} GFLOP"] = v.flops / 1e9
        if v.temp_bytes is not None:
            row[f"{v.name} temp MiB"] = v.temp_bytes / 2**20
    s2 = by_name["s2"]

    def ratio(a, b):
        return a / b if a and b else None

    for ours, peer, column in (("s2", "torch_s2", "S2: ours vs torch"),
                               ("full", "torch", "full: ours vs torch"),
                               ("s2", "full", "S2 vs full (ours)"),
                               ("torch_s2", "torch", "S2 vs full (torch)")):
        if peer in by_name and by_name[ours].seconds and by_name[peer].seconds:
            row[column] = min(by_name[peer].seconds) / min(by_name[ours].seconds)
    row["FLOPs S2/full"] = ratio(s2.flops, by_name["full"].flops)
    row["temp S2/full"] = ratio(s2.temp_bytes, by_name["full"].temp_bytes)
    return row


_ATTENTION_COLUMNS = (
    "N", "heads", "G", "s2 s", "torch_s2 s", "full s", "torch s", "S2: ours vs torch",
    "full: ours vs torch", "S2 vs full (ours)", "S2 vs full (torch)", "FLOPs S2/full",
    "temp S2/full", "s2 GFLOP", "full GFLOP", "s2 temp MiB", "full temp MiB",
)


# Retired spellings, accepted (with a warning) until the next release.
RENAMED = (*TIMING_RENAMED, Renamed("group_ratio", "attention.group_size_ratio"),
           Renamed("memory_budget_gb", "memory_gb"))


def default_config() -> ml_collections.ConfigDict:
    """lengths, heads ("HqxD/Hkv", e.g. SmolLM2's 9x64/3), attention.group_size_ratio (G / N),
    attention.wrap (our S2 with the wrap-around roll, as the official peer; False needs
    torch=False), batch, memory_gb (variants whose compiled temporaries exceed it are not
    timed), quick (N 2048,8192 and heads 9x64/3, 2 repeats), and the timing settings
    (`common`)."""
    c = timing_config(timeout_s=60.0)
    c.lengths = (2048, 8192, 16384)
    c.heads = ("9x64/3", "32x128")
    c.attention = ml_collections.ConfigDict(dict(group_size_ratio=0.25, wrap=True))
    c.batch = 1
    c.memory_gb = 0.4 * physical_memory_bytes() / 2**30
    c.quick = False
    return c


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Ours vs the PyTorch peers (S2 and full), fwd+bwd, fp32, per length x head shape."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.quick:
        config.lengths, config.heads, config.repeats = (2048, 8192), ("9x64/3",), 2
    rows = []
    for hs in map(HeadShape.parse, config.heads):
        for n in config.lengths:
            rows.append(_attention_case(n, hs, config))
            print(f"done N={n} heads={hs}", flush=True)
    meta = {"command": "attention",
            "group_size_ratio": config.attention.group_size_ratio,
            "wrap": config.attention.wrap, "batch": config.batch,
            "repeats": config.repeats, "dtype": "float32",
            "timing": "min wall seconds of forward+backward, variants interleaved"}
    report(rows, _ATTENTION_COLUMNS, config.json, meta)
    return rows
