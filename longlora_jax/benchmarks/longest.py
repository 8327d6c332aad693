"""The longest trainable context in this machine's memory: `python -m longlora_jax.bench longest`.

For each system (our LongLoRA step; transformers + PEFT, the PyTorch peer, both with LoRA+,
activation checkpointing and fp32 weights on the SmolLM2-135M shape), one training step at
sequence length N runs in a subprocess of its own: N doubles from `start` until a step fails
or `max_length` is reached, then bisects between the last length that ran and the first that
did not, down to `resolution` tokens. A watchdog reads the child's resident memory and kills
it past `memory_gb` (so an out-of-memory step is a data point, not a crash of this process);
the kernel's OOM kill counts the same. Each trial's outcome, peak memory and seconds are
reported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import ml_collections

from longlora_jax.benchmarks import train_step
from longlora_jax.benchmarks.common import physical_memory_bytes, report

SYSTEMS = ("longlora_jax", "hf_peft")


def default_config() -> ml_collections.ConfigDict:
    """systems, start, max_length, resolution (bisection stops at this many tokens), layers
    (SmolLM2-shaped), memory_gb (the budget a step may use), timeout_s (per trial), json."""
    return ml_collections.ConfigDict(dict(
        systems=SYSTEMS, start=8192, max_length=1 << 19, resolution=8192, layers=30,
        memory_gb=round(0.9 * physical_memory_bytes() / 2**30, 1), timeout_s=7200, json=""))


_CHILD = textwrap.dedent("""
    import sys
    from longlora_jax.benchmarks.longest import one_step
    one_step(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print("STEP OK", flush=True)
""")


def one_step(system: str, n: int, layers: int) -> None:
    """Builds the system's LoRA+ training step at N tokens and runs it once (in a child)."""
    config = train_step.default_config()  # full remat, fp32 base, loss chunk 1024, G = N/4
    config.layers = layers
    if system == "longlora_jax":
        train_step.our_step(n, config).run()
    else:  # the peer's memory is its logits' and activations'; SDPA is O(N) either way
        train_step.peer_step(n, config, "full").run()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def trial(system: str, n: int, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """One step of `system` at N in a watched child: {"N", "ok", "peak_gib", "seconds",
    "outcome"}."""
    limit = int(config.memory_gb * 2**30)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, system, str(n), str(config.layers)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    peak, killed = 0, []

    def watch():
        nonlocal peak
        while child.poll() is None:
            try:
                rss = _rss_bytes(child.pid)
            except OSError:
                return
            peak = max(peak, rss)
            if rss > limit:
                killed.append("memory")
                child.kill()
                return
            if time.perf_counter() - start > config.timeout_s:
                killed.append("timeout")
                child.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = child.communicate()
    watcher.join()
    ok = child.returncode == 0 and "STEP OK" in out
    if ok:
        outcome = "ran"
    elif killed:
        outcome = f"killed: over {config.memory_gb} GB" if killed[0] == "memory" else "timeout"
    elif child.returncode == -9:
        outcome = "killed by the kernel (out of memory)"
    else:
        last = [line for line in err.strip().splitlines() if line.strip()][-1:] or ["?"]
        outcome = f"failed: {last[0][:120]}"
    return {"N": n, "ok": ok, "peak_gib": peak / 2**30,
            "seconds": time.perf_counter() - start, "outcome": outcome}


def longest(system: str, config: ml_collections.ConfigDict, log) -> dict[str, Any]:
    """Doubling then bisection (see the module docstring); returns the trials and the answer."""
    trials, good, bad, n = [], None, None, config.start
    while n <= config.max_length:
        result = trial(system, n, config)
        trials.append(result)
        log(f"{system} N={n}: {result['outcome']} (peak {result['peak_gib']:.1f} GiB, "
            f"{result['seconds']:.0f} s)")
        if not result["ok"]:
            bad = n
            break
        good, n = n, 2 * n
    while good is not None and bad is not None and bad - good > config.resolution:
        mid = (good + bad) // 2 // config.resolution * config.resolution
        if mid in (good, bad):
            break
        result = trial(system, mid, config)
        trials.append(result)
        log(f"{system} N={mid}: {result['outcome']} (peak {result['peak_gib']:.1f} GiB)")
        good, bad = (mid, bad) if result["ok"] else (good, mid)
    return {"system": system, "longest": good, "first_failure": bad, "trials": trials}


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    rows = []
    for system in config.systems:
        found = longest(system, config, lambda line: print(line, flush=True))
        last = next((t for t in reversed(found["trials"]) if t["N"] == found["longest"]), None)
        rows.append({"system": system, "longest N": found["longest"],
                     "peak GiB at it": last["peak_gib"] if last else None,
                     "first N that failed": found["first_failure"],
                     "how it failed": next((t["outcome"] for t in found["trials"]
                                            if t["N"] == found["first_failure"]), None),
                     "trials": found["trials"]})
    if len(rows) == 2 and rows[0]["longest N"] and rows[1]["longest N"]:
        rows[0]["vs peer"] = rows[0]["longest N"] / rows[1]["longest N"]
    meta = {"command": "longest", "layers": config.layers, "memory_gb": config.memory_gb,
            "model": "SmolLM2-135M shape, LoRA+ r=8, fp32, activation checkpointing, batch 1"}
    report(rows, ("system", "longest N", "peak GiB at it", "first N that failed",
                  "how it failed", "vs peer"), config.json, meta)
    return rows
