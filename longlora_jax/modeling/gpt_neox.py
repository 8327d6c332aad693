"""GPT-NeoX / Pythia decoder in flax.linen: where its block differs from LLaMA's.

- Fused `query_key_value` [E, 3E] in HF's head-interleaved layout: output columns are, per
  head h, [q_h | k_h | v_h] (D each). Kept fused and in that layout, so loading and saving
  are a transpose, a LoRA adapter on it is PEFT's (B [r, 3E] in the same layout), and a
  tensor-parallel split of the 3E axis hands each device whole heads (logical "heads").
- Partial rotary: RoPE on the first `cfg.rotary_dim` = D * rotary_pct dims of each head.
- Parallel residual (`use_parallel_residual`): x + attn(ln1(x)) + mlp(ln2(x)); otherwise
  sequential: h = x + attn(ln1(x)), h + mlp(ln2(h)).
- LayerNorm with weight and bias; GELU MLP `dense_h_to_4h` -> `dense_4h_to_h`, both biased;
  `dense` (attention output) and `query_key_value` biased when `cfg.attention_bias`.
- Token embedding `embed_in`, final `final_layer_norm`, untied output projection `embed_out`.

Everything else is shared with the LLaMA block (`modeling.llama`): the forward (`CausalLM`),
RoPE, attention (S2-Attn and full, every backend; the KV cache), LoRA `Dense`, remat/scan and
the logical axis names. Module and parameter names are HF's, as the name table expects.
Shapes: B batch, N tokens, E hidden, H heads, D head dim, F MLP width.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from longlora_jax.modeling import rope
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.llama import CausalLM, attend_or_decode, constrain
from longlora_jax.modeling.lora import Dense
from longlora_jax.modeling.norms import layer_norm


class LayerNorm(nn.Module):
    """x [..., E] -> (x - mean) / sqrt(var + eps) * weight + bias; statistics in fp32.

    weight and bias [E] named ("norm",), as RMSNorm's weight (LoRA+ trains both).
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg

        def param(name, init):
            return self.param(name, nn.with_logical_partitioning(init, ("norm",)),
                              (x.shape[-1],), jnp.dtype(cfg.param_dtype))

        weight, bias = param("weight", nn.initializers.ones), param("bias", nn.initializers.zeros)
        return layer_norm(x, weight, bias, cfg.rms_norm_eps, jnp.dtype(cfg.dtype))


class GPTNeoXAttention(nn.Module):
    """x [B, N, E] -> [B, N, E]: fused-qkv self-attention with partial rotary (no GQA)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_bne, cos_bnr, sin_bnr, segment_ids_bn, train: bool,
                 decode: bool = False) -> jax.Array:
        cfg = self.cfg
        b, n, _ = x_bne.shape
        h, d = cfg.num_attention_heads, cfg.head_dim
        qkv = Dense(3 * h * d, ("embed", "heads"), cfg, cfg.attention_bias,
                    name="query_key_value")(x_bne, train=train)
        qkv_bnh3d = qkv.reshape(b, n, h, 3, d)  # per head [q | k | v]
        axes = ("act_batch", "act_length", "act_heads", "act_head_dim")
        q_bnhd, k_bnhd, v_bnhd = (constrain(qkv_bnh3d[:, :, :, i], *axes) for i in range(3))
        q_bnhd = rope.apply_rotary(q_bnhd, cos_bnr, sin_bnr)
        k_bnhd = rope.apply_rotary(k_bnhd, cos_bnr, sin_bnr)
        out_bnhd = attend_or_decode(q_bnhd, k_bnhd, v_bnhd, cfg, segment_ids_bn, train=train,
                                    decode=decode)
        out_bnhd = constrain(out_bnhd, *axes)
        return Dense(cfg.hidden_size, ("heads", "embed"), cfg, cfg.attention_bias,
                     name="dense")(out_bnhd.reshape(b, n, h * d), train=train)


class GPTNeoXMLP(nn.Module):
    """dense_4h_to_h(gelu(dense_h_to_4h(x))), both biased: [B, N, E] -> [B, N, E] via F."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_bne: jax.Array, train: bool) -> jax.Array:
        cfg = self.cfg
        up = Dense(cfg.intermediate_size, ("embed", "mlp"), cfg, True,
                   name="dense_h_to_4h")(x_bne, train=train)
        h_bnf = nn.gelu(up, approximate=cfg.hidden_act != "gelu")  # tanh forms: gelu_new, ...
        h_bnf = constrain(h_bnf, "act_batch", "act_length", "act_mlp")
        return Dense(cfg.hidden_size, ("mlp", "embed"), cfg, True,
                     name="dense_4h_to_h")(h_bnf, train=train)


class GPTNeoXLayer(nn.Module):
    """One block, parallel or sequential residual (module docstring). [B, N, E] -> same."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_bne, cos_bnr, sin_bnr, segment_ids_bn, train: bool, decode: bool):
        cfg = self.cfg
        h = LayerNorm(cfg, name="input_layernorm")(x_bne)
        attn_bne = GPTNeoXAttention(cfg, name="attention")(
            h, cos_bnr, sin_bnr, segment_ids_bn, train, decode)
        post_norm = LayerNorm(cfg, name="post_attention_layernorm")
        mlp = GPTNeoXMLP(cfg, name="mlp")
        if cfg.use_parallel_residual:
            x_bne = x_bne + attn_bne + mlp(post_norm(x_bne), train)
        else:
            x_bne = x_bne + attn_bne
            x_bne = x_bne + mlp(post_norm(x_bne), train)
        x_bne = constrain(x_bne, "act_batch", "act_length", "act_embed")
        if cfg.scan_layers:
            return x_bne, None
        return x_bne


class GPTNeoXForCausalLM(CausalLM):
    """GPT-NeoX / Pythia; the call is `CausalLM`'s (input_ids [B, N] -> logits [B, N, V])."""

    model_types: ClassVar[tuple[str, ...]] = ("gpt_neox",)
    layer_cls: ClassVar[type[nn.Module]] = GPTNeoXLayer
    norm_cls: ClassVar[type[nn.Module]] = LayerNorm
    part_names: ClassVar[tuple[str, str, str]] = ("embed_in", "final_layer_norm", "embed_out")
