"""THE one table mapping logical axis names to mesh axes, and what applies it.

Modules name the axes of their parameters and activations with the logical names below and
never mention a mesh axis; how a run is split over devices is decided here alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longlora_jax.parallel.mesh import BATCH_AXES, FSDP, SEQUENCE, TENSOR

# Parameter axes: embed is split over fsdp *and* sequence, so devices that split a long
# sequence do not each hold a full copy of the weights (they all-gather per layer, as fsdp does).
# Activation axes ("act_*"): batch over data+fsdp, tokens over sequence, heads/mlp/vocab over
# tensor. The attention kernels (S2 groups, splash) rely on length -> sequence. The residual
# stream's width is split over tensor too (Megatron-style sequence parallelism), so what the
# backward pass keeps per layer shrinks with the tensor axis (LLaMA-2-70B @ 32k on v4-16).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),
    ("vocab", TENSOR),
    ("embed", (FSDP, SEQUENCE)),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("mlp", TENSOR),
    ("norm", None),
    ("lora_rank", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", SEQUENCE),
    ("act_embed", TENSOR),
    ("act_heads", TENSOR),
    ("act_kv_heads", TENSOR),
    ("act_head_dim", None),
    ("act_mlp", TENSOR),
    ("act_vocab", TENSOR),
    # KV cache for decoding: [batch, cache length, kv heads, head dim]
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
)


def logical_to_mesh_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for one array named by logical axes."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), LOGICAL_AXIS_RULES)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    """NamedSharding for one array named by logical axes."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Where a [B, N] batch of token rows lives: rows over the batch axes, tokens over sequence."""
    return logical_sharding(mesh, ("act_batch", "act_length"))


def tree_shardings(mesh: Mesh, boxed_tree: Any) -> Any:
    """NamedShardings for a pytree of `nn.LogicallyPartitioned` boxes (e.g. `eval_shape(init)`).

    Leaves without logical names are replicated. A dimension that the mesh axes of its name
    do not divide keeps the longest leading run of them that does (jit refuses uneven
    splits): e.g. SmolLM2's 9 int4 scale groups of its 576 inputs stay whole under
    fsdp x sequence = 4, while the codes they scale are split 4 ways.
    """
    logical_specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_tree))
    return jax.tree.map(lambda s, shape: _fit(s, shape), shardings, shapes,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def _fit(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """`sharding` with each dimension split only over mesh axes whose product divides it."""
    fitted = []
    for size, axes in zip(shape, tuple(sharding.spec) + (None,) * len(shape), strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways, keep = 1, []
        for name in names:
            if size % (ways * sharding.mesh.shape[name]):
                break
            ways *= sharding.mesh.shape[name]
            keep.append(name)
        fitted.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    if tuple(fitted) == tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec)):
        return sharding
    return NamedSharding(sharding.mesh, PartitionSpec(*fitted))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Makes `mesh` and the rule table current, so activation constraints take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh


def on_mesh(fn, mesh: Mesh):
    """`fn` (a jitted function) called, lowered and traced inside `activate(mesh)`."""

    def call(*args, **kwargs):
        with activate(mesh):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):
        with activate(mesh):
            return fn.lower(*args, **kwargs)

    call.lower = lower
    call.mesh = mesh
    return call
