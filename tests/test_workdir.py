"""A training workdir stays consistent: one run at a time, metrics that follow the checkpoint
lineage, a summary of every segment, a full disk that stops the run cleanly.

(The random `kill -9` test is in test_train.py, next to the other resume tests.)
"""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from longlora_jax.errors import CheckpointError, ConfigError
from longlora_jax.training import loop as train
from longlora_jax.training.lock import WorkdirError, hold_workdir
from longlora_jax.training.metrics import MetricsWriteError, MetricsWriter
from tests.helpers import (
    REPO_ROOT,
    logged_rows,
    tensorboard_scalars,
    tiny_config,
    train_cli,
)

pytestmark = pytest.mark.integration


def _listing(workdir) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def test_second_run_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    cmd, env = train_cli(workdir, tmp_path / "xla_cache")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys, time\n"
         "from longlora_jax.training.lock import hold_workdir\n"
         "with hold_workdir(pathlib.Path(sys.argv[1])):\n"
         "    print('holding', flush=True)\n"
         "    time.sleep(600)\n", str(workdir)],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        second = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(
            f"error: workdir {workdir} is in use by another train run: pid {holder.pid} on "
            f"host {socket.gethostname()} since "), second.stderr
        assert sorted(os.listdir(workdir)) == ["train.lock"]  # refused before writing
    finally:
        holder.kill()  # SIGKILL: no chance to release the lock
        holder.wait()
    # The dead holder's flock went with it; this process takes the workdir, and a run on it
    # is then refused in the same way (flock conflicts between two opens in one process).
    busy = pytest.raises(WorkdirError, match=f"pid {os.getpid()} on host")
    with hold_workdir(workdir), busy:
        train.train(tiny_config(), workdir)


def test_unwritable_workdir_is_one_line(small_fs):
    workdir = small_fs("ro,size=1m")
    with pytest.raises(WorkdirError, match=(
            rf"^cannot write to workdir {workdir} \(Read-only file system\); use a writable")):
        train.train(tiny_config(), workdir)


def test_metrics_that_cannot_be_written_are_one_line(tmp_path):
    (tmp_path / "metrics.jsonl.tmp").mkdir()  # where the resumed records are written first
    with pytest.raises(MetricsWriteError, match=r"^cannot write .*metrics.jsonl: Is a direc"):
        MetricsWriter(tmp_path, enabled=True, total_steps=2, resume_step=1)
    (tmp_path / "metrics.jsonl.tmp").rmdir()
    writer = MetricsWriter(tmp_path, enabled=True, total_steps=2, resume_step=None)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(MetricsWriteError, match=r"^cannot append to .*metrics.jsonl: Is a dir"):
        writer.write(1, {"loss": 1.0})
    writer.close()


def test_workdir_url_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a URL"):
        train.train(tiny_config(), "gs://bucket/run")


def test_bad_model_config_leaves_no_new_workdir_and_keeps_an_existing_one(tmp_path):
    fresh = tmp_path / "fresh" / "run"
    with pytest.raises(ConfigError, match="quantize_skip module 'down'"):
        train.train(tiny_config("--config.model.quantize=nf4",
                                "--config.model.quantize_skip=down"), fresh)
    assert not fresh.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="quantize_skip module 'down'"):
        train.train(tiny_config("--config.model.quantize=nf4",
                                "--config.model.quantize_skip=down"), existing)
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt", "train.lock"]


