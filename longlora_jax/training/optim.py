"""The optimizer: AdamW over the trainable subtree only, as an optax partition.

`make_optimizer(optim_cfg, trainable)` is built on the `trainable` half of
`lora.split_trainable`, so frozen weights never get optimizer state. Within the trainable
subtree an `optax.partition` gives "decay" leaves (kernels, LoRA factors, an untied LM head)
AdamW with weight decay and "no_decay" leaves (norm weights and biases, token embeddings,
projection biases: HF Trainer's rule) the same AdamW without it. Global-norm clipping runs
first, over all trainable gradients.

Defaults follow the official LongLoRA runs (HF Trainer: `adamw_torch`, lr 2e-5, weight decay
0, 20 warmup steps, `constant_with_warmup`, max_grad_norm 1.0, betas (0.9, 0.999), eps 1e-8,
1000 steps). The paper's text says beta2 = 0.95; its released scripts never set it, so HF's
0.999 is what trained the published models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import optax
from flax import traverse_util

from longlora_jax.errors import ConfigError
from longlora_jax.modeling.lora import param_kind

SCHEDULES = ("constant_with_warmup", "cosine", "linear")
_NO_DECAY_KINDS = ("norm", "embedding", "bias")


def default_optim_config() -> ml_collections.ConfigDict:
    """The optimizer settings, each documented; override with `--config.optim.<field>=...`.

    lr: peak learning rate.
    warmup_steps: linear warmup from 0 to `lr` over this many steps.
    schedule: "constant_with_warmup" (official LongLoRA) | "cosine" | "linear" (decay after
      warmup to `lr * min_lr_ratio` at `total_steps`).
    min_lr_ratio: final lr as a fraction of `lr` for the decaying schedules.
    total_steps: length of the run (the decaying schedules end here).
    weight_decay: decoupled (AdamW) decay on "decay" leaves; norms and embeddings get none.
    b1, b2, eps: Adam moments and epsilon.
    clip_norm: global-norm gradient clipping threshold (0 disables).
    """
    return ml_collections.ConfigDict(
        dict(
            lr=2e-5,
            warmup_steps=20,
            schedule="constant_with_warmup",
            min_lr_ratio=0.0,
            total_steps=1000,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            clip_norm=1.0,
        )
    )


def lr_schedule(optim_cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """step -> learning rate (step 0 is the first update, at lr 0 when warming up, as HF)."""
    lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    if optim_cfg.schedule not in SCHEDULES:
        raise ConfigError(
            f"optim.schedule={optim_cfg.schedule!r}; valid: {', '.join(SCHEDULES)}"
        )
    if warmup < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {warmup}")
    if optim_cfg.schedule == "constant_with_warmup":
        decay = optax.constant_schedule(lr)
    else:
        decay_steps = optim_cfg.total_steps - warmup
        if decay_steps <= 0:
            raise ConfigError(
                f"schedule {optim_cfg.schedule!r} needs total_steps > warmup_steps, got "
                f"total_steps={optim_cfg.total_steps}, warmup_steps={warmup}"
            )
        if optim_cfg.schedule == "cosine":
            decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.min_lr_ratio)
        else:
            decay = optax.linear_schedule(lr, lr * optim_cfg.min_lr_ratio, decay_steps)
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def weight_decay_labels(trainable: Mapping[str, Any]) -> dict[str, Any]:
    """"decay" | "no_decay" for each leaf of the trainable subtree (same nested-dict keys)."""
    flat = traverse_util.flatten_dict(trainable)
    return traverse_util.unflatten_dict(
        {p: "no_decay" if param_kind(p) in _NO_DECAY_KINDS else "decay" for p in flat}
    )


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict, trainable: Mapping[str, Any]
) -> optax.GradientTransformation:
    """Clipping + partitioned AdamW over `trainable` (the trainable half of the variables).

    Initialise it on `trainable` only: its state then holds Adam moments for exactly the
    trainable leaves (plus scalar step counts), never for frozen ones.
    """
    schedule = lr_schedule(optim_cfg)

    def adamw(weight_decay: float) -> optax.GradientTransformation:
        return optax.adamw(
            schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
            weight_decay=weight_decay,
        )

    clip = optim_cfg.clip_norm
    if clip < 0:
        raise ConfigError(f"optim.clip_norm must be >= 0 (0 disables clipping), got {clip}")
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        optax.partition(
            {"decay": adamw(optim_cfg.weight_decay), "no_decay": adamw(0.0)},
            weight_decay_labels(trainable),
        ),
    )
