"""GGUF import against transformers' own GGUF loader.

Fast: tiny GGUF files written here the way llama.cpp's converter writes them (q/k rows
permuted, Q8_0-quantized matrices) from a random HF model. Slow: the real
SmolLM2-135M-Instruct Q4_1 file from the offline assets: logits, perplexity, bf16 loss.
"""

import gguf
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from longlora_jax import ConfigError
from longlora_jax.data import assets
from longlora_jax.errors import CheckpointError
from longlora_jax.io.gguf import load_gguf, load_gguf_tokenizer, read_gguf_config
from longlora_jax.io.hf import tensor_names
from tests.test_model_vs_hf import hf_logits, next_token_loss, our_logits, random_hf_model, tokens

# ------------------------------------------------------------------------------ tiny files


def llama_cpp_permute(w_oi: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row order: per head, (2, D/2) -> (D/2, 2)."""
    return (w_oi.reshape(heads, 2, w_oi.shape[0] // heads // 2, *w_oi.shape[1:])
            .swapaxes(1, 2).reshape(w_oi.shape))


def write_gguf(model: transformers.LlamaForCausalLM, path, *, quantize: bool, arch="llama"):
    """Writes `model` as a llama.cpp-style GGUF (matrices Q8_0 when `quantize`)."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        w = tensor.numpy()
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, c.num_key_value_heads)
        gguf_name = name_map.get_name(name, try_suffixes=(".weight",))
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if quantize and w.ndim == 2:
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, q, raw_shape=q.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_matches_source_model(tied, tmp_path):
    """fp32 GGUF: permutation undone, config read -> the source model's logits exactly."""
    model = random_hf_model({"num_key_value_heads": 2, "tie_word_embeddings": tied}, "none")
    path = write_gguf(model, tmp_path / "tiny.gguf", quantize=False)
    cfg, params = load_gguf(path, config_overrides={"scan_layers": tied})
    assert (cfg.tie_word_embeddings, cfg.num_key_value_heads, cfg.vocab_size) == (tied, 2, 256)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert read_gguf_config(path, config_overrides={"scan_layers": tied}) == cfg
    ids = tokens()
    err = np.abs(our_logits(cfg, params, ids) - hf_logits(model, ids)).max()
    assert err < 1e-5, err


def test_tiny_q8_gguf_matches_transformers_gguf_loader(tmp_path):
    """Q8_0 GGUF: we dequantize exactly as transformers does (same weights, same logits)."""
    model = random_hf_model({"num_key_value_heads": 2}, "none")
    path = write_gguf(model, tmp_path / "tiny.gguf", quantize=True)
    cfg, params = load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    state = ref.state_dict()
    flat = traverse_util.flatten_dict(params)
    for name in tensor_names(cfg):
        ours = np.asarray(flat[name.path])
        np.testing.assert_array_equal(ours.T if name.transpose else ours, state[name.hf].numpy())
    ids = tokens()
    assert np.abs(our_logits(cfg, params, ids) - hf_logits(ref, ids)).max() < 1e-5
    # quantization really happened: the source model differs
    assert np.abs(hf_logits(model, ids) - hf_logits(ref, ids)).max() > 1e-4


def test_gguf_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    model = random_hf_model({}, "none")
    path = write_gguf(model, tmp_path / "bert.gguf", quantize=False, arch="bert")
    with pytest.raises(ConfigError, match="GGUF architecture 'bert' is not supported"):
        load_gguf(path)


# ------------------------------------------------------------------------------ SmolLM2


