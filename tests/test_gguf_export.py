"""GGUF export, read back by our GGUF reader and by transformers' GGUF loader.

The tiny LoRA+ runs of test_export (trained at 2x linear position interpolation) are exported
as GGUF and as a merged HF checkpoint; the GGUF file must give the merged checkpoint's logits
(f32: 1e-4; f16 and q8_0: the loss of the format, measured and bounded).
"""

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from longlora_jax import LlamaConfig, LlamaForCausalLM
from longlora_jax import export as export_command
from longlora_jax.cli import run_command
from longlora_jax.data import assets
from longlora_jax.data.tokenizer import ByteTokenizer
from longlora_jax.inference.decode import generate
from longlora_jax.io import export
from longlora_jax.io.gguf import load_gguf, load_gguf_tokenizer
from longlora_jax.io.gguf_export import write_gguf
from longlora_jax.io.hf import tensor_names
from longlora_jax.io.run import Run
from tests.test_export import BASE, IDS, jax_logits, make_run, torch_logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(cfg, trained variables, merged HF dir, transformers logits of the merged export)."""
    cfg, _, _, variables, _ = make_run(tied=True)
    merged = export.export_merged(cfg, variables, tmp_path_factory.mktemp("m") / "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    return cfg, variables, merged, torch_logits(model.eval())


def gguf_logits(path) -> np.ndarray:
    cfg, params = load_gguf(path)
    return np.asarray(jax.jit(LlamaForCausalLM(cfg).apply)({"params": params}, IDS))


def loss(logits: np.ndarray) -> float:
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return float(-np.take_along_axis(np.asarray(logp), IDS[:, 1:, None], axis=-1).mean())


def test_f32_reloads_with_the_merged_logits_and_rope_scaling(trained, tmp_path):
    cfg, variables, merged_dir, merged = trained
    path = export.export_gguf(cfg, variables, tmp_path / "g", gguf_type="f32")
    assert path == tmp_path / "g" / export.GGUF_FILE
    reader = gguf.GGUFReader(path)
    field = {k: reader.get_field(k).contents() for k in (
        "general.architecture", "llama.rope.scaling.type", "llama.rope.scaling.factor",
        "llama.context_length", "general.file_type")}
    assert field == {"general.architecture": "llama", "llama.rope.scaling.type": "linear",
                     "llama.rope.scaling.factor": 2.0, "llama.context_length": 128,
                     "general.file_type": 0}
    loaded_cfg, _ = load_gguf(path)
    assert loaded_cfg.rope_scaling == cfg.rope_scaling
    assert np.abs(gguf_logits(path) - merged).max() < 1e-4
    assert np.abs(merged - jax_logits(cfg, variables)).max() < 1e-4

    # transformers' GGUF loader: the same tensors as the merged checkpoint (it does not read
    # llama.rope.scaling, so the rope comes from the merged config.json).
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        config=transformers.AutoConfig.from_pretrained(merged_dir)).eval()
    want = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    for name, tensor in want.state_dict().items():
        np.testing.assert_array_equal(ref.state_dict()[name].numpy(), tensor.numpy(), name)
    assert np.abs(torch_logits(ref) - merged).max() < 1e-4


def test_transformers_gguf_loader_alone_on_an_unscaled_model(tmp_path):
    cfg = LlamaConfig(**BASE, tie_word_embeddings=False)
    params = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(1), IDS)["params"]
    merged = export.export_merged(cfg, {"params": params}, tmp_path / "merged")
    path = export.export_gguf(cfg, {"params": params}, tmp_path / "g", gguf_type="f32",
                              tokenizer=ByteTokenizer())
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    want = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(merged).eval())
    assert np.abs(torch_logits(ref) - want).max() < 1e-4
    assert gguf.GGUFReader(path).get_field("tokenizer.ggml.model").contents() == "none"


@pytest.mark.parametrize("gguf_type, file_type, max_loss_change", [
    ("f16", 1, 1e-3), ("q8_0", 7, 1e-2)])
def test_f16_and_q8_0_cost_little(trained, tmp_path, gguf_type, file_type, max_loss_change):
    """The loss of the format: next-token loss on IDS within `max_loss_change` (relative) of the
    merged model's, and the logits really differ (the weights were rounded)."""
    cfg, variables, _, merged = trained
    path = export.export_gguf(cfg, variables, tmp_path / "g", gguf_type=gguf_type)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.file_type").contents() == file_type
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"
    ours = gguf_logits(path)
    change = abs(loss(ours) - loss(merged)) / loss(merged)
    print(f"{gguf_type}: max|logit - merged| {np.abs(ours - merged).max():.2e}, "
          f"relative loss change {change:.2e}")
    assert change < max_loss_change
    assert np.abs(ours - merged).max() > 1e-6


