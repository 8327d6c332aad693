"""S2-Attn with attention sinks against a masked dense reference (forward and gradients).

The reference mask is built independently of `modeling.sinks`: the S2 mask of
`tests/test_attention.s2_mask` (from the per-group rules) OR "key j < S and j <= i".
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.errors import ConfigError
from longlora_jax.modeling import kernels
from longlora_jax.modeling.attention import s2_attention
from tests.test_attention import dense_masked_attention, random_qkv, s2_mask


def sink_mask(n, hq, group, wrap, sinks, shift=True, segment_ids=None, window=None):
    """[B or 1, Hq, N, N]: the S2 (or short) mask plus the first `sinks` keys for every query."""
    hq_mask = s2_mask(n, hq, group, wrap, window)
    if not shift:  # short attention: every head like the unshifted ones
        hq_mask = np.broadcast_to(hq_mask[:1], hq_mask.shape).copy()
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    mask = hq_mask | ((j < sinks) & (j <= i))[None]
    if segment_ids is None:
        return mask[None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return mask[None] & same[:, None]


def masked_reference(q, k, v, mask_bhqk):
    if mask_bhqk.shape[0] == 1:
        return dense_masked_attention(q, k, v, jnp.asarray(mask_bhqk[0]))
    return jnp.concatenate([dense_masked_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1],
                                                   jnp.asarray(mask_bhqk[b]))
                            for b in range(q.shape[0])])


CASES = [  # hq, hkv, n, group, sinks, wrap, shift
    (4, 2, 32, 8, 2, False, True),
    (9, 3, 32, 8, 3, True, True),     # a kv head serving shifted and unshifted heads
    (9, 3, 28, 8, 4, True, True),     # N padded to a multiple of G, wrapped
    (4, 4, 28, 8, 1, False, True),    # padded, not wrapped
    (4, 2, 32, 16, 8, False, True),   # S = G/2: the sinks fill the first shifted segment
    (4, 1, 24, 8, 2, False, False),   # short attention (no shift) with sinks
]


@pytest.mark.parametrize(("hq", "hkv", "n", "group", "sinks", "wrap", "shift"), CASES)
def test_sinks_forward_and_gradients_match_masked_reference(hq, hkv, n, group, sinks, wrap,
                                                            shift):
    q, k, v = random_qkv(0, 2, n, hq, hkv)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    mask = sink_mask(n, hq, group, wrap, sinks, shift)

    def ours(q, k, v):
        return s2_attention(q, k, v, group_size=group, wrap=wrap, shift=shift,
                            sink_tokens=sinks)

    def ref(q, k, v):
        return masked_reference(q, k, v, mask)

    np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), atol=2e-5)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), (0, 1, 2)))(q, k, v)
             for f in (ours, ref)]
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, atol=3e-5)


def test_sinks_change_the_output_only_where_a_query_could_not_see_them():
    q, k, v = random_qkv(2, 1, 32, 4, 2)
    plain = np.asarray(s2_attention(q, k, v, group_size=8))
    with_sinks = np.asarray(s2_attention(q, k, v, group_size=8, sink_tokens=2))
    changed = np.abs(plain - with_sinks).max(axis=(0, 3)) > 1e-6  # [N, Hq]
    # unshifted heads: the first group already sees the sinks; every later query changes
    assert not changed[:8, :2].any() and changed[8:, :2].all()
    # shifted heads: the first segment [0, G/2) already holds them
    assert not changed[:4, 2:].any() and changed[4:, 2:].all()


def test_sinks_with_packed_documents_stay_inside_the_document():
    n = 32
    q, k, v = random_qkv(3, 2, n, 4, 2)
    seg = np.ones((2, n), np.int32)
    seg[0, 12:] = 2  # row 0: a second document whose queries may not see row 0's sinks
    mask = sink_mask(n, 4, 8, False, 3, segment_ids=seg)
    out = s2_attention(q, k, v, group_size=8, sink_tokens=3, segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(out, masked_reference(q, k, v, mask), atol=2e-5)


def test_sinks_splash_masks_equal_the_reference_mask():
    n, hq, group, sinks = 32, 4, 8, 3
    for wrap in (False, True):
        masks = kernels.s2_splash_masks(n, hq, group, wrap, sink_tokens=sinks)
        want = sink_mask(n, hq, group, wrap, sinks)[0]
        for h, m in enumerate(masks):
            got = np.asarray(m[0:n, 0:n])
            np.testing.assert_array_equal(got, want[h])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sink_tokens": 32}, "must be an int in [1, N=32)"),
    ({"sink_tokens": 2, "impl": "cudnn"}, "'xla' or 'splash'"),
])
def test_sinks_bad_input_one_line_errors(kwargs, message):
    q, k, v = random_qkv(0, 1, 32, 4, 2)
    with pytest.raises(ConfigError, match=re.escape(message)):
        s2_attention(q, k, v, group_size=8, **kwargs)
