"""Quality of a quantized frozen base: `python -m longlora_jax.bench quant --measure quality`.

The perplexity of the base (SmolLM2-135M by default) at `length` tokens with full attention
on the same held-out windows (the first `max_windows` non-overlapping windows of `data`'s
held-out documents, as `evaluate` takes them) for: the float base (fp32; SmolLM2's Q4_1 GGUF
dequantized), each of this project's `schemes` (loaded quantized tensor by tensor as
`evaluate` loads them: `io.run.load_model`), and each of the `peers` applied to the same float
kernels, whose dequantized kernels are evaluated as a float model:

    bitsandbytes_nf4   bitsandbytes' `quantize_4bit` (NF4, blocksize 64 along the input rows,
                       fp32 absmax), what PEFT's QLoRA loads a base with
    bitsandbytes_nf4_dq   the same with `compress_statistics` (QLoRA's double quantization)
    hqq                the `hqq` library's `Quantizer` at its 4-bit defaults
                       (`BaseQuantizeConfig(nbits=4, group_size=64)`)

Each row also has the bits per projection parameter of its storage with bf16 group
parameters (a bf16 base's), counted over the model's projections (`modeling.quant.leaves`).
With `json`, the rows are written there and rendered as markdown beside it (.md).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from longlora_jax.benchmarks.common import markdown_table, report
from longlora_jax.data.config import default_data_config
from longlora_jax.data.eval_data import eval_documents
from longlora_jax.errors import ConfigError
from longlora_jax.evaluation.perplexity import documents_for, make_eval_fn, perplexity
from longlora_jax.io.base import shard_variables
from longlora_jax.io.run import LoadedModel, load_model
from longlora_jax.modeling import quant
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.families import build_model
from longlora_jax.parallel.mesh import single_device_mesh

PEERS = ("bitsandbytes_nf4", "bitsandbytes_nf4_dq", "hqq")
COLUMNS = ("quantize", "ppl", "vs float", "bits / param", "seconds")


def bits_per_param(cfg: LlamaConfig, scheme: str) -> float:
    """Bits per projection parameter of `scheme` with bf16 group parameters (int4: 4 bits)."""
    if scheme == "none":
        return 16.0
    bits = count = 0
    for n_in, n_out in cfg.projections().values():
        for leaf in quant.leaves((n_in, n_out), ("in", "out"), scheme, jnp.bfloat16).values():
            width = 4 if leaf.dtype == jnp.int4 else jnp.dtype(leaf.dtype).itemsize * 8
            bits += int(np.prod(leaf.shape)) * width
        count += n_in * n_out
    return bits / count


def _bitsandbytes(double: bool) -> Callable[[np.ndarray], np.ndarray]:
    import bitsandbytes.functional as bnb
    import torch

    def round_trip(w_io: np.ndarray) -> np.ndarray:
        w = torch.from_numpy(np.ascontiguousarray(w_io.T))  # torch's [out, in]
        codes, state = bnb.quantize_4bit(w, blocksize=quant.GROUP, quant_type="nf4",
                                         compress_statistics=double)
        return bnb.dequantize_4bit(codes, state).numpy().T
    return round_trip


def _hqq_library(w_io: np.ndarray) -> np.ndarray:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    w = torch.from_numpy(np.ascontiguousarray(w_io.T))
    settings = BaseQuantizeConfig(nbits=4, group_size=quant.GROUP)["weight_quant_params"]
    codes, meta = Quantizer.quantize(w, device="cpu", compute_dtype=torch.float32, **settings)
    return Quantizer.dequantize(codes, meta).reshape(w.shape).numpy().T


def peer_round_trip(peer: str) -> Callable[[np.ndarray], np.ndarray]:
    """A peer's quantize-then-dequantize of one kernel [in, out] (fp32 numpy)."""
    if peer == "hqq":
        return _hqq_library
    return _bitsandbytes(double=peer == "bitsandbytes_nf4_dq")


def _peer_params(base: LoadedModel, peer: str) -> dict[str, Any]:
    """The float base's params with every decoder projection kernel through `peer`."""
    round_trip = peer_round_trip(peer)
    flat = dict(traverse_util.flatten_dict(base.variables["params"]))
    for path, value in flat.items():
        if path[-1] == quant.KERNEL and path[-2] in base.cfg.projections():
            kernels = np.asarray(value, np.float32)  # [layers, in, out]
            flat[path] = jnp.asarray(np.stack([round_trip(k) for k in kernels]))
    return traverse_util.unflatten_dict(flat)


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    unknown = set(config.peers) - set(PEERS)
    if unknown:
        raise ConfigError(f"peers {sorted(unknown)}; valid: {', '.join(PEERS)}")
    base = load_model(config.model, dtype="float32")
    data = default_data_config()
    data.source = config.data.source
    docs = documents_for(eval_documents(data, base.tokenizer), config.length, "nonoverlap", 256)
    mesh = single_device_mesh()

    def measure(name: str, cfg: LlamaConfig, variables: dict[str, Any], bits: float) -> None:
        start = time.perf_counter()
        eval_fn = make_eval_fn(build_model(cfg), mesh, loss_chunk=1024,
                               prefill_chunk=config.length)
        result = perplexity(eval_fn, shard_variables(cfg, variables, mesh), docs,
                            seq_len=config.length, max_windows=config.eval.max_windows)
        rows.append({"quantize": name, "ppl": result["ppl"], "windows": result["windows"],
                     "tokens": result["tokens"], "bits / param": bits,
                     "seconds": time.perf_counter() - start})
        print(f"{name}: ppl {result['ppl']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)

    rows: list[dict[str, Any]] = []
    for scheme in config.schemes:
        loaded = base if scheme == "none" else load_model(config.model, dtype="float32",
                                                          quantize=scheme)
        measure(scheme, loaded.cfg, loaded.variables, bits_per_param(base.cfg, scheme))
        del loaded
    for peer in config.peers:  # stored as the scheme of ours that has their parameters
        like = {"bitsandbytes_nf4": "nf4", "bitsandbytes_nf4_dq": "nf4+dq", "hqq": "hqq4"}
        measure(peer, base.cfg, {**base.variables, "params": _peer_params(base, peer)},
                bits_per_param(base.cfg, like[peer]))
    reference = rows[0]["ppl"]
    for row in rows:
        row["vs float"] = row["ppl"] / reference
    meta = {"command": "quant --measure quality", "model": config.model, "data": config.data.source,
            "length": config.length, "max_windows": config.eval.max_windows,
            "reference": config.schemes[0]}
    report(rows, COLUMNS, config.json, meta)
    if config.json:
        pathlib.Path(config.json).with_suffix(".md").write_text(
            f"{config.model}: perplexity at {config.length} tokens, the first "
            f"{rows[0]['windows']} non-overlapping windows of {config.data.source}'s held-out "
            f"documents, full attention; vs float: against the `{config.schemes[0]}` row.\n\n"
            f"{markdown_table(rows, COLUMNS)}\n")
    return rows
