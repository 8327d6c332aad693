"""Model families beyond LLaMA against transformers and PEFT themselves.

Tiny random checkpoints built by transformers in the test, one per family feature: Mistral
(GQA 9 q / 3 kv heads, sliding window 12 < N), Qwen2 (GQA, q/k/v biases, tied embeddings,
rope theta 1e6), GPT-NeoX (rotary_pct 0.25, parallel residual on, exact GELU; and off, tanh
GELU, rotary base 20000). For each: our logits equal transformers' loading and exporting,
greedy KV-cache `generate` equals transformers' token for token, the PEFT adapter (family
module names) and the merged export load in PEFT / transformers with our logits, perplexity
equals transformers' loss, S2-Attn in the model is exactly the per-head masked reference (both
wrap modes), sharded equals unsharded, and each family's tiny CPU training config learns.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from longlora_jax import ConfigError, LlamaConfig, LlamaForCausalLM, build_model
from longlora_jax.data.eval_data import TokenDocument
from longlora_jax.errors import CheckpointError
from longlora_jax.evaluation import perplexity as ppl_eval
from longlora_jax.inference import decode as gen
from longlora_jax.io import export, hf
from longlora_jax.io.hf import load_pretrained, save_pretrained
from longlora_jax.modeling import attention, lora
from longlora_jax.modeling.gpt_neox import GPTNeoXForCausalLM
from longlora_jax.parallel.mesh import make_mesh
from longlora_jax.training import loop
from tests.helpers import REPO_ROOT, run_python, train_config
from tests.test_attention import dense_masked_attention, s2_mask
from tests.test_evaluate import hf_window_nll
from tests.test_generate import PAD, hf_greedy

peft = pytest.importorskip("peft")

ATOL = 1e-4
VOCAB = 256
N = 64
WINDOW = 12
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128)
# name: (transformers config class, its fields, scan_layers when loading)
FAMILIES = {
    "mistral-window": (transformers.MistralConfig, dict(
        COMMON, hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
        sliding_window=WINDOW, rms_norm_eps=1e-6), True),
    "qwen2-bias-tied": (transformers.Qwen2Config, dict(
        COMMON, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}), False),
    "gpt_neox-parallel": (transformers.GPTNeoXConfig, dict(
        COMMON, rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu"), True),
    "gpt_neox-sequential": (transformers.GPTNeoXConfig, dict(
        COMMON, rotary_pct=0.25, rotary_emb_base=20000.0, use_parallel_residual=False,
        hidden_act="gelu_new"), False),
}
IDS = np.random.default_rng(1).integers(0, VOCAB, (2, N)).astype(np.int32)


def torch_logits(model, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def our_logits(cfg, variables, ids: np.ndarray = IDS, **kwargs) -> np.ndarray:
    return np.asarray(jax.jit(build_model(cfg).apply, static_argnames="train")(
        variables, ids, **kwargs))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, its checkpoint directory, scan_layers)."""
    config_cls, fields, scan = FAMILIES[request.param]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**fields)).eval()
    with torch.no_grad():  # every weight random, logits O(1): norms ~1, matrices ~1/sqrt(in)
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path, scan


def ablation(name: str, cfg: LlamaConfig, params: dict) -> tuple[LlamaConfig, dict]:
    """The model without the family feature under test (which must then change the logits)."""
    if name.startswith("mistral"):
        return cfg.replace(sliding_window=None), params
    if name.startswith("qwen2"):
        flat = traverse_util.flatten_dict(params)
        zeroed = {p: np.zeros_like(x) if p[-1] == "bias" else x for p, x in flat.items()}
        return cfg, traverse_util.unflatten_dict(zeroed)
    if name.endswith("parallel"):
        return cfg.replace(use_parallel_residual=False), params
    return cfg.replace(partial_rotary_factor=1.0), params


