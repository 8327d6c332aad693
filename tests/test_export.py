"""Export: merged HF checkpoint and PEFT adapter, checked with transformers and PEFT themselves.

A tiny base is trained a few steps with LoRA+ (a jitted AdamW loop over the trainable subtree
only) at a doubled context (linear rope scaling 2, as LongLoRA's position interpolation),
then exported. transformers(merged) and PEFT(base + adapter) must agree with each other and
with our JAX model within 1e-4, and differ from the untrained base.
"""

import json

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from longlora_jax import LlamaConfig, LlamaForCausalLM
from longlora_jax import export as export_command
from longlora_jax.cli import run_command
from longlora_jax.errors import ConfigError
from longlora_jax.io import export
from longlora_jax.io.hf import save_pretrained
from longlora_jax.io.run import Run, load_run
from longlora_jax.modeling import lora
from longlora_jax.training.optim import default_optim_config, make_optimizer

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 96
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 24)).astype(np.int32)
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6)
# What training changes: LoRA on (attention + one MLP projection) and 2x position interpolation.
TRAINING = dict(lora_rank=4, lora_alpha=8.0,
                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
                rope_scaling={"rope_type": "linear", "factor": 2.0}, max_position_embeddings=128)


def train(cfg: LlamaConfig, variables: dict, mode: str, steps: int = 6) -> dict:
    """A few AdamW steps on next-token loss; gradients only w.r.t. the trainable subtree."""
    trainable, frozen = lora.split_trainable(variables, lora.trainable_labels(variables, mode))
    optim_cfg = default_optim_config()
    optim_cfg.update(dict(lr=2e-2, warmup_steps=0))
    tx = make_optimizer(optim_cfg, trainable)
    model = LlamaForCausalLM(cfg)

    @jax.jit
    def step(trainable, opt_state):
        def loss_fn(t):
            logits = model.apply(lora.merge_trees(t, frozen), IDS[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, IDS[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    opt_state, losses = tx.init(trainable), []
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    return lora.merge_trees(trainable, frozen)


def jax_logits(cfg, variables) -> np.ndarray:
    return np.asarray(jax.jit(LlamaForCausalLM(cfg).apply)(variables, IDS))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.float().numpy()


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_run(tied: bool, base_dir=None):
    """(train cfg, base cfg, base params, trained variables, HF base dir or None)."""
    base_cfg = LlamaConfig(**BASE, tie_word_embeddings=tied, scan_layers=tied)
    cfg = base_cfg.replace(**TRAINING)
    init = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), IDS)
    variables = jax.tree_util.tree_map(np.asarray, nn.unbox(init))
    if base_dir is not None:
        save_pretrained(base_cfg, variables["params"], base_dir)
    trained = train(cfg, variables, "lora_plus")
    return cfg, base_cfg, variables["params"], trained, base_dir


@pytest.fixture(scope="module")
def hf_base_run(tmp_path_factory):
    """Untied, unscanned, trained from an HF base directory."""
    return make_run(tied=False, base_dir=tmp_path_factory.mktemp("hf_base"))


@pytest.fixture(scope="module")
def tied_run():
    """Tied embeddings (SmolLM2-like), scanned layers, a non-HF base (as GGUF / random)."""
    return make_run(tied=True)


@pytest.fixture(params=["hf_base_run", "tied_run"])
def run(request):
    return request.getfixturevalue(request.param)


def transformers_434_rope_scaling_validation(rope_scaling) -> None:
    """transformers 4.34's LlamaConfig._rope_scaling_validation, restated (the version the
    official LongLoRA code pins): None, or a dict of exactly `type` (linear | dynamic) and a
    float `factor` > 1."""
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict) or len(rope_scaling) != 2:
        raise ValueError(f"`rope_scaling` must be a dictionary with two fields, got {rope_scaling}")
    kind, factor = rope_scaling.get("type"), rope_scaling.get("factor")
    if kind not in ("linear", "dynamic"):
        raise ValueError(f"`rope_scaling`'s type must be linear or dynamic, got {kind}")
    if not isinstance(factor, float) or factor <= 1.0:
        raise ValueError(f"`rope_scaling`'s factor must be a float > 1, got {factor}")


