"""LLaMA decoder in flax.linen: RMSNorm, GQA attention with RoPE, SwiGLU MLP, scanned layers.

The LLaMA block serves three HF families (`cfg.model_type`): llama, mistral (its sliding
window is applied by `attention.attend` and the KV cache, from `cfg.sliding_window`) and qwen2
(biases on q/k/v: `cfg.attention_bias`). The pieces every family shares live here too:
`constrain`, `attend_or_decode` (training/eval attention or the KV-cache path) and
`layer_stack` (remat + scan of a family's layer); `modeling.gpt_neox` reuses them.

Shapes: B batch, N tokens, E hidden, Hq query heads, Hkv kv heads, D head dim, F MLP width,
V vocabulary, L layers. Parameter names mirror HF's (`q_proj`, `input_layernorm`, ...) so the
checkpoint converters are one table. Every parameter and activation is named with logical
axes; `longlora_jax.parallel.rules` maps them to the mesh.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from longlora_jax.errors import ConfigError
from longlora_jax.modeling import attention, kv_cache, rope
from longlora_jax.modeling.config import LLAMA_BLOCK, LlamaConfig
from longlora_jax.modeling.lora import Dense
from longlora_jax.modeling.norms import rms_norm

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """Sharding constraint by logical names (a no-op outside `sharding.activate`)."""
    return nn.with_logical_constraint(x, logical_axes)


def attend_or_decode(q_bnhd, k_bnkd, v_bnkd, cfg: LlamaConfig, segment_ids_bn, *, train: bool,
                     decode: bool) -> jax.Array:
    """A layer's attention on RoPE'd q [B, N, Hq, D], k, v [B, N, Hkv, D] -> [B, N, Hq, D].

    decode=False: `attention.attend` (S2 or full causal, as `train` and the config say).
    decode=True: appends k, v to the layer's KV cache (a `cache` submodule of the calling
    module) and attends over it (full causal, within the sliding window if any).
    """
    if not decode:
        return attention.attend(q_bnhd, k_bnkd, v_bnkd, cfg, train=train,
                                segment_ids=segment_ids_bn)
    k_bskd, v_bskd, kv_segment_bs, start = kv_cache.KVCache(name="cache")(
        k_bnkd, v_bnkd, segment_ids_bn)
    return kv_cache.cached_attention(q_bnhd, k_bskd, v_bskd, kv_segment_bs, segment_ids_bn,
                                     start, window=cfg.sliding_window)


class RMSNorm(nn.Module):
    """x [..., E] -> x / rms(x) * scale, statistics in fp32, scale [E] named ("norm",)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            jnp.dtype(self.cfg.param_dtype),
        )
        # HF's order: fp32 statistics, cast to the compute dtype before the weight.
        return rms_norm(x, scale, self.cfg.rms_norm_eps, jnp.dtype(self.cfg.dtype))


