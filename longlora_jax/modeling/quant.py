"""A quantized frozen base: the codes and per-group parameters of a projection kernel, and the
two ways back.

A projection kernel W [.., in, out] (a leading layer axis when scanned) is stored as codes Q
[.., in, out] (the `kernel` leaf) beside per-group leaves, by scheme (`LlamaConfig.quantize`):

    int8   Q int8, `scale` S [.., out]: one scale per output channel, S = max_i |W[i, o]| / 127,
           W ~ Q * S.
    int4   Q int4 (XLA stores two codes to a byte), S [.., in / G, out]: one scale per
           group of G = 64 consecutive input rows and output channel, S = max |W_group| / 7,
           W ~ Q * S (Q in -7..7: symmetric, no zero point).
    nf4    QLoRA's NormalFloat4: int4 codes indexing 16 levels at the quantiles of a normal
           distribution in [-1, 1] (`NF4`), scales as int4 with S = max |W_group|,
           W ~ NF4[Q] * S; a code is the nearest level.
    hqq4   asymmetric: Q int4 in -8..7, S and a zero point Z (`zero`, in code units) per
           group as int4's, W ~ (Q - Z) * S, S = (max - min) / 15 over the group and Z
           optimised per group without calibration data (`_hqq`): HQQ's half-quadratic
           solver (Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning
           Models", 2023), with a float zero point (HQQ rounds it to an integer at 4 bits).

int8, int4 and nf4 are symmetric and round to the nearest level. A scale (and a zero point) is
stored in the dtype of the base it replaces (bf16 for a bf16 base) and the codes are computed
with those rounded values, so for int8 and int4 |W - dequantize| <= S / 2 elementwise, exactly
as for an fp32 scale (a scale rounded down by bf16 leaves max |W| / S <= 127.5, resp. 7.5, so
nothing is clipped by more than S/2); for nf4 the bound is half the widest gap between levels,
times S; hqq4's optimised zero point moves its grid off the group's range, clipping an
extreme value to trade its error for smaller ones elsewhere, so it has no such bound (its
error is measured against round-to-nearest in tests/test_quant.py). An all-zero column (or
group) gets scale 0 and codes 0 (hqq4: a constant group gets scale 1 and the zero point that
makes code -8 its value).

Double quantization (QLoRA's, for the 4-bit schemes: `int4+dq`, `nf4+dq`, `hqq4+dq`): each
per-group leaf P [.., in / G, out] (scales, zero points) is stored as uint8 codes C with, per
block of `DQ_BLOCK` = 256 consecutive output channels of a group row, an fp32 minimum and step
(`scale_dq`, `zero_dq` [.., in / G, ceil(out / 256), 2]): P ~ lo + C * step, step = (max - min)
/ 255, so |P - dequantized P| <= step / 2. 4-bit codes then cost 4 + 8 / 64 + 64 / (64 * 256)
= 4.129 bits per parameter (hqq4+dq: 4.258) instead of 4.25 (4.5) with bf16 parameters.

`quantize` is written once for numpy (the loaders quantize each tensor on the host as they
read it) and jax.numpy (a random-init base is quantized on its devices); `dequantize` runs
inside the model's matmul, in the compute dtype, where XLA fuses it into the dot's operand.

Sharding: codes carry the kernel's logical axis names; per-group leaves the names of the axes
they follow: int8 (out,), the 4-bit schemes (in, out) for [in / G, out] (a group row splits
like the input rows it scales; see `parallel.rules` for a count of groups the mesh does not
divide), double-quantization statistics (in, out, None).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

SCHEMES = ("none", "int8", "int4", "nf4", "hqq4", "int4+dq", "nf4+dq", "hqq4+dq")
GROUP = 64  # input rows per 4-bit group (QLoRA's block size)
DQ = "+dq"  # the suffix of a double-quantized scheme
DQ_BLOCK = 256  # group parameters per fp32 (minimum, step) of double quantization (QLoRA's)
_LEVELS = {"int8": 127, "int4": 7, "nf4": 1}
_CODE_DTYPES = {"int8": "int8", "int4": "int4", "nf4": "int4", "hqq4": "int4"}
# NF4 (QLoRA): 16 levels at quantiles of a normal distribution, scaled to [-1, 1].
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
_NF4_MIDS = (NF4[1:] + NF4[:-1]) / 2
# hqq4's solver: iterations, and HQQ's defaults for its l_p shrinkage (p, beta, kappa).
HQQ_ITERS = 20
HQQ_P, HQQ_BETA, HQQ_KAPPA = 0.7, 10.0, 1.01

KERNEL, SCALE, ZERO = "kernel", "scale", "zero"


class Leaf(NamedTuple):
    """One stored leaf of a quantized kernel: its shape, logical axis names and dtype."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: Any


