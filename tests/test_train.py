"""The training entry point: exact resume, SIGTERM, sharded == unsharded, bad input."""

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from longlora_jax import train as train_command
from longlora_jax.cli import parse
from longlora_jax.errors import CheckpointError, ConfigError, DataError
from longlora_jax.io import run as run_module
from longlora_jax.io.run import load_run
from longlora_jax.training import loop as train
from longlora_jax.training.checkpoint import Checkpointer
from tests.helpers import (
    REPO_ROOT,
    losses_on_one_and_eight_devices,
    tensorboard_scalars,
    train_cli,
)
from tests.helpers import TINY_CONFIG as CONFIG
from tests.helpers import TINY_FAST as FAST
from tests.helpers import logged_losses as _losses
from tests.helpers import tiny_config as _config


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    workdir = tmp_path_factory.mktemp("straight")
    train.train(_config("--config.max_steps=6", "--config.checkpoint.every=3"), workdir)
    return _losses(workdir)


@pytest.mark.integration
def test_resume_is_exact(straight, tmp_path):
    train.train(_config("--config.max_steps=3", "--config.checkpoint.every=3"), tmp_path)
    assert Checkpointer(tmp_path, every=0, keep=1).steps() == [3]
    summary = train.train(_config("--config.max_steps=6", "--config.checkpoint.every=3"), tmp_path)
    assert summary["segments"][-1]["start_step"] == 3
    resumed = _losses(tmp_path)
    for step in (4, 5, 6):
        assert abs(resumed[step] - straight[step]) <= 1e-6, (step, resumed[step], straight[step])
    assert straight[6] < straight[1]  # it does learn

    # The same command again: nothing to do, and the finished run's records stay as they are.
    records = {name: (tmp_path / name).read_text() for name in ("metrics.jsonl", "summary.json")}
    again = train.train(_config("--config.max_steps=6", "--config.checkpoint.every=3"), tmp_path)
    assert again == summary
    assert {name: (tmp_path / name).read_text() for name in records} == records


@pytest.mark.integration
def test_sigterm_saves_and_resume_is_exact(tmp_path):
    workdir = tmp_path / "interrupted"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    cmd = [sys.executable, "-m", "longlora_jax.train", "--config", CONFIG, "--workdir",
           str(workdir), *FAST, "--config.max_steps=400", "--config.checkpoint.every=1000"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    steps = Checkpointer(workdir, every=0, keep=1).steps()
    assert len(steps) == 1 and 2 <= steps[0] < 400
    end = steps[0] + 3
    train.train(_config(f"--config.max_steps={end}", "--config.checkpoint.every=1000"), workdir)
    straight = tmp_path / "straight"
    train.train(_config(f"--config.max_steps={end}", "--config.checkpoint.every=1000"), straight)
    resumed, reference = _losses(workdir), _losses(straight)
    for step in range(steps[0] + 1, end + 1):
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed, reference)


def _finished_steps(workdir) -> list[int]:
    folder = workdir / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.exists() else []
    return sorted(int(name) for name in names if name.isdigit())


def _max_logged_step(metrics) -> int:
    """The newest step with a loss in metrics.jsonl as it is right now (a line may be torn)."""
    steps = [0]
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            steps.append(json.loads(line).get("step", 0))
    return max(steps)


