"""The device mesh and THE one table mapping logical axis names to mesh axes.

Modules name the axes of their parameters and activations with the logical names below and
never mention a mesh axis; everything about how a run is split over devices lives here.

Mesh axes (always all four, size 1 when unused):
  data      pure data parallelism (params replicated, batch split);
  fsdp      data parallelism with parameters, gradients and optimizer state split (ZeRO-3);
  sequence  sequence/context parallelism: activations split along the token axis;
  tensor    Megatron-style tensor parallelism over heads, MLP width and vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# Parameter axes: embed is split over fsdp *and* sequence, so devices that split a long
# sequence do not each hold a full copy of the weights (they all-gather per layer, as fsdp does).
# Activation axes ("act_*"): batch over data+fsdp, tokens over sequence, heads/mlp/vocab over
# tensor. The attention kernels (S2 groups, splash) rely on length -> sequence. The residual
# stream's width is split over tensor too (Megatron-style sequence parallelism), so what the
# backward pass keeps per layer shrinks with the tensor axis (LLaMA-2-70B @ 32k on v4-16).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", "sequence"),
    ("act_embed", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # KV cache for decoding: [batch, cache length, kv heads, head dim]
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
)


class MeshError(ValueError):
    """The requested mesh does not match the devices; the message says what would."""


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills at most one -1 entry so the product equals `num_devices`.

    `shape` maps mesh axes (a subset of MESH_AXES; missing axes are 1) to sizes.
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; valid: {', '.join(MESH_AXES)}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    auto = [axis for axis, size in sizes.items() if size == -1]
    if len(auto) > 1:
        raise MeshError(f"at most one mesh axis may be -1 (auto), got {auto}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise MeshError(f"mesh sizes must be positive or -1, got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if auto:
        if num_devices % fixed:
            raise MeshError(
                f"mesh {sizes} cannot fill {num_devices} devices: {num_devices} is not a "
                f"multiple of the fixed axes' product {fixed}"
            )
        sizes[auto[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh {sizes} has {fixed} devices but {num_devices} are available; make the "
            f"product equal {num_devices} or set one axis to -1"
        )
    return sizes


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes MESH_AXES over `devices` (default: all devices; data=-1 if no shape)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape or {"data": -1}, len(devices))
    dims = tuple(sizes[axis] for axis in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        device_grid = mesh_utils.create_device_mesh(dims, devices=devices)
    except (NotImplementedError, AssertionError) as err:
        # TPU placement fails for shapes the torus cannot hold without splitting an axis
        # (NotImplementedError) and for device subsets that are not a sub-cube (an assert in
        # mesh_utils); the mesh is still correct in id order, only its collectives slower.
        warnings.warn(f"mesh {sizes}: no topology-aware device placement "
                      f"({type(err).__name__}); devices placed in id order", stacklevel=2)
        device_grid = np.asarray(devices).reshape(dims)
    return Mesh(device_grid, MESH_AXES)


def logical_to_mesh_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for one array named by logical axes."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), LOGICAL_AXIS_RULES)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    """NamedSharding for one array named by logical axes."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes))


def tree_shardings(mesh: Mesh, boxed_tree: Any) -> Any:
    """NamedShardings for a pytree of `nn.LogicallyPartitioned` boxes (e.g. `eval_shape(init)`).

    Leaves without logical names are replicated.
    """
    logical_specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Makes `mesh` and the rule table current, so activation constraints take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh
