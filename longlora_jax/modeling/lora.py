"""LoRA: projection layers with low-rank adapters kept in their own `lora` collection.

A `Dense` here is `y = x @ W` plus, when its name is a LoRA target and LoRA is on,
`dropout(x) @ A @ B * (alpha / r)` with A [in, r] (Kaiming-uniform, as PEFT) and B [r, out]
(zeros, so an untrained adapter is the identity). The factors live in the `lora` variable
collection, so a model's variables are `{"params": base, "lora": adapters}`:

- `model.apply({"params": params}, ids)` runs the base model (no adapters applied);
- the LoRA subtree is trainable on its own and can be checkpointed on its own.

Sharding: A is named (in-axis, "lora_rank") and B ("lora_rank", out-axis), i.e. each factor
is split like the kernel dimension it shares and the rank r is replicated. `x @ A` then
reduces over the same (fsdp) split as `x @ W` does, no factor is ever gathered whole, and a
factor's bytes per device shrink with the kernel's (r * E per layer is tiny, but for 70B
at r=64 replicating every factor would still cost ~1 GB per device in Adam state).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from longlora_jax.modeling.config import LlamaConfig

LORA_COLLECTION = "lora"


def _kaiming_uniform_in(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """PEFT's A init: kaiming_uniform(a=sqrt(5)) on [r, in] == U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Module):
    """x [..., in] -> [..., out] with kernel [in, out] named `axes`, plus optional LoRA."""

    features: int
    axes: tuple[str, str]
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), self.axes
            ),
            (x.shape[-1], self.features),
            jnp.dtype(cfg.param_dtype),
        )
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
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
        return jnp.dot(jnp.dot(x, a.astype(x.dtype)), b.astype(x.dtype)) * scale
