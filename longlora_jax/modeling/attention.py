"""Attention: full causal and shifted sparse (S2) attention, and the backend dispatch.

q [B, N, Hq, D]; k, v [B, N, Hkv, D] with Hq a multiple of Hkv (GQA: query head h reads kv head
h // (Hq // Hkv)); output [B, N, Hq, D]. Softmax is computed in fp32.

S2-Attn with group size G (even, <= N), exactly as the official LongLoRA code computes it
(`docs/s2_attention.md` has the same rules with pictures of the masks):
  * query heads h < Hq // 2 attend causally within the groups [0, G), [G, 2G), ...;
  * heads h >= Hq // 2 are "shifted": q, k, v rolled left by G/2, attended causally within
    groups, the output rolled back. With `wrap=False` (default, the official flash path) the
    shifted groups are [0, G/2), [G/2, 3G/2), ..., [N - G/2, N): the rolled last group is split
    so no token sees its future. With `wrap=True` (the paper's Algorithm 1) it is one group:
    the first G/2 tokens also see the last G/2 tokens.
  * a shifted query head reads the shifted copy of its own kv head; a kv head that serves
    both kinds (e.g. 9 query / 3 kv heads: kv head 1 serves q heads 3 | 4, 5) is used twice,
    never copied Hq / Hkv times.
  * N not a multiple of G is padded at the end (causality hides the padding; with `wrap=True`
    the padded keys are masked).
  * `segment_ids` [B, N] (packed documents) additionally restricts attention to equal ids.
  * `window` W (Mistral's sliding window) additionally restricts a query to the keys fewer
    than W positions before it in its group's attention order: itself and the W - 1 before.
    A group longer than W attends within both; in the original order everywhere except the
    wrapped group of `wrap=True`, whose order is the rolled (padded) one. Full causal
    attention is one group of N, so there it is exactly HF's sliding-window mask.

Rolling is realised as slicing: the shifted groups are [G/2, N - G/2) cut into groups of G, plus
the "straddling" group (the last G/2 tokens followed by the first G/2), which `wrap=False` cuts
in two. The same decomposition runs per device under sequence parallelism, where "followed by
the first G/2 tokens" means the next device's first G/2 tokens: one collective-permute each way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from longlora_jax.errors import ConfigError
from longlora_jax.modeling import kernels, sinks
from longlora_jax.modeling.config import ATTENTION_IMPLS, LlamaConfig
from longlora_jax.parallel.mesh import BATCH_AXES, SEQUENCE, TENSOR

# --------------------------------------------------------------------------- validation


def _check_inputs(q, k, v, segment_ids) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ConfigError(f"{name} must be rank 4 [B, N, H, D], got shape {tuple(x.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ConfigError(
            f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree: "
            "need q [B, N, Hq, D] and k, v [B, N, Hkv, D]"
        )
    if q.shape[2] % k.shape[2]:
        raise ConfigError(
            f"query heads Hq={q.shape[2]} must be a multiple of kv heads Hkv={k.shape[2]}"
        )
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(q.shape[:2]):
        raise ConfigError(
            f"segment_ids shape {tuple(segment_ids.shape)} must be [B, N] = {tuple(q.shape[:2])}"
        )


def _check_group(group_size: int, n: int) -> None:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ConfigError(f"S2 group_size must be a positive even int, got {group_size!r}")
    if group_size > n:
        raise ConfigError(f"S2 group_size={group_size} exceeds the sequence length N={n}")


def resolve_impl(impl: str, dtype=jnp.float32) -> str:
    """The concrete backend for `impl`: auto = splash on TPU, cudnn on GPU (fp16/bf16), xla."""
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention impl {impl!r} is not one of: {', '.join(ATTENTION_IMPLS)}")
    if impl != "auto":
        return impl
    platform = kernels.target_platform()
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16):
        return "cudnn"
    return "xla"


# --------------------------------------------------------------------------- full causal


def causal_attention(q_bnhd, k_bnkd, v_bnkd, *, segment_ids=None, impl: str = "xla",
                     window: int | None = None) -> jax.Array:
    """Full causal attention; `segment_ids` [B, N] masks across packed documents; `window`
    W: a sliding window (a query sees itself and the W - 1 keys before it).

    impl: xla (the blocked flash-style kernel as one group of N: causal block skipping,
    scores recomputed in the backward pass, O(N) memory) | splash | cudnn | auto.
    """
    _check_inputs(q_bnhd, k_bnkd, v_bnkd, segment_ids)
    impl = resolve_impl(impl, q_bnhd.dtype)
    mesh = _mesh_axes()
    if mesh is not None:  # the kernels run per device, with the whole sequence
        mesh = dataclasses.replace(mesh, seq_size=1)
    if impl == "splash":
        n, hq = q_bnhd.shape[1:3]
        masks = kernels.s2_splash_masks(n, hq, group=n, wrap=False, window=window)[:1] * hq
        return _splash_per_device(masks, q_bnhd, k_bnkd, v_bnkd, segment_ids, mesh)

    def whole(q, k, v, seg):
        return _GROUPED[impl](q, k, v, group=q.shape[1], segment_ids=seg, window=window)

    if mesh is None:
        return whole(q_bnhd, k_bnkd, v_bnkd, segment_ids)
    return _per_device(whole, (q_bnhd, k_bnkd, v_bnkd, segment_ids), mesh)


# --------------------------------------------------------------------------- S2 layout


@dataclasses.dataclass(frozen=True)
class _HeadRun:
    """Query heads [q0, q1) reading kv heads [k0, k1), all shifted or all not."""

    q0: int
    q1: int
    k0: int
    k1: int
    shifted: bool


def head_runs(hq: int, hkv: int, shift: bool = True) -> list[_HeadRun]:
    """Splits the heads into runs with a uniform GQA ratio and shift (at most 4 runs).

    Query heads h >= Hq // 2 are shifted. If that boundary falls inside a kv head's query
    group (Hq // 2 not a multiple of Hq // Hkv), that kv head appears in two runs. Without
    `shift` (short attention) every head is one unshifted run.
    """
    if not shift:
        return [_HeadRun(0, hq, 0, hkv, False)]
    r, half = hq // hkv, hq // 2
    jb, a = divmod(half, r)
    runs = []
    if jb:
        runs.append(_HeadRun(0, jb * r, 0, jb, False))
    if a:
        runs.append(_HeadRun(jb * r, half, jb, jb + 1, False))
        runs.append(_HeadRun(half, (jb + 1) * r, jb, jb + 1, True))
        jb += 1
    if jb < hkv:
        runs.append(_HeadRun(jb * r, hq, jb, hkv, True))
    return runs


@dataclasses.dataclass(frozen=True)
class _Neighbours:
    """How a device reaches the tokens after and before its own block of the sequence.

    Unsharded, the "next block" is the sequence itself (so the straddling group is the last
    G/2 tokens followed by the first G/2, i.e. the roll); under sequence parallelism it is
    the next device's block, fetched with a collective-permute.
    """

    from_next: Callable[[jax.Array], jax.Array]
    from_prev: Callable[[jax.Array], jax.Array]
    is_last: bool | jax.Array  # whether this block ends the sequence (static True unsharded)


_UNSHARDED = _Neighbours(from_next=lambda x: x, from_prev=lambda x: x, is_last=True)


def _ring(axis: str, size: int) -> _Neighbours:
    to_prev = [(j, (j - 1) % size) for j in range(size)]
    to_next = [(j, (j + 1) % size) for j in range(size)]
    return _Neighbours(
        from_next=lambda x: jax.lax.ppermute(x, axis, to_prev),
        from_prev=lambda x: jax.lax.ppermute(x, axis, to_next),
        is_last=jax.lax.axis_index(axis) == size - 1,
    )


def _shifted_groups(q, k, v, seg, valid, *, group: int, wrap: bool, grouped, nbrs: _Neighbours):
    """Shifted-head attention on one block of n tokens (n a multiple of G), any backend.

    q [B, n, H, D], k, v [B, n, Hk, D], seg [B, n] int32 | None, valid [B, n] bool | None
    (False on padding; only consulted with wrap=True). Returns [B, n, H, D].
    """
    half, n = group // 2, q.shape[1]

    def straddle(x):  # [tail of this block | head of the next block], G tokens
        return jnp.concatenate([x[:, n - half:], nbrs.from_next(x[:, :half])], axis=1)

    outs_mid = []
    if n > group:
        mid = slice(half, n - half)
        seg_mid = None if seg is None else seg[:, mid]
        outs_mid.append(grouped(q[:, mid], k[:, mid], v[:, mid], group=group, segment_ids=seg_mid))
    q_s, k_s, v_s = straddle(q), straddle(k), straddle(v)
    seg_s = None if seg is None else straddle(seg)
    if not wrap and nbrs.is_last is True:
        out_s = grouped(q_s, k_s, v_s, group=half, segment_ids=seg_s)  # two half groups
    else:
        split = None
        if not wrap:  # the last device's straddling group is two half groups
            second = jnp.arange(group) >= half
            split = jnp.broadcast_to(second & nbrs.is_last, (q.shape[0], group))
        elif valid is not None:  # the sequence's last keys may be padding
            split = ~straddle(valid)
        if split is not None:
            base = jnp.zeros(split.shape, jnp.int32) if seg_s is None else seg_s
            seg_s = base * 2 + split.astype(jnp.int32)
        out_s = grouped(q_s, k_s, v_s, group=group, segment_ids=seg_s)
    head = nbrs.from_prev(out_s[:, half:])
    return jnp.concatenate([head, *outs_mid, out_s[:, :half]], axis=1)


def _s2_block(q, k, v, seg, valid, *, group: int, wrap: bool, shift: bool, grouped,
              nbrs: _Neighbours):
    """S2 on one block of tokens: the head runs, unshifted ones plain grouped attention."""
    outs = []
    for run in head_runs(q.shape[2], k.shape[2], shift):
        qr, kr, vr = q[:, :, run.q0:run.q1], k[:, :, run.k0:run.k1], v[:, :, run.k0:run.k1]
        if run.shifted:
            outs.append(_shifted_groups(qr, kr, vr, seg, valid, group=group, wrap=wrap,
                                        grouped=grouped, nbrs=nbrs))
        else:
            outs.append(grouped(qr, kr, vr, group=group, segment_ids=seg))
    return jnp.concatenate(outs, axis=2)


# --------------------------------------------------------------------------- meshes


@dataclasses.dataclass(frozen=True)
class _MeshAxes:
    batch: tuple[str, ...]  # mesh axes splitting the batch (data, fsdp; those > 1)
    batch_size: int
    seq_size: int
    tensor_size: int


def _mesh_axes() -> _MeshAxes | None:
    """How the current mesh splits batch, tokens and heads; None outside `sharding.activate`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    batch = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    return _MeshAxes(batch, math.prod(sizes[a] for a in batch), sizes.get(SEQUENCE, 1),
                     sizes.get(TENSOR, 1))


def _per_device(fn, args, mesh: _MeshAxes, *, split_heads: bool = False, kernel=None):
    """Runs fn(*args) per device (shard_map): [B, N, ...] arrays split over batch and sequence.

    With `split_heads`, 4-D arrays' heads (axis 2) are split over `tensor` too; otherwise a
    tensor-parallel split of heads is gathered first. A splash `kernel` goes first in fn's
    arguments, its per-head mask data split like the heads.
    """
    b = args[0].shape[0]
    batch = mesh.batch if mesh.batch and b % mesh.batch_size == 0 else None
    seq = SEQUENCE if mesh.seq_size > 1 else None
    heads = TENSOR if split_heads else None

    def spec(x):
        return None if x is None else PartitionSpec(batch, seq, *([heads] if x.ndim == 4 else []))

    in_specs = tuple(spec(x) for x in args)
    if kernel is not None:  # mask data is per head unless all heads share one mask
        per_head = kernel.fwd_mask_info.data_next
        mask_heads = heads if per_head is not None and per_head.shape[0] > 1 else None
        data_spec = NamedSharding(jax.sharding.get_abstract_mesh(), PartitionSpec(mask_heads, seq))
        in_specs, args = (kernel.manual_sharding_spec(data_spec), *in_specs), (kernel, *args)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=PartitionSpec(batch, seq, heads),
                         check_vma=False)(*args)


