"""LoRA: projection layers with low-rank adapters kept in their own `lora` collection.

A `Dense` here is `y = x @ W (+ b)` plus, when its name is a LoRA target and LoRA is on,
`dropout(x) @ A @ B * (alpha / r)` with A [in, r] (Kaiming-uniform, as PEFT) and B [r, out]
(zeros, so an untrained adapter is the identity). The factors live in the `lora` variable
collection, so a model's variables are `{"params": base, "lora": adapters}`:

- `model.apply({"params": params}, ids)` runs the base model (no adapters applied);
- the LoRA subtree is trainable on its own and can be checkpointed on its own.

Sharding: A is named (in-axis, "lora_rank") and B ("lora_rank", out-axis), i.e. each factor
is split like the kernel dimension it shares and the rank r is replicated. `x @ A` then
reduces over the same (fsdp) split as `x @ W` does, no factor is ever gathered whole, and a
factor's bytes per device shrink with the kernel's (r * E per layer is tiny, but replicated
factors of a 70B model at a large rank would add up in Adam state on every device).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from longlora_jax.errors import ConfigError
from longlora_jax.modeling import quant
from longlora_jax.modeling.config import LlamaConfig

LORA_COLLECTION = "lora"


def _kaiming_uniform_in(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """PEFT's A init: kaiming_uniform(a=sqrt(5)) on [r, in] == U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Module):
    """x [..., in] -> [..., out] with kernel [in, out] named `axes`, plus optional LoRA.

    `use_bias` adds a bias [out] (named like the kernel's out axis), as Qwen2's q/k/v and
    GPT-NeoX's projections have; LoRA adapts the biased projection exactly as PEFT does
    (x @ W + b + dropout(x) @ A @ B * s), and the bias itself is frozen unless everything
    trains (see `trainable_labels`).

    With `cfg.quantize` set (and `quantizable`, which only the LM head turns off, and the
    module not in `cfg.quantize_skip`) the kernel
    is stored quantized (`modeling.quant`): `kernel` holds the integer codes [in, out] and
    `scale` (hqq4: and `zero`; double-quantized: with their statistics) the per-group
    parameters (`quant.leaves`), and the kernel is dequantized in the compute dtype inside the
    matmul. Such a Dense is filled by a loader (`io.hf.assemble_params`) or by
    `quantize_params`; initialising it gives zeros.
    """

    features: int
    axes: tuple[str, str]
    cfg: LlamaConfig
    use_bias: bool = False
    quantizable: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        shape = (x.shape[-1], self.features)
        quantized = self.quantizable and self.name not in cfg.quantize_skip
        scheme = cfg.quantize if quantized else "none"
        if scheme == "none":
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.initializer_range), self.axes
                ),
                shape,
                jnp.dtype(cfg.param_dtype),
            ).astype(dtype)
        else:
            stored = {name: self.param(name, nn.with_logical_partitioning(
                nn.initializers.zeros, leaf.axes), leaf.shape, leaf.dtype)
                for name, leaf in quant.leaves(shape, self.axes, scheme,
                                               cfg.param_dtype).items()}
            kernel = quant.dequantize(stored, scheme, dtype)
        y = jnp.dot(x.astype(dtype), kernel)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   (self.axes[1],)),
                              (self.features,), jnp.dtype(cfg.param_dtype))
            y = y + bias.astype(dtype)
        if cfg.lora_rank and self.name in cfg.lora_targets and (
            self.is_initializing() or self.has_variable(LORA_COLLECTION, "a")
        ):
            y = y + self._lora(x.astype(dtype), train)
        return y

    def _lora(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.cfg
        rank = cfg.lora_rank
        a = self.variable(
            LORA_COLLECTION,
            "a",
            nn.with_logical_partitioning(_kaiming_uniform_in, (self.axes[0], "lora_rank")),
            self.make_rng("params") if self.is_initializing() else None,
            (x.shape[-1], rank),
        ).value
        b = self.variable(
            LORA_COLLECTION,
            "b",
            nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[1])),
            None,
            (rank, self.features),
        ).value
        if cfg.lora_dropout and train:
            x = nn.Dropout(cfg.lora_dropout)(x, deterministic=False)
        scale = cfg.lora_alpha / rank
        return _lora_product(x, a.astype(x.dtype), b.astype(x.dtype), scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lora_product(x_bni, a_ir, b_ro, scale: float) -> jax.Array:
    """(x @ A * scale) @ B: x [B, N, in] -> [B, N, out].

    Its own backward only to choose the contractions: autodiff's gradients of A and B contract
    (batch, length) jointly, for which XLA:CPU first transposes the whole [B, N, out] cotangent
    through a slow loop fusion (4x the LoRA backward at N=8192). Here they contract the length
    per batch row and then sum the rows: the same math, no transpose, and under sharding a
    partial sum + all-reduce like autodiff's (no reshape that would merge sharded axes).
    """
    return jnp.dot(jnp.dot(x_bni, a_ir) * scale, b_ro)


def _lora_product_fwd(x_bni, a_ir, b_ro, scale):
    h_bnr = jnp.dot(x_bni, a_ir) * scale
    return jnp.dot(h_bnr, b_ro), (x_bni, a_ir, b_ro, h_bnr)


def _lora_product_bwd(scale, residuals, g_bno):
    x_bni, a_ir, b_ro, h_bnr = residuals
    g_bnr = jnp.dot(g_bno, b_ro.T) * scale
    grad_b = jnp.einsum("bnr,bno->bro", h_bnr, g_bno).sum(0)
    grad_a = jnp.einsum("bni,bnr->bir", x_bni, g_bnr).sum(0)
    return jnp.dot(g_bnr, a_ir.T), grad_a, grad_b


_lora_product.defvjp(_lora_product_fwd, _lora_product_bwd)


# --------------------------------------------------------------------------- trainable labels

TRAINABLE, FROZEN = "trainable", "frozen"
TRAIN_MODES = ("lora", "lora_plus", "full")
# Norm modules (RMSNorm or LayerNorm): input_layernorm, post_attention_layernorm, norm,
# final_layer_norm. Token embeddings: LLaMA's embed_tokens, GPT-NeoX's embed_in; untied output
# projections: lm_head, GPT-NeoX's embed_out.
_NORM_SUFFIX = "norm"
_EMBEDDINGS = ("embed_tokens", "embed_in")
_LM_HEADS = ("lm_head", "embed_out")


def param_kind(path: tuple[str, ...]) -> str:
    """What a variable is, from its flattened path `(collection, module, ..., leaf)`.

    One of "lora" (an adapter factor), "embedding" (token embeddings, also the LM head when
    tied), "norm" (a norm's weight, and a LayerNorm's bias), "lm_head" (untied output
    projection), "bias" (a projection's bias: Qwen2's q/k/v, GPT-NeoX's) or "kernel".
    """
    if path[0] == LORA_COLLECTION:
        return "lora"
    if any(name in path for name in _EMBEDDINGS):
        return "embedding"
    if any(name in path for name in _LM_HEADS):
        return "lm_head"
    if len(path) >= 2 and path[-2].endswith(_NORM_SUFFIX):
        return "norm"
    return "bias" if path[-1] == "bias" else "kernel"


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(tree)


def trainable_labels(variables: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """Labels every leaf of `{"params": ..., "lora": ...}` "trainable" or "frozen".

    The result is a nested dict with the same keys as `variables` and a label at each leaf
    (boxed `nn.LogicallyPartitioned` leaves count as leaves), usable as optax labels.

    - "lora": only the `lora` collection (LoRA factors) trains.
    - "lora_plus": LoRA factors, the token embeddings and every norm (RMSNorm weight;
      LayerNorm weight and bias) train (the LongLoRA recipe: trainable embeddings and norms
      are what close the gap to full fine-tuning at long context); an untied LM head stays
      frozen, and so do projection biases (Qwen2's q/k/v, GPT-NeoX's): neither is an
      embedding or a norm, PEFT's default `bias="none"` (the official fine-tune.py's
      setting) keeps them frozen, and the official `trainable_params="embed,norm"` name
      match does not reach them. (That match does reach GPT-NeoX's output matrix, whose HF
      name `embed_out` contains "embed"; here it stays frozen like every family's LM head:
      the paper trains the input embedding, and transformers 5 renames that matrix
      `lm_head`, so a PEFT adapter carrying it would load in one transformers only.) Tied
      embeddings (e.g.
      SmolLM2): the one matrix is both the input embedding and the LM head, so it trains and
      the output projection changes with it. It is not untied: that would change the
      architecture and the exported checkpoint; both exports keep it one matrix (the PEFT
      adapter via `ensure_weight_tying`). With a large vocabulary and a small model the
      embedding dominates what trains (the README gives the counts).
    - "full": every leaf of `params` and of `lora` (if present) trains.

    Raises `ConfigError` for an unknown mode, or "lora"/"lora_plus" without a `lora`
    collection (lora_rank == 0).
    """
    if mode not in TRAIN_MODES:
        raise ConfigError(f"lora.mode={mode!r}; valid: {', '.join(TRAIN_MODES)}")
    if mode != "full" and not variables.get(LORA_COLLECTION):
        raise ConfigError(
            f"trainable mode {mode!r} needs LoRA factors but the variables have no "
            f"{LORA_COLLECTION!r} collection; set lora_rank > 0 or use mode 'full'"
        )
    trained = {"lora": ("lora",), "lora_plus": ("lora", "embedding", "norm")}.get(mode)
    labels = {
        path: TRAINABLE if trained is None or param_kind(path) in trained else FROZEN
        for path in _flat(variables)
    }
    return traverse_util.unflatten_dict(labels)


def split_trainable(variables: Mapping[str, Any], labels: Mapping[str, Any]) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts, each holding only its own leaves (no placeholders).

    Differentiate w.r.t. `trainable` only, so no gradient exists for a frozen leaf, and build
    the optimizer on it, so no optimizer state does either. `merge_trees` is the inverse.
    """
    flat_labels = _flat(labels)
    parts: dict[str, dict] = {TRAINABLE: {}, FROZEN: {}}
    for path, leaf in _flat(variables).items():
        parts[flat_labels[path]][path] = leaf
    return (
        traverse_util.unflatten_dict(parts[TRAINABLE]),
        traverse_util.unflatten_dict(parts[FROZEN]),
    )


def merge_trees(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
    """The full variables again from `split_trainable`'s halves."""
    return traverse_util.unflatten_dict({**_flat(frozen), **_flat(trainable)})


def trainable_summary(
    variables: Mapping[str, Any], labels: Mapping[str, Any]
) -> tuple[str, int, int]:
    """("trainable params: X || all params: Y || trainable%: Z", X, Y), as PEFT prints it.

    Y counts every leaf, LoRA factors included (PEFT's convention).
    """
    flat_labels = _flat(labels)
    trainable = total = 0
    for path, leaf in _flat(variables).items():
        size = math.prod(nn.unbox(leaf).shape)
        total += size
        trainable += size if flat_labels[path] == TRAINABLE else 0
    percent = 100.0 * trainable / max(total, 1)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"
    return line, trainable, total


# --------------------------------------------------------------------------- merge


def merge_lora(cfg: LlamaConfig, variables: Mapping[str, Any]) -> tuple[LlamaConfig, dict]:
    """Folds each adapter into its kernel: W [.., in, out] += A [.., in, r] @ B [.., r, out] * s.

    With s = alpha / r. Works on scanned (leading layer axis) and unscanned trees; the product
    is computed in fp32 at full precision and cast to the kernel's dtype (a bf16 base loses
    the bf16 rounding of the sum: upcast first to keep it). A quantized base is dequantized
    first, into the dtype it was quantized from (`quant.dequantize_tree`). Returns the config
    with LoRA (and quantization) off and the merged `params`, which give the unmerged model's
    logits. Raises `ConfigError` when
    there is nothing to merge (already merged, or trained without LoRA).
    """
    lora = variables.get(LORA_COLLECTION)
    if not cfg.lora_rank or not lora:
        raise ConfigError(
            f"nothing to merge: lora_rank={cfg.lora_rank} and the variables have "
            f"{'a' if lora else 'no'} {LORA_COLLECTION!r} collection (already merged, or "
            "trained without LoRA)"
        )
    scale = cfg.lora_alpha / cfg.lora_rank
    flat_params = _flat(quant.dequantize_tree(nn.unbox(variables["params"]), cfg.quantize))
    flat_lora = _flat(nn.unbox(lora))
    for module in sorted({path[:-1] for path in flat_lora}):
        a, b = flat_lora[(*module, "a")], flat_lora[(*module, "b")]
        kernel = flat_params[(*module, "kernel")]
        delta = jnp.einsum(
            "...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        flat_params[(*module, "kernel")] = (kernel.astype(jnp.float32) + delta * scale).astype(
            kernel.dtype
        )
    return cfg.replace(lora_rank=0, quantize="none"), traverse_util.unflatten_dict(flat_params)
