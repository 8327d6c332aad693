"""Shared test utilities."""

import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

from tensorboardX.proto.event_pb2 import Event

from longlora_jax import train
from longlora_jax.cli import parse

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny_cpu.py")
# The tiny config at its fastest: seconds per run.
TINY_FAST = [
    "--config.seq_len=128", "--config.batch.global_batch=2", "--config.eval.before=False",
    "--config.eval.after=False", "--config.checkpoint.async_save=False",
    "--config.data.prefetch=0",
]


def run_python(code: str, *, devices: int = 1, env: dict | None = None, timeout: int = 900,
               argv: list[str] | None = None) -> str:
    """Runs `code` (with `argv` as sys.argv[1:]) in a fresh interpreter with `devices` fake
    CPU devices; returns its stdout.

    Use for anything that needs XLA flags set before jax is imported (fake multi-device
    meshes, TPU ahead-of-time compilation). Fails the test with the child's stderr.
    """
    child_env = dict(os.environ)
    child_env["JAX_PLATFORMS"] = "cpu"
    child_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    child_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *(argv or [])],
        capture_output=True, text=True, env=child_env, timeout=timeout, cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc.stdout


def losses_on_one_and_eight_devices(*overrides: str) -> tuple[list[float], list[float]]:
    """Per-step losses of 3 steps of the tiny config with `overrides`, trained on one device
    and on 8 fake devices (data 2 x fsdp 2 x sequence 2), each in a fresh interpreter."""
    code = """
    import json, pathlib, sys, tempfile
    from longlora_jax.training.loop import train
    from tests.helpers import train_config
    workdir = pathlib.Path(tempfile.mkdtemp())
    config = train_config("configs/tiny_cpu.py", *json.loads(sys.argv[1]))
    train(config, workdir)
    print(json.dumps([json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text()
                      .splitlines()]))
    """
    common = [*overrides, "--config.max_steps=3", "--config.checkpoint.every=0"]
    meshes = {1: ["--config.mesh.data=1"],
              8: ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.sequence=2"]}
    one, eight = (json.loads(run_python(code, devices=devices, argv=[json.dumps(common + mesh)])
                             .splitlines()[-1]) for devices, mesh in meshes.items())
    return one, eight


def train_config(config_file: str, *overrides: str):
    """The training config the train command builds from `config_file` and `overrides`."""
    return parse(train.COMMAND, ["--config", config_file, *overrides])


def train_cli(workdir, cache_dir) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of `python -m longlora_jax.train` on the tiny config (TINY_FAST)
    in a subprocess: CPU, this checkout, the matmul precision of the test process
    (conftest.py), and a persistent compilation cache in `cache_dir` so that launches after
    the first skip the compile."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT,
               JAX_DEFAULT_MATMUL_PRECISION="highest",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "longlora_jax.train", "--config", TINY_CONFIG, "--workdir",
           str(workdir), *TINY_FAST]
    return cmd, env


def tiny_config(*overrides: str):
    """configs/tiny_cpu.py with TINY_FAST and `overrides`."""
    return train_config(TINY_CONFIG, *TINY_FAST, *overrides)


def logged_rows(workdir: pathlib.Path) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl."""
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def logged_losses(workdir: pathlib.Path) -> dict[int, float]:
    """step -> training loss, from WORKDIR/metrics.jsonl."""
    return {r["step"]: r["loss"] for r in logged_rows(workdir) if "loss" in r}


def tensorboard_scalars(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of every event file in `logdir`, in file-name order.

    Read without TensorFlow: each record is a little-endian u64 length, its u32 CRC, the
    serialized `Event` proto and the data's u32 CRC (TFRecord framing).
    """
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
