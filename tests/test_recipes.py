"""The paper recipes for real checkpoints: each run tokenizes with its base's own tokenizer and
refuses one that cannot fit; SFT rows start with BOS, train on LongAlpaca-16k-length for 5
epochs with the official per-example S2 groups; 70B at the paper's learning rate."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from longlora_jax.data import ByteTokenizer, assets, make_train_iterator
from longlora_jax.errors import ConfigError
from longlora_jax.io.base import BaseSpec, check_tokenizer, load_tokenizer
from longlora_jax.io.hf import save_pretrained
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.training.config import model_config, with_epochs_resolved
from tests.helpers import REPO_ROOT, train_config

transformers = pytest.importorskip("transformers")
CONFIGS = os.path.join(REPO_ROOT, "configs")


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory):
    """The 32k SentencePiece stand-in saved as an HF tokenizer directory."""
    out = tmp_path_factory.mktemp("standin")
    load_tokenizer("standin-sp32k", BaseSpec.parse("preset:tiny")).save_pretrained(out)
    return out


def test_the_standin_is_mistral_not_llama2(standin_dir):
    tok = transformers.AutoTokenizer.from_pretrained(standin_dir, local_files_only=True)
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    # Mistral-7B-v0.1's pieces; LLaMA-2 has "▁the" at 278 and "▁" at 29871.
    assert tok.convert_tokens_to_ids(["▁the", "▁"]) == [272, 28705]
    with pytest.raises(ConfigError, match=r"named Mistral-7B-v0\.1's vocabulary"):
        load_tokenizer("llama2", BaseSpec.parse("preset:tiny"))


def _run(module: str, *args: str, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"longlora_jax.{module}", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})


@pytest.mark.integration
def test_train_refuses_a_tokenizer_larger_than_the_embedding(standin_dir, tmp_path):
    proc = _run("train", "--config", f"{CONFIGS}/tiny_cpu.py", "--workdir", str(tmp_path),
                "--config.model.overrides={'vocab_size': 300, 'max_position_embeddings': 128}",
                f"--config.model.tokenizer=hf:{standin_dir}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: model.tokenizer=") and "32000 ids" in line
    assert "300 rows" in line
    assert not (tmp_path / "checkpoints").exists()  # refused before any step


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, standin_dir):
    """A tiny random HF LLaMA (vocab 300) whose directory carries a 32k tokenizer."""
    out = tmp_path_factory.mktemp("base")
    cfg = LlamaConfig.preset("tiny", vocab_size=300)

    from longlora_jax import LlamaForCausalLM
    params = nn.unbox(LlamaForCausalLM(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32)))
    save_pretrained(cfg, params["params"], out)
    transformers.AutoTokenizer.from_pretrained(standin_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("module, args", [
    ("evaluate", ["--lengths", "64"]),
    ("generate", ["--prompt", "hello"]),
])
def test_evaluate_and_generate_refuse_it_too(hf_base, module, args):
    proc = _run(module, "--model", f"hf:{hf_base}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "32000 ids" in line and "300 rows" in line


def test_a_fitting_tokenizer_that_is_not_the_bases_own_warns(hf_base):
    cfg = LlamaConfig.from_hf(hf_base).replace(vocab_size=32000)
    spec = BaseSpec.parse(f"hf:{hf_base}")
    with pytest.warns(UserWarning, match="not the tokenizer of the base"):
        check_tokenizer(ByteTokenizer(), "bytes", cfg, spec)
    check_tokenizer(load_tokenizer("auto", spec), "auto", cfg, spec)  # its own: silent


@pytest.mark.parametrize("name", ["llama2_7b_32k", "llama3_8b_64k", "longalpaca_sft_16k"])
def test_paper_configs_use_the_bases_own_tokenizer(name, hf_base):
    config = train_config(f"{CONFIGS}/{name}.py", f"--config.model.base=hf:{hf_base}")
    assert config.model.tokenizer == "auto"
    assert len(load_tokenizer(config.model.tokenizer, BaseSpec.parse(config.model.base))) == 32000


@pytest.mark.integration
def test_sft_recipe(tmp_path):
    config = train_config(f"{CONFIGS}/longalpaca_sft_16k.py")
    assert config.data.paths == ("data/LongAlpaca-16k-length.json",)
    assert config.data.add_bos and config.epochs == 5.0
    assert config.attention.group_rule == "longlora_sft" and config.data.sft_template == "longlora"
    cfg, _ = model_config(config)
    assert cfg.s2_group_rule == "longlora_sft"
    # Rows start with BOS; 5 epochs of the file at global batch 64.
    examples = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(200)]
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(examples))
    config.data.paths = (str(path),)
    config.data.prefetch = 0
    tok = ByteTokenizer()
    batch = next(make_train_iterator(config.data, tok, seq_len=64, global_batch=4))
    assert (batch["inputs"][:, 0] == tok.bos_token_id).all()
    assert with_epochs_resolved(config).max_steps == -(-5 * 200 // 64)


def test_seventy_b_trains_at_the_papers_rate():
    for variant in ("tpu", "gpu"):
        assert train_config(f"{CONFIGS}/llama2_70b_32k.py:{variant}").optim.lr == 1e-5
        assert train_config(f"{CONFIGS}/llama2_7b_32k.py:{variant}").optim.lr == 2e-5


def test_assets_name_the_standin_for_what_it_is():
    assert "mistral-tokenizer" in assets.ASSET_NAMES
    assert "llama2-tokenizer" not in assets.ASSET_NAMES
