"""What a command sets up before JAX starts its backends, so it prints only what its user needs.

With libtpu installed (the test requirements, or a TPU image) on a machine without TPU chips,
JAX's TPU plugin probes for TPU workers and prints libtpu's errors before falling back to the
CPU. When no TPU chip is on the PCI bus, `quiet_accelerator_probing` describes this host as a
one-host topology of its own (`TPU_WORKER_HOSTNAMES=localhost`, `TPU_HOST_BOUNDS=1,1,1`, only
where unset): the plugin then finds no chip without a word; and it lets several such
processes load libtpu at once (`ALLOW_MULTIPLE_LIBTPU_LOAD`). A TPU VM is left untouched.
"""

from __future__ import annotations

import glob
import os

_GOOGLE_PCI_VENDOR = "0x1ae0"
# Google PCI devices that are not TPUs: the gVNIC network card of Compute Engine VMs.
_NOT_TPU_DEVICES = ("0x0042",)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def tpu_chips_present() -> bool:
    """Whether a Google TPU chip is on this machine's PCI bus (what libtpu drives)."""
    for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
        device_file = os.path.join(os.path.dirname(vendor_file), "device")
        if (_read(vendor_file) == _GOOGLE_PCI_VENDOR
                and _read(device_file) not in _NOT_TPU_DEVICES):
            return True
    return False


def quiet_accelerator_probing() -> None:
    """Keeps libtpu silent on a machine without TPU chips (call before JAX's first backend use)."""
    if tpu_chips_present():
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    # libtpu's lock file guards chips; without any, it only stops a second JAX process
    # (an `aot` compile beside a training run) from starting
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
