"""Memory of a quantized frozen base: `python -m longlora_jax.bench quant` (its quality:
`--measure quality`, `benchmarks.quant_quality`).

For each scheme of `model.quantize` the base (SmolLM2-135M by default: real weights, offline)
is loaded in a subprocess of its own, as `evaluate`/`generate` load it (`io.run.load_model`,
quantized tensor by tensor as the safetensors are read): the bytes of its device arrays by
kind (codes of the quantized projections, their scales, the float rest: embeddings, norms,
head), the ratio of the projections' bytes to the unquantized ones, and the host's peak
resident memory during the load above what the process held before it. One child per scheme,
so one load's peak cannot hide another's.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from longlora_jax.benchmarks import quant_quality
from longlora_jax.benchmarks.common import report
from longlora_jax.errors import ConfigError
from longlora_jax.io.run import load_model
from longlora_jax.modeling import quant


def default_config() -> ml_collections.ConfigDict:
    """measure ("memory": this module's bytes; "quality": perplexity, `benchmarks.
    quant_quality`), model (a base: smollm2 | hf:DIR | gguf:FILE | preset:NAME), dtype (memory:
    of the unquantized weights and the scales; quality evaluates in fp32), schemes (the first
    is the reference of the ratios), json; quality only: peers (bitsandbytes_nf4,
    bitsandbytes_nf4_dq, hqq), length (tokens per window), eval.max_windows, data.source (an
    offline evaluation source)."""
    return ml_collections.ConfigDict(dict(
        measure="memory", model="smollm2", dtype="bfloat16", schemes=quant.SCHEMES, json="",
        peers=quant_quality.PEERS, length=2048, data=dict(source="offline_all"),
        eval=dict(max_windows=8)))


_CHILD = textwrap.dedent("""
    import json, sys
    from longlora_jax.benchmarks.quant import measure_load
    print("RESULT " + json.dumps(measure_load(sys.argv[1], sys.argv[2], sys.argv[3])))
""")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_load(model: str, dtype: str, scheme: str) -> dict[str, Any]:
    """Loads `model` with `scheme` in this process and reports its bytes (run in a child)."""
    before = _peak_rss_bytes()
    loaded = load_model(model, dtype=dtype, quantize=scheme)
    params = traverse_util.flatten_dict(loaded.variables["params"])
    jax.block_until_ready(params)
    quantized = {path[:-1] for path in params if path[-1] == quant.SCALE}
    sizes = {"codes": 0, "scales": 0, "float": 0}
    for path, leaf in params.items():
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        if path[:-1] in quantized:
            # XLA stores int4 two codes to a byte (tests/test_quant.py); itemsize says 1
            if path[-1] == quant.KERNEL and leaf.dtype == quant.code_dtype("int4"):
                nbytes = int(np.prod(leaf.shape)) // 2
            sizes["codes" if path[-1] == quant.KERNEL else "scales"] += nbytes
        else:
            sizes["float"] += nbytes
    return {**sizes, "host peak": _peak_rss_bytes() - before}


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    if config.measure == "quality":
        return quant_quality.run(config)
    if config.measure != "memory":
        raise ConfigError(f"measure={config.measure!r}; valid: memory, quality")
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for scheme in config.schemes:
        child = subprocess.run([sys.executable, "-c", _CHILD, config.model, config.dtype,
                                scheme], capture_output=True, text=True, env=env, check=False)
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode or not lines:
            tail = (child.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"bench quant: loading {config.model} as {scheme} failed: {tail}")
        sizes = json.loads(lines[0][len("RESULT "):])
        rows.append({"quantize": scheme, **{f"{k} MiB": v / 2**20 for k, v in sizes.items()}})
    reference = rows[0]
    for row in rows:
        row["frozen MiB"] = row["codes MiB"] + row["scales MiB"] + row["float MiB"]
        row["frozen / ref"] = row["frozen MiB"] / reference["frozen MiB"]
        # the projections' bytes over the same projections' in the (unquantized) reference
        unquantized = reference["float MiB"] - row["float MiB"]
        if unquantized > 0:
            row["projections / ref"] = (row["codes MiB"] + row["scales MiB"]) / unquantized
    columns = ("quantize", "codes MiB", "scales MiB", "float MiB", "frozen MiB",
               "projections / ref", "frozen / ref", "host peak MiB")
    report(rows, columns, config.json, {"command": "quant", "model": config.model,
                                        "dtype": config.dtype})
    return rows
