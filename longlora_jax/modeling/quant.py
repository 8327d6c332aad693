"""A quantized frozen base: the codes and scales of a projection kernel, and the two ways back.

A projection kernel W [.., in, out] (a leading layer axis when scanned) is stored as codes Q
[.., in, out] and scales S, by scheme (`LlamaConfig.quantize`):

    int8   Q int8, S [.., out]: one scale per output channel, S = max_i |W[i, o]| / 127,
           W ~ Q * S.
    int4   Q int4 (XLA stores two codes to a byte), S [.., in / G, out]: one scale per
           group of G = 64 consecutive input rows and output channel, S = max |W_group| / 7,
           W ~ Q * S (Q in -7..7: symmetric, no zero point).
    nf4    QLoRA's NormalFloat4: int4 codes indexing 16 levels at the quantiles of a normal
           distribution in [-1, 1] (`NF4`), scales as int4 with S = max |W_group|,
           W ~ NF4[Q] * S; a code is the nearest level.

All are symmetric and round to the nearest level. A scale is stored in the dtype of the
base it replaces (bf16 for a bf16 base) and the codes are computed with that rounded scale,
so for int8 and int4 |W - dequantize(Q, S)| <= S / 2 elementwise, exactly as for an fp32
scale (a scale rounded down by bf16 leaves max |W| / S <= 127.5, resp. 7.5, so nothing is
clipped by more than S/2); for nf4 the bound is half the widest gap between levels, times S.
An all-zero column (or group) gets scale 0 and codes 0.

`quantize` is written once for numpy (the loaders quantize each tensor on the host as they
read it) and jax.numpy (a random-init base is quantized on its devices); `dequantize` runs
inside the model's matmul, in the compute dtype, where XLA fuses it into the dot's operand.

Sharding: codes carry the kernel's logical axis names; scales the names of the axes they
follow: int8 (out,), int4 (in, out) for [in / G, out] (a group row splits like the input
rows it scales; see `parallel.rules` for a count of groups the mesh does not divide).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

SCHEMES = ("none", "int8", "int4", "nf4")
GROUP = 64  # input rows per int4 scale (QLoRA's block size)
_LEVELS = {"int8": 127, "int4": 7, "nf4": 1}
_CODE_DTYPES = {"int8": "int8", "int4": "int4", "nf4": "int4"}
# NF4 (QLoRA): 16 levels at quantiles of a normal distribution, scaled to [-1, 1].
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
_NF4_MIDS = (NF4[1:] + NF4[:-1]) / 2


def code_dtype(scheme: str) -> jnp.dtype:
    """The storage dtype of a scheme's codes (int8, int4)."""
    return jnp.dtype(_CODE_DTYPES[scheme])


def scale_shape(kernel_shape: tuple[int, ...], scheme: str) -> tuple[int, ...]:
    """Shape of the scales of a kernel [.., in, out]: [.., out] (int8), [.., in / G, out]."""
    *lead, n_in, n_out = kernel_shape
    return (*lead, n_out) if scheme == "int8" else (*lead, n_in // GROUP, n_out)


def scale_axes(kernel_axes: tuple[str, ...], scheme: str) -> tuple[str, ...]:
    """Logical names of the scales of a kernel named `kernel_axes` (in, out)."""
    return kernel_axes[-1:] if scheme == "int8" else kernel_axes


def quantize(w_io: Any, scheme: str, scale_dtype: Any, xp: Any = np) -> tuple[Any, Any]:
    """(codes, scales) of a kernel w [.., in, out] (see the module docstring).

    xp: numpy (host arrays) or jax.numpy (device arrays); the arithmetic is fp32 either way.
    """
    w = xp.asarray(w_io).astype(np.float32)
    grouped = scheme != "int8"
    if grouped:  # [.., in, out] -> [.., in / G, G, out]
        w = w.reshape(*w.shape[:-2], w.shape[-2] // GROUP, GROUP, w.shape[-1])
    amax = xp.max(xp.abs(w), axis=-2)
    # (times the reciprocal, not divided: XLA rewrites a division by a constant so)
    scales = (amax * np.float32(1 / _LEVELS[scheme])).astype(scale_dtype)
    s = scales.astype(np.float32)
    safe = xp.where(s == 0, np.float32(1), s)
    levels = _LEVELS[scheme]
    if scheme == "nf4":
        codes = xp.searchsorted(xp.asarray(_NF4_MIDS), w / xp.expand_dims(safe, -2)) - 8
    else:
        codes = xp.clip(xp.round(w / xp.expand_dims(safe, -2)), -levels, levels)
    if grouped:
        codes = codes.reshape(*codes.shape[:-3], -1, codes.shape[-1])
    return codes.astype(np.int8).astype(code_dtype(scheme)), scales


def dequantize(codes: jax.Array, scales: jax.Array, scheme: str, dtype: Any) -> jax.Array:
    """The kernel [.., in, out] in `dtype` from its codes and scales."""
    dtype = jnp.dtype(dtype)
    s = scales.astype(dtype)
    # int8: one scale per column; int4: one scale row per G input rows
    s = jnp.expand_dims(s, -2) if scheme == "int8" else jnp.repeat(s, GROUP, axis=-2)
    if scheme == "nf4":
        return jnp.asarray(NF4, dtype)[codes.astype(jnp.int32) + 8] * s
    return codes.astype(dtype) * s


# ------------------------------------------------------------------------------ pytrees

KERNEL, SCALE = "kernel", "scale"


def quantized_modules(params: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Paths of the modules of a params tree whose kernels are stored quantized."""
    return sorted(path[:-1] for path in traverse_util.flatten_dict(params) if path[-1] == SCALE)


def quantize_tree(params: Mapping[str, Any], scheme: str,
                  modules: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """`params` with the float kernels of `modules` replaced by codes and scales (jax.numpy,
    e.g. under jit; scales in each kernel's dtype)."""
    flat = dict(traverse_util.flatten_dict(params))
    for module in modules:
        kernel = flat[(*module, KERNEL)]
        flat[(*module, KERNEL)], flat[(*module, SCALE)] = quantize(kernel, scheme, kernel.dtype,
                                                                    jnp)
    return traverse_util.unflatten_dict(flat)


def dequantize_tree(params: Mapping[str, Any], scheme: str) -> dict[str, Any]:
    """`params` with every quantized kernel turned back into a float kernel in its scales'
    dtype (the dtype of the base it was quantized from); the scales are dropped."""
    flat = dict(traverse_util.flatten_dict(params))
    for module in quantized_modules(params):
        scales = flat.pop((*module, SCALE))
        flat[(*module, KERNEL)] = dequantize(flat[(*module, KERNEL)], scales, scheme,
                                             scales.dtype)
    return traverse_util.unflatten_dict(flat)
