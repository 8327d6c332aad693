"""Sequence-parallel S2-Attn on 8 fake CPU devices: equal to unsharded, and the shift compiles
to collective-permutes with no all-gather / all-to-all of the sequence."""

import json

import pytest

from tests.helpers import run_python

_STANDALONE = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from longlora_jax.parallel import rules
from longlora_jax.parallel.mesh import make_mesh
from longlora_jax.errors import ConfigError
from longlora_jax.modeling import attention

mesh = make_mesh({"data": 2, "sequence": 4})
rng = np.random.default_rng(0)
b, n, hq, hkv, d, g = 2, 128, 6, 2, 8, 16
q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for h in (hq, hkv, hkv))
w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
seg = jnp.asarray(np.stack([np.arange(n) // 40, np.arange(n) // 100]), jnp.int32)
spec = NamedSharding(mesh, P(("data", "fsdp"), "sequence"))
results = {}
for wrap in (False, True):
    def loss(q, k, v, seg):
        out = attention.s2_attention(q, k, v, group_size=g, wrap=wrap, segment_ids=seg)
        return jnp.sum(out * w), out
    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    want = fn(q, k, v, seg)
    args = [jax.device_put(x, spec) for x in (q, k, v, seg)]
    with rules.activate(mesh):
        compiled = fn.lower(*args).compile()
        got = compiled(*args)
    text = compiled.as_text()
    results[str(wrap)] = {
        "err": max(float(jnp.abs(a - c).max())  # output and gradients, elementwise
                   for a, c in zip(jax.tree.leaves(got)[1:], jax.tree.leaves(want)[1:])),
        "out_sharded": got[0][1].sharding.spec == spec.spec,
        "ops": {op: len(re.findall(op + r"(-start)?\\(", text))
                for op in ("collective-permute", "all-gather", "all-to-all")},
    }
# Data + tensor parallel, N=120 not a multiple of G: per-device loops, padding inside.
dp_mesh = make_mesh({"data": 4, "tensor": 2})
qp, kp, vp = (jnp.asarray(rng.standard_normal((4, 120, h, d)), jnp.float32) for h in (hq, hkv, hkv))
fwd = jax.jit(lambda q, k, v: attention.s2_attention(q, k, v, group_size=g, wrap=True))
with rules.activate(dp_mesh):
    dp_spec = NamedSharding(dp_mesh, P(("data", "fsdp"), None, "tensor"))
    got = fwd(*(jax.device_put(x, dp_spec) for x in (qp, kp, vp)))
results["data_tensor_err"] = float(jnp.abs(got - fwd(qp, kp, vp)).max())
try:
    with rules.activate(mesh):
        jax.jit(lambda q, k, v: attention.s2_attention(q, k, v, group_size=48))(*args[:3])
except ConfigError as e:
    results["error"] = str(e)
print(json.dumps(results))
"""

_MODEL = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from longlora_jax.parallel import rules
from longlora_jax.parallel.mesh import make_mesh
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.llama import LlamaForCausalLM

cfg = LlamaConfig.preset("tiny", attention_train="s2", s2_group_size=16, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=8)
model = LlamaForCausalLM(cfg)
ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 128)), jnp.int32)
boxed = model.init(jax.random.key(0), ids[:, :8])["params"]
params = jax.tree.map(lambda x: x.unbox(), boxed, is_leaf=lambda x: hasattr(x, "unbox"))
fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids, train=True))
want = fn(params, ids)
mesh = make_mesh({"data": 2, "sequence": 4})
p = jax.device_put(params, rules.tree_shardings(mesh, {"params": boxed})["params"])
ids_s = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"), "sequence")))
with rules.activate(mesh):
    compiled = fn.lower(p, ids_s).compile()
    got = compiled(p, ids_s)
attn_ops = {}
for line in compiled.as_text().splitlines():
    m = re.search(r" (collective-permute|all-gather|all-to-all)(-start)?\\(", line)
    if m and "/self_attn/" in line and "_proj" not in line:
        attn_ops[m.group(1)] = attn_ops.get(m.group(1), 0) + 1
print(json.dumps({"err": float(jnp.abs(got - want).max()), "attn_ops": attn_ops}))
"""


@pytest.fixture(scope="module")
def standalone():
    return json.loads(run_python(_STANDALONE, devices=8).strip().splitlines()[-1])


@pytest.mark.parametrize("wrap", ["False", "True"])
def test_sequence_sharded_s2_equals_unsharded(standalone, wrap):
    result = standalone[wrap]
    assert result["err"] < 1e-5
    assert result["out_sharded"]


@pytest.mark.parametrize("wrap", ["False", "True"])
def test_sequence_sharded_s2_is_a_neighbour_exchange(standalone, wrap):
    ops = standalone[wrap]["ops"]
    assert ops["collective-permute"] > 0
    assert ops["all-gather"] == 0
    assert ops["all-to-all"] == 0


def test_data_and_tensor_parallel_s2_equals_unsharded(standalone):
    assert standalone["data_tensor_err"] < 1e-5


def test_sequence_sharded_s2_needs_whole_groups_per_device(standalone):
    assert standalone["error"] == (
        "sequence-parallel S2 needs N=128 to be a multiple of sequence shards (4) x "
        "group_size (48)"
    )


def test_model_s2_under_sequence_sharding():
    """The model's own activations (logical names) reach S2 sequence-sharded."""
    result = json.loads(run_python(_MODEL, devices=8).strip().splitlines()[-1])
    assert result["err"] < 1e-5
    assert result["attn_ops"].get("collective-permute", 0) > 0
    assert "all-gather" not in result["attn_ops"]
    assert "all-to-all" not in result["attn_ops"]
