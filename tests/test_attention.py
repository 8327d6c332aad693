"""S2-Attn and causal attention against an independent numpy per-head, per-group loop."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.errors import ConfigError
from longlora_jax.modeling import attention, kernels
from longlora_jax.modeling.attention import causal_attention, s2_attention


def s2_groups(n: int, group: int, shifted: bool, wrap: bool,
              drop_padding: bool = True) -> list[list[int]]:
    """Token positions of each attention group, in attention (causal) order.

    Straight from the rules in docs/s2_attention.md: pad N to a multiple of G; shifted heads
    see the sequence rolled left by G/2; wrap=False splits the rolled last group in two;
    padding (positions >= N) is dropped, or kept where it is with drop_padding=False (a
    sliding window counts positions in the padded order).
    """
    padded = math.ceil(n / group) * group
    order = [(i + group // 2) % padded for i in range(padded)] if shifted else list(range(padded))
    groups = [order[s:s + group] for s in range(0, padded, group)]
    if shifted and not wrap:
        last = groups.pop()
        groups += [last[: group // 2], last[group // 2:]]
    return [[p for p in g if p < n or not drop_padding] for g in groups]


def reference_attention(q, k, v, head_groups, segment_ids=None, window=None):
    """numpy loop: each query head attends causally within each of its groups.

    q [B, N, Hq, D], k, v [B, N, Hkv, D]; head_groups(h) -> list of position lists (in
    attention order; positions >= N are padding, never attended). `window` W: a query sees
    only the group's W positions ending at its own.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_size, n, hq, d = q.shape
    ratio = hq // k.shape[2]
    out = np.zeros_like(q)
    for b in range(b_size):
        for h in range(hq):
            for grp in head_groups(h):
                for i, p in enumerate(grp):
                    if p >= n:
                        continue
                    first = 0 if window is None else max(0, i + 1 - window)
                    keys = [s for s in grp[first: i + 1] if s < n]
                    if segment_ids is not None:
                        keys = [s for s in keys if segment_ids[b, s] == segment_ids[b, p]]
                    scores = k[b, keys, h // ratio] @ q[b, p, h] / math.sqrt(d)
                    probs = np.exp(scores - scores.max())
                    out[b, p, h] = probs / probs.sum() @ v[b, keys, h // ratio]
    return out


def s2_reference(q, k, v, group, wrap, segment_ids=None, window=None):
    n, hq = q.shape[1], q.shape[2]
    return reference_attention(
        q, k, v, lambda h: s2_groups(n, group, h >= hq // 2, wrap, drop_padding=False),
        segment_ids, window,
    )


def s2_mask(n, hq, group, wrap, window=None) -> np.ndarray:
    """[Hq, N, N] boolean: query i may attend key j (built from `s2_groups`)."""
    mask = np.zeros((hq, n, n), bool)
    for h in range(hq):
        for grp in s2_groups(n, group, h >= hq // 2, wrap, drop_padding=False):
            for i, p in enumerate(grp):
                first = 0 if window is None else max(0, i + 1 - window)
                if p < n:
                    mask[h, p, [s for s in grp[first: i + 1] if s < n]] = True
    return mask


def dense_masked_attention(q, k, v, mask_hqk):
    """Plain jnp attention with an explicit per-head mask (a differentiable reference)."""
    hq, hkv = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, hq // hkv, axis=2), jnp.repeat(v, hq // hkv, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask_hqk[None], scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def random_qkv(seed, b, n, hq, hkv, d=8):
    rng = np.random.default_rng(seed)
    shapes = [(b, n, h, d) for h in (hq, hkv, hkv)]
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 tokens, so small test groups exercise causal block skipping."""
    monkeypatch.setattr(kernels, "DEFAULT_BLOCK", 4)


def test_reference_groups_match_design():
    # N=8, G=4: unshifted [0,4),[4,8); shifted (wrap=False) [0,2),[2,6),[6,8).
    assert s2_groups(8, 4, False, False) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert s2_groups(8, 4, True, False) == [[2, 3, 4, 5], [6, 7], [0, 1]]
    assert s2_groups(8, 4, True, True) == [[2, 3, 4, 5], [6, 7, 0, 1]]
    # N=6 padded to 8: the padding (6, 7) is dropped.
    assert s2_groups(6, 4, True, True) == [[2, 3, 4, 5], [0, 1]]


def test_head_runs_gqa_boundary():
    runs = attention.head_runs(9, 3)
    assert [(r.q0, r.q1, r.k0, r.k1, r.shifted) for r in runs] == [
        (0, 3, 0, 1, False), (3, 4, 1, 2, False), (4, 6, 1, 2, True), (6, 9, 2, 3, True)]
    assert [(r.q0, r.q1, r.k0, r.k1, r.shifted) for r in attention.head_runs(6, 2)] == [
        (0, 3, 0, 1, False), (3, 6, 1, 2, True)]


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize(
    ("hq", "hkv", "n", "group"),
    [(9, 3, 32, 8), (6, 2, 24, 12), (4, 4, 32, 16), (4, 1, 20, 8), (9, 3, 22, 8), (2, 2, 16, 16)],
)
def test_s2_matches_numpy_reference(hq, hkv, n, group, wrap):
    q, k, v = random_qkv(0, 2, n, hq, hkv)
    out = jax.jit(s2_attention, static_argnames=("group_size", "wrap"))(
        q, k, v, group_size=group, wrap=wrap)
    np.testing.assert_allclose(out, s2_reference(q, k, v, group, wrap), atol=2e-5)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("wrap", [False, True])
def test_s2_segment_ids(wrap):
    q, k, v = random_qkv(1, 2, 24, 6, 2)
    seg = np.array([[0] * 5 + [1] * 12 + [2] * 7, [3] * 24])
    out = jax.jit(lambda *a: s2_attention(*a, group_size=8, wrap=wrap, segment_ids=seg))(q, k, v)
    np.testing.assert_allclose(out, s2_reference(q, k, v, 8, wrap, seg), atol=2e-5)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(("wrap", "n"), [(False, 32), (True, 32), (True, 28)])
def test_s2_gradients_match_dense_masked_reference(wrap, n):
    q, k, v = random_qkv(2, 2, n, 9, 3)
    w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
    mask = jnp.asarray(s2_mask(n, 9, 8, wrap))

    def loss(attn):
        return lambda q, k, v: jnp.sum(attn(q, k, v) * w)

    s2 = loss(lambda *a: s2_attention(*a, group_size=8, wrap=wrap))
    ours = jax.jit(jax.grad(s2, (0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(loss(lambda *a: dense_masked_attention(*a, mask)), (0, 1, 2)))(q, k, v)
    for got, want in zip(ours, ref, strict=True):
        np.testing.assert_allclose(got, want, atol=3e-5)


# Sliding windows (Mistral): smaller than half a group, between, and longer than the group
# (a no-op); N not a multiple of G pads the wrapped group (the window counts padded order).
WINDOW_CASES = [(9, 3, 32, 16, 5), (6, 2, 24, 12, 9), (4, 1, 20, 8, 3), (9, 3, 22, 8, 6),
                (4, 2, 32, 8, 20)]


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize(("hq", "hkv", "n", "group", "window"), WINDOW_CASES)
def test_s2_with_sliding_window_matches_numpy_reference(hq, hkv, n, group, window, wrap):
    q, k, v = random_qkv(10, 2, n, hq, hkv)
    seg = np.array([[0] * 3 + [1] * (n - 3), [2] * n])
    out = jax.jit(lambda *a: s2_attention(*a, group_size=group, wrap=wrap, window=window,
                                          segment_ids=seg))(q, k, v)
    want = s2_reference(q, k, v, group, wrap, seg, window)
    np.testing.assert_allclose(out, want, atol=2e-5)
    if window < group:  # the window really cuts
        assert np.abs(want - s2_reference(q, k, v, group, wrap, seg)).max() > 1e-2


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("wrap", [False, True])
def test_s2_sliding_window_gradients_match_dense_masked_reference(wrap):
    q, k, v = random_qkv(11, 2, 30, 9, 3)
    w = jnp.asarray(np.random.default_rng(12).standard_normal(q.shape), jnp.float32)
    mask = jnp.asarray(s2_mask(30, 9, 12, wrap, window=5))

    def loss(attn):
        return lambda q, k, v: jnp.sum(attn(q, k, v) * w)

    s2 = loss(lambda *a: s2_attention(*a, group_size=12, wrap=wrap, window=5))
    ours = jax.jit(jax.grad(s2, (0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(loss(lambda *a: dense_masked_attention(*a, mask)), (0, 1, 2)))(q, k, v)
    for got, want in zip(ours, ref, strict=True):
        np.testing.assert_allclose(got, want, atol=3e-5)


@pytest.mark.parametrize(("group", "block", "window"), [(16, 4, 5), (16, 4, 8), (12, 3, 1)])
def test_blocked_kernel_sliding_window_skips_only_invisible_blocks(group, block, window):
    q, k, v = random_qkv(13, 1, 2 * group, 4, 2)
    out = jax.jit(lambda *a: kernels.blocked_grouped_causal(*a, group=group, block=block,
                                                            window=window))(q, k, v)
    want = reference_attention(q, k, v, lambda h: [list(range(0, group)),
                                                   list(range(group, 2 * group))],
                               window=window)
    np.testing.assert_allclose(out, want, atol=2e-5)


def test_causal_attention_sliding_window_matches_reference():
    q, k, v = random_qkv(14, 2, 24, 6, 3)
    out = jax.jit(lambda *a: causal_attention(*a, window=7))(q, k, v)
    want = reference_attention(q, k, v, lambda h: [list(range(24))], window=7)
    np.testing.assert_allclose(out, want, atol=2e-5)


@pytest.mark.parametrize(("group", "block"), [(16, 4), (16, 6), (12, 12), (10, 3)])
def test_blocked_kernel_blocks_and_in_group_padding(group, block):
    q, k, v = random_qkv(4, 1, 2 * group, 4, 2)
    out = jax.jit(lambda *a: kernels.blocked_grouped_causal(*a, group=group, block=block))(q, k, v)
    want = reference_attention(q, k, v, lambda h: [list(range(0, group)),
                                                   list(range(group, 2 * group))])
    np.testing.assert_allclose(out, want, atol=2e-5)


def test_s2_with_group_n_unshifted_heads_are_causal_attention():
    q, k, v = random_qkv(5, 2, 16, 4, 2)
    s2 = jax.jit(lambda *a: s2_attention(*a, group_size=16))(q, k, v)
    full = jax.jit(causal_attention)(q, k, v)
    np.testing.assert_allclose(s2[:, :, :2], full[:, :, :2], atol=1e-5)
    assert not np.allclose(s2[:, :, 2:], full[:, :, 2:], atol=1e-3)


def test_causal_attention_matches_reference_with_segments():
    q, k, v = random_qkv(6, 2, 12, 6, 3)
    seg = np.array([[0] * 4 + [1] * 8, [5] * 7 + [6] * 5])
    out = jax.jit(causal_attention)(q, k, v, segment_ids=jnp.asarray(seg))
    want = reference_attention(q, k, v, lambda h: [list(range(12))], seg)
    np.testing.assert_allclose(out, want, atol=2e-5)


def test_s2_bf16_inputs_keep_dtype_and_stay_close():
    q, k, v = random_qkv(7, 1, 32, 4, 2)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = jax.jit(lambda *a: s2_attention(*a, group_size=8))(q16, k16, v16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), s2_reference(q, k, v, 8, False), atol=5e-2)


@pytest.mark.parametrize(
    ("kwargs", "shapes", "message"),
    [
        (dict(group_size=7), None, "group_size must be a positive even int, got 7"),
        (dict(group_size=64), None, "group_size=64 exceeds the sequence length N=32"),
        (dict(group_size=8), ((1, 32, 6, 8), (1, 32, 4, 8)), "Hq=6 must be a multiple of .*Hkv=4"),
        (dict(group_size=8), ((32, 6, 8), (32, 6, 8)), r"q must be rank 4 .*got shape \(32, 6"),
        (dict(group_size=8, impl="tpu"), None, "impl 'tpu' is not one of"),
    ],
)
def test_bad_input_one_line_errors(kwargs, shapes, message):
    q_shape, kv_shape = shapes or ((1, 32, 4, 8), (1, 32, 2, 8))
    q, kv = jnp.zeros(q_shape), jnp.zeros(kv_shape)
    with pytest.raises(ConfigError, match=message) as info:
        s2_attention(q, kv, kv, **kwargs)
    assert "\n" not in str(info.value)


def test_segment_ids_shape_error():
    q = jnp.zeros((2, 16, 2, 8))
    with pytest.raises(ConfigError, match=r"segment_ids shape \(16,\) must be \[B, N\]"):
        s2_attention(q, q, q, group_size=8, segment_ids=jnp.zeros(16, jnp.int32))


def test_attend_uses_s2_only_for_s2_training():
    from longlora_jax.modeling.config import LlamaConfig

    q, k, v = random_qkv(8, 1, 24, 4, 2)
    cfg = LlamaConfig.preset("tiny", attention_train="s2", s2_group_size_ratio=0.25,
                             attention_impl="auto")
    assert attention.resolve_impl("auto") == "xla"  # on this CPU
    s2 = jax.jit(lambda *a: s2_attention(*a, group_size=6))(q, k, v)
    full = jax.jit(causal_attention)(q, k, v)
    attend = jax.jit(attention.attend, static_argnames=("cfg", "train"))
    np.testing.assert_allclose(attend(q, k, v, cfg, train=True), s2, atol=1e-6)
    np.testing.assert_allclose(attend(q, k, v, cfg, train=False), full, atol=1e-6)
    full_cfg = cfg.replace(attention_train="full")
    np.testing.assert_allclose(attend(q, k, v, full_cfg, train=True), full, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model_logits():
    """Logits of the tiny model (6 q / 2 kv heads, N=64, G=16) for each attention mode."""
    from longlora_jax.modeling.config import LlamaConfig
    from longlora_jax.modeling.llama import LlamaForCausalLM

    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 64)), jnp.int32)
    results = {}
    params = None
    for wrap in (False, True):
        cfg = LlamaConfig.preset("tiny", attention_train="s2", s2_group_size_ratio=0.25,
                                 s2_wrap=wrap, num_attention_heads=6, num_key_value_heads=2)
        model = LlamaForCausalLM(cfg)
        params = params or model.init(jax.random.key(0), ids)["params"]
        apply = jax.jit(model.apply, static_argnames="train")
        results[wrap] = apply({"params": params}, ids, train=True)
        results["full"] = apply({"params": params}, ids, train=False)
    return results


def test_model_s2_agrees_with_full_attention_where_context_is_equal(tiny_model_logits):
    """wrap=False: before G/2 = 8 every head, in every layer, sees the full causal context."""
    s2, full = tiny_model_logits[False], tiny_model_logits["full"]
    np.testing.assert_allclose(s2[:, :8], full[:, :8], atol=1e-5)
    per_position = np.abs(np.asarray(s2 - full)).max(axis=(0, 2))
    assert (per_position[8:] > 1e-3).all()  # shifted heads lose context from G/2 on


def test_model_s2_wrap_lets_the_first_tokens_see_the_last(tiny_model_logits):
    """wrap=True: tokens before G/2 also see the last G/2 tokens in the shifted heads.

    The tail comes first in rolled order, so it is unchanged; through the 2 layers only
    tokens in a group with [0, 8) can change, i.e. [0, 16); [16, 64) cannot.
    """
    wrapped, full = tiny_model_logits[True], tiny_model_logits["full"]
    per_position = np.abs(np.asarray(wrapped - full)).max(axis=(0, 2))
    assert (per_position > 1e-3).all()
    unwrapped = tiny_model_logits[False]
    np.testing.assert_allclose(wrapped[:, 16:], unwrapped[:, 16:], atol=1e-5)
    per_position = np.abs(np.asarray(wrapped - unwrapped)).max(axis=(0, 2))
    assert (per_position[:8] > 1e-3).all()


# ----------------------------------------------------------------------------- SFT group rule


def official_sft_segments(length: int, block: int, sft_group: int) -> tuple[int, list, list]:
    """The official llama_attn_replace_sft.py, restated: for an unpadded example of `length`
    tokens, G = length / 4 if length % block == 0 else sft_group; flash-attention varlen
    segments from cu_seqlens = [0, G, 2G, ...] (first half of the heads) and [G/2, 3G/2, ...]
    (second half; starts >= length dropped), each ending at the example's end."""
    group = int(length * 0.25) if length % block == 0 else sft_group
    starts = list(range(0, length, group))
    shifted = [s + group // 2 for s in starts if s + group // 2 < length]

    def segments(bounds):
        edges = [*bounds, length]
        return [list(range(a, b)) for a, b in itertools.pairwise(edges) if b > a]

    return group, segments(starts), segments([0, *shifted])


@pytest.mark.parametrize("length", [4095, 4096, 4097, 8191, 8192, 8193, 12288, 16383, 16384, 100])
def test_sft_group_rule_is_the_official_one(length):
    official_group, _, _ = official_sft_segments(length, 4096, 8192)
    assert attention.longlora_sft_group(length) == official_group
    assert attention.longlora_sft_group(length) in attention.sft_group_choices(16384)


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_sft_rows_attend_like_the_official_varlen_segments(monkeypatch, impl):
    """Per-row groups, rows padded to N: each row's real tokens attend exactly within the
    official segments of its own length (small constants, the same construction); splash in
    interpret mode."""
    block, sft_group, n = 8, 16, 48
    monkeypatch.setattr(attention, "SFT_BLOCK", block)
    monkeypatch.setattr(attention, "SFT_GROUP", sft_group)
    lengths = [5, 8, 9, 16, 17, 24, 31, 32, 40, 48]  # example token counts (model input + 1)
    rng = np.random.default_rng(0)
    b, hq, hkv, d = len(lengths), 4, 2, 8
    q = rng.standard_normal((b, n, hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, n, hkv, d)).astype(np.float32) for _ in range(2))
    inputs = [min(length - 1, n) for length in lengths]  # real input tokens per row
    seg = np.array([[1] * m + [0] * (n - m) for m in inputs], np.int32)
    got = np.asarray(attention.sft_s2_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                segment_ids=jnp.asarray(seg), impl=impl))
    for row, (length, m) in enumerate(zip(lengths, inputs, strict=True)):
        _, unshifted, shifted = official_sft_segments(min(length, n), block, sft_group)

        def groups(h, unshifted=unshifted, shifted=shifted, m=m):
            return [[p for p in g if p < m] for g in (shifted if h >= hq // 2 else unshifted)]

        want = reference_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], groups)
        np.testing.assert_allclose(got[row, :m], want[0, :m], atol=2e-5, rtol=0)


def test_short_attention_is_every_head_unshifted():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 40, 6, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 40, 3, 8)), jnp.float32) for _ in range(2))
    got = s2_attention(q, k, v, group_size=8, shift=False)
    want = reference_attention(q, k, v, lambda h: s2_groups(40, 8, False, False))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_sft_rule_gradients_equal_per_row_s2(monkeypatch):
    """Autodiff through the per-row choice equals S2 with each row's own static G."""
    monkeypatch.setattr(attention, "SFT_BLOCK", 8)
    monkeypatch.setattr(attention, "SFT_GROUP", 16)
    n, rng = 32, np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, n, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, n, 2, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray([[1] * 15 + [0] * 17, [1] * 23 + [0] * 9], jnp.int32)  # lengths 16, 24

    def loss(q):
        return jnp.sum(attention.sft_s2_attention(q, k, v, segment_ids=seg) * seg[..., None, None])

    def per_row(q):
        rows = [s2_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], group_size=g,
                             segment_ids=seg[i:i + 1]) for i, g in enumerate((4, 6))]
        return jnp.sum(jnp.concatenate(rows) * seg[..., None, None])

    np.testing.assert_allclose(np.asarray(jax.grad(loss)(q)), np.asarray(jax.grad(per_row)(q)),
                               atol=1e-5)


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (9, 3)])
def test_official_torch_s2_peer_equals_our_s2_with_wrap(heads):
    """The benchmark's PyTorch peer (the official roll + per-group SDPA) computes our S2 with
    the wrap-around roll, GQA included (9 query heads over 3: the shift splits a kv group)."""
    import torch

    from longlora_jax.benchmarks import torch_peers

    hq, hkv = heads
    rng = np.random.default_rng(hq)
    q, k, v = (rng.standard_normal((2, 64, h, 8)).astype(np.float32) for h in (hq, hkv, hkv))
    ours = jax.jit(lambda *a: s2_attention(*a, group_size=16, wrap=True))(q, k, v)
    theirs = torch_peers.s2_attention(
        *(torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)), group=16)
    np.testing.assert_allclose(np.asarray(ours), theirs.transpose(1, 2).numpy(), atol=2e-5)
