"""Shared test utilities."""

import os
import subprocess
import sys
import textwrap

from longlora_jax import train
from longlora_jax.cli import parse

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, *, devices: int = 1, env: dict | None = None, timeout: int = 900) -> str:
    """Runs `code` in a fresh interpreter with `devices` fake CPU devices; returns its stdout.

    Use for anything that needs XLA flags set before jax is imported (fake multi-device
    meshes, TPU ahead-of-time compilation). Fails the test with the child's stderr.
    """
    child_env = dict(os.environ)
    child_env["JAX_PLATFORMS"] = "cpu"
    child_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    child_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=child_env, timeout=timeout, cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc.stdout


def train_config(config_file: str, *overrides: str):
    """The training config the train command builds from `config_file` and `overrides`."""
    return parse(train.COMMAND, ["--config", config_file, *overrides])
