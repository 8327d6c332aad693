"""KV cache for decoding: per-layer key/value buffers and full attention over them.

Each attention layer keeps, in the `cache` variable collection,

    key, value    [B, S, Hkv, D]  keys (after RoPE) and values of every token seen so far
    segment_ids   [B, S] int32    the segment of each slot (0 = left padding, 1 = text)
    index         []     int32    the next free slot (shared by all rows)

where S is the cache length fixed when the cache is created. A call with N new tokens writes
them at slots index..index+N-1 and attends from them to every written slot at or before
their own (causal by slot) with the same segment id, so left-padded prompts of different
lengths decode together: a pad slot is never seen by a text token. Keys are cached after
RoPE with the frequencies of the call that wrote them (HF's dynamic-NTK behaviour: earlier
keys keep their rotation when the base grows). The caller sizes the cache: writing past S is
not checked inside jit (`dynamic_update_slice` would clamp), so `generate` allocates exactly
prompt + new tokens.

Sharding: the buffers are named (cache_batch, cache_length, act_kv_heads, act_head_dim).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CACHE_COLLECTION = "cache"
# Key slots per step of `cached_attention` (the fastest of 256/512/1024 on CPU at 8k tokens).
DEFAULT_BLOCK = 256
_KV_AXES = ("cache_batch", "cache_length", "act_kv_heads", "act_head_dim")


class KVCache(nn.Module):
    """Appends k, v [B, N, Hkv, D] and segment ids [B, N] to the cache.

    Returns (keys [B, S, Hkv, D], values [B, S, Hkv, D], slot segment ids [B, S], first slot
    of the new tokens []). Created by an `init` in decode mode, whose input length is S.
    """

    @nn.compact
    def __call__(self, k_bnkd, v_bnkd, segment_ids_bn):
        b, n, hkv, d = k_bnkd.shape
        key = self.variable(CACHE_COLLECTION, "key",
                            nn.with_logical_partitioning(jnp.zeros, _KV_AXES),
                            (b, n, hkv, d), k_bnkd.dtype)
        value = self.variable(CACHE_COLLECTION, "value",
                              nn.with_logical_partitioning(jnp.zeros, _KV_AXES),
                              (b, n, hkv, d), v_bnkd.dtype)
        segment = self.variable(CACHE_COLLECTION, "segment_ids",
                                nn.with_logical_partitioning(jnp.zeros, _KV_AXES[:2]),
                                (b, n), jnp.int32)
        index = self.variable(CACHE_COLLECTION, "index", jnp.zeros, (), jnp.int32)
        start = index.value
        key.value = jax.lax.dynamic_update_slice(
            key.value, k_bnkd.astype(key.value.dtype), (0, start, 0, 0))
        value.value = jax.lax.dynamic_update_slice(
            value.value, v_bnkd.astype(value.value.dtype), (0, start, 0, 0))
        segment.value = jax.lax.dynamic_update_slice(
            segment.value, segment_ids_bn.astype(jnp.int32), (0, start))
        index.value = start + n
        return key.value, value.value, segment.value, start


def init_cache(model: nn.Module, batch: int, length: int) -> Any:
    """A zero KV cache (the `cache` collection of `model`, any family's `CausalLM`) for `batch`
    rows of up to `length` tokens, boxed with its logical axis names (`nn.unbox` gives the
    arrays, `sharding.tree_shardings` their placement). Traced abstractly: no forward runs.
    """
    def init():
        ids = jnp.zeros((batch, length), jnp.int32)
        return model.init(jax.random.key(0), ids, decode=True)[CACHE_COLLECTION]

    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(init))


def cached_attention(q_bnhd, k_bskd, v_bskd, kv_segment_bs, q_segment_bn, start, *,
                     window: int | None = None, block: int = DEFAULT_BLOCK) -> jax.Array:
    """Attention of N new queries [B, N, Hq, D] over the cache [B, S, Hkv, D] -> [B, N, Hq, D].

    Query i sits at slot `start + i`; it sees slot j when j <= start + i and the slots'
    segment ids match; with a sliding `window` W also only when j > start + i - W (slots, as
    HF's sliding-window mask counts cache positions). GQA: query head h reads kv head
    h // (Hq // Hkv).

    Flash-style: a loop over key blocks of `block` slots with an online softmax (fp32
    statistics), visiting only the blocks up to the last written slot (and, with a window,
    from the first one the oldest query can see), so a decode step at slot t costs O(t)
    (O(W) with a window) and a prefill chunk never holds more than [N, block] scores per
    head. The loop bounds are dynamic (a `while_loop`): forward only, not
    reverse-differentiable. The cache itself still holds every slot.
    """
    b, n, hq, d = q_bnhd.shape
    s, hkv = k_bskd.shape[1], k_bskd.shape[2]
    t = min(block, s)
    q_bkgnd = q_bnhd.reshape(b, n, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)
    q_slot_n = start + jnp.arange(n)
    scale = 1.0 / math.sqrt(d)
    # Masked scores are a finite -1e30: a row's all-masked blocks then add exp(0) terms that
    # vanish exactly (x exp(-1e30 - m) = 0) once its first visible key raises the running max.
    masked = jnp.float32(-1e30)

    def visit(j, carry):
        m_bkgn, l_bkgn, acc_bkgnd = carry
        first = jnp.minimum(j * t, s - t)  # the last block may overlap the one before it ...
        k_btkd = jax.lax.dynamic_slice_in_dim(k_bskd, first, t, axis=1)
        v_btkd = jax.lax.dynamic_slice_in_dim(v_bskd, first, t, axis=1)
        segment_bt = jax.lax.dynamic_slice_in_dim(kv_segment_bs, first, t, axis=1)
        slot_t = first + jnp.arange(t)
        visible_nt = (slot_t[None] <= q_slot_n[:, None]) & (slot_t[None] >= j * t)  # ... masked
        if window is not None:
            visible_nt = visible_nt & (slot_t[None] > q_slot_n[:, None] - window)
        visible_bnt = visible_nt[None] & (q_segment_bn[:, :, None] == segment_bt[:, None, :])
        scores = jnp.einsum("bkgnd,btkd->bkgnt", q_bkgnd, k_btkd,
                            preferred_element_type=jnp.float32) * scale
        scores = jnp.where(visible_bnt[:, None, None], scores, masked)
        m_new = jnp.maximum(m_bkgn, scores.max(axis=-1))
        probs = jnp.exp(scores - m_new[..., None])
        correction = jnp.exp(m_bkgn - m_new)
        pv = jnp.einsum("bkgnt,btkd->bkgnd", probs.astype(v_bskd.dtype), v_btkd,
                        preferred_element_type=jnp.float32)
        return (m_new, l_bkgn * correction + probs.sum(axis=-1),
                acc_bkgnd * correction[..., None] + pv)

    shape = q_bkgnd.shape[:-1]
    init = (jnp.full(shape, masked), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, d), jnp.float32))
    first_block = 0 if window is None else jnp.maximum(start - window + 1, 0) // t
    _, l_bkgn, acc_bkgnd = jax.lax.fori_loop(first_block, (start + n + t - 1) // t, visit,
                                             init)
    out_bkgnd = acc_bkgnd / l_bkgn[..., None]
    return out_bkgnd.transpose(0, 3, 1, 2, 4).reshape(b, n, hq, d).astype(q_bnhd.dtype)