@pytest.mark.parametrize("rope, valid_for_434", [
    ({"rope_type": "linear", "factor": 4.0}, True),
    ({"rope_type": "dynamic", "factor": 2.0}, True),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, False),
])
def test_exported_rope_scaling_spelling(rope, valid_for_434):
    hf = LlamaConfig(**BASE).replace(rope_scaling=rope).to_hf()
    if valid_for_434:
        transformers_434_rope_scaling_validation(hf["rope_scaling"])
        assert hf["rope_scaling"] == {"type": rope["rope_type"], "factor": rope["factor"]}
    else:  # 4.34 cannot use yarn at all: the newer spelling
        with pytest.raises(ValueError):
            transformers_434_rope_scaling_validation(hf["rope_scaling"])
        assert hf["rope_scaling"]["rope_type"] == "yarn"
    assert transformers.LlamaConfig(**hf).rope_parameters["rope_type"] == rope["rope_type"]
    assert LlamaConfig.from_hf(hf).rope_scaling == LlamaConfig(**BASE, rope_scaling=rope
                                                                ).rope_scaling


@pytest.mark.integration
def test_merged_and_peft_exports_agree_and_differ_from_base(run, tmp_path):
    cfg, base_cfg, base_params, trained, base_dir = run
    ours = jax_logits(cfg, trained)
    base = jax_logits(base_cfg, {"params": base_params})
    assert np.abs(ours - base).max() > 1e-2

    merged_dir = export.export_merged(cfg, trained, tmp_path / "merged")
    hf_config = json.loads((merged_dir / "config.json").read_text())
    assert hf_config["rope_parameters"]["rope_type"] == "linear"
    assert hf_config["rope_parameters"]["factor"] == 2.0
    assert hf_config["rope_scaling"] == {"type": "linear", "factor": 2.0}
    transformers_434_rope_scaling_validation(hf_config["rope_scaling"])
    assert hf_config["max_position_embeddings"] == 128
    merged = torch_logits(hf_model(merged_dir))
    # The legacy spelling alone (what transformers 4 writes and reads) gives the same model.
    del hf_config["rope_parameters"]
    (merged_dir / "config.json").write_text(json.dumps(hf_config))
    np.testing.assert_allclose(torch_logits(hf_model(merged_dir)), merged, atol=1e-6)

    peft_dir = export.export_peft(cfg, trained, tmp_path / "peft", base_dir=base_dir,
                                  base_params=None if base_dir else base_params)
    adapter = json.loads((peft_dir / export.ADAPTER_CONFIG).read_text())
    # The base had no rope scaling, training had: the adapter points at O/base either way.
    assert adapter["base_model_name_or_path"] == str((tmp_path / "peft" / "base").absolute())
    base_config = json.loads((peft_dir / "base" / "config.json").read_text())
    assert base_config["rope_parameters"]["factor"] == 2.0
    assert adapter["ensure_weight_tying"] == cfg.tie_word_embeddings
    peft_model = peft.PeftModel.from_pretrained(
        hf_model(adapter["base_model_name_or_path"]), peft_dir
    ).eval()
    via_peft = torch_logits(peft_model)

    np.testing.assert_allclose(merged, via_peft, atol=1e-4)
    np.testing.assert_allclose(merged, ours, atol=1e-4)
    with peft_model.disable_adapter():
        # O/base holds the pretrained weights (rope-scaled): the untrained model again.
        np.testing.assert_allclose(torch_logits(peft_model), base_at_training_rope(run),
                                   atol=1e-4)
    if base_dir is not None:
        np.testing.assert_allclose(torch_logits(hf_model(base_dir)), base, atol=1e-4)


def base_at_training_rope(run) -> np.ndarray:
    cfg, _, base_params, _, _ = run
    return jax_logits(cfg.replace(lora_rank=0), {"params": base_params})


def test_peft_points_at_hf_base_when_rope_matches(hf_base_run, tmp_path):
    cfg, base_cfg, _, trained, base_dir = hf_base_run
    same_rope = cfg.replace(rope_scaling=base_cfg.rope_scaling,
                            max_position_embeddings=base_cfg.max_position_embeddings)
    out = export.export_peft(same_rope, trained, tmp_path / "peft", base_dir=base_dir)
    adapter = json.loads((out / export.ADAPTER_CONFIG).read_text())
    assert adapter["base_model_name_or_path"] == str(base_dir.absolute())
    assert not (out / "base").exists()
    peft_model = peft.PeftModel.from_pretrained(hf_model(base_dir), out).eval()
    np.testing.assert_allclose(torch_logits(peft_model), jax_logits(same_rope, trained),
                               atol=1e-4)


def test_lora_only_adapter_has_no_modules_to_save(hf_base_run, tmp_path):
    cfg, _, _, trained, base_dir = hf_base_run
    out = export.export_peft(cfg, trained, tmp_path / "peft", mode="lora", base_dir=base_dir)
    adapter = json.loads((out / export.ADAPTER_CONFIG).read_text())
    assert adapter["modules_to_save"] is None
    from safetensors import safe_open

    with safe_open(str(out / export.ADAPTER_WEIGHTS), "np") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert len(keys) == 2 * cfg.num_hidden_layers * len(cfg.lora_targets)


