"""Attention kernels: causal attention within contiguous groups of tokens ("grouped causal").

Every kernel here computes the same thing: the sequence [0, N) is cut into groups
[0, G), [G, 2G), ...; each query attends causally to the keys of its own group (and, with
`segment_ids` [B, N], only to keys of its own segment; with a sliding `window` W, only to the
keys fewer than W positions before it in the group: itself and the W - 1 before). S2-Attn
(`attention.py`) is built from such calls (the shifted heads on a shifted view of the
sequence); the fused backends also serve full causal attention as one group of G = N. With
`s2_splash_mask`, splash does S2 directly: one call per run of heads that share a mask
(`attention.py`, which also splits the heads over devices).

Shapes: q [B, N, Hq, D]; k, v [B, N, Hkv, D] with Hq a multiple of Hkv (query head h reads kv
head h // (Hq // Hkv)); output [B, N, Hq, D]. Softmax statistics are fp32.

Backends:
  `blocked_grouped_causal`  XLA, every platform. Each group is split into blocks of T tokens and
      query block i meets key blocks 0..i only (causal block skipping); a loop over (batch,
      kv head, group) chunks keeps the live scores to one group, and a custom VJP recomputes
      them in the backward pass from the saved log-sum-exp (flash-attention style), so memory
      is O(N) beyond one group's O(G^2 / 2) scores and FLOPs are ~G/N of full attention.
  `splash_grouped_causal`   TPU Pallas splash attention (`interpret=True` runs it on CPU);
      `make_splash_kernel` + `run_splash` for any per-head masks.
  `cudnn_grouped_causal`    GPU cuDNN fused attention on the groups folded into the batch.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
)

# Block size T of the blocked XLA kernel (tokens) for groups over 4 x DEFAULT_BLOCK; half of
# it for smaller groups (`default_block`). Chosen by timing forward + backward on CPU.
DEFAULT_BLOCK = 256
# Score elements per loop step of the blocked kernel (chunks are batched up to this; the
# bench sets it huge to unroll the loop for XLA cost analysis, which counts a body once).
SCORES_PER_STEP = 1 << 22


def _first_block(i: int, t: int, window: int | None) -> int:
    """The first key block query block i can see: 0, or the one holding i*T - (W - 1)."""
    return 0 if window is None else max(0, (i * t - window + 1) // t)


def _row_mask(i: int, t: int, seg_q=None, seg_k=None, *, window: int | None = None,
              transposed: bool = False):
    """Visible scores of query block i against key blocks j0..i: [T, (i+1-j0)T] (or its
    transpose), j0 = `_first_block` (0 without a window).

    Earlier key blocks are fully visible (later ones were skipped); the diagonal block is
    lower-triangular; a window also cuts the older keys. seg_q [T] and seg_k [(i+1-j0)T] add
    "same segment".
    """
    j0 = _first_block(i, t, window)
    shape = (t, (i + 1 - j0) * t)
    row = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + i * t
    col = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + j0 * t
    mask = row >= col
    if window is not None:
        mask = mask & (row - col < window)
    if seg_q is not None:
        mask = mask & (seg_q[:, None] == seg_k[None, :])
    return mask.T if transposed else mask


def _chunk_forward(q, k, v, seg, window=None):
    """One chunk (a group): q [nb, R, T, D] (pre-scaled), k, v [nb, T, D], seg [nb, T] | None.

    Query block i attends key blocks j0..i only (causal block skipping; j0 > 0 when a window
    rules out the older blocks), as one [T, (i+1-j0)T] score matrix per block. Returns out
    [nb, R, T, D] (q's dtype) and lse [nb, R, T] (fp32).
    """
    nb, _, t, d = q.shape
    k_flat, v_flat = k.reshape(nb * t, d), v.reshape(nb * t, d)
    seg_flat = None if seg is None else seg.reshape(nb * t)
    outs, lses = [], []
    for i in range(nb):
        keys = slice(_first_block(i, t, window) * t, (i + 1) * t)
        s = jnp.einsum("rtd,sd->rts", q[i], k_flat[keys], preferred_element_type=jnp.float32)
        seg_i = None if seg is None else (seg[i], seg_flat[keys])
        s = jnp.where(_row_mask(i, t, *(seg_i or ()), window=window), s, -jnp.inf)
        m = s.max(-1)
        e = jnp.exp(s - m[..., None])
        denom = e.sum(-1)
        pv = jnp.einsum("rts,sd->rtd", e.astype(v.dtype), v_flat[keys],
                        preferred_element_type=jnp.float32)
        outs.append(pv / denom[..., None])
        lses.append(m + jnp.log(denom))
    return jnp.stack(outs).astype(q.dtype), jnp.stack(lses)


def _chunk_backward(q, k, v, seg, out, lse, dout, window=None):
    """Gradients of one chunk (shapes as `_chunk_forward`), scores recomputed from lse.

    Scores are recomputed transposed ([(i+1)T, R, T]) so that dK = dS^T Q and dV = P^T dO
    are plain matmuls on this CPU's matmul library; only dQ needs the transposed operand.
    """
    nb, _, t, d = q.shape
    f32 = jnp.float32
    k_flat, v_flat = k.reshape(nb * t, d), v.reshape(nb * t, d)
    seg_flat = None if seg is None else seg.reshape(nb * t)
    delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1)  # [nb, R, T]
    dk = jnp.zeros((nb * t, d), f32)
    dv = jnp.zeros((nb * t, d), f32)
    dqs = []
    for i in range(nb):
        keys = slice(_first_block(i, t, window) * t, (i + 1) * t)
        seg_i = None if seg is None else (seg[i], seg_flat[keys])
        mask = _row_mask(i, t, *(seg_i or ()), window=window, transposed=True)[:, None]
        st = jnp.einsum("sd,rtd->srt", k_flat[keys], q[i], preferred_element_type=f32)
        pt = jnp.exp(jnp.where(mask, st - lse[i][None], -jnp.inf))
        dpt = jnp.einsum("sd,rtd->srt", v_flat[keys], dout[i], preferred_element_type=f32)
        dst = pt * (dpt - delta[i][None])
        dk = dk.at[keys].add(jnp.einsum("srt,rtd->sd", dst.astype(q.dtype), q[i],
                                        preferred_element_type=f32))
        dv = dv.at[keys].add(jnp.einsum("srt,rtd->sd", pt.astype(dout.dtype), dout[i],
                                        preferred_element_type=f32))
        dq_t = jnp.einsum("ds,srt->drt", k_flat[keys].T, dst.astype(k.dtype),
                          preferred_element_type=f32)
        dqs.append(dq_t.transpose(1, 2, 0))
    return (
        jnp.stack(dqs).astype(q.dtype),
        dk.reshape(nb, t, d).astype(k.dtype),
        dv.reshape(nb, t, d).astype(v.dtype),
    )


def map_chunks(fn, args, scores_per_chunk: int):
    """lax.map of fn over the leading (chunk) axis of args, as many chunks per step as fit
    `SCORES_PER_STEP` score elements (at least one); None args pass through as None."""
    present = [a is not None for a in args]
    xs = tuple(a for a in args if a is not None)

    def body(xs_c):
        it = iter(xs_c)
        return fn(*[next(it) if p else None for p in present])

    steps = max(1, SCORES_PER_STEP // scores_per_chunk)
    return jax.lax.map(body, xs, batch_size=min(steps, xs[0].shape[0]))


def _chunk_scores(q) -> int:
    """Score elements of one chunk q [C, nb, R, T, D]: nb(nb+1)/2 block pairs of R x T x T."""
    _, nb, r, t, _ = q.shape
    return nb * (nb + 1) // 2 * r * t * t


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_core(q, k, v, seg, window):
    """q [C, nb, R, T, D] (pre-scaled), k, v [C, nb, T, D], seg [C, nb, T] | None -> out."""
    return _blocked_core_fwd(q, k, v, seg, window)[0]


def _blocked_core_fwd(q, k, v, seg, window):
    forward = functools.partial(_chunk_forward, window=window)
    out, lse = map_chunks(forward, (q, k, v, seg), _chunk_scores(q))
    return out, (q, k, v, seg, out, lse)


def _blocked_core_bwd(window, res, dout):
    q, k, v, seg, out, lse = res
    backward = functools.partial(_chunk_backward, window=window)
    dq, dk, dv = map_chunks(backward, (q, k, v, seg, out, lse, dout), _chunk_scores(q))
    return dq, dk, dv, None


_blocked_core.defvjp(_blocked_core_fwd, _blocked_core_bwd)


def default_block(group: int) -> int:
    """Block size T for a group: DEFAULT_BLOCK / 2 for groups up to 4 x DEFAULT_BLOCK tokens,
    else DEFAULT_BLOCK; a group no longer than that is one block.

    Measured on CPU (SmolLM2 heads 9x64/3, forward + backward, 2 cores): T = 128 against 512
    takes 0.051 vs 0.065 s at G = 512, 0.125 vs 0.145 s at G = 1024; T = 256 against 512
    takes 0.40 vs 0.45 s at G = 2048 and 1.69 vs 1.89 s at G = 4096 (smaller blocks skip
    more of the causal triangle and keep the scores in cache; 128 is no faster at 2048).
    """
    block = DEFAULT_BLOCK // 2 if group <= 4 * DEFAULT_BLOCK else DEFAULT_BLOCK
    return group if group <= block else block


def blocked_grouped_causal(q_bnhd, k_bnkd, v_bnkd, *, group: int, segment_ids=None,
                           window: int | None = None, block: int | None = None) -> jax.Array:
    """Grouped causal attention in XLA with causal block skipping (see module docstring).

    `group` must divide N. `block` (T, default `default_block(group)`) need not divide the
    group: each group is padded at its end to a multiple of T, which causality hides. A
    `window` also skips the key blocks entirely older than it (O(N W) work, not O(N G)).
    """
    b, n, hq, d = q_bnhd.shape
    hkv = k_bnkd.shape[2]
    r, ng = hq // hkv, n // group
    t = block or default_block(group)
    nb = -(-group // t)
    pad = nb * t - group

    def chunks(x, heads: tuple[int, ...]):
        # [B, N, *heads, D] -> [B * Hkv * ng, nb, *R, T, D]
        x = x.reshape(b, ng, group, *heads, d)
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (len(heads) + 1))
        x = x.reshape(b, ng, nb, t, *heads, d)
        order = (0, 4, 1, 2, *range(5, 4 + len(heads)), 3, 3 + len(heads) + 1)
        return x.transpose(order).reshape(b * hkv * ng, nb, *heads[1:], t, d)

    scale = jnp.asarray(1.0 / math.sqrt(d), q_bnhd.dtype)
    qc = chunks(q_bnhd.reshape(b, n, hkv, r, d) * scale, (hkv, r))
    kc, vc = chunks(k_bnkd, (hkv,)), chunks(v_bnkd, (hkv,))
    segc = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32).reshape(b, ng, group)
        seg = jnp.pad(seg, [(0, 0), (0, 0), (0, pad)])
        seg = jnp.broadcast_to(seg.reshape(b, 1, ng, nb, t), (b, hkv, ng, nb, t))
        segc = seg.reshape(b * hkv * ng, nb, t)
    out = _blocked_core(qc, kc, vc, segc, window)  # [C, nb, R, T, D]
    out = out.reshape(b, hkv, ng, nb, r, t, d).transpose(0, 2, 3, 5, 1, 4, 6)
    return out.reshape(b, ng, nb * t, hq, d)[:, :, :group].reshape(b, n, hq, d)


# --------------------------------------------------------------------------- TPU splash


def target_platform() -> str:
    """The platform being compiled for: the current mesh's (AOT for a TPU topology from a
    CPU host included), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


