"""Fused backends: TPU splash attention (Pallas interpret mode on CPU, and ahead-of-time
compilation for a TPU v4 topology) and GPU cuDNN (skipped without a GPU)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.modeling import kernels
from longlora_jax.modeling.attention import causal_attention, s2_attention
from tests.helpers import run_python
from tests.test_attention import random_qkv, reference_attention, s2_reference


@pytest.mark.parametrize(
    ("hq", "hkv", "n", "group", "wrap"),
    [(9, 3, 96, 32, False), (9, 3, 80, 32, True), (4, 4, 128, 64, True)],
)
def test_splash_s2_matches_numpy_reference(hq, hkv, n, group, wrap):
    """Per-head masks express the shift; N need not be a multiple of 128 or of G."""
    q, k, v = random_qkv(0, 2, n, hq, hkv, d=16)
    fn = jax.jit(lambda *a: s2_attention(*a, group_size=group, wrap=wrap, impl="splash"))
    np.testing.assert_allclose(fn(q, k, v), s2_reference(q, k, v, group, wrap), atol=2e-5)


def test_splash_s2_segments_and_gradients_match_xla():
    q, k, v = random_qkv(1, 2, 96, 6, 2, d=16)
    seg = jnp.asarray(np.stack([np.arange(96) // 40, np.arange(96) // 70]), jnp.int32)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def grads(impl):
        def loss(q, k, v):
            out = s2_attention(q, k, v, group_size=32, wrap=True, segment_ids=seg, impl=impl)
            return jnp.sum(out * w)
        return jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)

    for got, want in zip(grads("splash"), grads("xla"), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_splash_s2_backward_beyond_the_fused_kernel_matches_xla():
    """Past FUSED_BWD_MAX_KV_BLOCKS key blocks the backward runs separate dq and dk/dv
    kernels (the fused one keeps a dq per key block): same gradients as XLA, GQA runs."""
    n = 128 * (kernels.FUSED_BWD_MAX_KV_BLOCKS + 1)
    q, k, v = random_qkv(6, 1, n, 6, 2, d=8)
    w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)

    def grads(impl):
        def loss(q, k, v):
            return jnp.sum(s2_attention(q, k, v, group_size=n // 4, impl=impl) * w)
        return jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)

    for got, want in zip(grads("splash"), grads("xla"), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_splash_causal_attention_matches_reference():
    q, k, v = random_qkv(3, 1, 128, 4, 2, d=16)
    seg = np.repeat([0, 1], 64)[None]
    out = jax.jit(lambda *a: causal_attention(*a, segment_ids=jnp.asarray(seg),
                                               impl="splash"))(q, k, v)
    want = reference_attention(q, k, v, lambda h: [list(range(128))], seg)
    np.testing.assert_allclose(out, want, atol=2e-5)


@pytest.mark.parametrize(("n", "group", "window", "wrap"),
                         [(96, 32, 12, False), (80, 32, 20, True), (128, 64, 40, True)])
def test_splash_s2_sliding_window_matches_numpy_reference(n, group, window, wrap):
    """The window in the per-head masks (Mistral), in the rolled order for wrap=True."""
    q, k, v = random_qkv(4, 2, n, 6, 2, d=16)
    fn = jax.jit(lambda *a: s2_attention(*a, group_size=group, wrap=wrap, window=window,
                                         impl="splash"))
    np.testing.assert_allclose(fn(q, k, v), s2_reference(q, k, v, group, wrap, window=window),
                               atol=2e-5)


def test_splash_causal_sliding_window_matches_reference():
    q, k, v = random_qkv(5, 1, 128, 4, 2, d=16)
    out = jax.jit(lambda *a: causal_attention(*a, impl="splash", window=48))(q, k, v)
    want = reference_attention(q, k, v, lambda h: [list(range(128))], window=48)
    np.testing.assert_allclose(out, want, atol=2e-5)


_AOT = """
import json
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
from longlora_jax.parallel import rules
from longlora_jax.parallel.mesh import make_mesh
from longlora_jax.modeling import attention

topo = topologies.get_topology_desc("v4:2x2x1", "tpu")
results = {}
cases = (("data", {"data": 8}, 2048, (9, 3)),
         ("sequence", {"data": 2, "sequence": 4}, 1024, (9, 3)),
         ("tensor", {"data": 2, "tensor": 4}, 2048, (8, 4)))
