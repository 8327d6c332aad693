"""fp32 matmul rate, XLA vs PyTorch, on the train step's shapes: `python -m longlora_jax.bench
matmul`.

Both sides' train steps are mostly these matmuls (SmolLM2-135M's projections and LM head over
N tokens, forward and the two backward products), so the rate each library reaches here is
a ceiling on how far one step can pull ahead of the other at equal FLOPs. Same process,
interleaved, min of the timed runs; torch with its default threads (`torch.get_num_threads`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from longlora_jax.benchmarks.common import Variant, report, time_round_robin, timing_config
from longlora_jax.errors import ConfigError

# (name, K, M) of y[N, M] = x[N, K] @ w[K, M] in the SmolLM2-135M layer, and the LM head.
PROJECTIONS = (("q/o", 576, 576), ("k/v", 576, 192), ("gate/up", 576, 1536),
               ("down", 1536, 576), ("lm head chunk", 576, 49152))


def default_config() -> ml_collections.ConfigDict:
    """tokens (N rows; the LM head runs on `loss_chunk`-row chunks, as the step does), and
    the timing settings (`common`)."""
    c = timing_config(timeout_s=60.0)
    c.tokens = 8192
    c.loss_chunk = 1024
    c.repeats = 5
    return c


def _shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, rows, K, M) of every timed product: forward x @ w, backward dy @ w^T (dx) and
    x^T @ dy (dw), as [rows, K] @ [K, M] problems."""
    shapes = []
    for name, k, m in PROJECTIONS:
        rows = config.loss_chunk if name == "lm head chunk" else config.tokens
        shapes += [(f"{name} fwd", rows, k, m), (f"{name} dx", rows, m, k),
                   (f"{name} dw", k, rows, m)]
    return shapes


def _pair(rows: int, k: int, m: int) -> tuple[Variant, Variant]:
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((rows, k), np.float32), rng.standard_normal((k, m), np.float32)
    ja, jb, dot = jax.device_put(a), jax.device_put(b), jax.jit(jnp.dot)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return (Variant("xla", lambda: dot(ja, jb).block_until_ready()),
            Variant("torch", lambda: torch.mm(ta, tb)))


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """GFLOP/s of each product on each side and their ratio; a last row totals them."""
    import torch

    if not config.torch:
        raise ConfigError("torch=False: bench matmul measures XLA against torch; valid: True")
    rows, totals = [], {"xla": 0.0, "torch": 0.0}
    for name, n, k, m in _shapes(config):
        variants = _pair(n, k, m)
        time_round_robin(variants, config)
        flops = 2 * n * k * m
        best = {v.name: min(v.seconds) for v in variants}
        for side in totals:
            totals[side] += best[side]
        rows.append({"product": name, "shape": f"[{n},{k}]x[{k},{m}]",
                     "XLA GFLOP/s": flops / best["xla"] / 1e9,
                     "torch GFLOP/s": flops / best["torch"] / 1e9,
                     "XLA vs torch": best["torch"] / best["xla"]})
    flops = sum(2 * n * k * m for _, n, k, m in _shapes(config))
    rows.append({"product": "all of the above", "shape": "-",
                 "XLA GFLOP/s": flops / totals["xla"] / 1e9,
                 "torch GFLOP/s": flops / totals["torch"] / 1e9,
                 "XLA vs torch": totals["torch"] / totals["xla"]})
    meta = {"command": "matmul", "dtype": "float32", "tokens": config.tokens,
            "torch_threads": torch.get_num_threads(),
            "timing": "min wall seconds of one product, the two sides interleaved"}
    report(rows, ("product", "shape", "XLA GFLOP/s", "torch GFLOP/s", "XLA vs torch"),
           config.json, meta)
    return rows