def base_scheme(scheme: str) -> str:
    """The 4-bit scheme of a double-quantized one ("nf4+dq" -> "nf4"); others unchanged."""
    return scheme.removesuffix(DQ)


def code_dtype(scheme: str) -> jnp.dtype:
    """The storage dtype of a scheme's codes (int8, int4)."""
    return jnp.dtype(_CODE_DTYPES[base_scheme(scheme)])


def _group_params(scheme: str) -> tuple[str, ...]:
    return (SCALE, ZERO) if base_scheme(scheme) == "hqq4" else (SCALE,)


def leaves(kernel_shape: tuple[int, ...], kernel_axes: tuple[str, ...], scheme: str,
           float_dtype: Any) -> dict[str, Leaf]:
    """Every leaf a kernel [.., in, out] named `kernel_axes` is stored as, by name: the codes
    (`kernel`), the group parameters (`scale`, hqq4's `zero`: [.., out] for int8, else
    [.., in / G, out], in `float_dtype`; uint8 when double-quantized) and their
    double-quantization statistics (`scale_dq`, ...: [.., in / G, ceil(out / 256), 2] fp32)."""
    *lead, n_in, n_out = kernel_shape
    out = {KERNEL: Leaf(tuple(kernel_shape), tuple(kernel_axes), code_dtype(scheme))}
    if scheme == "int8":
        out[SCALE] = Leaf((*lead, n_out), tuple(kernel_axes[-1:]), jnp.dtype(float_dtype))
        return out
    shape = (*lead, n_in // GROUP, n_out)
    for name in _group_params(scheme):
        if scheme.endswith(DQ):
            out[name] = Leaf(shape, tuple(kernel_axes), jnp.dtype(jnp.uint8))
            out[f"{name}_dq"] = Leaf((*shape[:-1], -(-n_out // DQ_BLOCK), 2),
                                     (*kernel_axes, None), jnp.dtype(jnp.float32))
        else:
            out[name] = Leaf(shape, tuple(kernel_axes), jnp.dtype(float_dtype))
    return out


def quantize(w_io: Any, scheme: str, float_dtype: Any, xp: Any = np) -> dict[str, Any]:
    """The leaves (see `leaves`) of a kernel w [.., in, out] (see the module docstring).

    xp: numpy (host arrays) or jax.numpy (device arrays); the arithmetic is fp32 either way.
    """
    w = xp.asarray(w_io).astype(np.float32)
    if xp is np:  # (a transposed view reduces in another order: hqq4's codes would differ)
        w = np.ascontiguousarray(w)
    name = base_scheme(scheme)
    if name != "int8":  # [.., in, out] -> [.., in / G, G, out]
        w = w.reshape(*w.shape[:-2], w.shape[-2] // GROUP, GROUP, w.shape[-1])
    if name == "hqq4":
        scales, zeros = _hqq(w, xp)
        params = {SCALE: scales, ZERO: zeros}
    else:
        amax = xp.max(xp.abs(w), axis=-2)
        # (times the reciprocal, not divided: XLA rewrites a division by a constant so)
        params = {SCALE: amax * np.float32(1 / _LEVELS[name])}
    out = {}
    for key, value in params.items():
        if scheme.endswith(DQ):
            out[key], out[f"{key}_dq"] = _double_quantize(value, xp)
        else:
            out[key] = value.astype(float_dtype)
    # the codes from the parameters as stored (rounded to their dtype or double-quantized)
    rounded = {k: _dequantize_param(out, k, xp).astype(np.float32) for k in params}
    codes = _codes(w, name, rounded, xp)
    if name != "int8":
        codes = codes.reshape(*codes.shape[:-3], -1, codes.shape[-1])
    return {KERNEL: codes.astype(np.int8).astype(code_dtype(scheme)), **out}


def _codes(w: Any, name: str, params: Mapping[str, Any], xp: Any) -> Any:
    """Nearest codes of grouped (or, int8, plain) w given its fp32 group parameters."""
    s = params[SCALE]
    safe = xp.expand_dims(xp.where(s == 0, np.float32(1), s), -2)
    if name == "nf4":
        return xp.searchsorted(xp.asarray(_NF4_MIDS), w / safe) - 8
    if name == "hqq4":
        return xp.clip(xp.round(w / safe + xp.expand_dims(params[ZERO], -2)), -8, 7)
    levels = _LEVELS[name]
    return xp.clip(xp.round(w / safe), -levels, levels)


def _hqq(w: Any, xp: Any) -> tuple[Any, Any]:
    """fp32 (scale, zero point) [.., in / G, out] of grouped w [.., in / G, G, out], Q in -8..7.

    HQQ: the scale spans the group's range, S = (max - min) / 15; the zero point starts at
    the integer nearest to where min maps to code -8 (so a weight of 0 is exact) and takes up
    to `HQQ_ITERS` rounds of half-quadratic splitting: the codes of the current Z; the
    quantization error's sparse part W_e = shrink_p(W - (Q - Z) S) (a generalised soft
    threshold, the proximal step of an l_p norm, p < 1, with a growing weight beta); Z in
    closed form, the mean of Q - (W - W_e) / S. As HQQ, the rounds stop (per kernel: all but
    the two group axes) once the mean |W - (Q - Z) S| stops falling, keeping the Z before.
    (Keeping each group's best Z of all rounds, or fitting S too, lowers the weight error
    but raised SmolLM2's perplexity: docs/qlora.md.)
    """
    lo, hi = xp.min(w, axis=-2, keepdims=True), xp.max(w, axis=-2, keepdims=True)
    scale = (hi - lo) * np.float32(1 / 15)
    scale = xp.where(scale > 0, scale, np.float32(1))  # a constant group: exact at S = 1
    zero = xp.round(-lo / scale) - 8
    best_err = xp.full((*lo.shape[:-3], 1, 1, 1), np.inf, np.float32)
    active, best_zero = best_err > 0, zero  # active: the kernels still improving
    beta = HQQ_BETA
    for _ in range(HQQ_ITERS):
        q = xp.clip(xp.round(w / scale + zero), -8, 7)
        residual = w - (q - zero) * scale
        err = xp.mean(xp.abs(residual), axis=(-3, -2, -1), keepdims=True)
        active = active & (err < best_err)
        best_err, best_zero = xp.where(active, err, best_err), xp.where(active, zero, best_zero)
        mag = xp.abs(residual)
        sparse = xp.sign(residual) * xp.maximum(
            mag - (mag + np.float32(1e-8)) ** np.float32(HQQ_P - 1) / np.float32(beta), 0)
        zero = xp.where(active, xp.mean(q - (w - sparse) / scale, axis=-2, keepdims=True),
                        zero)
        beta *= HQQ_KAPPA
    return scale[..., 0, :].astype(np.float32), best_zero[..., 0, :].astype(np.float32)


def _double_quantize(p: Any, xp: Any) -> tuple[Any, Any]:
    """(uint8 codes [.., out], fp32 (min, step) [.., ceil(out / 256), 2]) of p [.., out]."""
    n_out = p.shape[-1]
    blocks = -(-n_out // DQ_BLOCK)
    pad = [(0, 0)] * (p.ndim - 1) + [(0, blocks * DQ_BLOCK - n_out)]
    grouped = xp.pad(p, pad, mode="edge").reshape(*p.shape[:-1], blocks, DQ_BLOCK)
    lo, hi = xp.min(grouped, axis=-1), xp.max(grouped, axis=-1)
    step = (hi - lo) * np.float32(1 / 255)
    safe = xp.where(step == 0, np.float32(1), step)
    codes = xp.clip(xp.round((grouped - lo[..., None]) / safe[..., None]), 0, 255)
    codes = codes.reshape(*p.shape[:-1], blocks * DQ_BLOCK)[..., :n_out]
    return codes.astype(np.uint8), xp.stack([lo, step], axis=-1).astype(np.float32)


def _dequantize_param(stored: Mapping[str, Any], name: str, xp: Any = jnp) -> Any:
    """A group parameter [.., out] from its stored leaf (and double-quantization stats)."""
    value = stored[name]
    stats = stored.get(f"{name}_dq")
    if stats is None:
        return value
    lo, step = (xp.repeat(stats[..., i], DQ_BLOCK, axis=-1)[..., :value.shape[-1]]
                for i in (0, 1))
    return lo + value.astype(np.float32) * step


def dequantize(stored: Mapping[str, Any], scheme: str, dtype: Any) -> jax.Array:
    """The kernel [.., in, out] in `dtype` from its stored leaves (`quantize`'s dict)."""
    dtype = jnp.dtype(dtype)
    name = base_scheme(scheme)

    def expand(param):  # int8: one value per column; else one row per G input rows
        param = jnp.asarray(_dequantize_param(stored, param)).astype(dtype)
        return jnp.expand_dims(param, -2) if name == "int8" else jnp.repeat(param, GROUP, -2)

    codes = jnp.asarray(stored[KERNEL])
    if name == "nf4":
        return jnp.asarray(NF4, dtype)[codes.astype(jnp.int32) + 8] * expand(SCALE)
    if name == "hqq4":
        return (codes.astype(dtype) - expand(ZERO)) * expand(SCALE)
    return codes.astype(dtype) * expand(SCALE)


def dequantized_param_bound(stored: Mapping[str, Any], name: str) -> Any:
    """Half the double-quantization step of every value of a group parameter [.., out]: the
    most its dequantized value may differ from the value it was quantized from."""
    stats = stored[f"{name}_dq"]
    half = jnp.repeat(stats[..., 1] / 2, DQ_BLOCK, axis=-1)
    return half[..., :stored[name].shape[-1]]


# ------------------------------------------------------------------------------ pytrees


def quantized_modules(params: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Paths of the modules of a params tree whose kernels are stored quantized."""
    return sorted(path[:-1] for path in traverse_util.flatten_dict(params) if path[-1] == SCALE)


def is_group_leaf(path: tuple[str, ...]) -> bool:
    """Whether a params path is a quantized kernel's leaf other than its codes."""
    return path[-1] != KERNEL and path[-1].removesuffix("_dq") in (SCALE, ZERO)


def quantize_tree(params: Mapping[str, Any], scheme: str,
                  modules: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """`params` with the float kernels of `modules` replaced by their quantized leaves
    (jax.numpy, e.g. under jit; group parameters in each kernel's dtype)."""
    flat = dict(traverse_util.flatten_dict(params))
    for module in modules:
        kernel = flat.pop((*module, KERNEL))
        for name, value in quantize(kernel, scheme, kernel.dtype, jnp).items():
            flat[(*module, name)] = value
    return traverse_util.unflatten_dict(flat)


def dequantize_tree(params: Mapping[str, Any], scheme: str) -> dict[str, Any]:
    """`params` with every quantized kernel turned back into a float kernel in its scales'
    dtype (the dtype of the base it was quantized from; fp32 for double-quantized scales);
    the other leaves are dropped."""
    flat = dict(traverse_util.flatten_dict(params))
    for module in quantized_modules(params):
        stored = {path[-1]: flat.pop(path) for path in list(flat)
                  if path[:-1] == module and (path[-1] == KERNEL or is_group_leaf(path))}
        scale = stored[SCALE]
        dtype = scale.dtype if jnp.issubdtype(scale.dtype, jnp.floating) else jnp.float32
        flat[(*module, KERNEL)] = dequantize(stored, scheme, dtype)
    return traverse_util.unflatten_dict(flat)
