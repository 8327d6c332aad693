"""`bench profile`'s accounting: self time from a trace, kinds and places from compiled HLO."""

import jax
import jax.numpy as jnp
import numpy as np

from longlora_jax.benchmarks.profile import hlo_index, self_seconds
from longlora_jax.modeling.loss import chunked_cross_entropy

TRACE = """
planes {
  id: 1
  name: "/host:CPU"
  lines {
    id: 1
    name: "worker 1"
    timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 100000 }
    events { metadata_id: 2 offset_ps: 10000 duration_ps: 50000 }
    events { metadata_id: 3 offset_ps: 20000 duration_ps: 10000 }
    events { metadata_id: 2 offset_ps: 70000 duration_ps: 20000 }
    events { metadata_id: 4 offset_ps: 200000 duration_ps: 30000 }
  }
  lines {
    id: 2
    name: "worker 2"
    timestamp_ns: 1000
    events { metadata_id: 3 offset_ps: 0 duration_ps: 40000 }
  }
  lines {
    id: 3
    name: "python"
    timestamp_ns: 1000
    events { metadata_id: 5 offset_ps: 0 duration_ps: 900000 }
  }
  event_metadata { key: 1 value { id: 1 name: "while.1" } }
  event_metadata { key: 2 value { id: 2 name: "fusion.2" } }
  event_metadata { key: 3 value { id: 3 name: "dot.3" } }
  event_metadata { key: 4 value { id: 4 name: "ThunkExecutor::Execute" } }
  event_metadata { key: 5 value { id: 5 name: "run" } }
}
"""


def test_self_time_subtracts_nested_instructions_and_sums_threads(tmp_path):
    path = tmp_path / "t.xplane.pb"
    path.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(TRACE))
    seconds, threads = self_seconds(str(path), {"while.1", "fusion.2", "dot.3"})
    # while 100 ns holds fusion 50 (which holds dot 10) and fusion 20; dot also 40 on worker 2
    assert threads == 2
    np.testing.assert_allclose([seconds["while.1"], seconds["fusion.2"], seconds["dot.3"]],
                               [30e-9, 60e-9, 50e-9])
    assert set(seconds) == {"while.1", "fusion.2", "dot.3"}  # runtime events left out


def test_kinds_and_places_come_from_the_compiled_hlo():
    h = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 32)), jnp.float32)
    targets, mask = jnp.zeros((1, 64), jnp.int32), jnp.ones((1, 64), jnp.float32)

    def loss(h, w):
        total, count = chunked_cross_entropy(lambda x: x @ w, h, targets, mask, chunk=16)
        return total / count

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w).compile().as_text()
    index = hlo_index(text)
    assert set(index.kind.values()) <= {"matmul", "scatter/gather", "copy/transpose", "reduce",
                                        "elementwise", "loop control"}
    kinds_by_place = {}
    for name, kind in index.kind.items():
        kinds_by_place.setdefault(index.place[name], set()).add(kind)
    assert "loop control" in kinds_by_place["modeling/loss.py:chunked_cross_entropy"]  # scan
    assert "reduce" in kinds_by_place["modeling/loss.py:_nll"]  # logsumexp over V
    dots = [n for n, k in index.kind.items() if k == "matmul"]
    assert dots and all("dot(" in text.split(f"%{n} = ")[1].split("\n")[0]
                        or "fusion(" in text.split(f"%{n} = ")[1].split("\n")[0] for n in dots)
