"""Our LLaMA against transformers' PyTorch LlamaForCausalLM: same fp32 logits, both directions.

Random tiny checkpoints (seeded, weights scaled so logits are O(1)) are written with
transformers' `save_pretrained(safe_serialization=True)`, read with our `load_pretrained`,
and run on the same tokens; then our `save_pretrained` output is read back by transformers.
"""

import numpy as np
import pytest
import torch
import transformers

from longlora_jax import LlamaForCausalLM
from longlora_jax.io.hf import load_pretrained, save_pretrained

ATOL = 1e-5
VOCAB = 256
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)
ROPE = {
    "none": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    # max_position_embeddings=32 below, N=64 tokens: the NTK base really grows.
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}
# name: (config changes, rope, scan_layers, pass position_ids)
CASES = {
    "mha-untied": ({}, "none", False, False),
    "mha-tied-scanned": ({"tie_word_embeddings": True}, "none", True, True),
    "gqa-9q-3kv-tied": ({"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3,
                         "tie_word_embeddings": True}, "none", False, False),
    "gqa-9q-3kv-scanned": ({"hidden_size": 72, "num_attention_heads": 9,
                            "num_key_value_heads": 3}, "linear", True, True),
    "gqa-head-dim-16": ({"num_key_value_heads": 2, "head_dim": 16}, "none", True, False),
    "linear": ({"num_key_value_heads": 2}, "linear", False, False),
    "dynamic": ({"max_position_embeddings": 32}, "dynamic", False, False),
    "dynamic-positions-scanned": ({"max_position_embeddings": 32}, "dynamic", True, True),
    "yarn": ({"num_key_value_heads": 2}, "yarn", True, False),
    "llama3": ({"num_key_value_heads": 2}, "llama3", False, True),
}


def random_hf_model(changes: dict, rope: str, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A seeded tiny HF LLaMA with every weight random (norms around 1, matrices ~1/sqrt(in))."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        **{**BASE, **changes}, rope_parameters={**ROPE[rope], "rope_theta": 10000.0}
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def tokens(batch: int = 2, n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, n)).astype(np.int32)


def hf_logits(model, ids: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if positions is None else {"position_ids": torch.from_numpy(positions).long()}
        return model(torch.from_numpy(ids).long(), **kwargs).logits.float().numpy()


def our_logits(cfg, params, ids, positions=None) -> np.ndarray:
    """fp32 logits [B, N, V], op by op (its compiles are cached across configs and tests)."""
    return np.asarray(LlamaForCausalLM(cfg).apply({"params": params}, ids, positions))


def shifted_positions(n: int) -> np.ndarray:
    """Two rows with different offsets (so batch rows really differ), reaching past 64."""
    return np.stack([np.arange(n) + 5, np.arange(n) * 2 + 1]).astype(np.int32)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_both_ways(case, tmp_path):
    changes, rope, scan, with_positions = CASES[case]
    model = random_hf_model(changes, rope)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ids = tokens()
    positions = shifted_positions(ids.shape[1]) if with_positions else None
    ref = hf_logits(model, ids, positions)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits

    cfg, params = load_pretrained(tmp_path / "hf", config_overrides={"scan_layers": scan})
    assert cfg.scan_layers == scan
    assert cfg.rope_scaling.rope_type == ROPE[rope]["rope_type"]
    assert ("layers" in params) == scan
    ours = our_logits(cfg, params, ids, positions)
    err = np.abs(ours - ref).max()
    print(f"{case}: load max|ours - hf| = {err:.2e}")
    assert err < ATOL, f"{case}: max abs logit error {err}"
    if rope != "none":  # the scaling matters at these lengths: unscaled RoPE is far off
        unscaled = our_logits(cfg.replace(rope_scaling=None), params, ids, positions)
        assert np.abs(unscaled - ref).max() > 1e-2

    # Our writer -> transformers gives the original model's logits (shards + index).
    save_pretrained(cfg, params, tmp_path / "ours", max_shard_bytes=64 * 1024)
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    err_back = np.abs(hf_logits(back, ids, positions) - ref).max()
    print(f"{case}: save max|hf(ours) - hf| = {err_back:.2e}")
    assert err_back < ATOL, f"{case}: round trip max abs logit error {err_back}"


def test_position_ids_change_the_logits(tmp_path):
    """Guards the position_ids cases above: positions really reach the rotary tables."""
    model = random_hf_model({}, "none")
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_pretrained(tmp_path)
    ids = tokens()
    default = our_logits(cfg, params, ids)
    shifted = our_logits(cfg, params, ids, shifted_positions(ids.shape[1]))
    assert np.abs(default - shifted).max() > 0.1


def next_token_loss(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token cross-entropy, computed in float64 (independent of the model's loss)."""
    logits = logits[:, :-1].astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return float(np.mean(log_z - target))


def test_bf16_loss_close_to_fp32(tmp_path):
    """bf16 compute (and bf16 storage) gives a finite loss within 2% of the fp32 loss.

    The random model's logits are O(5) so its loss is far from log(V), i.e. bf16 rounding
    of weights and activations does move it; the real-model check is in test_gguf.py.
    """
    model = random_hf_model({"num_key_value_heads": 2}, "none")
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids = tokens(n=128)
    cfg, params = load_pretrained(tmp_path)
    loss32 = next_token_loss(our_logits(cfg, params, ids), ids)
    cfg16, params16 = load_pretrained(
        tmp_path, dtype="bfloat16", config_overrides={"dtype": "bfloat16"}
    )
    assert cfg16.param_dtype == "bfloat16" and params16["norm"]["weight"].dtype == "bfloat16"
    logits16 = our_logits(cfg16, params16, ids)
    assert logits16.dtype == np.float32  # logits and loss stay fp32
    loss16 = next_token_loss(logits16, ids)
    print(f"bf16 loss {loss16:.5f} vs fp32 {loss32:.5f} (log V = {np.log(VOCAB):.3f})")
    assert np.isfinite(loss16)
    assert abs(loss32 - np.log(VOCAB)) > 0.5
    assert abs(loss16 - loss32) / loss32 < 0.02
    assert np.abs(logits16 - our_logits(cfg, params, ids)).max() > 1e-3  # bf16 really ran
