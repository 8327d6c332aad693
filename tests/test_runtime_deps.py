"""requirements.txt has no torch: the demo's path (GGUF model + tokenizer, training, eval,
generation, export) must run with torch unimportable."""

import json

from tests.helpers import REPO_ROOT, run_python

BLOCK_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
"""


def test_demo_path_runs_without_torch(tmp_path):
    out = run_python(BLOCK_TORCH + f"""
import json, pathlib
from longlora_jax import assets, evaluate, export, generate, train  # noqa: F401
from longlora_jax.cli import parse
from longlora_jax.io.gguf import load_gguf, load_gguf_tokenizer

path = assets.smollm2_gguf()
tok = load_gguf_tokenizer(path)
cfg, params = load_gguf(path)
config = parse(["--config", "{REPO_ROOT}/configs/tiny_cpu.py", "--config.max_steps=1",
                "--config.seq_len=64", "--config.eval.before=False",
                "--config.checkpoint.async_save=False"], description="t").config
summary = train.train(config, pathlib.Path("{tmp_path}") / "run")
print(json.dumps({{"vocab": len(tok), "layers": cfg.num_hidden_layers,
                  "ids": tok("The pass key is 12345.").input_ids,
                  "end_step": summary["end_step"]}}))
""")
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["vocab"], result["layers"], result["end_step"]) == (49152, 30, 1)
    assert len(result["ids"]) > 5
