"""Multi-process training on one machine: two jax.distributed CPU processes == one process.

Each child is one "host" with one CPU device, joined through a local coordinator
(LONGLORA_COORDINATOR, as `distributed.maybe_initialize` reads it); together they train
`configs/tiny_cpu.py` on a two-device mesh that spans both processes, each feeding its own
rows of the global batch. The losses must match a single-process run of the same config.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

from longlora_jax.io import manifest
from longlora_jax.training.checkpoint import Checkpointer
from longlora_jax.training.loop import train
from tests.helpers import REPO_ROOT, train_config

pytestmark = pytest.mark.integration

CONFIG = os.path.join(REPO_ROOT, "configs", "tiny_cpu.py")
ARGS = [
    "--config", CONFIG, "--config.seq_len=128", "--config.batch.global_batch=2",
    "--config.model.frozen_dtype=float32", "--config.eval.before=False",
    "--config.eval.after=False", "--config.checkpoint.async_save=False",
    "--config.data.prefetch=0", "--config.checkpoint.every=2",
]

# One process of the group: join, report what it sees, train.
CHILD = textwrap.dedent("""
    import json, sys
    from longlora_jax.parallel import distributed
    assert distributed.maybe_initialize()
    import jax
    from longlora_jax.parallel.mesh import make_mesh
    from longlora_jax.training.loop import train
    from tests.helpers import train_config
    mesh = make_mesh({"data": -1})
    print("PROBE " + json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
        "mesh_processes": sorted({d.process_index for d in mesh.devices.flat}),
    }), flush=True)
    train(train_config(*sys.argv[2:]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(workdir: pathlib.Path, *overrides: str, processes: int = 2) -> list[dict]:
    """Runs the training as `processes` local processes; returns each one's probe."""
    port = _free_port()
    procs = []
    for index in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   LONGLORA_COORDINATOR=f"127.0.0.1:{port}",
                   LONGLORA_NUM_PROCESSES=str(processes), LONGLORA_PROCESS_ID=str(index))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", CHILD, *ARGS, "--workdir", str(workdir), *overrides],
            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for index, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {index} failed:\n{out[-4000:]}"
    return [json.loads(line.split(" ", 1)[1]) for out in outputs
            for line in out.splitlines() if line.startswith("PROBE ")]


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _single(workdir: pathlib.Path, *overrides: str) -> list[tuple[int, float]]:
    train(train_config(*ARGS[1:], *overrides), workdir)
    return _losses(workdir)


def _assert_close(multi, single):
    assert [s for s, _ in multi] == [s for s, _ in single]
    for (step, got), (_, want) in zip(multi, single, strict=True):
        assert abs(got - want) <= 1e-5, (step, got, want)


def test_two_processes_match_one(tmp_path):
    probes = _run_group(tmp_path / "multi", "--config.max_steps=2")
    assert sorted(p["process_index"] for p in probes) == [0, 1]
    for probe in probes:
        assert probe["process_count"] == 2
        assert probe["devices"] == 2 and probe["local_devices"] == 1
        assert probe["mesh_processes"] == [0, 1]
    multi = _losses(tmp_path / "multi")  # written once, by process 0 only
    _assert_close(multi, _single(tmp_path / "single", "--config.max_steps=2"))
    assert (tmp_path / "multi" / "summary.json").exists()
    # One orbax checkpoint for the group, with each process's data-iterator state.
    assert Checkpointer(tmp_path / "multi", every=0, keep=1).steps() == [2]
    data = tmp_path / "multi" / "checkpoints" / "2" / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    # Its manifest (written by process 0 once both had written) lists both and verifies.
    listed = json.loads((data.parent / manifest.MANIFEST).read_text())["items"]["data"]
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(listed)
    assert manifest.verify(data.parent) is None


@pytest.mark.slow
def test_two_processes_resume_and_evaluate(tmp_path):
    """A group checkpoint restores in a new group, and evaluation runs on global arrays."""
    evals = ["--config.eval.before=True", "--config.eval.after=True",
             "--config.eval.max_windows=2", "--config.eval.batch=2"]
    _run_group(tmp_path / "multi", "--config.max_steps=2", *evals)
    _run_group(tmp_path / "multi", "--config.max_steps=3", *evals)
    single = _single(tmp_path / "single", "--config.max_steps=3", *evals)
    _assert_close(_losses(tmp_path / "multi"), single)
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["segments"][-1]["start_step"] == 2
    want = json.loads((tmp_path / "single" / "summary.json").read_text())["eval_after"]["ppl"]
    assert abs(summary["eval_after"]["ppl"] - want) <= 1e-4 * want