def _splits_heads(q_bnhd, k_bnkd, mesh: _MeshAxes | None) -> bool:
    """Whether splash can split the heads over `tensor` (Hq and Hkv both divide)."""
    return (mesh is not None and mesh.tensor_size > 1
            and not (q_bnhd.shape[2] % mesh.tensor_size or k_bnkd.shape[2] % mesh.tensor_size))


def _splash_per_device(masks, q_bnhd, k_bnkd, v_bnkd, seg, mesh: _MeshAxes | None):
    """Splash attention with per-head `masks`, heads split over `tensor` when they divide
    (each device then holds only its own heads' block tables)."""
    split = _splits_heads(q_bnhd, k_bnkd, mesh)
    kernel = kernels.make_splash_kernel(masks, head_shards=mesh.tensor_size if split else 1)
    if mesh is None:
        return kernels.run_splash(kernel, q_bnhd, k_bnkd, v_bnkd, seg)
    return _per_device(kernels.run_splash, (q_bnhd, k_bnkd, v_bnkd, seg), mesh,
                       split_heads=split, kernel=kernel)


def _splash_s2(q_bnhd, k_bnkd, v_bnkd, seg, mesh: _MeshAxes | None, *, group: int, wrap: bool,
               shift: bool, window: int | None, sink_tokens: int = 0) -> jax.Array:
    """S2 on splash, the shift in the masks. Heads split over `tensor`: one kernel with
    per-head masks. Otherwise one kernel per run of heads sharing a mask (`head_runs`; two
    for most models): a kernel whose heads share a mask keeps one head's block tables in
    TPU scalar memory (1 MiB), where 32 heads' tables overflow it from 64k tokens on."""
    n, hq, hkv = q_bnhd.shape[1], q_bnhd.shape[2], k_bnkd.shape[2]
    if _splits_heads(q_bnhd, k_bnkd, mesh):
        masks = kernels.s2_splash_masks(n, hq, group, wrap, shift, window, sink_tokens)
        return _splash_per_device(masks, q_bnhd, k_bnkd, v_bnkd, seg, mesh)
    outs = []
    for run in head_runs(hq, hkv, shift):
        mask = kernels.s2_splash_mask(n, group, run.shifted, wrap, window, sink_tokens)
        kv = slice(run.k0, run.k1)
        outs.append(_splash_per_device([mask] * (run.q1 - run.q0), q_bnhd[:, :, run.q0:run.q1],
                                       k_bnkd[:, :, kv], v_bnkd[:, :, kv], seg, mesh))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