class _S2Mask(splash_mask._ComputableMask):
    """Splash mask of one head: causal within (shifted) groups, optionally wrapped.

    Unshifted: same group p // G. Shifted, wrap=False: same group (p + G/2) // G. Shifted,
    wrap=True: positions rolled left by G/2 within `period` tokens (N padded to a multiple of
    G), same rolled group and causal in rolled order; keys at or beyond `valid` are padding.
    A sliding `window` W keeps the keys fewer than W positions back in that (rolled) order.
    `sink_tokens` S: keys j < S are also visible to every query at or after them.
    """

    def __init__(self, length: int, group: int, shifted: bool, wrap: bool, valid: int,
                 window: int | None = None, sink_tokens: int = 0):
        self.params = (length, group, shifted, wrap, valid, window, sink_tokens)
        half, period = group // 2, -(-valid // group) * group

        def mask_function(q_ids, kv_ids):
            keep = s2_keep(q_ids, kv_ids)
            if sink_tokens:  # attention sinks: the first tokens are visible to every group
                keep = keep | ((kv_ids < sink_tokens) & (kv_ids <= q_ids))
            return keep

        def s2_keep(q_ids, kv_ids):
            if shifted and wrap:
                rq, rk = (q_ids - half) % period, (kv_ids - half) % period
                keep = (rq // group == rk // group) & (rq >= rk)
                if window is not None:
                    keep = keep & (rq - rk < window)
                return keep & ((kv_ids < valid) | (q_ids >= valid))
            offset = half if shifted else 0
            same = (q_ids + offset) // group == (kv_ids + offset) // group
            keep = same & (q_ids >= kv_ids)
            return keep if window is None else keep & (q_ids - kv_ids < window)

        super().__init__(shape=(length, length), mask_function=mask_function)

    def __eq__(self, other):
        return isinstance(other, _S2Mask) and self.params == other.params

    def __hash__(self):
        return hash((_S2Mask, self.params))


# The fused splash backward writes one partial dq per key block ([N/T, H, N, D] in q's dtype,
# summed afterwards): O(N^2) memory, 298 GiB for one 7B layer at 100k tokens. Beyond this many
# key blocks the separate dq kernel runs instead (one more pass over the scores, O(N) memory).
FUSED_BWD_MAX_KV_BLOCKS = 16


def splash_length(n: int) -> int:
    """The sequence length splash runs at: N padded to a multiple of 512 (its largest block)
    from 4096 tokens on (at most 1/8 more), else of 128."""
    quantum = 512 if n >= 4096 else 128
    return -(-n // quantum) * quantum


def make_splash_kernel(head_masks: list[_S2Mask], interpret: bool | None = None,
                       head_shards: int = 1):
    """A splash attention kernel with one mask per query head (a pytree: pass it through
    `shard_map` with `kernel.manual_sharding_spec(...)` to split heads over `head_shards`
    devices).

    Blocks of T = 512 tokens (256 or 128 when the length needs them). The backward is the
    fused kernel up to `FUSED_BWD_MAX_KV_BLOCKS` key blocks, separate dq and dk/dv kernels
    above. Heads sharing one mask keep one head's block tables in TPU scalar memory (1 MiB
    per core); distinct masks keep each device's heads' tables (`attention.py` calls one
    kernel per run of heads that share a mask unless the heads are split over devices).
    """
    length = head_masks[0].shape[0]
    block = next(b for b in (512, 256, 128) if length % b == 0)
    fused = length // block <= FUSED_BWD_MAX_KV_BLOCKS
    dq_blocks = {} if fused else {"block_q_dq": block, "block_kv_dq": block}
    sizes = splash_kernel.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=fused,
        **dq_blocks,
    )
    if interpret is None:
        interpret = target_platform() != "tpu"
    return splash_kernel.make_splash_mha(
        splash_mask.MultiHeadMask(head_masks), block_sizes=sizes, head_shards=head_shards,
        q_seq_shards=1, interpret=interpret,
    )


def s2_splash_mask(n: int, group: int, shifted: bool, wrap: bool, window: int | None = None,
                   sink_tokens: int = 0) -> _S2Mask:
    """One head's S2 mask for N tokens (shifted or not), within the sliding `window` if
    given, plus `sink_tokens` global keys (see `_S2Mask`)."""
    return _S2Mask(splash_length(n), group, shifted=shifted, wrap=wrap, valid=n, window=window,
                   sink_tokens=sink_tokens)


def s2_splash_masks(n: int, hq: int, group: int, wrap: bool, shift: bool = True,
                    window: int | None = None, sink_tokens: int = 0) -> list[_S2Mask]:
    """Per-head S2 masks for N tokens: heads h >= Hq // 2 shifted unless `shift` is off
    (short attention); see `s2_splash_mask`."""
    return [s2_splash_mask(n, group, shift and h >= hq // 2, wrap, window, sink_tokens)
            for h in range(hq)]


def run_splash(kernel, q_bnhd, k_bnkd, v_bnkd, segment_ids=None) -> jax.Array:
    """Applies a splash `kernel` to [B, N, H, D] arrays (N padded to the kernel's length)."""
    n, d = q_bnhd.shape[1], q_bnhd.shape[3]
    pad = splash_length(n) - n

    def heads_first(x):  # [B, N, H, D] -> [B, H, N', D]
        return jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

    scale = jnp.asarray(1.0 / math.sqrt(d), q_bnhd.dtype)
    args = [heads_first(q_bnhd * scale), heads_first(k_bnkd), heads_first(v_bnkd)]
    if segment_ids is None:
        out = jax.vmap(kernel)(*args)
    else:
        seg = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, pad)])
        ids = splash_kernel.SegmentIds(q=seg, kv=seg)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(*args, ids)
    return out.transpose(0, 2, 1, 3)[:, :n].astype(q_bnhd.dtype)


