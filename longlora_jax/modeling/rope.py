"""Rotary position embedding with HF's scalings: default, linear (PI), dynamic (NTK), yarn, llama3.

Frequencies follow `transformers.modeling_rope_utils` exactly (same formulas, fp32), so a
checkpoint's logits match transformers'. Linear scaling is LongLoRA's position interpolation:
positions are divided by `factor`, which is the same as dividing every frequency by it.

Partial rotary (GPT-NeoX's `rotary_pct`): the frequencies are those of a head of R =
`cfg.rotary_dim` dims, the tables are [B, N, R], and only the first R dims of each head rotate
(as HF, every scaling's frequencies are computed over R dims).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from longlora_jax.modeling.config import LlamaConfig


def _base_inv_freq(base: float | jnp.ndarray, dim: int) -> jnp.ndarray:
    """[dim // 2] fp32 inverse frequencies base^(-2i/dim)."""
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (jnp.asarray(base, jnp.float32) ** exponents)


def _yarn(cfg: LlamaConfig, dim: int) -> tuple[jnp.ndarray, float]:
    rs = cfg.rope_scaling
    base = cfg.rope_theta
    factor = rs.factor
    original = rs.original_max_position_embeddings or cfg.max_position_embeddings

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rs.attention_factor
    if attention_factor is None:
        if rs.mscale and rs.mscale_all_dim:
            attention_factor = mscale_of(factor, rs.mscale) / mscale_of(factor, rs.mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)
    beta_fast = rs.beta_fast or 32
    beta_slow = rs.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.truncate is None or rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = jnp.asarray(1.0 - ramp, jnp.float32)
    pos_freqs = jnp.asarray(base, jnp.float32) ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = (
        inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    )
    return inv_freq, float(attention_factor)


def _llama3(cfg: LlamaConfig, dim: int) -> jnp.ndarray:
    rs = cfg.rope_scaling
    inv_freq = _base_inv_freq(cfg.rope_theta, dim)
    old_context = rs.original_max_position_embeddings
    low_wavelen = old_context / rs.low_freq_factor
    high_wavelen = old_context / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (old_context / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def inv_frequencies(cfg: LlamaConfig, position_ids: jnp.ndarray) -> tuple[jnp.ndarray, float]:
    """Inverse frequencies [R/2] (fp32; R = rotary dims) and the cos/sin scale for this config.

    `position_ids` matters only for dynamic NTK scaling, whose base grows with the longest
    position in the call (HF: seq_len = max(position_ids) + 1, never below the trained window).
    """
    dim = cfg.rotary_dim
    rope_type = cfg.rope_scaling.rope_type
    if rope_type == "default":
        return _base_inv_freq(cfg.rope_theta, dim), 1.0
    if rope_type == "linear":
        return _base_inv_freq(cfg.rope_theta, dim) / cfg.rope_scaling.factor, 1.0
    if rope_type == "dynamic":
        trained = cfg.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(position_ids) + 1, trained).astype(jnp.float32)
        factor = cfg.rope_scaling.factor
        base = cfg.rope_theta * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "yarn":
        return _yarn(cfg, dim)
    if rope_type == "llama3":
        return _llama3(cfg, dim), 1.0
    raise AssertionError(rope_type)  # RopeScaling validates the type


def rotary_tables(cfg: LlamaConfig, position_ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin tables [B, N, R] (fp32) for integer positions [B, N] (R = rotary dims)."""
    inv_freq, scale = inv_frequencies(cfg, position_ids)
    angles_bnk = position_ids.astype(jnp.float32)[..., None] * inv_freq
    angles_bnd = jnp.concatenate([angles_bnk, angles_bnk], axis=-1)
    return jnp.cos(angles_bnd) * scale, jnp.sin(angles_bnd) * scale


def apply_rotary(x_bnhd: jnp.ndarray, cos_bnd: jnp.ndarray, sin_bnd: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [B, N, H, D] by the tables [B, N, R] (HF's rotate-half convention).

    R <= D: the first R dims of each head rotate, the rest pass through (partial rotary).
    Computed in fp32 and cast back to x's dtype.
    """
    rot = cos_bnd.shape[-1]
    x = x_bnhd[..., :rot].astype(jnp.float32)
    half = rot // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = (x * cos_bnd[:, :, None, :] + rotated * sin_bnd[:, :, None, :]).astype(x_bnhd.dtype)
    if rot == x_bnhd.shape[-1]:
        return out
    return jnp.concatenate([out, x_bnhd[..., rot:]], axis=-1)
