"""Chunked next-token cross-entropy: [N, V] logits never exist at once.

N tokens x V vocabulary fp32 logits would be 4·N·V bytes (100k x 32k: 12.8 GB); here the
final hidden states are projected to the vocabulary `chunk` tokens at a time inside a
`lax.scan` whose body is rematerialised, so the forward keeps only [B, chunk, V] and the
backward recomputes each chunk's logits from its hidden states. Everything is fp32.

Under sequence parallelism each device holds a contiguous slice of the tokens. The scan
therefore walks the tokens *within* every slice in lockstep ([B, S, N/S, E] -> chunks of the
N/S axis), so every step computes on all sequence shards at once and no hidden states move.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from longlora_jax.parallel.mesh import SEQUENCE, current_axis_size


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
    b, n, _ = h_bne.shape
    shards = current_axis_size(SEQUENCE)
    if n % shards:
        shards = 1
    per_shard = n // shards
    chunk = min(chunk, per_shard)
    pad = -per_shard % chunk
    num_chunks = (per_shard + pad) // chunk

    def to_chunks(x: jax.Array) -> jax.Array:
        """[B, N, ...] -> [num_chunks, B, S, chunk, ...] walking each shard's tokens."""
        x = x.reshape(b, shards, per_shard, *x.shape[2:])
        if pad:
            x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        x = x.reshape(b, shards, num_chunks, chunk, *x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    h_cbsqe = to_chunks(h_bne)
    h_cbsqe = nn.with_logical_constraint(
        h_cbsqe, (None, "act_batch", "act_length", None, "act_embed")
    )
    targets_cbsq = to_chunks(targets_bn)
    mask_cbsq = to_chunks(mask_bn.astype(jnp.float32))

    @jax.checkpoint
    def chunk_nll(h_bsqe, targets_bsq, mask_bsq):
        logits_bsqv = project(h_bsqe).astype(jnp.float32)
        log_z = jax.nn.logsumexp(logits_bsqv, axis=-1)
        target_logit = jnp.take_along_axis(logits_bsqv, targets_bsq[..., None], axis=-1)[..., 0]
        return jnp.sum((log_z - target_logit) * mask_bsq)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    nll_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_cbsqe, targets_cbsq, mask_cbsq))
    return nll_sum, jnp.sum(mask_bn.astype(jnp.float32))
