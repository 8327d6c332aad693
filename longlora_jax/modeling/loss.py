"""Chunked next-token cross-entropy: [N, V] logits never exist at once.

Two forms of the same loss. `chunked_cross_entropy(project, h, ...)` (evaluation, any head):
the backward recomputes each chunk's logits (rematerialised scan body). `fused_cross_entropy(
h, w, ...)` (training): each chunk's forward computes its loss *and* its gradients with
respect to the hidden states and the head weight, so the backward only scales them: 6 N·V·E
FLOPs for the head instead of 8, at the price of keeping dh [B, N, E] and dW [E, V] (fp32).

N tokens x V vocabulary fp32 logits would be 4·N·V bytes (100k x 32k: 12.8 GB); here the
final hidden states are projected to the vocabulary `chunk` tokens at a time inside a
`lax.scan` whose body is rematerialised, so the forward keeps only [B, chunk, V] and the
backward recomputes each chunk's logits from its hidden states. Everything is fp32.

Under sequence parallelism each device holds a contiguous slice of the tokens. The scan
therefore walks the tokens *within* every slice in lockstep ([B, S, N/S, E] -> chunks of the
N/S axis), so every step computes on all sequence shards at once and no hidden states move.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from longlora_jax.parallel.mesh import SEQUENCE, current_axis_size


def _chunking(b: int, n: int, chunk: int):
    """(to_chunks, from_chunks) for [B, N, ...] arrays: chunks of `chunk` tokens walking the
    tokens within every sequence shard in lockstep ([num_chunks, B, S, chunk, ...])."""
    shards = current_axis_size(SEQUENCE)
    if n % shards:
        shards = 1
    per_shard = n // shards
    chunk = min(chunk, per_shard)
    pad = -per_shard % chunk
    num_chunks = (per_shard + pad) // chunk

    def to_chunks(x: jax.Array) -> jax.Array:
        x = x.reshape(b, shards, per_shard, *x.shape[2:])
        if pad:
            x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        x = x.reshape(b, shards, num_chunks, chunk, *x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    def from_chunks(x: jax.Array) -> jax.Array:
        x = jnp.moveaxis(x, 0, 2).reshape(b, shards, num_chunks * chunk, *x.shape[4:])
        return x[:, :, :per_shard].reshape(b, n, *x.shape[3:])

    return to_chunks, from_chunks


def _constrain_chunks(h_cbsqe: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(h_cbsqe, (None, "act_batch", "act_length", None,
                                                "act_embed"))


def _nll(logits_bsqv: jax.Array, targets_bsq: jax.Array, mask_bsq: jax.Array):
    """(summed masked NLL, log-partition [B, S, Q]) of fp32 logits."""
    log_z = jax.nn.logsumexp(logits_bsqv, axis=-1)
    target_logit = jnp.take_along_axis(logits_bsqv, targets_bsq[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * mask_bsq), log_z


def chunked_cross_entropy(
    project: Callable[[jax.Array], jax.Array],
    h_bne: jax.Array,
    targets_bn: jax.Array,
    mask_bn: jax.Array,
    *,
    chunk: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """Summed token NLL and summed mask weight.

    project: final hidden [..., E] -> fp32 logits [..., V] (the model's LM head).
    h_bne [B, N, E]; targets_bn [B, N] int (the next token of each position);
    mask_bn [B, N] (0 drops a position: padding, SFT prompts). Returns (sum of mask * nll,
    sum of mask), both fp32 scalars; the mean loss is their ratio.
    """
    to_chunks, _ = _chunking(*h_bne.shape[:2], chunk)
    xs = (_constrain_chunks(to_chunks(h_bne)), to_chunks(targets_bn),
          to_chunks(mask_bn.astype(jnp.float32)))

    @jax.checkpoint
    def chunk_nll(h_bsqe, targets_bsq, mask_bsq):
        return _nll(project(h_bsqe).astype(jnp.float32), targets_bsq, mask_bsq)[0]

    def body(total, xs):
        return total + chunk_nll(*xs), None

    nll_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return nll_sum, jnp.sum(mask_bn.astype(jnp.float32))


def fused_cross_entropy(h_bne: jax.Array, w_ev: jax.Array, targets_bn: jax.Array,
                        mask_bn: jax.Array, *, chunk: int = 1024,
                        dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """`chunked_cross_entropy` for a linear head `logits = h @ w` (w [E, V], computed in
    `dtype`, as the model's head does), with its gradients computed in the forward pass.

    Returns (sum of mask * nll, sum of mask); differentiable w.r.t. h_bne and w_ev.
    """
    return _fused(h_bne, w_ev, targets_bn, mask_bn.astype(jnp.float32), chunk,
                  jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h_bne, w_ev, targets_bn, mask_bn, chunk, dtype):
    return _fused_fwd(h_bne, w_ev, targets_bn, mask_bn, chunk, dtype)[0]


def _fused_fwd(h_bne, w_ev, targets_bn, mask_bn, chunk, dtype):
    to_chunks, from_chunks = _chunking(*h_bne.shape[:2], chunk)
    w = w_ev.astype(dtype)

    def body(carry, xs):
        nll_sum, dw_ev = carry
        h_bsqe, targets_bsq, mask_bsq = xs
        logits_bsqv = jnp.dot(h_bsqe.astype(dtype), w).astype(jnp.float32)
        nll, log_z = _nll(logits_bsqv, targets_bsq, mask_bsq)
        # d(sum of mask * nll) / d logits = mask * (softmax - one_hot(target))
        dlogits = jnp.exp(logits_bsqv - log_z[..., None])
        dlogits = dlogits - jax.nn.one_hot(targets_bsq, dlogits.shape[-1], dtype=jnp.float32)
        dlogits = (dlogits * mask_bsq[..., None]).astype(dtype)
        dh_bsqe = jnp.dot(dlogits, w.T).astype(h_bne.dtype)
        dw_ev = dw_ev + jnp.einsum("bsqe,bsqv->ev", h_bsqe.astype(dtype), dlogits,
                                   preferred_element_type=jnp.float32)
        return (nll_sum + nll, dw_ev), dh_bsqe

    xs = (_constrain_chunks(to_chunks(h_bne)), to_chunks(targets_bn), to_chunks(mask_bn))
    init = (jnp.zeros((), jnp.float32), jnp.zeros(w_ev.shape, jnp.float32))
    (nll_sum, dw_ev), dh_cbsqe = jax.lax.scan(body, init, xs)
    dh_bne = from_chunks(dh_cbsqe)
    return (nll_sum, jnp.sum(mask_bn)), (dh_bne, dw_ev.astype(w_ev.dtype))


def _fused_bwd(chunk, dtype, residuals, cotangents):
    dh_bne, dw_ev = residuals
    g_nll, _ = cotangents
    return (dh_bne * g_nll.astype(dh_bne.dtype), dw_ev * g_nll.astype(dw_ev.dtype), None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)
