"""TPU slices as compile targets: their chips, HBM and peak rate, and compile-only devices.

`parse_topology("v4-16")` (a Cloud TPU accelerator type, counting TensorCores) or
`parse_topology("v4:2x2x2")` (a chip grid) names a slice; `topology_devices(slice)` gives one
compile-only JAX device per chip from libtpu's topology description, so a CPU host with libtpu
installed compiles for the slice without a TPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
from jax.experimental import topologies

from longlora_jax.errors import ConfigError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """Per-chip facts of a TPU generation.

    cores_per_chip: TensorCores per chip (2 for megacore v4/v5p: "v4-16" counts 16 cores,
    i.e. 8 chips, each one JAX device). hbm_bytes: HBM per chip. usable_hbm_bytes: what
    XLA:TPU lets one program use (its out-of-memory message calls it "available HBM").
    peak_flops: bf16 FLOP/s per chip.
    """

    libtpu_name: str
    cores_per_chip: int
    hbm_bytes: int
    usable_hbm_bytes: int
    peak_flops: float


GENERATIONS = {
    "v4": TpuGeneration("v4", 2, 32 * GIB, int(30.75 * GIB), 275e12),
    "v5p": TpuGeneration("v5", 2, 96 * GIB, int(95.74 * GIB), 459e12),
}

# Chips of a slice -> its 3D chip grid (Cloud TPU's standard slice shapes).
_GRIDS = {
    4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
    256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A TPU slice: `name` as given ("v4-16" or "v4:2x2x2"), its generation and chip grid."""

    name: str
    generation: str
    grid: tuple[int, int, int]

    @property
    def spec(self) -> TpuGeneration:
        return GENERATIONS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def topology_name(self) -> str:
        """libtpu's name of the chip grid, e.g. "v4:2x2x2"."""
        return f"{self.spec.libtpu_name}:{'x'.join(map(str, self.grid))}"

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's accelerator type, e.g. "v4-16"."""
        return f"{self.generation}-{self.chips * self.spec.cores_per_chip}"


def parse_topology(name: str) -> TpuSlice:
    """"v4-16" (Cloud TPU accelerator type: TensorCores) or "v4:2x2x2" (chip grid)."""
    valid = (f"an accelerator type like v4-8, v4-16, v5p-32 ({', '.join(GENERATIONS)} with "
             f"{', '.join(str(2 * c) for c in sorted(_GRIDS))} cores) or a chip grid like "
             "v4:2x2x2")
    grid_match = re.fullmatch(r"(v\d+p?):(\d+)x(\d+)x(\d+)", name)
    type_match = re.fullmatch(r"(v\d+p?)-(\d+)", name)
    generation = (grid_match or type_match).group(1) if (grid_match or type_match) else None
    if generation == "v5":  # libtpu spells v5p "v5"
        generation = "v5p"
    if generation not in GENERATIONS:
        raise ConfigError(f"unknown TPU topology {name!r}; valid: {valid}")
    if grid_match:
        grid = tuple(int(g) for g in grid_match.groups()[1:])
        if min(grid) < 1 or any(g % b for g, b in zip(grid, _host_bounds(grid), strict=True)):
            raise ConfigError(f"unknown TPU topology {name!r}; valid: {valid} (a grid of "
                              "whole hosts of 2x2x1 chips, or one smaller than a host)")
        return TpuSlice(name, generation, grid)
    cores = int(type_match.group(2))
    chips, rest = divmod(cores, GENERATIONS[generation].cores_per_chip)
    if rest or chips not in _GRIDS:
        raise ConfigError(f"unknown TPU topology {name!r}; valid: {valid}")
    return TpuSlice(name, generation, _GRIDS[chips])


def _host_bounds(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Chips per host along each axis: 2x2x1, or the whole grid where it is smaller."""
    return tuple(min(g, b) for g, b in zip(grid, (2, 2, 1), strict=True))


def topology_devices(tpu: TpuSlice) -> list[jax.Device]:
    """Compile-only devices of the slice (one per chip), from libtpu's topology description.

    Quiets libtpu's search for TPU metadata and lets several compile-only processes share
    the host (libtpu otherwise takes a lock file meant for real chips).
    """
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    wrap = tuple(g % 4 == 0 and min(tpu.grid) >= 4 for g in tpu.grid)
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=tpu.topology_name, chip_config_name="megacore",
        chips_per_host_bounds=_host_bounds(tpu.grid), num_slices=1, wrap=wrap,
    )
    return list(desc.devices)