# ------------------------------------------------------------------------------ bad input

def test_peft_export_of_run_without_lora_is_an_error(tmp_path):
    cfg = LlamaConfig(**BASE)
    variables = {"params": {}}
    with pytest.raises(ConfigError, match=r"no LoRA adapters.*use --format merged"):
        export.export_peft(cfg, variables, tmp_path / "o")
    with pytest.raises(ConfigError, match="mode 'full' cannot be a PEFT adapter"):
        export.export_peft(cfg.replace(lora_rank=4), {"params": {}, "lora": {"x": 1}},
                           tmp_path / "o", mode="full")
    assert not (tmp_path / "o").exists()


def test_refuses_to_overwrite_and_replaces_atomically(run, tmp_path):
    cfg, _, _, trained, _ = run
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"exists and is not empty; set overwrite"):
        export.export_merged(cfg, trained, out)
    assert (out / "keep.txt").exists()
    export.export_merged(cfg, trained, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp dirs left


@pytest.mark.integration
def test_cli(run, tmp_path, monkeypatch, capsys):
    cfg, _, _, trained, base_dir = run
    meta = {"base": f"hf:{base_dir}" if base_dir else "preset:tiny", "mode": "lora_plus",
            "tokenizer": "bytes", "seed": 0}
    monkeypatch.setattr(export, "load_run",
                        lambda workdir, step=None: Run(cfg, trained, meta, 1))

    def cli(out, fmt):
        return run_command(export_command.COMMAND, ["--workdir", str(tmp_path / "W"), "--out",
                                                    str(out), "--format", fmt])

    out = tmp_path / "out"
    assert cli(out, "peft") == 0
    assert (out / export.ADAPTER_WEIGHTS).is_file()
    assert cli(out, "merged") == 2
    assert "exists and is not empty" in capsys.readouterr().err
    no_lora = {"params": trained["params"]}
    monkeypatch.setattr(export, "load_run", lambda workdir, step=None: Run(
        cfg.replace(lora_rank=0), no_lora, {**meta, "mode": "full"}, 1))
    assert cli(tmp_path / "o2", "peft") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the run has no LoRA adapters") and "\n" not in err
    assert cli(tmp_path / "o3", "merged") == 0


def test_tokenizer_is_saved_with_both_exports(tied_run, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg, _, _, trained, _ = tied_run
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    merged = export.export_merged(cfg, trained, tmp_path / "merged", tokenizer=tokenizer)
    adapter = export.export_peft(cfg, trained, tmp_path / "peft", tokenizer=tokenizer)
    for path in (merged, adapter, adapter / "base"):
        loaded = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert loaded("w3 w7 zz")["input_ids"] == [3, 7, VOCAB - 1]


@pytest.mark.slow
def test_cli_on_a_real_training_workdir(tmp_path):
    """Train configs/tiny_cpu.py for 2 steps, export both formats with the CLI, load them."""
    from longlora_jax.training.loop import train
    from tests.helpers import REPO_ROOT, train_config

    workdir = tmp_path / "run"
    config = train_config(
        f"{REPO_ROOT}/configs/tiny_cpu.py", "--config.seq_len=128",
        "--config.batch.global_batch=2", "--config.eval.before=False",
        "--config.eval.after=False", "--config.checkpoint.async_save=False",
        "--config.data.prefetch=0", "--config.max_steps=2", "--config.checkpoint.every=2")
    train(config, workdir)
    for fmt in export.FORMATS:
        assert run_command(export_command.COMMAND, ["--workdir", str(workdir), "--out",
                                                    str(tmp_path / fmt), "--format", fmt]) == 0
    loaded = load_run(workdir)
    cfg, variables = loaded.cfg, loaded.variables
    adapter = json.loads((tmp_path / "peft" / export.ADAPTER_CONFIG).read_text())
    assert adapter["modules_to_save"] == list(export.LORA_PLUS_MODULES)  # the run's mode
    ids = IDS % cfg.vocab_size
    with torch.no_grad():
        merged = hf_model(tmp_path / "merged")(torch.from_numpy(ids).long()).logits.numpy()
        peft_model = peft.PeftModel.from_pretrained(
            hf_model(adapter["base_model_name_or_path"]), tmp_path / "peft")
        via_peft = peft_model(torch.from_numpy(ids).long()).logits.numpy()
    ours = np.asarray(LlamaForCausalLM(cfg).apply(variables, ids))
    np.testing.assert_allclose(merged, ours, atol=1e-4)
    np.testing.assert_allclose(via_peft, ours, atol=1e-4)
