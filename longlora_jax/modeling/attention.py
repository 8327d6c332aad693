"""Attention: full causal and shifted sparse (S2) attention, and the backend dispatch.

q [B, N, Hq, D]; k, v [B, N, Hkv, D] with Hq a multiple of Hkv (GQA); output [B, N, Hq, D].
Softmax is computed in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longlora_jax.modeling.config import LlamaConfig


def causal_attention(q_bnhd, k_bnkd, v_bnkd, *, segment_ids=None) -> jax.Array:
    """Full causal attention (XLA reference). segment_ids [B, N] masks across documents."""
    b, n, hq, d = q_bnhd.shape
    hkv = k_bnkd.shape[2]
    q_bnkgd = q_bnhd.reshape(b, n, hkv, hq // hkv, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q_bnkgd, k_bnkd, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(d))
    mask = jnp.tril(jnp.ones((n, n), dtype=bool))[None, None, None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bnkd.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_bnkd)
    return out.reshape(b, n, hq, d)


def attend(q_bnhd, k_bnkd, v_bnkd, cfg: LlamaConfig, *, train: bool, segment_ids=None) -> jax.Array:
    """The model's attention: S2 when training with `attention_train="s2"`, else full causal."""
    del train  # S2-Attn dispatch lands with the S2 backend.
    return causal_attention(q_bnhd, k_bnkd, v_bnkd, segment_ids=segment_ids)
