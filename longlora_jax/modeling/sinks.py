"""S2-Attn with attention sinks: the first S tokens of the sequence visible to every group.

The train/test gap of S2-Attn (a model fine-tuned with grouped attention and evaluated with
full attention) is what SinkLoRA (arXiv 2406.05678) attacks with two changes: the shifted
heads' outputs are returned to the original token order before the output projection, and a
few initial tokens are attended globally ("attention sinks", as in StreamingLLM). The first
is what S2-Attn here (and the official LongLoRA code) already computes: `s2_attention` rolls
the shifted heads' output back. The second is this module: with `sinks` S > 0 a query at
position i also sees the keys j < S with j <= i (and of its own packed document), whatever
its group; everything else is S2-Attn exactly (`attention.py`'s rules: shift, wrap, padding,
GQA, sliding window). As a mask over (query, key) pairs:

    mask_sinks(i, j) = mask_s2(i, j) or (j < S and j <= i and segment(i) == segment(j))

Sinks ignore a sliding window (they are global, as in StreamingLLM).

Cost: each group attends to G + S keys, O(N (G + S)) per head. The XLA path here keeps each
group's [G, G + S] probabilities for the backward pass (plain autodiff), the memory of a
dense per-group reference; the splash backend takes the same rule as a mask (`kernels`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longlora_jax.errors import ConfigError


def check_sinks(sinks: int, n: int) -> None:
    if not isinstance(sinks, int) or not 0 < sinks < n:
        raise ConfigError(f"attention sinks={sinks!r} must be an int in [1, N={n}) "
                          "(0 turns sinks off)")


def _run_visible(rq, rk, orig, *, group: int, shift: int, wrap: bool, n: int,
                 window: int | None):
    """Whether rolled query index rq sees rolled key index rk inside its (shifted) group.

    rq, rk: broadcastable int arrays of rolled positions in [0, Np); `orig(r)` maps a rolled
    position to the original one. Keys beyond the real length n (padding) are never seen.
    """
    keep = (rq // group == rk // group) & (rk <= rq) & (orig(rk) < n)
    if shift and not wrap:  # the straddling group splits: the wrapped head is its own part
        keep = keep & ((orig(rq) < shift) == (orig(rk) < shift))
    if window is not None:
        keep = keep & (rq - rk < window)
    return keep


def _one_run(q, k, v, seg, *, group: int, shift: int, wrap: bool, n: int, sinks: int,
             window: int | None):
    """One run of heads (all shifted or all not) on the padded sequence.

    q [B, Np, H, D], k, v [B, Np, Hk, D], seg [B, Np] int32 (zeros when unpacked); Np a
    multiple of G. Returns [B, Np, H, D] in the original order.
    """
    b, np_, h, d = q.shape
    hk, ng = k.shape[2], np_ // group

    def orig(r):
        return (r + shift) % np_

    def rolled(x):
        return jnp.roll(x, -shift, axis=1) if shift else x

    r_idx = jnp.arange(np_).reshape(ng, group)
    rq, rk = r_idx[:, :, None], r_idx[:, None, :]  # [ng, G, 1], [ng, 1, G]
    in_group = _run_visible(rq, rk, orig, group=group, shift=shift, wrap=wrap, n=n,
                            window=window)  # [ng, G, G]
    j = jnp.arange(sinks)
    rj = (j - shift) % np_  # the sinks' rolled positions
    seen_in_group = _run_visible(rq, rj[None, None, :], orig, group=group, shift=shift,
                                 wrap=wrap, n=n, window=window)
    sink_mask = (j[None, None, :] <= orig(rq)) & ~seen_in_group  # [ng, G, S]

    seg_r = rolled(seg).reshape(b, ng, group)
    same_doc = seg_r[:, :, :, None] == seg_r[:, :, None, :]  # [B, ng, G, G]
    sink_doc = seg_r[:, :, :, None] == seg[:, None, None, :sinks]  # [B, ng, G, S]
    mask = jnp.concatenate([sink_mask[None] & sink_doc, in_group[None] & same_doc], axis=-1)

    qg = rolled(q).reshape(b, ng, group, hk, h // hk, d)
    kg = jnp.concatenate([jnp.broadcast_to(k[:, None, :sinks], (b, ng, sinks, hk, d)),
                          rolled(k).reshape(b, ng, group, hk, d)], axis=2)
    vg = jnp.concatenate([jnp.broadcast_to(v[:, None, :sinks], (b, ng, sinks, hk, d)),
                          rolled(v).reshape(b, ng, group, hk, d)], axis=2)
    scores = jnp.einsum("bgqkrd,bgskd->bgkrqs", qg, kg, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(d))
    # A padded query may see nothing: the finite minimum keeps its (discarded) row finite.
    scores = jnp.where(mask[:, :, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgkrqs,bgskd->bgqkrd", probs, vg).reshape(b, np_, h, d)
    return jnp.roll(out, shift, axis=1) if shift else out


def s2_sink_attention_xla(q_bnhd, k_bnkd, v_bnkd, *, group_size: int, sinks: int,
                          wrap: bool = False, shift: bool = True, segment_ids=None,
                          window: int | None = None, head_runs) -> jax.Array:
    """S2-Attn (or short attention, `shift=False`) plus `sinks` global keys, in XLA.

    q [B, N, Hq, D]; k, v [B, N, Hkv, D] -> [B, N, Hq, D]; N is padded to a multiple of G.
    `head_runs(hq, hkv, shift)` splits the heads into uniformly shifted runs (attention.py).
    """
    b, n = q_bnhd.shape[:2]
    check_sinks(sinks, n)
    pad = -n % group_size
    q, k, v = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q_bnhd, k_bnkd, v_bnkd))
    seg = (jnp.zeros((b, n), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    seg = jnp.pad(seg, [(0, 0), (0, pad)], constant_values=-1)
    outs = []
    for run in head_runs(q.shape[2], k.shape[2], shift):
        outs.append(_one_run(q[:, :, run.q0:run.q1], k[:, :, run.k0:run.k1],
                             v[:, :, run.k0:run.k1], seg, group=group_size,
                             shift=group_size // 2 if run.shifted else 0, wrap=wrap, n=n,
                             sinks=sinks, window=window))
    return jnp.concatenate(outs, axis=2)[:, :n]