# --------------------------------------------------------------------------- S2 entry


def s2_attention(q_bnhd, k_bnkd, v_bnkd, *, group_size: int, wrap: bool = False,
                 segment_ids=None, impl: str = "xla", shift: bool = True,
                 window: int | None = None, sink_tokens: int = 0) -> jax.Array:
    """Shifted sparse attention (see module docstring); impl: xla | splash | cudnn | auto.
    `window`: a sliding window W applied within the groups too (None: none).
    `sink_tokens` S > 0: the first S tokens are also visible to every group (attention
    sinks, `modeling.sinks`; xla and splash, no sequence sharding).

    shift=False is short attention: every head attends within the unshifted groups (the
    paper's ablation of the shift; no information crosses a group boundary).

    Inside `sharding.activate(mesh)` the computation runs per device (shard_map): the batch
    split over data/fsdp, the tokens over `sequence` (N / sequence size must then be a multiple
    of G, and the shift is a neighbour exchange: collective-permute, no gather). Splash without
    sequence sharding also splits the heads over `tensor` (when Hq and Hkv divide); otherwise
    a tensor split of the heads is gathered first.
    """
    _check_inputs(q_bnhd, k_bnkd, v_bnkd, segment_ids)
    n = q_bnhd.shape[1]
    _check_group(group_size, n)
    impl = resolve_impl(impl, q_bnhd.dtype)
    grouped = functools.partial(_GROUPED[impl], window=window)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    mesh = _mesh_axes()
    seq_size = 1 if mesh is None else mesh.seq_size

    if sink_tokens:
        return _with_sinks(q_bnhd, k_bnkd, v_bnkd, seg, group=group_size, wrap=wrap,
                           shift=shift, impl=impl, window=window, sink_tokens=sink_tokens,
                           mesh=mesh)
    if seq_size > 1:
        if n % (seq_size * group_size):
            raise ConfigError(
                f"sequence-parallel S2 needs N={n} to be a multiple of sequence shards "
                f"({seq_size}) x group_size ({group_size})"
            )

        def per_device(q, k, v, seg):
            return _s2_block(q, k, v, seg, None, group=group_size, wrap=wrap, shift=shift,
                             grouped=grouped, nbrs=_ring(SEQUENCE, seq_size))

        return _per_device(per_device, (q_bnhd, k_bnkd, v_bnkd, seg), mesh)

    if impl == "splash":  # masks express the shift directly: no roll
        return _splash_s2(q_bnhd, k_bnkd, v_bnkd, seg, mesh, group=group_size, wrap=wrap,
                          shift=shift, window=window)

    def whole(q, k, v, seg):
        return _s2_padded(q, k, v, seg, group=group_size, wrap=wrap, shift=shift,
                          grouped=grouped)

    if mesh is None:
        return whole(q_bnhd, k_bnkd, v_bnkd, seg)
    return _per_device(whole, (q_bnhd, k_bnkd, v_bnkd, seg), mesh)


