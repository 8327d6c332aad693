"""LoRA layer (scanned / unscanned / remat), trainable labels, split/merge of trees, merging.

References: the base model itself (B = 0 adapters are exactly the identity), an independent
numpy fold of A @ B * alpha / r, the unscanned model for the scanned one, and PEFT's own
trainable-parameter count for the same adapter on transformers' LLaMA.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from longlora_jax import ConfigError, LlamaConfig, LlamaForCausalLM
from longlora_jax.modeling import lora

IDS = np.random.default_rng(0).integers(0, 512, (2, 16)).astype(np.int32)


# Attention and MLP targets, so both kinds of projection are covered everywhere.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


def tiny(**changes) -> LlamaConfig:
    return LlamaConfig.preset("tiny", **{"lora_rank": 4, "lora_targets": TARGETS, **changes})


@functools.cache
def _init_once() -> dict:
    variables = nn.unbox(jax.jit(LlamaForCausalLM(tiny()).init)(jax.random.key(0), IDS))
    return jax.tree_util.tree_map(np.asarray, variables)


def init(cfg: LlamaConfig) -> dict:
    """Variables for a variant of `tiny()` (tied, no LoRA, dtype, scanned), from ONE init.

    Compilation dominates these tests on a CPU, so the variants are derived from one init
    in numpy and every model call is jitted once per config (`logits`).
    """
    params = {k: v for k, v in _init_once()["params"].items()
              if not (cfg.tie_word_embeddings and k == "lm_head")}
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(cfg.param_dtype)), params)
    variables = {"params": params, **({"lora": _init_once()["lora"]} if cfg.lora_rank else {})}
    return stack_layers(cfg, variables) if cfg.scan_layers else variables


def perturb_lora(variables: dict, scale: float = 0.05, seed: int = 1) -> dict:
    """Nonzero B (and moved A), as after some training."""
    rng = np.random.default_rng(seed)
    moved = jax.tree_util.tree_map(
        lambda x: (x + scale * rng.standard_normal(x.shape)).astype(x.dtype), variables["lora"]
    )
    return {**variables, "lora": moved}


@functools.cache
def _jitted_apply(cfg: LlamaConfig):
    return jax.jit(LlamaForCausalLM(cfg).apply, static_argnames=("train",))


def logits(cfg, variables, **kwargs) -> np.ndarray:
    return np.asarray(_jitted_apply(cfg)(variables, IDS, **kwargs))


def flat_labels(labels) -> dict:
    return {"/".join(p): v for p, v in traverse_util.flatten_dict(labels).items()}


def stack_layers(cfg: LlamaConfig, variables: dict) -> dict:
    """Unscanned variables -> the scanned layout (layers_i/... -> layers/... with axis L)."""
    out = {}
    for col, tree in variables.items():
        tree = dict(tree)
        per_layer = [tree.pop(f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        tree["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_layer)
        out[col] = tree
    return out


# ------------------------------------------------------------------------------ the layer

LAYOUTS = {
    "unscanned": dict(scan_layers=False, remat_policy="none"),
    "scanned": dict(scan_layers=True, remat_policy="none"),
    "scanned-remat": dict(scan_layers=True, remat_policy="dots"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_untrained_adapter_is_exactly_the_base_model(layout):
    cfg = tiny(**LAYOUTS[layout])
    variables = init(cfg)
    base_cfg = cfg.replace(lora_rank=0)
    base = logits(base_cfg, {"params": variables["params"]})
    np.testing.assert_array_equal(logits(cfg, variables), base)
    np.testing.assert_array_equal(logits(cfg, {"params": variables["params"]}), base)
    assert not np.array_equal(logits(cfg, perturb_lora(variables)), base)


def test_scanned_lora_matches_unscanned():
    """The same weights stacked on a layer axis: same logits and same LoRA gradients (remat)."""
    cfg = tiny(remat_policy="full")
    unscanned = perturb_lora(init(cfg))
    scanned_cfg = cfg.replace(scan_layers=True)
    scanned = stack_layers(cfg, unscanned)
    np.testing.assert_allclose(logits(scanned_cfg, scanned), logits(cfg, unscanned), atol=1e-5)

    def grads(c, v):
        def loss(lora_tree):
            return LlamaForCausalLM(c).apply({"params": v["params"], "lora": lora_tree}, IDS).sum()
        return jax.grad(loss)(v["lora"])

    grads = jax.jit(grads, static_argnums=0)
    g_scanned = grads(scanned_cfg, scanned)
    g_stacked = stack_layers(cfg, {"lora": grads(cfg, unscanned)})["lora"]
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_scanned, g_stacked
    )


def test_scanned_factors_have_a_layer_axis_and_differ_per_layer():
    cfg = tiny(scan_layers=True)
    boxed = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), IDS)
    specs = nn.get_partition_spec(boxed)["lora"]["layers"]["self_attn"]["q_proj"]
    assert tuple(specs["a"]) == ("layers", "embed", "lora_rank")
    assert tuple(specs["b"]) == ("layers", "lora_rank", "heads")
    q = nn.unbox(jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), IDS))["lora"]["layers"]
    q = q["self_attn"]["q_proj"]
    assert q["a"].shape == (cfg.num_hidden_layers, cfg.hidden_size, cfg.lora_rank)
    assert not np.allclose(q["a"][0], q["a"][1])
    np.testing.assert_array_equal(q["b"], 0.0)


def test_dropout_acts_only_in_training():
    cfg = tiny(scan_layers=True, lora_dropout=0.5)
    variables = perturb_lora(init(cfg))
    rngs = {"dropout": jax.random.key(3)}
    eval_out = logits(cfg, variables)
    np.testing.assert_array_equal(logits(cfg, variables, train=False, rngs=rngs), eval_out)
    assert not np.allclose(logits(cfg, variables, train=True, rngs=rngs), eval_out)


# ------------------------------------------------------------------------------ labels

def kinds_by_label(variables, labels) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {lora.TRAINABLE: set(), lora.FROZEN: set()}
    for path, label in traverse_util.flatten_dict(labels).items():
        out[label].add(lora.param_kind(path))
    return out


@pytest.mark.parametrize("scan", [False, True])
def test_labels_per_mode_untied(scan):
    variables = init(tiny(scan_layers=scan))
    by_mode = {m: kinds_by_label(variables, lora.trainable_labels(variables, m))
               for m in lora.TRAIN_MODES}
    assert by_mode["lora"] == {"trainable": {"lora"},
                               "frozen": {"embedding", "norm", "kernel", "lm_head"}}
    assert by_mode["lora_plus"] == {"trainable": {"lora", "embedding", "norm"},
                                    "frozen": {"kernel", "lm_head"}}
    assert by_mode["full"] == {"trainable": {"lora", "embedding", "norm", "kernel", "lm_head"},
                               "frozen": set()}
    labels = flat_labels(lora.trainable_labels(variables, "lora_plus"))
    assert labels["params/lm_head/kernel"] == "frozen"
    assert labels["params/embed_tokens/embedding"] == "trainable"
    assert labels["params/norm/weight"] == "trainable"
    layer = "layers" if scan else "layers_1"
    assert labels[f"params/{layer}/post_attention_layernorm/weight"] == "trainable"
    assert labels[f"params/{layer}/self_attn/q_proj/kernel"] == "frozen"
    assert labels[f"lora/{layer}/self_attn/o_proj/b"] == "trainable"
    assert set(labels) == {"/".join(p) for p in traverse_util.flatten_dict(variables)}


def test_tied_embedding_trains_in_lora_plus():
    variables = init(tiny(tie_word_embeddings=True))
    labels = flat_labels(lora.trainable_labels(variables, "lora_plus"))
    assert not any("lm_head" in p for p in labels)
    assert labels["params/embed_tokens/embedding"] == "trainable"


def test_full_mode_without_lora_and_label_errors():
    base = init(tiny(lora_rank=0))
    assert "lora" not in base
    assert set(flat_labels(lora.trainable_labels(base, "full")).values()) == {"trainable"}
    for mode in ("lora", "lora_plus"):
        with pytest.raises(ConfigError, match=f"'{mode}' needs LoRA factors.*lora_rank > 0"):
            lora.trainable_labels(base, mode)
    with pytest.raises(ValueError, match="'qlora'; valid: lora, lora_plus, full"):
        lora.trainable_labels(base, "qlora")


def test_config_rejects_bad_lora_settings():
    with pytest.raises(ConfigError, match="lora target 'qkv_proj' is not one of: q_proj"):
        tiny(lora_targets=("q_proj", "qkv_proj"))
    with pytest.raises(ConfigError, match=r"lora_rank must be >= 0.*got -2"):
        tiny(lora_rank=-2)
    with pytest.raises(ConfigError, match="lora_dropout"):
        tiny(lora_dropout=1.5)


# ------------------------------------------------------------------------------ split / merge

def test_split_holds_only_own_leaves_and_merge_inverts():
    variables = init(tiny(scan_layers=True))
    labels = lora.trainable_labels(variables, "lora_plus")
    trainable, frozen = lora.split_trainable(variables, labels)
    flat_t, flat_f = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(frozen)
    flat_labels_ = traverse_util.flatten_dict(labels)
    assert all(flat_labels_[p] == "trainable" for p in flat_t)
    assert all(flat_labels_[p] == "frozen" for p in flat_f)
    assert set(flat_t) | set(flat_f) == set(flat_labels_) and not set(flat_t) & set(flat_f)
    assert all(x is not None for x in jax.tree_util.tree_leaves(trainable))
    merged = lora.merge_trees(trainable, frozen)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged, variables)


def test_gradient_tree_holds_only_trainable_leaves():
    cfg = tiny(scan_layers=True)
    variables = init(cfg)
    trainable, frozen = lora.split_trainable(variables, lora.trainable_labels(variables, "lora"))

    def loss(t):
        return LlamaForCausalLM(cfg).apply(lora.merge_trees(t, frozen), IDS).mean()

    grads = jax.jit(jax.grad(loss))(trainable)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    assert set(grads) == {"lora"}
    # B = 0: A gets no gradient yet, B does (d loss / d B = (x A)^T ...).
    q = grads["lora"]["layers"]["self_attn"]["q_proj"]
    assert np.abs(q["b"]).max() > 0 and np.abs(q["a"]).max() == 0


def test_summary_counts_match_peft():
    """PEFT's print_trainable_parameters on the same adapter over transformers' LLaMA."""
    peft = pytest.importorskip("peft")
    import transformers

    cfg = tiny()
    variables = init(cfg)
    line, trainable, total = lora.trainable_summary(
        variables, lora.trainable_labels(variables, "lora")
    )
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf()))
    peft_model = peft.get_peft_model(
        hf_model, peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                  target_modules=list(cfg.lora_targets))
    )
    assert (trainable, total) == peft_model.get_nb_trainable_parameters()
    pct = 100 * trainable / total
    want = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"
    assert line == want
    _, plus, plus_total = lora.trainable_summary(
        variables, lora.trainable_labels(variables, "lora_plus")
    )
    e, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    assert plus == trainable + v * e + (2 * layers + 1) * e and plus_total == total


# ------------------------------------------------------------------------------ merging

def numpy_merge(cfg: LlamaConfig, variables: dict) -> dict:
    """Independent reference: kernel + a @ b * alpha / r, per module, in float64."""
    flat = traverse_util.flatten_dict(variables["params"])
    fl = traverse_util.flatten_dict(variables["lora"])
    out = {p: np.asarray(x, np.float64) for p, x in flat.items()}
    for path in fl:
        if path[-1] == "a":
            a = np.asarray(fl[path], np.float64)
            b = np.asarray(fl[(*path[:-1], "b")], np.float64)
            out[(*path[:-1], "kernel")] += np.matmul(a, b) * (cfg.lora_alpha / cfg.lora_rank)
    return out


@pytest.mark.parametrize("scan", [False, True])
def test_merged_params_give_unmerged_logits(scan):
    cfg = tiny(scan_layers=scan, lora_alpha=8.0)
    variables = perturb_lora(init(cfg))
    merged_cfg, merged = lora.merge_lora(cfg, variables)
    assert merged_cfg.lora_rank == 0 and merged_cfg.replace(lora_rank=4) == cfg
    reference = numpy_merge(cfg, variables)
    for path, x in traverse_util.flatten_dict(merged).items():
        assert x.dtype == jnp.float32
        np.testing.assert_allclose(x, reference[path], atol=1e-6)
    unmerged = logits(cfg, variables)
    assert not np.allclose(unmerged, logits(cfg, {"params": variables["params"]}), atol=1e-3)
    np.testing.assert_allclose(logits(merged_cfg, {"params": merged}), unmerged, atol=1e-5)


def test_merge_keeps_kernel_dtype():
    cfg = tiny(param_dtype="bfloat16")
    variables = perturb_lora(init(cfg))
    _, merged = lora.merge_lora(cfg, variables)
    assert merged["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16


def test_merging_twice_is_an_error():
    cfg = tiny()
    merged_cfg, merged = lora.merge_lora(cfg, perturb_lora(init(cfg)))
    with pytest.raises(ConfigError, match=r"nothing to merge: lora_rank=0.*already merged"):
        lora.merge_lora(merged_cfg, {"params": merged})
    with pytest.raises(ConfigError, match="no 'lora' collection"):
        lora.merge_lora(cfg, {"params": merged})


def test_lora_product_gradients_equal_autodiff():
    """The hand-written backward of the LoRA branch (batched contractions) is autodiff's."""
    from longlora_jax.modeling.lora import _lora_product

    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (2, 24, 16))
    a = jax.random.normal(keys[1], (16, 4))
    b = jax.random.normal(keys[2], (4, 12))
    cotangent = jax.random.normal(keys[3], (2, 24, 12))

    def plain(x, a, b):
        return jnp.dot(jnp.dot(x, a), b) * 2.5

    def ours(x, a, b):
        return _lora_product(x, a, b, 2.5)

    want = jax.vjp(plain, x, a, b)
    got = jax.vjp(ours, x, a, b)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1](cotangent), want[1](cotangent), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