def test_q8_0_dequantizes_as_transformers_does(trained, tmp_path):
    cfg, variables, merged_dir, _ = trained
    path = export.export_gguf(cfg, variables, tmp_path / "g", gguf_type="q8_0")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        config=transformers.AutoConfig.from_pretrained(merged_dir)).eval()
    loaded_cfg, params = load_gguf(path)
    flat, state = traverse_util.flatten_dict(params), ref.state_dict()
    for name in tensor_names(loaded_cfg):
        ours = np.asarray(flat[name.path])
        np.testing.assert_array_equal(ours.T if name.transpose else ours, state[name.hf].numpy())


def test_smollm2_tokenizer_keys_are_copied(tmp_path):
    """A model from a GGUF file carries that file's tokenizer (SmolLM2's: 49152 BPE tokens,
    merges, chat template) into its export."""
    source = assets.smollm2_gguf()
    cfg = LlamaConfig(**{**BASE, "vocab_size": 49152}, tie_word_embeddings=True)
    params = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), IDS)["params"]
    path = write_gguf(cfg, params, tmp_path / "x.gguf", gguf_type="f32", source_gguf=source)
    ours, theirs = gguf.GGUFReader(path), gguf.GGUFReader(source)
    keys = sorted(k for k in theirs.fields if k.startswith("tokenizer."))
    assert "tokenizer.chat_template" in keys and "tokenizer.ggml.merges" in keys
    for key in keys:  # (the same keys and values: the same tokenizer for every reader)
        assert ours.get_field(key).contents() == theirs.get_field(key).contents(), key
        assert ours.get_field(key).types == theirs.get_field(key).types, key