@pytest.mark.integration
def test_sigkill_at_random_moments_then_resume_is_exact(straight, tmp_path):
    """`kill -9` at random moments (asynchronous saves every step, so kills land mid-step,
    mid-save and mid-write), then a launch that finishes: the same losses as a run never
    interrupted, every step logged once (metrics.jsonl and TensorBoard), the summary covers
    every segment, no temporary checkpoint directory is left and no kill blocked a launch."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    workdir = tmp_path / "killed"
    metrics = workdir / "metrics.jsonl"
    cmd, env = train_cli(workdir, tmp_path / "xla_cache")
    cmd += ["--config.checkpoint.async_save=True", "--config.max_steps=6",
            "--config.checkpoint.every=1", "--config.checkpoint.keep=2"]
    kills = []
    for _ in range(3):
        done = (_finished_steps(workdir) or [0])[-1]
        if done >= 5:
            break
        target = rng.randint(done + 1, 5)
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        # Rows after `done` left by the previous kill go first (the resume cuts them), then
        # the run reaches `target`.
        deadline = time.time() + 180
        cut = False
        while proc.poll() is None and time.time() < deadline:
            newest = _max_logged_step(metrics)
            cut = cut or newest <= done
            if cut and newest >= target:
                break
            time.sleep(0.02)
        assert proc.poll() is None, (seed, kills, proc.communicate()[1])
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        kills.append((done, target))
    final = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, (seed, kills, final.stderr)

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = [r["step"] for r in rows if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6], (seed, kills, logged)
    assert _losses(workdir) == straight, (seed, kills)
    scalars = tensorboard_scalars(workdir / "tensorboard")
    want = [(r["step"], np.float32(r["loss"])) for r in rows if "loss" in r]
    assert scalars["loss"] == want, (seed, kills)
    summary = json.loads((workdir / "summary.json").read_text())
    segments = summary["segments"]
    assert segments[0]["start_step"] == 0 and segments[-1]["end_step"] == 6
    assert all(a["end_step"] == b["start_step"] for a, b in itertools.pairwise(segments))
    assert summary["tokens"] == sum(r["tokens"] for r in rows)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["5", "6"]


@pytest.mark.integration
def test_sharded_equals_unsharded():
    one, eight = losses_on_one_and_eight_devices(
        *FAST, "--config.model.frozen_dtype=float32", "--config.batch.global_batch=4")
    assert len(one) == len(eight) == 3
    np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)


# Elastic resume: the tiny config on three meshes, fp32 base, a batch row per data x fsdp shard.
MESHES = {8: ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.sequence=2"),
          4: ("--config.mesh.data=1", "--config.mesh.fsdp=4"),
          1: ("--config.mesh.data=1",)}
SHAPES = {8: "data 2 x fsdp 2 x sequence 2 x tensor 1 (8 devices, 1 process)",
          4: "data 1 x fsdp 4 x sequence 1 x tensor 1 (4 devices, 1 process)",
          1: "data 1 x fsdp 1 x sequence 1 x tensor 1 (1 device, 1 process)"}


def _train_on(devices, workdir, max_steps, cache_dir) -> str:
    """The train command on `devices` fake CPU devices (MESHES), checkpoints every 3 steps;
    its stdout."""
    cmd, env = train_cli(workdir, cache_dir)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run(
        [*cmd, "--config.model.frozen_dtype=float32", "--config.batch.global_batch=4",
         "--config.checkpoint.every=3", f"--config.max_steps={max_steps}", *MESHES[devices]],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.integration
def test_elastic_resume_on_other_meshes_is_exact(tmp_path):
    """3 steps on 8 devices (data 2 x fsdp 2 x sequence 2), resumed to 6 on 4 (fsdp 4) and on
    1; 3 steps on 4, resumed on 8: every step's loss equals the uninterrupted 8-device run's
    within 1e-5, and each resume says in one line which mesh wrote the checkpoint."""
    cache = tmp_path / "xla_cache"
    straight = tmp_path / "straight8"
    _train_on(8, straight, 6, cache)
    reference = _losses(straight)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    runs = {}
    for devices in (4, 1):  # the 8-device run as if preempted after its checkpoint at 3
        workdir = tmp_path / f"8to{devices}"
        shutil.copytree(straight, workdir, ignore=lambda d, names: ["6"] if d.endswith(
            "checkpoints") else [])
        runs[8, devices] = workdir, _train_on(devices, workdir, 6, cache)
    workdir = tmp_path / "4to8"
    _train_on(4, workdir, 3, cache)
    runs[4, 8] = workdir, _train_on(8, workdir, 6, cache)
    for (before, after), (workdir, out) in runs.items():
        lines = [line for line in out.splitlines() if line.startswith("elastic resume:")]
        assert lines == [f"elastic resume: the checkpoint was written on mesh {SHAPES[before]}, "
                         f"this run has {SHAPES[after]}; its arrays were restored into this "
                         "mesh's shardings"], out
        resumed = _losses(workdir)
        assert sorted(resumed) == [1, 2, 3, 4, 5, 6], (before, after, resumed)
        np.testing.assert_allclose([resumed[s] for s in range(1, 7)],
                                   [reference[s] for s in range(1, 7)], atol=1e-5, rtol=0,
                                   err_msg=f"{before} -> {after} devices")


# ----------------------------------------------------------------------------- bad input


def test_unknown_config_key_is_one_line():
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.rnk'.*rank"):
        parse(train_command.COMMAND, ["--config", CONFIG, "--config.lora.rnk=4"])


@pytest.mark.integration
def test_cli_prints_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "longlora_jax.train", "--config", CONFIG, "--workdir",
         str(tmp_path), "--config.mesh.data=3"],
        capture_output=True, text=True, cwd=REPO_ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: mesh") and "3 devices but 1" in proc.stderr


def test_mesh_product_must_match_devices(tmp_path):
    with pytest.raises(ConfigError, match="4 devices but 1 are available"):
        train.train(_config("--config.mesh.data=2", "--config.mesh.tensor=2"), tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["--config.seq_len=250"], "does not divide seq_len=250"),
    (["--config.attention.group_size=512"], "does not divide seq_len=128"),
])
def test_seq_len_s2_cannot_use(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train.train(_config(*overrides), tmp_path)


@pytest.mark.integration
def test_workdir_of_a_different_model(tmp_path):
    train.train(_config("--config.max_steps=1", "--config.checkpoint.every=1"), tmp_path)
    with pytest.raises(CheckpointError, match="lora_rank=8 there, 4 here"):
        train.train(_config("--config.max_steps=2", "--config.lora.rank=4"), tmp_path)
    assert Checkpointer(tmp_path, every=0, keep=1).steps() == [1]


@pytest.mark.integration
def test_missing_and_empty_data(tmp_path):
    with pytest.raises(DataError):
        train.train(_config("--config.data.source=text_files",
                            f"--config.data.paths=('{tmp_path}/nope.txt',)"), tmp_path / "a")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        train.train(_config("--config.data.source=text_files",
                            f"--config.data.paths=('{empty}',)"), tmp_path / "b")


@pytest.mark.integration
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    train.train(_config("--config.max_steps=2", "--config.checkpoint.every=1"), tmp_path)
    with pytest.raises(train.TrainingStopped, match=r"loss is (nan|inf) at step \d+; stopped "
                       r"without saving, the newest checkpoint \(step \d+\) is untouched"):
        train.train(_config("--config.max_steps=8", "--config.checkpoint.every=1",
                            "--config.optim.lr=1e38", "--config.optim.warmup_steps=0",
                            "--config.optim.clip_norm=0.0"), tmp_path)
    checkpointer = Checkpointer(tmp_path, every=0, keep=1)
    assert checkpointer.steps()[-1] >= 2
    good = checkpointer.steps()
    assert all(np.isfinite(loss) for s, loss in _losses(tmp_path).items() if s in good)


@pytest.mark.integration
def test_truncated_latest_checkpoint_falls_back(tmp_path, capsys):
    train.train(_config("--config.max_steps=4", "--config.checkpoint.every=2"), tmp_path)
    latest = tmp_path / "checkpoints" / "4" / "trainable"
    for path in latest.rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    summary = train.train(_config("--config.max_steps=5", "--config.checkpoint.every=2"), tmp_path)
    assert summary["segments"][-1]["start_step"] == 2
    assert "item 'trainable' is damaged" in capsys.readouterr().err


@pytest.mark.integration
def test_truncated_latest_meta_is_reported_and_the_previous_one_checked(tmp_path, capsys):
    train.train(_config("--config.max_steps=4", "--config.checkpoint.every=2"), tmp_path)
    meta = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:10])
    summary = train.train(_config("--config.max_steps=5", "--config.checkpoint.every=2"), tmp_path)
    assert summary["end_step"] == 5
    assert "item 'meta' is damaged" in capsys.readouterr().err


def _data_file(item_dir):
    """The largest array data file of a checkpoint item (tensorstore's `d/` chunks)."""
    files = [p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_middle_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.integration
def test_damaged_checkpoints_are_named_set_aside_and_the_resume_is_exact(straight, tmp_path,
                                                                          capsys):
    """Asynchronous saves every step, then: one data file of checkpoint 4's `trainable` cut in
    half, one byte flipped in the middle of a data file of 3's `optimizer`, 2's `data` item
    deleted. Each is one warning line naming the item; they are moved to checkpoints/rejected
    (not deleted); the run resumes from 1 with the losses of a run never interrupted."""
    every = ("--config.checkpoint.every=1", "--config.checkpoint.keep=10")
    train.train(_config("--config.max_steps=4", "--config.checkpoint.async_save=True", *every),
                tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert all((ckpts / str(step) / "manifest.json").is_file() for step in range(1, 5))
    cut = _data_file(ckpts / "4" / "trainable")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    _flip_middle_byte(_data_file(ckpts / "3" / "optimizer"))
    shutil.rmtree(ckpts / "2" / "data")
    damaged = {step: _tree(ckpts / step) for step in ("2", "3", "4")}
    capsys.readouterr()

    summary = train.train(_config("--config.max_steps=6", *every), tmp_path)
    assert summary["segments"][-1]["start_step"] == 1
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3, err
    expected = {4: ("item 'trainable' is damaged: file ", "(truncated)"),
                3: ("item 'optimizer' is damaged: file ", "fails its sha256 checksum"),
                2: ("item 'data' is missing",)}
    for line, (step, phrases) in zip(warnings, expected.items(), strict=True):
        assert f"checkpoints/{step} is not trusted: " in line, line
        assert all(phrase in line for phrase in phrases), line
        assert f"moved to {ckpts / 'rejected' / str(step)} (not deleted)" in line, line
    assert {step: _tree(ckpts / "rejected" / step) for step in damaged} == damaged
    assert Checkpointer(tmp_path, every=0, keep=1).steps() == [1, 2, 3, 4, 5, 6]
    resumed = _losses(tmp_path)
    for step in range(2, 7):
        assert abs(resumed[step] - straight[step]) <= 1e-6, (step, resumed[step], straight[step])


@pytest.mark.integration
def test_load_run_verifies_and_no_trusted_checkpoint_is_one_error_line(tmp_path, capsys):
    """load_run (export, evaluate) skips a checkpoint whose trainable leaves fail their
    checksum, naming the item, and refuses it when asked for it by step; with every
    checkpoint damaged, the train command stops with one `error:` line and exit status 2,
    changing nothing."""
    train.train(_config("--config.max_steps=2", "--config.checkpoint.every=1"), tmp_path)
    ckpts = tmp_path / "checkpoints"
    _flip_middle_byte(_data_file(ckpts / "2" / "trainable"))
    capsys.readouterr()
    assert load_run(tmp_path).step == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: checkpoint "), err
    assert "item 'trainable' is damaged" in err and "checksum" in err
    with pytest.raises(CheckpointError, match=r"checkpoint 2 in .* cannot be used: item "
                       r"'trainable' is damaged: file .* fails its sha256 checksum"):
        load_run(tmp_path, step=2)

    _flip_middle_byte(_data_file(ckpts / "1" / "trainable"))
    before = _tree(ckpts)
    cmd, env = train_cli(tmp_path, tmp_path / "xla_cache")
    proc = subprocess.run([*cmd, "--config.max_steps=4"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert errors[0].startswith(f"error: no checkpoint in {ckpts} can be trusted: step 2: "
                                "item 'trainable' is damaged"), errors
    assert "step 1: item 'trainable' is damaged" in errors[0]
    assert "nothing was deleted or moved" in errors[0]
    assert _tree(ckpts) == before
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies"):
        load_run(tmp_path)


# Reads a workdir as `evaluate --model` (load_model) and `export --workdir` (export_run) do,
# alternately, argv[2] times; one line per read: "ok" or the error.
READER = """
import sys
from longlora_jax.errors import UserError
from longlora_jax.io.export import export_run
from longlora_jax.io.run import load_model
workdir, reads = sys.argv[1], int(sys.argv[2])
for n in range(reads):
    try:
        if n % 2:
            export_run(workdir, f"{workdir}-export", format="merged", overwrite=True)
        else:
            load_model(workdir)
        print("ok", flush=True)
    except UserError as err:
        print(f"error: {err}", flush=True)
"""


@pytest.mark.integration
def test_readers_beside_a_writer_always_read_a_finished_checkpoint(tmp_path):
    """`evaluate --model` and `export --workdir` (their library calls) read 6 times in another
    process while `train` saves asynchronously every step and keeps 2 (and is then stopped by
    SIGTERM): every read succeeds and says nothing on stderr; checkpoints beyond keep leave
    through checkpoints/deleting, so only the newest two remain."""
    workdir = tmp_path / "run"
    cmd, env = train_cli(workdir, tmp_path / "xla_cache")
    proc = subprocess.Popen(
        [*cmd, "--config.checkpoint.async_save=True", "--config.checkpoint.every=1",
         "--config.checkpoint.keep=2", "--config.max_steps=100000"],
        env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not _finished_steps(workdir) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        reader = subprocess.run([sys.executable, "-c", READER, str(workdir), "6"], env=env,
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        still_training = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert still_training and proc.returncode == 0, err[-3000:]
    assert reader.stdout.splitlines() == ["ok"] * 6, reader.stderr[-3000:]
    assert "warning:" not in reader.stderr and "Traceback" not in reader.stderr, reader.stderr
    last = _finished_steps(workdir)[-1]
    assert last > 6 and _finished_steps(workdir) == [last - 1, last]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(last - 1),
                                                                           str(last)]


@pytest.mark.integration
def test_a_checkpoint_is_held_while_read_and_one_deleted_first_is_retried_once(tmp_path,
                                                                               monkeypatch,
                                                                               capsys):
    """load_run holds the checkpoint it reads by hard links: deleted while it is verified, it
    is still read. Deleted before it is held: the next newest is read, with no warning; that
    one deleted too: one CheckpointError line. Where hard links fail it reads in place."""
    train.train(_config("--config.max_steps=3", "--config.checkpoint.every=1"), tmp_path)
    ckpts = tmp_path / "checkpoints"
    verify, copytree = run_module.checkpoint_problem, shutil.copytree

    def delete(step):  # what the writer does beyond checkpoint.keep
        (ckpts / "deleting").mkdir(exist_ok=True)
        os.rename(ckpts / str(step), ckpts / "deleting" / str(step))
        shutil.rmtree(ckpts / "deleting" / str(step))

    def deleting_while_verifying(manager, step, items):
        delete(step)
        return verify(manager, step, items)

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "checkpoint_problem", deleting_while_verifying)
        assert load_run(tmp_path).step == 3
    assert not (ckpts / "reading").exists()  # the hard links are gone

    train.train(_config("--config.max_steps=6", "--config.checkpoint.every=1"), tmp_path)
    doomed = [6]

    def deleting_before_held(source, *args, **kwargs):
        if doomed and source.name == str(doomed[0]):
            delete(doomed.pop(0))
        return copytree(source, *args, **kwargs)

    capsys.readouterr()
    monkeypatch.setattr(run_module.shutil, "copytree", deleting_before_held)
    assert load_run(tmp_path).step == 5
    assert capsys.readouterr().err == ""
    doomed[:] = [5, 4]
    with pytest.raises(CheckpointError, match=r"checkpoints 5 and then 4 in .* were deleted "
                       r"while they were read .*checkpoint.keep"):
        load_run(tmp_path)

    def no_hard_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.undo()
    train.train(_config("--config.max_steps=7", "--config.checkpoint.every=1"), tmp_path)
    monkeypatch.setattr(os, "link", no_hard_links)
    assert load_run(tmp_path).step == 7
    assert not (ckpts / "reading").exists()


def test_bad_config_values_are_one_line_errors(tmp_path):
    for override, message in (("--config.lora.mode=lroa", "lora.mode='lroa'; valid: lora"),
                              ("--config.optim.schedule=step", "optim.schedule='step'")):
        with pytest.raises(ConfigError, match=message):
            train.train(_config(override), tmp_path)


@pytest.mark.integration
def test_train_restores_signal_handlers_and_leaves_the_config_alone(tmp_path):
    """After a run (e.g. in a notebook) Ctrl-C works as before, and the caller's config is
    unchanged (optim.total_steps 0 is resolved inside, not written back)."""

    def mine(signum, frame):
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGINT, mine)
    term = signal.getsignal(signal.SIGTERM)
    try:
        config = _config("--config.max_steps=1", "--config.checkpoint.every=0")
        before = config.to_json()
        train.train(config, tmp_path)
        assert signal.getsignal(signal.SIGINT) is mine
        assert signal.getsignal(signal.SIGTERM) is term
        assert config.to_json() == before and config.optim.total_steps == 0
    finally:
        signal.signal(signal.SIGINT, previous)