for name, shape, n, (hq, hkv) in cases:
    mesh = make_mesh(shape, devices=topo.devices)
    spec = NamedSharding(mesh, P(("data", "fsdp"), "sequence", "tensor"))
    args = [jax.ShapeDtypeStruct((8, n, h, 64), jnp.bfloat16, sharding=spec)
            for h in (hq, hkv, hkv)]

    def loss(q, k, v):
        out = attention.s2_attention(q, k, v, group_size=n // 8, impl="auto")
        return out.astype(jnp.float32).sum()

    with rules.activate(mesh):
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
    text = compiled.as_text()
    results[name] = {"kernels": text.count('custom_call_target="tpu_custom_call"'),
                     "all_gather": text.count("all-gather")}
print(json.dumps(results))
"""


@pytest.mark.integration
def test_splash_s2_compiles_ahead_of_time_for_tpu_v4():
    """auto -> splash for a TPU target; batch-, sequence- and head-sharded meshes compile."""
    env = {"TPU_ACCELERATOR_TYPE": "v4-8", "TPU_WORKER_HOSTNAMES": "localhost",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    result = json.loads(run_python(_AOT, env=env).strip().splitlines()[-1])
    for name in ("data", "sequence", "tensor"):
        assert result[name]["kernels"] >= 2, result  # forward and fused backward Mosaic kernels
        assert result[name]["all_gather"] == 0, result


_LONG = """
import json
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from longlora_jax.modeling import attention
from longlora_jax.parallel import rules
from longlora_jax.parallel.mesh import make_mesh
from longlora_jax.parallel.topology import parse_topology, topology_devices

mesh = make_mesh({"data": 1}, devices=topology_devices(parse_topology("v5p:1x1x1")))
n, h, d = 65536, 32, 128
args = [jax.ShapeDtypeStruct((1, n, h, d), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
        for _ in range(3)]

def loss(q, k, v):
    out = attention.s2_attention(q, k, v, group_size=n // 4, impl="splash")
    return out.astype(jnp.float32).sum()

with rules.activate(mesh):
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
print(json.dumps({"temp": compiled.memory_analysis().temp_size_in_bytes, "q_bytes": n * h * d * 2,
                  "kernels": compiled.as_text().count('custom_call_target="tpu_custom_call"')}))
"""


@pytest.mark.integration
def test_splash_s2_at_64k_tokens_compiles_for_one_v5p_chip_in_linear_memory():
    """LLaMA-7B's 32 heads at 65536 tokens, forward and backward: one kernel per run of
    heads that share a mask (32 heads' block tables overflowed the 1 MiB of TPU scalar
    memory), and separate dq/dk-dv backward kernels (the fused one kept 128 partial dq's,
    64 GiB): temporaries a few times q's size."""
    env = {"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    result = json.loads(run_python(_LONG, env=env).strip().splitlines()[-1])
    assert result["kernels"] == 6, result  # 2 runs x (forward, dq, dk/dv)
    assert result["temp"] < 8 * result["q_bytes"], result


_HEAD_SHARDED = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from longlora_jax.parallel import rules
from longlora_jax.parallel.mesh import make_mesh
from longlora_jax.modeling import attention

mesh = make_mesh({"data": 2, "tensor": 4})
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((2, 96, h, 16)), jnp.float32) for h in (8, 4, 4))
w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
results = {}
for name, attn in (
    ("s2", lambda *a: attention.s2_attention(*a, group_size=32, impl="splash")),
    ("s2_wrap", lambda *a: attention.s2_attention(*a, group_size=32, wrap=True, impl="splash")),
    ("causal", lambda *a: attention.causal_attention(*a, impl="splash")),
):
    fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * w), (0, 1, 2)))
    want = fn(q, k, v)
    args = [jax.device_put(x, spec) for x in (q, k, v)]
    with rules.activate(mesh):
        compiled = fn.lower(*args).compile()
        got = compiled(*args)
    results[name] = {"err": max(float(jnp.abs(a - b).max()) for a, b in zip(got, want)),
                     "all_gather": compiled.as_text().count("all-gather")}
print(json.dumps(results))
"""


def test_splash_splits_heads_over_tensor_devices():
    """Per-head masks travel with their heads: no gather of heads, same gradients."""
    result = json.loads(run_python(_HEAD_SHARDED, devices=8).strip().splitlines()[-1])
    for name in ("s2", "s2_wrap", "causal"):
        assert result[name]["err"] < 1e-5, result
        assert result[name]["all_gather"] == 0, result


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN fused attention needs an NVIDIA GPU; none on this machine")
@pytest.mark.parametrize("wrap", [False, True])
def test_cudnn_s2_matches_xla(wrap):
    q, k, v = (x.astype(jnp.bfloat16) for x in random_qkv(4, 2, 256, 8, 2, d=64))
    got = jax.jit(lambda *a: s2_attention(*a, group_size=64, wrap=wrap, impl="cudnn"))(q, k, v)
    want = jax.jit(lambda *a: s2_attention(*a, group_size=64, wrap=wrap, impl="xla"))(q, k, v)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2)