def test_logits_match_transformers_loading_and_exporting(family, tmp_path):
    name, model, path, scan = family
    ref = torch_logits(model)
    assert np.abs(ref).max() > 1.0
    cfg, params = load_pretrained(path, config_overrides={"scan_layers": scan})
    hf_config = json.loads((path / "config.json").read_text())
    assert cfg.model_type == hf_config["model_type"]
    assert type(build_model(cfg)) is (GPTNeoXForCausalLM if cfg.model_type == "gpt_neox"
                                      else LlamaForCausalLM)
    ours = our_logits(cfg, {"params": params})
    err = np.abs(ours - ref).max()
    print(f"{name}: load max|ours - hf| = {err:.2e}")
    assert err < ATOL
    off_cfg, off_params = ablation(name, cfg, params)
    assert np.abs(our_logits(off_cfg, {"params": off_params}) - ref).max() > 1e-2

    out = save_pretrained(cfg, params, tmp_path / "ours", max_shard_bytes=64 * 1024)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == cfg.model_type
    assert written["architectures"] == hf_config["architectures"]
    err_back = np.abs(torch_logits(hf_model(out)) - ref).max()
    print(f"{name}: export max|hf(ours) - hf| = {err_back:.2e}")
    assert err_back < ATOL
    assert LlamaConfig.from_hf(out, scan_layers=scan) == cfg


def test_greedy_generate_matches_transformers(family):
    """Two left-padded prompts, 24 new tokens: decoding runs past the sliding window."""
    name, model, path, scan = family
    cfg, params = load_pretrained(path, config_overrides={"scan_layers": scan})
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, VOCAB, n).astype(np.int32) for n in (14, 9)]
    want = hf_greedy(model, rows, 24)
    got = gen.generate(cfg, params, rows, 24, pad_token_id=PAD)
    print(f"{name}: ours {got[:, 14:].tolist()}\n{name}: hf   {want[:, 14:].tolist()}")
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert want.shape[1] > 14 + WINDOW


def test_perplexity_equals_transformers(family):
    """`evaluate`'s perplexity: full forward, and KV-cache chunks of 8 (past the window)."""
    name, model, path, scan = family
    cfg, params = load_pretrained(path, config_overrides={"scan_layers": scan})
    docs = [TokenDocument("doc", np.random.default_rng(4).integers(0, VOCAB, 100)
                          .astype(np.int32))]
    nll, count = hf_window_nll(model, docs[0].tokens, "nonoverlap")
    for chunk in (0, 8):
        eval_fn = ppl_eval.make_eval_fn(build_model(cfg), make_mesh({"data": 1}),
                                        loss_chunk=16, prefill_chunk=chunk)
        ours = ppl_eval.perplexity(eval_fn, {"params": params}, docs, seq_len=32,
                                   protocol="nonoverlap", batch_size=2)
        assert ours["tokens"] == count
        assert ours["ppl"] == pytest.approx(np.exp(nll / count), rel=1e-5), (name, chunk)


def trained_variables(cfg: LlamaConfig, params: dict, seed: int = 5) -> dict:
    """params + LoRA factors, with what LoRA+ trains moved off its starting point (B != 0,
    embeddings and norms perturbed), as after a few training steps."""
    variables = nn.unbox(jax.jit(build_model(cfg).init)(jax.random.key(0), IDS[:, :8]))
    variables["params"] = params
    labels = traverse_util.flatten_dict(lora.trainable_labels(variables, "lora_plus"))
    flat = traverse_util.flatten_dict(variables)
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    for path, x in flat.items():
        if labels[path] == lora.TRAINABLE:
            scale = 0.2 if path[0] == lora.LORA_COLLECTION else 0.05
            flat[path] = np.asarray(x + scale * jax.random.normal(next(keys), x.shape), x.dtype)
    return traverse_util.unflatten_dict(flat)


