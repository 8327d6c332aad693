"""Perplexity with full attention over windows of held-out documents.

`make_eval_fn(model, mesh)` compiles (variables, inputs, targets, mask) -> (NLL sum, token
count); `perplexity(eval_fn, variables, docs, seq_len=N)` runs it over a document set's
windows (`data.eval_data`: the official stride-256 protocol or non-overlapping windows).
Training uses them for its before/after and periodic evaluation; `evaluation.compare` for
`python -m longlora_jax.evaluate`.

Long windows on small memory: `prefill_chunk > 0` runs a window through the KV-cache path
that many tokens at a time, whose flash-style attention (`modeling.kv_cache.cached_attention`)
holds [chunk, block] scores per head and skips the future key blocks: exact full attention
in O(N) memory instead of the plain forward's dense [N, N] scores (the README has the
measured memory). Dynamic NTK RoPE ignores it (its frequencies depend on the longest position
of a forward, as in transformers' single forward).

Sequence-sharded evaluation (mesh axis `sequence` > 1; prefill_chunk must then be 0):
activations are split along the tokens and full attention all-gathers each layer's keys and
values along the sequence (GSPMD, from the model's length constraints; no hand-written
collective). Per device, activations and queries scale with N/S, the gathered k/v of a layer
with N (2·N·Hkv·D values) and the dense scores with (N/S)·N·Hq; with GQA the all-gather is
small next to the scores. A ring (ppermute of k/v blocks with an online softmax) would bound
the scores to (N/S)^2; it is not implemented.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from longlora_jax.data.eval_data import TokenDocument, perplexity_windows, window_starts
from longlora_jax.errors import ConfigError, DataError
from longlora_jax.modeling.families import build_model
from longlora_jax.modeling.kv_cache import CACHE_COLLECTION, init_cache
from longlora_jax.modeling.llama import CausalLM
from longlora_jax.modeling.loss import chunked_cross_entropy
from longlora_jax.parallel import rules
from longlora_jax.parallel.mesh import SEQUENCE

EvalFn = Callable[[Any, np.ndarray, np.ndarray, np.ndarray], tuple[jax.Array, jax.Array]]


EVAL_ATTENTIONS = ("full", "s2", "short")


def make_eval_fn(model: CausalLM, mesh: Mesh, *, loss_chunk: int = 1024,
                 prefill_chunk: int = 0, attention: str = "full") -> EvalFn:
    """A jitted (variables, inputs_bn, targets_bn, mask_bn) -> (NLL sum, token count).

    attention: "full" (causal, whatever the training attention was: how the model is used),
    or "s2" / "short" (S2-Attn, or S2 without the shift, with the config's group rule: what
    the approximation itself costs at evaluation, the paper's Table 1 pilot). Batches are
    split over the mesh's batch axes. prefill_chunk > 0: windows go through the KV-cache
    path min(prefill_chunk, N) tokens at a time (see the module docstring; full attention
    only, and not with dynamic NTK RoPE or a sequence-sharded mesh).
    """
    if attention not in EVAL_ATTENTIONS:
        raise ConfigError(f"attention={attention!r}; valid: {', '.join(EVAL_ATTENTIONS)}")
    batch_sharding = rules.batch_sharding(mesh)
    sparse = attention != "full"
    if sparse:  # the training attention, deterministic (no LoRA dropout)
        model = build_model(model.cfg.replace(attention_train=attention, lora_dropout=0.0))
    if (sparse or model.cfg.rope_scaling.rope_type == "dynamic"
            or mesh.shape[SEQUENCE] > 1):
        prefill_chunk = 0

    def project(variables, h):
        return model.apply(variables, h, method=CausalLM.project)

    def full_nll(variables, inputs_bn, targets_bn, mask_bn):
        h_bne = model.apply(variables, inputs_bn, return_hidden=True, train=sparse)
        return chunked_cross_entropy(functools.partial(project, variables), h_bne, targets_bn,
                                     mask_bn, chunk=loss_chunk)

    def chunked_nll(variables, inputs_bn, targets_bn, mask_bn):
        b, n = inputs_bn.shape
        chunk = min(prefill_chunk, n)
        pad = -n % chunk
        num = (n + pad) // chunk
        positions_bn = jnp.broadcast_to(jnp.arange(n + pad, dtype=jnp.int32), (b, n + pad))

        def chunks(x_bn):
            x_bn = jnp.pad(x_bn, ((0, 0), (0, pad)))
            return x_bn.reshape(b, num, chunk).swapaxes(0, 1)

        def body(carry, xs):
            cache, nll, count = carry
            ids_bc, positions_bc, targets_bc, mask_bc = xs
            h_bce, updated = model.apply({**variables, CACHE_COLLECTION: cache}, ids_bc,
                                         positions_bc, decode=True, return_hidden=True,
                                         mutable=[CACHE_COLLECTION])
            chunk_nll, chunk_count = chunked_cross_entropy(
                functools.partial(project, variables), h_bce, targets_bc, mask_bc,
                chunk=loss_chunk)
            return (updated[CACHE_COLLECTION], nll + chunk_nll, count + chunk_count), None

        cache = nn.unbox(init_cache(model, b, n + pad))
        zero = jnp.zeros((), jnp.float32)
        xs = (chunks(inputs_bn), chunks(positions_bn), chunks(targets_bn), chunks(mask_bn))
        (_, nll, count), _ = jax.lax.scan(body, (cache, zero, zero), xs)
        return nll, count

    @functools.partial(jax.jit, in_shardings=(None, batch_sharding, batch_sharding, batch_sharding))
    def nll(variables, inputs_bn, targets_bn, mask_bn):
        if prefill_chunk:
            return chunked_nll(variables, inputs_bn, targets_bn, mask_bn)
        return full_nll(variables, inputs_bn, targets_bn, mask_bn)

    return rules.on_mesh(nll, mesh)  # `.lower(...)` too, for memory and HLO checks


def perplexity(
    eval_fn: EvalFn,
    variables: Any,
    docs: Sequence[TokenDocument],
    *,
    seq_len: int,
    protocol: str = "nonoverlap",
    stride: int = 256,
    batch_size: int = 1,
    max_windows: int = 0,
) -> dict[str, float]:
    """exp(mean NLL) over every scored token of the documents' windows.

    protocol/stride: see `data.eval_data` ("official": windows every `stride` tokens, or
    "nonoverlap"). max_windows > 0 stops after that many windows (over all documents).
    Returns {"ppl", "nll", "tokens", "windows"}.
    """
    nll_sum, count, windows = 0.0, 0.0, 0
    for doc in docs:
        for inputs_bn, targets_bn, mask_bn in perplexity_windows(
            doc.tokens, seq_len, protocol=protocol, stride=stride, batch_size=batch_size,
            pad_batches=True,
        ):
            real = int((mask_bn.sum(axis=1) > 0).sum())
            if max_windows and windows + real > max_windows:
                keep = max_windows - windows
                mask_bn = mask_bn * (np.arange(len(mask_bn)) < keep)[:, None]
                real = keep
            batch_nll, batch_count = eval_fn(variables, inputs_bn, targets_bn, mask_bn)
            nll_sum += float(batch_nll)
            count += float(batch_count)
            windows += real
            if max_windows and windows >= max_windows:
                break
        if max_windows and windows >= max_windows:
            break
    if count == 0:
        raise DataError(f"no window of {seq_len} tokens in {len(docs)} documents")
    mean = nll_sum / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": windows}


def documents_for(docs: Sequence[TokenDocument], seq_len: int, protocol: str, stride: int
                  ) -> list[TokenDocument]:
    """The documents long enough for one window; DataError when none is."""
    if not docs:
        raise DataError("the evaluation document set is empty")
    usable = [d for d in docs if len(window_starts(len(d.tokens), seq_len, protocol=protocol,
                                                   stride=stride))]
    if not usable:
        longest = max(len(d.tokens) for d in docs)
        raise DataError(f"no document is long enough for one {protocol} window of {seq_len} "
                        f"tokens (longest: {longest} tokens in {len(docs)} documents)")
    return usable