class Attention(nn.Module):
    """x [B, N, E] -> [B, N, E]: GQA self-attention; S2-Attn when training with it on.

    q/k/v carry biases when `cfg.attention_bias` (Qwen2). `decode=True` appends k, v to the
    layer's KV cache and attends over it (full causal; see `kv_cache`); segment_ids_bn are
    then required (0 marks left padding).
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_bne, cos_bnd, sin_bnd, segment_ids_bn, train: bool,
                 decode: bool = False) -> jax.Array:
        cfg = self.cfg
        b, n, _ = x_bne.shape
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        q = Dense(hq * d, ("embed", "heads"), cfg, bias, name="q_proj")(x_bne, train=train)
        k = Dense(hkv * d, ("embed", "kv_heads"), cfg, bias, name="k_proj")(x_bne, train=train)
        v = Dense(hkv * d, ("embed", "kv_heads"), cfg, bias, name="v_proj")(x_bne, train=train)
        q_axes = ("act_batch", "act_length", "act_heads", "act_head_dim")
        kv_axes = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")
        q_bnhd = constrain(q.reshape(b, n, hq, d), *q_axes)
        k_bnkd = constrain(k.reshape(b, n, hkv, d), *kv_axes)
        v_bnkd = constrain(v.reshape(b, n, hkv, d), *kv_axes)
        q_bnhd = rope.apply_rotary(q_bnhd, cos_bnd, sin_bnd)
        k_bnkd = rope.apply_rotary(k_bnkd, cos_bnd, sin_bnd)
        out_bnhd = attend_or_decode(q_bnhd, k_bnkd, v_bnkd, cfg, segment_ids_bn, train=train,
                                    decode=decode)
        out_bnhd = constrain(out_bnhd, *q_axes)
        return Dense(cfg.hidden_size, ("heads", "embed"), cfg, name="o_proj")(
            out_bnhd.reshape(b, n, hq * d), train=train
        )


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), x [B, N, E] -> [B, N, E] via width F."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_bne: jax.Array, train: bool) -> jax.Array:
        cfg = self.cfg
        f = cfg.intermediate_size
        gate = Dense(f, ("embed", "mlp"), cfg, name="gate_proj")(x_bne, train=train)
        up = Dense(f, ("embed", "mlp"), cfg, name="up_proj")(x_bne, train=train)
        h_bnf = constrain(nn.silu(gate) * up, "act_batch", "act_length", "act_mlp")
        return Dense(cfg.hidden_size, ("mlp", "embed"), cfg, name="down_proj")(h_bnf, train=train)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). [B, N, E] -> same."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_bne, cos_bnd, sin_bnd, segment_ids_bn, train: bool, decode: bool):
        cfg = self.cfg
        h = RMSNorm(cfg, name="input_layernorm")(x_bne)
        x_bne = x_bne + Attention(cfg, name="self_attn")(
            h, cos_bnd, sin_bnd, segment_ids_bn, train, decode)
        h = RMSNorm(cfg, name="post_attention_layernorm")(x_bne)
        x_bne = x_bne + MLP(cfg, name="mlp")(h, train)
        x_bne = constrain(x_bne, "act_batch", "act_length", "act_embed")
        if cfg.scan_layers:
            return x_bne, None
        return x_bne


def layer_stack(cfg: LlamaConfig, layer: type[nn.Module]):
    """A family's decoder `layer` class, wrapped in remat and (optionally) scan as the config
    asks. The layer is called (x, cos, sin, segment_ids, train, decode) and, when scanned,
    returns (x, None)."""
    if cfg.remat_policy != "none":
        # static_argnums counts `self` as 0: `train` and `decode` are arguments 5 and 6.
        layer = nn.remat(
            layer,
            policy=_REMAT_POLICIES[cfg.remat_policy],
            prevent_cse=not cfg.scan_layers,
            static_argnums=(5, 6),
        )
    if cfg.scan_layers:
        layer = nn.scan(
            layer,
            variable_axes={"params": 0, "lora": 0, kv_cache.CACHE_COLLECTION: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * 5,
            length=cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
    return layer


class CausalLM(nn.Module):
    """input_ids [B, N] int32 -> logits [B, N, V] (fp32): the forward every family shares.

    `train=True` selects the training attention (`cfg.attention_train`, e.g. S2-Attn) and
    LoRA dropout; otherwise attention is full causal. `segment_ids` [B, N] (optional) keeps
    packed documents from attending to each other. `return_hidden=True` returns the final
    normed hidden states [B, N, E] instead of logits (the chunked loss projects them itself
    through `project`).

    `decode=True` runs on the KV cache (`modeling.kv_cache`): apply with the `cache`
    collection mutable; `position_ids` are then required and `segment_ids` default to ones
    (0 marks left padding). An `init` in decode mode creates a cache as long as its input.

    A family is a subclass naming its decoder layer and final-norm classes and the HF names
    of its token embedding, final norm and untied output projection (`part_names`), which
    become the parameter names; `layers` holds the L layers (`layers_{i}`, or one scanned
    `layers` stack).
    """

    cfg: LlamaConfig
    model_types: ClassVar[tuple[str, ...]]
    layer_cls: ClassVar[type[nn.Module]]
    norm_cls: ClassVar[type[nn.Module]]
    part_names: ClassVar[tuple[str, str, str]]  # (embedding, final norm, output projection)

    def setup(self):
        cfg = self.cfg
        if cfg.model_type not in self.model_types:
            raise ConfigError(f"{type(self).__name__} builds {', '.join(self.model_types)}, "
                              f"not {cfg.model_type}; use longlora_jax.build_model(cfg)")
        embed_name, norm_name, head_name = self.part_names
        setattr(self, embed_name, nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")
            ),
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
        ))
        stack = layer_stack(cfg, self.layer_cls)
        if cfg.scan_layers:
            self.layers = stack(cfg)
        else:
            self.layers = [stack(cfg) for _ in range(cfg.num_hidden_layers)]
        setattr(self, norm_name, self.norm_cls(cfg))
        if not cfg.tie_word_embeddings:
            # Never quantized: the output layer is what quantization hurts most and is <= 2%
            # of a large model's weights (the README's QLoRA section).
            setattr(self, head_name, Dense(cfg.vocab_size, ("embed", "vocab"), cfg,
                                           quantizable=False))

    def _embedding(self) -> nn.Embed:
        return getattr(self, self.part_names[0])

    def _final_norm(self) -> nn.Module:
        return getattr(self, self.part_names[1])

    def _output_projection(self) -> Dense:
        return getattr(self, self.part_names[2])

    def __call__(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        train: bool = False,
        return_hidden: bool = False,
        decode: bool = False,
    ) -> jax.Array:
        cfg = self.cfg
        b, n = input_ids.shape
        if position_ids is None:
            if decode and not self.is_initializing():
                raise ValueError("decode=True needs position_ids (the cache holds earlier tokens)")
            position_ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        if decode and segment_ids is None:
            segment_ids = jnp.ones((b, n), jnp.int32)
        cos_bnd, sin_bnd = rope.rotary_tables(cfg, position_ids)
        x_bne = constrain(self._embedding()(input_ids), "act_batch", "act_length", "act_embed")
        if cfg.scan_layers:
            x_bne, _ = self.layers(x_bne, cos_bnd, sin_bnd, segment_ids, train, decode)
        else:
            for layer in self.layers:
                x_bne = layer(x_bne, cos_bnd, sin_bnd, segment_ids, train, decode)
        h_bne = self._final_norm()(x_bne)
        if return_hidden:
            return h_bne
        return self.project(h_bne)

    def output_weight(self) -> jax.Array:
        """The LM head as a [E, V] matrix (the token embedding, transposed, when tied): what
        `project` multiplies by, for losses that handle the head themselves."""
        if self.cfg.tie_word_embeddings:
            return self._embedding().embedding.T
        return self.variables["params"][self.part_names[2]]["kernel"]

    def project(self, h_bne: jax.Array) -> jax.Array:
        """Final hidden states [..., E] -> fp32 logits [..., V] (tied or untied head)."""
        if self.cfg.tie_word_embeddings:
            logits = self._embedding().attend(h_bne)
        else:
            logits = self._output_projection()(h_bne)
        return logits.astype(jnp.float32)


class LlamaForCausalLM(CausalLM):
    """The LLaMA-block families (llama, mistral, qwen2); see `CausalLM` for the call."""

    model_types: ClassVar[tuple[str, ...]] = LLAMA_BLOCK
    layer_cls: ClassVar[type[nn.Module]] = DecoderLayer
    norm_cls: ClassVar[type[nn.Module]] = RMSNorm
    part_names: ClassVar[tuple[str, str, str]] = ("embed_tokens", "norm", "lm_head")
