"""RMS and layer normalisation with their backward written out.

    y = rms_norm(x, scale, 1e-5, jnp.dtype(jnp.float32))          # x [..., E], scale [E]
    y = layer_norm(x, weight, bias, 1e-5, jnp.dtype(jnp.float32))  # GPT-NeoX

The forwards are transformers': statistics in fp32; RMSNorm casts the normalised x to `dtype`
before the product with its scale (LLaMA's order), LayerNorm applies weight and bias in fp32
and casts the result. The backwards are the same derivatives in fp32 with every sum written as
a contraction: a parameter's gradient, a sum over the tokens, as ones [...] . [..., E]; a
per-token sum over the features as [..., E] . [E]. Autodiff gives the same numbers, but
XLA:CPU fuses its parameter gradients into column reductions with a broadcast of the per-token
statistics inside: at [8192, 576] autodiff's RMSNorm backward ran 17x and LayerNorm's 13x
slower than these (`bench profile` found RMSNorm's reductions at 7% of the 8192-token train
step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _sum_tokens(x: jax.Array) -> jax.Array:
    """[..., E] -> [E]: the sum over every leading axis, as a contraction with ones."""
    return jnp.einsum("...,...e->e", jnp.ones(x.shape[:-1], x.dtype), x)


def _dot_features(x: jax.Array, w: jax.Array) -> jax.Array:
    """[..., E] . [E] -> [..., 1]."""
    return jnp.einsum("...e,e->...", x, w)[..., None]


def _inverse_rms(x32: jax.Array, eps: float) -> jax.Array:
    """[..., E] fp32 -> 1 / sqrt(mean(x^2) + eps), [..., 1]."""
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype) -> jax.Array:
    """x [..., E], scale [E] -> x / rms(x) * scale, [..., E] in `dtype`."""
    return _rms_forward(x, scale, eps, dtype)[0]


def _rms_forward(x, scale, eps, dtype):
    x32 = x.astype(F32)
    inv_rms = _inverse_rms(x32, eps)
    y = scale.astype(dtype) * (x32 * inv_rms).astype(dtype)
    return y, (x, scale, inv_rms)


def _rms_backward(eps, dtype, residuals, g):
    x, scale, inv_rms = residuals
    x32, g32 = x.astype(F32), g.astype(F32)
    scale32 = scale.astype(dtype).astype(F32)
    normed = (x32 * inv_rms).astype(dtype).astype(F32)
    d_scale = _sum_tokens(g32 * normed)
    g_scale_x = _dot_features(g32 * x32, scale32)
    dx = inv_rms * (g32 * scale32) - (inv_rms ** 3 / x.shape[-1]) * g_scale_x * x32
    return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_forward, _rms_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float,
               dtype) -> jax.Array:
    """x [..., E], weight, bias [E] -> (x - mean) / sqrt(var + eps) * weight + bias, in
    `dtype`."""
    return _ln_forward(x, weight, bias, eps, dtype)[0]


def _ln_statistics(x32, eps):
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    return mean, jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)


def _ln_forward(x, weight, bias, eps, dtype):
    x32 = x.astype(F32)
    mean, inv_std = _ln_statistics(x32, eps)
    y = ((x32 - mean) * inv_std * weight.astype(F32) + bias.astype(F32)).astype(dtype)
    return y, (x, weight, mean, inv_std)


def _ln_backward(eps, dtype, residuals, g):
    x, weight, mean, inv_std = residuals
    e = x.shape[-1]
    g32, w32 = g.astype(F32), weight.astype(F32)
    normed = (x.astype(F32) - mean) * inv_std
    d_weight, d_bias = _sum_tokens(g32 * normed), _sum_tokens(g32)
    mean_gw = _dot_features(g32, w32) / e
    mean_gw_normed = _dot_features(g32 * normed, w32) / e
    dx = inv_std * (g32 * w32 - mean_gw - normed * mean_gw_normed)
    return dx.astype(x.dtype), d_weight.astype(weight.dtype), d_bias.astype(weight.dtype)


layer_norm.defvjp(_ln_forward, _ln_backward)