def test_smollm2_tokenizer_from_gguf_metadata():
    path = assets.smollm2_gguf()
    tok = load_gguf_tokenizer(path)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert len(tok) == 49152
    tokens_field = gguf.GGUFReader(path).get_field("tokenizer.ggml.tokens").contents()
    text = "Startups are hard. 12345 naïve café!"
    ids = tok(text).input_ids
    assert tok.convert_ids_to_tokens(ids) == [tokens_field[i] for i in ids]
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)

    # The same tokenizer as transformers' own GGUF route (which needs torch; ours does not).
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                     local_files_only=True)
    long_text = "\n\n".join(d.text for d in assets.essays()[:3]) + " ünïcode 🙂 <|im_end|>"
    assert tok(long_text).input_ids == ref(long_text).input_ids
    chat = [{"role": "user", "content": "What is the pass key?"}]
    assert (tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    assert ((tok.pad_token_id, tok.unk_token_id, tok.add_bos_token)
            == (ref.pad_token_id, ref.unk_token_id, ref.add_bos_token))


@pytest.fixture(scope="module")
def smollm2():
    """(config, params, tokenizer, transformers' GGUF model), loaded once for the slow tests."""
    path = assets.smollm2_gguf()
    cfg, params = load_gguf(path)
    tok = load_gguf_tokenizer(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return cfg, params, tok, ref


def essay(name: str) -> str:
    return next(d.text for d in assets.essays() if d.name == name)


def exact_reference(ref: transformers.LlamaForCausalLM) -> transformers.LlamaForCausalLM:
    """The same (dequantized) weights in a plain float64 transformers model: the exact logits."""
    hf_config = ref.config.to_dict()
    hf_config.pop("quantization_config", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).double().eval()
    model.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    return model


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2):
    """Bitwise-equal weights, and logits as close to transformers' as fp32 allows.

    SmolLM2's residual stream reaches |h| ~ 2.5e4, so fp32 logits (|logit| ~ 40) carry ~1e-4
    of rounding noise in ANY implementation: transformers' own fp32 logits differ from its
    float64 ones by 0.8e-4..1.9e-4 on essay snippets. We check the absolute gap to
    transformers' fp32 loader, and that our error against the exact float64 logits is
    comparable to transformers' own (both measured and printed).
    """
    cfg, params, tok, ref = smollm2
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == (
        30, 576, 9, 3, 49152, 100000.0, True)
    state = ref.state_dict()
    flat = traverse_util.flatten_dict(params)
    for name in tensor_names(cfg):
        ours = np.asarray(flat[name.path])
        np.testing.assert_array_equal(ours.T if name.transpose else ours, state[name.hf].numpy())
    snippet = essay("worked")[:1200]  # the opening of "What I Worked On"
    ids = np.asarray([tok(snippet).input_ids], np.int32)
    assert ids.shape[1] > 200
    ours, theirs = our_logits(cfg, params, ids), hf_logits(ref, ids)
    with torch.no_grad():
        exact = exact_reference(ref)(torch.from_numpy(ids).long()).logits.numpy()
    gap = np.abs(ours - theirs).max()
    our_err, their_err = np.abs(ours - exact).max(), np.abs(theirs - exact).max()
    print(f"SmolLM2 {ids.shape[1]} tokens, |logit| <= {np.abs(exact).max():.1f}: "
          f"max|ours - transformers| = {gap:.2e}; vs float64: ours {our_err:.2e}, "
          f"transformers {their_err:.2e}")
    assert gap < 2.5e-4  # 6e-6 of the logit range
    assert our_err < 2.5e-4


def held_out_ids(tok, window: int = 2048) -> np.ndarray:
    """[1, <=window] tokens of the first held-out essay (assets.held_out_split, 1 eval doc)."""
    _, (doc,) = assets.held_out_split(assets.essays(), 1)
    return np.asarray([tok(doc.text).input_ids[:window]], np.int32)


@pytest.mark.slow
def test_smollm2_perplexity_on_held_out_essay(smollm2):
    cfg, params, tok, ref = smollm2
    ids = held_out_ids(tok)
    loss = next_token_loss(our_logits(cfg, params, ids), ids)
    ref_loss = next_token_loss(hf_logits(ref, ids), ids)
    print(f"SmolLM2 held-out essay, {ids.shape[1]} tokens: perplexity {np.exp(loss):.3f} "
          f"(transformers {np.exp(ref_loss):.3f})")
    assert abs(loss - ref_loss) < 1e-4
    assert np.exp(loss) < 40  # a real language model (uniform would be 49152)


@pytest.mark.slow
def test_smollm2_bf16_loss_within_2_percent(smollm2):
    cfg, params, tok, _ = smollm2
    ids = held_out_ids(tok, window=512)
    logits32 = our_logits(cfg, params, ids)
    cfg16, params16 = load_gguf(assets.smollm2_gguf(), dtype="bfloat16",
                                config_overrides={"dtype": "bfloat16"})
    logits16 = our_logits(cfg16, params16, ids)
    loss32, loss16 = next_token_loss(logits32, ids), next_token_loss(logits16, ids)
    print(f"SmolLM2 bf16 loss {loss16:.5f} vs fp32 {loss32:.5f}; "
          f"max|logit diff| {np.abs(logits16 - logits32).max():.3f}")
    assert np.isfinite(loss16)
    assert abs(loss16 - loss32) / loss32 < 0.02
    assert np.abs(logits16 - logits32).max() > 1e-2  # bf16 really ran
