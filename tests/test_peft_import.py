"""Official LongLoRA releases and PEFT adapters load onto a base: `hf:BASE+ADAPTER`.

A tiny random transformers LLaMA is the base; PEFT writes a LoRA adapter with random factors
(as `adapter_model.bin`, a torch pickle, the official releases' format, and as safetensors);
an official-style `trainable_params.bin` carries LoRA+ embeddings (one extra row: the pad
token the official scripts add) and norms. transformers + PEFT, set up the way the official
merge script does, is the reference: logits within 1e-4.
"""

import json

import numpy as np
import pytest

from longlora_jax import LlamaForCausalLM
from longlora_jax.errors import CheckpointError
from longlora_jax.io.run import load_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 96
IDS = np.random.default_rng(0).integers(0, VOCAB + 1, (2, 20)).astype(np.int64)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def _resized_base(base_dir):
    """The base as the official scripts prepare it: one more token, its input and output
    embedding rows the mean of the others (smart_tokenizer_and_embedding_resize)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.resize_token_embeddings(VOCAB + 1)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[-1:] = weight[:-1].mean(dim=0, keepdim=True)
    return model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(base dir, adapter dir) of an official-style LoRA+ release."""
    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    model = _resized_base(root / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                              "o_proj"],
                           init_lora_weights=False)
    # As the official releases: LoRA factors only (their embeddings are in trainable_params).
    peft.get_peft_model(model, lora).save_pretrained(root / "adapter", safe_serialization=False,
                                                     save_embedding_layers=False)
    g = torch.Generator().manual_seed(1)
    trainable = {"model.embed_tokens.weight": torch.randn(VOCAB + 1, 32, generator=g),
                 "model.norm.weight": 1 + 0.1 * torch.randn(32, generator=g)}
    for i in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            trainable[f"model.layers.{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(32, generator=g)
    torch.save(trainable, root / "adapter" / "trainable_params.bin")
    return root / "base", root / "adapter"


def _reference(base_dir, adapter_dir, trainable: bool) -> np.ndarray:
    model = _resized_base(base_dir)
    if trainable:
        state = torch.load(adapter_dir / "trainable_params.bin")
        assert not model.load_state_dict(state, strict=False).unexpected_keys
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def test_official_release_with_pickled_adapter_and_trainable_params(release):
    base_dir, adapter_dir = release
    assert (adapter_dir / "adapter_model.bin").is_file()
    loaded = load_model(f"hf:{base_dir}+{adapter_dir}")
    assert loaded.cfg.vocab_size == VOCAB + 1 and loaded.cfg.lora_rank == 4
    ours = np.asarray(LlamaForCausalLM(loaded.cfg).apply(loaded.variables, IDS.astype(np.int32)))
    want = _reference(base_dir, adapter_dir, trainable=True)
    np.testing.assert_allclose(ours, want, atol=1e-4)
    base_only = _resized_base(base_dir)(torch.from_numpy(IDS)).logits.detach().numpy()
    assert np.abs(ours - base_only).max() > 1e-2  # the adapter does something


def test_safetensors_adapter_without_trainable_params(release, tmp_path):
    base_dir, _ = release
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "st")
    assert (tmp_path / "st" / "adapter_model.safetensors").is_file()
    loaded = load_model(f"hf:{base_dir}+{tmp_path / 'st'}")
    ids = IDS.clip(max=VOCAB - 1)
    ours = np.asarray(LlamaForCausalLM(loaded.cfg).apply(loaded.variables, ids.astype(np.int32)))
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        tmp_path / "st").eval()
    with torch.no_grad():
        want = reference(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, want, atol=1e-4)


def test_adapter_errors_are_one_line(release, tmp_path):
    base_dir, adapter_dir = release
    with pytest.raises(CheckpointError, match=r"no adapter_config\.json"):
        load_model(f"hf:{base_dir}+{tmp_path}")
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora=true is not supported"):
        load_model(f"hf:{base_dir}+{bad}")
    with pytest.raises(CheckpointError, match="an adapter goes on a base"):
        load_model(f"{tmp_path}+{adapter_dir}")