def splash_grouped_causal(q_bnhd, k_bnkd, v_bnkd, *, group: int, segment_ids=None,
                          window: int | None = None, interpret: bool | None = None) -> jax.Array:
    """Grouped causal attention with TPU splash attention (`interpret` defaults to "not TPU")."""
    n, hq = q_bnhd.shape[1], q_bnhd.shape[2]
    mask = _S2Mask(splash_length(n), group, shifted=False, wrap=False, valid=n, window=window)
    kernel = make_splash_kernel([mask] * hq, interpret)
    return run_splash(kernel, q_bnhd, k_bnkd, v_bnkd, segment_ids)


# --------------------------------------------------------------------------- GPU cuDNN


def cudnn_grouped_causal(q_bnhd, k_bnkd, v_bnkd, *, group: int, segment_ids=None,
                         window: int | None = None) -> jax.Array:
    """Grouped causal attention with cuDNN flash attention: groups folded into the batch.

    cuDNN needs fp16/bf16 inputs on an NVIDIA GPU; segment ids become a boolean mask; a
    sliding window is cuDNN's own local window (W - 1 keys back, none ahead).
    """
    b, n, hq, d = q_bnhd.shape
    ng = n // group

    def fold(x):
        return x.reshape(b * ng, group, *x.shape[2:])

    mask = None
    if segment_ids is not None:
        seg = segment_ids.reshape(b * ng, group)
        mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    out = jax.nn.dot_product_attention(
        fold(q_bnhd), fold(k_bnkd), fold(v_bnkd), mask=mask, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn",
    )
    return out.reshape(b, n, hq, d)