def test_resume_cuts_the_metrics_back_and_the_summary_covers_every_segment(tmp_path):
    evals = ["--config.eval.before=True", "--config.eval.after=True", "--config.eval.every=2",
             "--config.eval.max_windows=1"]
    train.train(tiny_config("--config.max_steps=4", "--config.checkpoint.every=2", *evals),
                tmp_path)
    # What a kill after step 4, before its checkpoint was finished, leaves behind: rows of
    # steps 3 and 4 that the resumed run will train again (marked here, so that a copy that
    # survives shows), and a line torn in the middle.
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    stale = [{**r, **{k: 999.0 for k in r if k not in ("step", "time")}} if r["step"] > 2 else r
             for r in logged_rows(tmp_path)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in stale) + '{"step": 5, "lo')

    summary = train.train(
        tiny_config("--config.max_steps=6", "--config.checkpoint.every=2", *evals), tmp_path)

    rows = logged_rows(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_ppl" in r] == [0, 2, 4, 6]
    assert all(999.0 not in r.values() for r in rows)
    # TensorBoard holds the same records: each step once per tag, the values of metrics.jsonl.
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    for tag in ("loss", "eval_ppl", "grad_norm", "lr"):
        want = [(r["step"], np.float32(r[tag])) for r in rows if tag in r]
        assert scalars[tag] == want, tag

    assert [(s["start_step"], s["end_step"]) for s in summary["segments"]] == [(0, 2), (2, 6)]
    assert summary["end_step"] == 6
    assert summary["tokens"] == sum(r["tokens"] for r in rows if "tokens" in r) == 6 * 256
    assert summary["train_seconds"] == pytest.approx(
        sum(s["train_seconds"] for s in summary["segments"]))
    assert [e["step"] for e in summary["evaluations"]] == [0, 2, 4, 6]
    first = next(r for r in rows if "eval_ppl" in r)
    assert summary["eval_before"]["ppl"] == first["eval_ppl"]  # from the first segment
    assert summary["eval_after"]["ppl"] == rows[-1]["eval_ppl"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.fixture
def small_fs(tmp_path):
    """mount(options) -> a fresh tmpfs mounted with `options`; unmounted afterwards."""
    mounts = []

    def mount(options: str):
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "--lazy", str(point)], check=True)


def _fill_bytes(folder, leave: int) -> None:
    """Fills the file system of `folder` up to `leave` bytes (FOLDER/filler)."""
    # Unbuffered: a buffered file would retry its leftover bytes on close, outside suppress.
    with open(folder / "filler", "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
    os.truncate(folder / "filler", max(0, os.path.getsize(folder / "filler") - leave))


def test_full_disk_stops_before_writing_and_keeps_the_newest_checkpoint(small_fs):
    workdir = small_fs("size=16m") / "run"
    overrides = ["--config.checkpoint.every=1", "--config.checkpoint.keep=3"]
    train.train(tiny_config("--config.max_steps=2", *overrides), workdir)
    _fill_bytes(workdir.parent, leave=0)
    with pytest.raises(WorkdirError, match=r"^cannot write to workdir .* \(No space left on "):
        train.train(tiny_config("--config.max_steps=4", *overrides), workdir)
    _fill_bytes(workdir.parent, leave=256 * 1024)  # metrics fit, a checkpoint (~0.5 MiB) not
    with pytest.raises(CheckpointError, match=(
            r"^not enough space for checkpoint 3 in .*: it needs about 0\.\d MiB, 0\.\d+ MiB "
            r"are free; the newest good checkpoint \(step 2\) is kept; free some space")):
        train.train(tiny_config("--config.max_steps=4", *overrides), workdir)
    assert _listing(workdir) == ["1", "2"]
    (workdir.parent / "filler").unlink()
    summary = train.train(tiny_config("--config.max_steps=4", *overrides), workdir)
    assert summary["segments"][-1]["start_step"] == 2
    assert [r["step"] for r in logged_rows(workdir)] == [1, 2, 3, 4]


def test_save_failing_mid_write_removes_its_directory_and_keeps_the_newest(small_fs, tmp_path):
    """The disk runs out of inodes while an asynchronous save writes its files: the command
    stops with status 2 and one error line, the half-written checkpoint is gone, and the run
    resumes once there is room. (Subprocesses: orbax's writer threads log their own failures
    and leave tasks that asyncio reports when the interpreter exits.)"""
    workdir = small_fs("size=64m,nr_inodes=400") / "run"
    cmd, env = train_cli(workdir, tmp_path / "xla_cache")
    cmd += ["--config.checkpoint.every=1", "--config.checkpoint.keep=3",
            "--config.checkpoint.async_save=True"]

    def launch(max_steps: int) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, f"--config.max_steps={max_steps}"], env=env,
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    assert launch(2).returncode == 0
    fillers = workdir.parent / "fillers"
    fillers.mkdir()
    with contextlib.suppress(OSError):
        for i in range(10_000):
            (fillers / str(i)).touch()
    for path in sorted(fillers.iterdir())[:12]:  # room for metrics, not a checkpoint (~44)
        path.unlink()
    failed = launch(4)
    assert failed.returncode == 2, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, failed.stderr[-3000:]
    assert re.match(r"error: saving checkpoint 3 in .* failed \(No space left on device\); the "
                    r"newest good checkpoint \(step 2\) is kept; free some space", errors[0])
    assert _listing(workdir) == ["1", "2"]
    shutil.rmtree(fillers)
    assert launch(4).returncode == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert [s["start_step"] for s in summary["segments"]] == [0, 2]
    assert _listing(workdir) == ["2", "3", "4"]