def test_hf_bpe_tokenizer_is_embedded(tmp_path):
    """An HF byte-level BPE tokenizer becomes tokenizer.ggml.* that tokenizes the same."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = " ".join(d.text for d in assets.essays()[:2])
    backend.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                                     eos_token="</s>")
    cfg = LlamaConfig(**{**BASE, "vocab_size": 304})
    params = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), IDS)["params"]
    path = write_gguf(cfg, params, tmp_path / "x.gguf", gguf_type="f32", tokenizer=tokenizer)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == 304  # padded
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == 1
    sample = "What I Worked On: startups, 1234 ünïcode"
    assert load_gguf_tokenizer(path)(sample).input_ids == tokenizer(sample).input_ids


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt_neox", hidden_act="gelu", num_key_value_heads=4),
     "GGUF export of model_type 'gpt_neox' is not supported; valid: llama, mistral, qwen2"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "rope scaling 'dynamic' has no GGUF form llama.cpp reads"),
])
def test_unsupported_models_are_one_line_errors(tmp_path, monkeypatch, capsys, change, message):
    cfg = LlamaConfig(**{**BASE, **change})
    variables = {"params": {}}
    monkeypatch.setattr(export, "load_run", lambda workdir, step=None: Run(
        cfg, variables, {"base": "preset:tiny", "mode": "full", "tokenizer": "bytes",
                         "seed": 0}, 1))
    out = tmp_path / "out"
    argv = ["--workdir", str(tmp_path / "W"), "--out", str(out), "--format", "gguf"]
    assert run_command(export_command.COMMAND, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert run_command(export_command.COMMAND, [*argv, "--config.gguf.type=q4_0"]) == 2
    assert "gguf.type='q4_0'; valid: f32, f16, q8_0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp dirs left


def test_cli_writes_gguf_and_keeps_a_failed_write_from_landing(trained, tmp_path, monkeypatch):
    cfg, variables, _, merged = trained
    meta = {"base": "preset:tiny", "mode": "lora_plus", "tokenizer": "bytes", "seed": 0}
    monkeypatch.setattr(export, "load_run", lambda workdir, step=None: Run(cfg, variables,
                                                                           meta, 1))
    out = tmp_path / "out"
    argv = ["--workdir", str(tmp_path / "W"), "--out", str(out), "--format", "gguf",
            "--config.gguf.type=f32"]
    assert run_command(export_command.COMMAND, argv) == 0
    assert np.abs(gguf_logits(out / export.GGUF_FILE) - merged).max() < 1e-4

    def broken(*args, **kwargs):
        (kwargs.get("path") or args[2]).write_bytes(b"GGUF half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        run_command(export_command.COMMAND, [*argv, "--overwrite"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left
    assert np.abs(gguf_logits(out / export.GGUF_FILE) - merged).max() < 1e-4  # old file kept


# ------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smollm2_f32(tmp_path_factory):
    """SmolLM2 (the Q4_1 asset, dequantized) exported by the CLI as an f32 GGUF file."""
    out = tmp_path_factory.mktemp("smollm2") / "gguf"
    argv = ["--workdir", "smollm2", "--out", str(out), "--format", "gguf",
            "--config.gguf.type=f32"]
    assert run_command(export_command.COMMAND, argv) == 0
    return out / export.GGUF_FILE


def chat_ids(path) -> list[int]:
    tok = load_gguf_tokenizer(path)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                     "France? Answer in one sentence."}],
                                   tokenize=False, add_generation_prompt=True)
    return tok(text).input_ids


@pytest.mark.slow
def test_smollm2_export_reloads_with_the_merged_logits(smollm2_f32, tmp_path):
    """The f32 file holds exactly the asset's (dequantized) weights; read back, its logits are
    those of the merged HF export of the same model as transformers computes them."""
    _, source = load_gguf(assets.smollm2_gguf())
    cfg, params = load_gguf(smollm2_f32)
    flat, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(source)
    for path, leaf in want.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(leaf), str(path))
    assert run_command(export_command.COMMAND, ["--workdir", "smollm2", "--out",
                                                str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                               dtype=torch.float32).eval()
    ids = np.asarray([chat_ids(smollm2_f32)], np.int32)
    with torch.no_grad():
        theirs = merged(torch.from_numpy(ids).long()).logits.numpy()
    ours = np.asarray(LlamaForCausalLM(cfg).apply({"params": params}, ids))
    print(f"SmolLM2 f32 GGUF vs merged HF export: max|logit diff| "
          f"{np.abs(ours - theirs).max():.2e}")
    assert np.abs(ours - theirs).max() < 2.5e-4  # fp32 noise of this model (test_gguf.py)


@pytest.mark.slow
def test_llama_cpp_decodes_the_same_greedy_tokens(smollm2_f32):
    """llama.cpp itself (llama-cpp-python, built from source: see the README's slow tests)
    runs our export and picks the same greedy tokens as our KV-cache decoder."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = chat_ids(smollm2_f32)
    cfg, params = load_gguf(smollm2_f32)
    new = 24
    ours = generate(cfg, params, [ids], new, eos_token_id=cfg.eos_token_id)[0, len(ids):]
    ours = [int(t) for t in ours]
    if cfg.eos_token_id in ours:
        ours = ours[:ours.index(cfg.eos_token_id) + 1]
    llm = llama_cpp.Llama(model_path=str(smollm2_f32), n_ctx=512, n_threads=2, verbose=False)
    theirs = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                              repeat_penalty=1.0):
        theirs.append(int(token))
        if len(theirs) == len(ours) or token == llm.token_eos():
            break
    print("ours:", ours, "\nllama.cpp:", theirs)
    assert theirs == ours and len(ours) >= 8
