"""The device mesh: its four axes (the names every layer uses) and how it is built.

Mesh axes (always all four, size 1 when unused):
  data      pure data parallelism (params replicated, batch split);
  fsdp      data parallelism with parameters, gradients and optimizer state split (ZeRO-3);
  sequence  sequence/context parallelism: activations split along the token axis;
  tensor    Megatron-style tensor parallelism over heads, MLP width and vocabulary.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from longlora_jax.errors import ConfigError

DATA, FSDP, SEQUENCE, TENSOR = "data", "fsdp", "sequence", "tensor"
MESH_AXES = (DATA, FSDP, SEQUENCE, TENSOR)
# The mesh axes that split the batch.
BATCH_AXES = (DATA, FSDP)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills at most one -1 entry so the product equals `num_devices`.

    `shape` maps mesh axes (a subset of MESH_AXES; missing axes are 1) to sizes.
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"unknown mesh axes {sorted(unknown)}; valid: {', '.join(MESH_AXES)}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    auto = [axis for axis, size in sizes.items() if size == -1]
    if len(auto) > 1:
        raise ConfigError(f"at most one mesh axis may be -1 (auto), got {auto}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError(f"mesh sizes must be positive or -1, got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if auto:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {sizes} cannot fill {num_devices} devices: {num_devices} is not a "
                f"multiple of the fixed axes' product {fixed}"
            )
        sizes[auto[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh {sizes} has {fixed} devices but {num_devices} are available; make the "
            f"product equal {num_devices} or set one axis to -1"
        )
    return sizes


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes MESH_AXES over `devices` (default: all devices; data=-1 if no shape)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape or {DATA: -1}, len(devices))
    dims = tuple(sizes[axis] for axis in MESH_AXES)
    try:
        device_grid = mesh_utils.create_device_mesh(dims, devices=devices)
    except (NotImplementedError, AssertionError) as err:
        # TPU placement fails for shapes the torus cannot hold without splitting an axis
        # (NotImplementedError) and for device subsets that are not a sub-cube (an assert in
        # mesh_utils); the mesh is still correct in id order, only its collectives slower.
        warnings.warn(f"mesh {sizes}: no topology-aware device placement "
                      f"({type(err).__name__}); devices placed in id order", stacklevel=2)
        device_grid = np.asarray(devices).reshape(dims)
    return Mesh(device_grid, MESH_AXES)


def single_device_mesh() -> Mesh:
    """The mesh of this process's first device (evaluation, export, generation on one chip)."""
    return make_mesh({DATA: 1}, devices=jax.local_devices()[:1])


def current_axis_size(axis: str) -> int:
    """Size of `axis` in the mesh made current by `rules.activate` (1 outside one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        return 1
    return mesh.shape[axis]