def _with_sinks(q, k, v, seg, *, group: int, wrap: bool, shift: bool, impl: str,
                window: int | None, sink_tokens: int, mesh: _MeshAxes | None) -> jax.Array:
    """S2 plus attention sinks (`modeling.sinks`): XLA per group, or splash masks."""
    sinks.check_sinks(sink_tokens, q.shape[1])
    if mesh is not None and mesh.seq_size > 1:
        raise ConfigError("attention sinks need whole sequences per device; use "
                          "mesh.sequence=1 (split the batch over data/fsdp instead)")
    if impl == "splash":
        return _splash_s2(q, k, v, seg, mesh, group=group, wrap=wrap, shift=shift,
                          window=window, sink_tokens=sink_tokens)
    if impl != "xla":
        raise ConfigError(f"attention sinks run on attention.impl 'xla' or 'splash', not "
                          f"{impl!r}")

    def whole(q, k, v, seg):
        return sinks.s2_sink_attention_xla(q, k, v, group_size=group, sinks=sink_tokens,
                                           wrap=wrap, shift=shift, segment_ids=seg,
                                           window=window, head_runs=head_runs)

    if mesh is None:
        return whole(q, k, v, seg)
    return _per_device(whole, (q, k, v, seg), mesh)


def _s2_padded(q, k, v, seg, *, group: int, wrap: bool, shift: bool, grouped):
    """S2 on the whole sequence, padded at the end to a multiple of G (see `_s2_block`)."""
    b, n = q.shape[:2]
    pad = -n % group
    valid = None
    if pad:
        q, k, v = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v))
        if seg is not None:
            seg = jnp.pad(seg, [(0, 0), (0, pad)])
        valid = jnp.broadcast_to(jnp.arange(n + pad) < n, (b, n + pad))
    out = _s2_block(q, k, v, seg, valid, group=group, wrap=wrap, shift=shift, grouped=grouped,
                    nbrs=_UNSHARDED)
    return out[:, :n]


_GROUPED = {
    "xla": kernels.blocked_grouped_causal,
    "splash": kernels.splash_grouped_causal,
    "cudnn": kernels.cudnn_grouped_causal,
}


# --------------------------------------------------------------------------- SFT group rule

SFT_BLOCK = 4096  # the official SFT rule's length quantum
SFT_GROUP = 8192  # ... and its group for every other length


def longlora_sft_group(length: int) -> int:
    """The official SFT group size for an example of `length` tokens (its unpadded length):
    length / 4 when the length is a multiple of 4096, else 8192."""
    return length // 4 if length % SFT_BLOCK == 0 else SFT_GROUP


def sft_group_choices(n: int) -> tuple[int, ...]:
    """Every group `longlora_sft_group` gives for examples of at most N tokens, ascending."""
    return tuple(sorted({m // 4 for m in range(SFT_BLOCK, n + 1, SFT_BLOCK)} | {SFT_GROUP}))


def sft_s2_attention(q_bnhd, k_bnkd, v_bnkd, *, segment_ids, wrap: bool = False,
                     impl: str = "xla", shift: bool = True,
                     window: int | None = None) -> jax.Array:
    """S2 with each row's group from the official SFT rule (`longlora_sft_group`).

    segment_ids [B, N]: > 0 on an example's tokens, 0 on padding (one example per row). The
    row's example had L = min(tokens + 1, N) tokens (the model input drops the last one), so
    its G is `longlora_sft_group(L)`; a G larger than N is full causal attention (the
    official groups then hold the whole example). Rows pick their G at run time among
    `sft_group_choices(N)` (`lax.switch`, one compiled S2 per choice); under a mesh the rows
    are split over the batch axes and each device runs its own rows' choices. Sequence
    sharding is refused (every row needs its whole sequence).
    """
    _check_inputs(q_bnhd, k_bnkd, v_bnkd, segment_ids)
    if segment_ids is None:
        raise ConfigError("the longlora_sft group rule needs segment ids (0 = padding) to "
                          "know each row's example length")
    impl = resolve_impl(impl, q_bnhd.dtype)
    n = q_bnhd.shape[1]
    choices = sft_group_choices(n)
    seg = segment_ids.astype(jnp.int32)

    def one_group(group):
        def run(q, k, v, seg):
            grouped = functools.partial(_GROUPED[impl], window=window)
            if group > n:
                return grouped(q, k, v, group=n, segment_ids=seg)
            if impl == "splash":
                return _splash_s2(q, k, v, seg, None, group=group, wrap=wrap, shift=shift,
                                  window=window)
            return _s2_padded(q, k, v, seg, group=group, wrap=wrap, shift=shift,
                              grouped=grouped)

        return run

    branches = [one_group(g) for g in choices]

    def rows(q, k, v, seg):
        length = jnp.minimum((seg > 0).sum(axis=1) + 1, n)
        group = jnp.where(length % SFT_BLOCK == 0, length // 4, SFT_GROUP)
        index = jnp.searchsorted(jnp.asarray(choices), group)

        def row(xs):
            i, *row_xs = xs
            return jax.lax.switch(i, branches, *(x[None] for x in row_xs))[0]

        return jax.lax.map(row, (index, q, k, v, seg))

    mesh = _mesh_axes()
    if mesh is None:
        return rows(q_bnhd, k_bnkd, v_bnkd, seg)
    if mesh.seq_size > 1:
        raise ConfigError("the longlora_sft group rule needs whole sequences per device; "
                          "use mesh.sequence=1 (split the batch over data/fsdp instead)")
    return _per_device(rows, (q_bnhd, k_bnkd, v_bnkd, seg), mesh)


def attend(q_bnhd, k_bnkd, v_bnkd, cfg: LlamaConfig, *, train: bool, segment_ids=None) -> jax.Array:
    """The model's attention: with `train`, S2 (or short attention) as `attention_train`
    says, with the group of `s2_group_rule`; otherwise full causal. Every form keeps the
    model's sliding window, if it has one."""
    if train and cfg.attention_train in ("s2", "short"):
        shift = cfg.attention_train == "s2"
        if cfg.s2_group_rule == "longlora_sft":
            if cfg.s2_sink_tokens:
                raise ConfigError("attention sinks are not available with the longlora_sft "
                                  "group rule; use group_rule 'fixed'")
            return sft_s2_attention(q_bnhd, k_bnkd, v_bnkd, segment_ids=segment_ids,
                                    wrap=cfg.s2_wrap, impl=cfg.attention_impl, shift=shift,
                                    window=cfg.sliding_window)
        group = cfg.s2_group(q_bnhd.shape[1])
        return s2_attention(q_bnhd, k_bnkd, v_bnkd, group_size=group, wrap=cfg.s2_wrap,
                            segment_ids=segment_ids, impl=cfg.attention_impl, shift=shift,
                            window=cfg.sliding_window, sink_tokens=cfg.s2_sink_tokens)
    return causal_attention(q_bnhd, k_bnkd, v_bnkd, segment_ids=segment_ids,
                            impl=cfg.attention_impl, window=cfg.sliding_window)
