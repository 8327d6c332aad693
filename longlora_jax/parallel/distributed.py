"""Multi-process start-up: `jax.distributed.initialize()` when the environment asks for it.

Detected environments:
- explicit: LONGLORA_COORDINATOR=host:port, LONGLORA_NUM_PROCESSES, LONGLORA_PROCESS_ID
  (what launch/slurm_gpu.sbatch sets, and the local two-process test);
- LONGLORA_DISTRIBUTED=1: jax detects everything itself (TPU pod metadata on Cloud TPU VMs,
  SLURM, Open MPI, Kubernetes); what launch/tpu_pod.sh sets on every worker;
- SLURM with more than one task (SLURM_NTASKS > 1): jax reads the coordinator from SLURM;
- multi-host TPU slices whose environment names the hosts (TPU_WORKER_HOSTNAMES lists more
  than one, or MEGASCALE_*).
Single-process runs (a laptop, one TPU VM, one GPU box) need nothing.

LONGLORA_LOCAL_DEVICE_IDS="0,1,..." names the accelerators this process drives; under SLURM
jax otherwise gives each process only the GPU numbered SLURM_LOCALID (one process per GPU),
so a one-process-per-node launch lists all of the node's GPUs.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def _multi_host_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def _local_device_ids() -> list[int] | None:
    ids = os.environ.get("LONGLORA_LOCAL_DEVICE_IDS", "")
    return [int(i) for i in ids.split(",")] if ids else None


def maybe_initialize() -> bool:
    """Initialises jax.distributed if this is one process of several; True if it did."""
    coordinator = os.environ.get("LONGLORA_COORDINATOR")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["LONGLORA_NUM_PROCESSES"]),
            process_id=int(os.environ["LONGLORA_PROCESS_ID"]),
            local_device_ids=_local_device_ids(),
        )
        return True
    if (os.environ.get("LONGLORA_DISTRIBUTED") == "1"
            or int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _multi_host_tpu()):
        jax.distributed.initialize(local_device_ids=_local_device_ids())
        return True
    return False


def any_process(flag: bool) -> bool:
    """True if `flag` is true on any process (every process must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def is_main_process() -> bool:
    """Process 0: the one that writes files shared by the run (metrics, summaries, exports)."""
    return jax.process_index() == 0