def test_peft_and_merged_exports_load_with_our_logits(family, tmp_path):
    """LoRA (attention + one MLP projection) and LoRA+ at 2x position interpolation, exported
    as a PEFT adapter (the family's module names; O/base carries the training rope) and
    merged: PEFT, transformers and our model agree within 1e-4."""
    name, _, path, scan = family
    base_cfg, params = load_pretrained(path, config_overrides={"scan_layers": scan})
    mlp_out = "dense_4h_to_h" if base_cfg.block == "gpt_neox" else "down_proj"
    cfg = base_cfg.replace(lora_rank=4, lora_alpha=8.0,
                           lora_targets=(*base_cfg.lora_targets, mlp_out),
                           rope_scaling={"rope_type": "linear", "factor": 2.0},
                           max_position_embeddings=256)
    variables = trained_variables(cfg, params)
    ours = our_logits(cfg, variables)
    assert np.abs(ours - our_logits(base_cfg, {"params": params})).max() > 1e-2

    peft_dir = export.export_peft(cfg, variables, tmp_path / "peft", base_dir=path)
    adapter = json.loads((peft_dir / export.ADAPTER_CONFIG).read_text())
    assert adapter["target_modules"] == sorted(cfg.lora_targets)
    assert adapter["modules_to_save"] == list(export.lora_plus_modules(cfg))
    if cfg.block == "gpt_neox":
        assert adapter["target_modules"] == ["dense", "dense_4h_to_h", "query_key_value"]
    base = hf_model(adapter["base_model_name_or_path"])
    peft_model = peft.PeftModel.from_pretrained(base, peft_dir, is_trainable=True).eval()
    _, trainable, _ = lora.trainable_summary(
        variables, lora.trainable_labels(variables, "lora_plus"))
    if not cfg.tie_word_embeddings:  # PEFT trains exactly what we train
        assert peft_model.get_nb_trainable_parameters()[0] == trainable
    via_peft = torch_logits(peft_model)
    merged = torch_logits(hf_model(export.export_merged(cfg, variables, tmp_path / "merged")))
    print(f"{name}: max|peft - ours| = {np.abs(via_peft - ours).max():.2e}, "
          f"max|merged - ours| = {np.abs(merged - ours).max():.2e}")
    np.testing.assert_allclose(via_peft, ours, atol=ATOL)
    np.testing.assert_allclose(merged, ours, atol=ATOL)


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("preset", ["tiny-mistral", "tiny-qwen2", "tiny-gpt-neox"])
def test_model_s2_attention_is_the_masked_reference(preset, wrap, monkeypatch):
    """Each family's training forward with S2-Attn (G = 16, N = 48; Mistral's window 12 < G)
    equals the same model whose attention is plain softmax under the per-head S2 mask (the
    independent reference of test_attention.py), and differs from full attention."""
    heads = dict(num_attention_heads=6) if preset == "tiny-gpt-neox" else dict(
        num_attention_heads=6, num_key_value_heads=2)
    cfg = LlamaConfig.preset(preset, attention_train="s2", s2_group_size=16, s2_wrap=wrap,
                             hidden_size=48, **heads)
    if cfg.sliding_window is not None:
        cfg = cfg.replace(sliding_window=WINDOW)
    ids = IDS[:, :48]
    variables = nn.unbox(jax.jit(build_model(cfg).init)(jax.random.key(0), ids))
    s2 = our_logits(cfg, variables, ids, train=True)
    full = our_logits(cfg, variables, ids, train=False)
    mask = jnp.asarray(s2_mask(48, 6, 16, wrap, cfg.sliding_window))
    monkeypatch.setattr(attention, "attend", lambda q, k, v, cfg, *, train, segment_ids:
                        dense_masked_attention(q, k, v, mask))
    np.testing.assert_allclose(s2, our_logits(cfg, variables, ids, train=True), atol=2e-5)
    assert np.abs(s2 - full).max() > 1e-2


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tiny_mistral_cpu", "tiny_qwen2_cpu", "tiny_gpt_neox_cpu"])
def test_tiny_cpu_config_learns(name, tmp_path):
    config = train_config(os.path.join(REPO_ROOT, "configs", f"{name}.py"),
                          "--config.max_steps=4", "--config.seq_len=128",
                          "--config.eval.before=False", "--config.eval.after=False",
                          "--config.checkpoint.async_save=False", "--config.data.prefetch=0")
    loop.train(config, tmp_path)
    losses = [json.loads(line).get("loss") for line in
              (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    assert len(losses) == 4 and np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.integration
def test_sharded_equals_unsharded_for_each_family():
    """data 2 x sequence 2 x tensor 2 on 8 fake devices, the logical-axis table placing every
    family's parameters: S2 training forward and full forward as on one device."""
    out = run_python("""
        import json
        import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
        from jax.sharding import NamedSharding, PartitionSpec as P
        jax.config.update("jax_default_matmul_precision", "highest")
        from longlora_jax import LlamaConfig, build_model
        from longlora_jax.parallel import rules
        from longlora_jax.parallel.mesh import make_mesh
        mesh = make_mesh({"data": 2, "sequence": 2, "tensor": 2})
        ids = np.random.default_rng(0).integers(0, 512, (2, 64)).astype(np.int32)
        errs = {}
        for preset in ("tiny-mistral", "tiny-qwen2", "tiny-gpt-neox"):
            cfg = LlamaConfig.preset(preset, attention_train="s2", s2_group_size=16,
                                     sliding_window=12 if preset == "tiny-mistral" else None,
                                     lora_rank=2, scan_layers=True)
            model = build_model(cfg)
            boxed = model.init(jax.random.key(0), ids)
            variables = nn.unbox(boxed)
            fn = jax.jit(model.apply, static_argnames="train")
            placed = jax.device_put(variables, rules.tree_shardings(mesh, boxed))
            ids_s = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"), "sequence")))
            for train in (True, False):
                want = fn(variables, ids, train=train)
                with rules.activate(mesh):
                    got = fn(placed, ids_s, train=train)
                errs[f"{preset}/{train}"] = float(jnp.abs(got - want).max())
        print(json.dumps(errs))
    """, devices=8)
    errs = json.loads(out.strip().splitlines()[-1])
    assert len(errs) == 6 and max(errs.values()) < 1e-4, errs


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("preset", ["tiny-mistral", "tiny-qwen2", "tiny-gpt-neox"])
def test_name_table_round_trips_and_covers_the_params(preset, scan):
    cfg = LlamaConfig.preset(preset, scan_layers=scan, tie_word_embeddings=False)
    names = hf.tensor_names(cfg)
    for name in names:
        assert hf.lookup_hf(name.hf, scan_layers=scan, cfg=cfg) == name
        assert hf.lookup_path(name.path, name.layer, cfg=cfg) == name
    assert {n.path for n in names} == set(hf.param_shapes(cfg))
    with pytest.raises(CheckpointError, match=f"not part of a {cfg.model_type} decoder"):
        hf.lookup_hf("model.layers.0.self_attn.o_proj.bias", cfg=cfg)


def test_every_family_config_round_trips():
    for preset in ("tiny-mistral", "tiny-qwen2", "tiny-gpt-neox", "mistral-7b", "qwen2.5-7b",
                   "pythia-6.9b"):
        cfg = LlamaConfig.preset(preset, lora_rank=8, scan_layers=True)
        assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert LlamaConfig.from_hf(cfg.to_hf(), lora_rank=8, scan_layers=True) == cfg
    pythia = LlamaConfig.preset("pythia-6.9b")
    assert (pythia.rotary_dim, pythia.lora_targets) == (32, ("query_key_value", "dense"))
    assert round(pythia.num_params() / 1e9, 3) == 6.857  # Pythia-6.9B's published count
    assert round(LlamaConfig.preset("mistral-7b").num_params() / 1e9, 2) == 7.24
    assert round(LlamaConfig.preset("qwen2.5-7b").num_params() / 1e9, 2) == 7.62


@pytest.mark.parametrize(("hf", "message"), [
    ({"model_type": "falcon"}, "model_type 'falcon' is not supported; supported: llama, "
                               "mistral, qwen2, gpt_neox"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64},
     "qwen2 use_sliding_window=True .* is not supported"),
    ({"model_type": "mistral", "hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_unsupported_configs_are_one_line_errors(hf, message):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4)
    with pytest.raises(ConfigError, match=message) as info:
        LlamaConfig.from_hf({**base, **hf})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("changes", "message"), [
    (dict(model_type="gpt_neox", lora_targets=("q_proj",)),
     "lora target 'q_proj' is not one of: query_key_value, dense"),
    (dict(sliding_window=16), "sliding_window=16: only mistral has one"),
    (dict(model_type="gpt_neox", num_key_value_heads=2), "gpt_neox has no GQA"),
    (dict(model_type="gpt_neox", partial_rotary_factor=0.1), "gives 1 rotary dims"),
    (dict(use_parallel_residual=True), "are GPT-NeoX fields"),
    (dict(model_type="qwen2", attention_bias=False), "qwen2 always has q/k/v biases"),
])
def test_family_fields_are_checked(changes, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, **changes)


def test_llama_module_refuses_another_family():
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM builds llama, mistral, qwen2, not "
                                          r"gpt_neox; use longlora_jax\.build_model"):
        LlamaForCausalLM(LlamaConfig.preset("tiny-gpt-neox")).init(jax.random.key(0), IDS)
