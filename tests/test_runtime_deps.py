"""requirements.txt has no torch: the demo's path (GGUF model + tokenizer, training, eval,
generation, export) must run with torch unimportable."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, run_python

pytestmark = pytest.mark.integration

BLOCK_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
"""


def test_demo_path_runs_without_torch(tmp_path):
    out = run_python(BLOCK_TORCH + f"""
import json, pathlib
from longlora_jax import aot, assets, bench, evaluate, export, generate, train  # noqa: F401
from longlora_jax.data import assets
from longlora_jax.io.gguf import load_gguf, load_gguf_tokenizer
from longlora_jax.training.loop import train as run_training
from tests.helpers import train_config

path = assets.smollm2_gguf()
tok = load_gguf_tokenizer(path)
cfg, params = load_gguf(path)
config = train_config("{REPO_ROOT}/configs/tiny_cpu.py", "--config.max_steps=1",
                      "--config.seq_len=64", "--config.eval.before=False",
                      "--config.checkpoint.async_save=False")
summary = run_training(config, pathlib.Path("{tmp_path}") / "run")
print(json.dumps({{"vocab": len(tok), "layers": cfg.num_hidden_layers,
                  "ids": tok("The pass key is 12345.").input_ids,
                  "end_step": summary["end_step"]}}))
""")
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["vocab"], result["layers"], result["end_step"]) == (49152, 30, 1)
    assert len(result["ids"]) > 5


def test_a_command_prints_no_startup_noise(tmp_path):
    """Without torch and without JAX_PLATFORMS (so libtpu, installed with the test
    requirements, probes for TPUs): a command prints what its user needs and nothing else."""
    code = BLOCK_TORCH + """
import runpy
sys.argv = ["generate", "--model", "preset:tiny", "--prompt", "hi", "--max_new_tokens", "2",
            "--temperature", "0"]
runpy.run_module("longlora_jax.generate", run_name="__main__")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = REPO_ROOT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["[preset:tiny: 2 prompt tokens]"], proc.stderr
