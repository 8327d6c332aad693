"""The training step, its state, and the one jitted, sharded form of it.

`training.loop` runs it and `training.fit` compiles exactly the same function for a TPU
topology, so what the fit report measures is what a run executes.

State layout: the model's variables are split once by the trainable labels
(`lora.trainable_labels`) into `trainable` (fp32, in the state, optimised, checkpointed)
and `frozen` (stored in `frozen_dtype`, e.g. bf16, or as integer codes and scales for a
quantized base; a separate argument that is never differentiated, updated or
checkpointed). Gradients are taken w.r.t. `trainable` only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from longlora_jax.io.base import abstract_variables
from longlora_jax.modeling.llama import CausalLM
from longlora_jax.modeling.lora import merge_trees, split_trainable, trainable_labels
from longlora_jax.modeling.loss import chunked_cross_entropy, fused_cross_entropy
from longlora_jax.parallel import rules
from longlora_jax.training.optim import lr_schedule, make_optimizer

Batch = Mapping[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class TrainState(struct.PyTreeNode):
    """What a training run carries from step to step (and checkpoints).

    step: int32 scalar, updates applied so far; trainable: the trainable subtree of the
    variables; opt_state: optimizer state over `trainable` only; rng: dropout key.
    """

    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static settings of the step.

    accum_steps: micro-batches per step (gradient accumulation; the global batch is split
      into `accum_steps` micro-batches, run one after another and summed).
    loss_chunk: tokens per chunk of the chunked cross-entropy.
    mask_documents: pass `segment_ids` to attention so packed documents do not attend to
      each other (the official recipe does not; off by default).
    fused_loss: the training loss computes the LM head's gradients in its forward pass
      (`modeling.loss.fused_cross_entropy`: no logits recomputed in the backward).
    """

    accum_steps: int = 1
    loss_chunk: int = 1024
    mask_documents: bool = False
    fused_loss: bool = True


def loss_and_count(
    model: CausalLM,
    variables: Mapping[str, Any],
    batch: Batch,
    *,
    options: StepOptions,
    dropout_rng: jax.Array | None = None,
    train: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """(summed token NLL, number of scored tokens) of one batch [b, N] (fp32 scalars).

    Segment ids reach the model when documents are masked, and for the per-row SFT group rule
    (which reads each row's example length from them).
    """
    segments = options.mask_documents or model.cfg.s2_group_rule == "longlora_sft"
    h_bne = model.apply(
        variables,
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"] if segments else None,
        train=train,
        return_hidden=True,
        rngs={"dropout": dropout_rng} if dropout_rng is not None else None,
    )

    if train and options.fused_loss:
        w_ev = model.apply(variables, method=CausalLM.output_weight)
        return fused_cross_entropy(h_bne, w_ev, batch["targets"], batch["loss_mask"],
                                   chunk=options.loss_chunk, dtype=model.cfg.dtype)

    def project(h):
        return model.apply(variables, h, method=CausalLM.project)

    return chunked_cross_entropy(
        project, h_bne, batch["targets"], batch["loss_mask"], chunk=options.loss_chunk
    )


def _micro_batches(batch: Batch, accum_steps: int) -> Batch:
    """[G, N] -> [accum, G/accum, N]; micro-batch j takes rows j, j+accum, ... so each
    device keeps working on its own rows of a batch-sharded array."""

    def split(x):
        micro = x.shape[0] // accum_steps
        x = x.reshape(micro, accum_steps, *x.shape[1:])
        x = jnp.moveaxis(x, 1, 0)
        return nn.with_logical_constraint(x, (None, "act_batch", "act_length"))

    return {k: split(batch[k]) for k in BATCH_KEYS}


def train_step(
    state: TrainState,
    frozen: Any,
    batch: Batch,
    *,
    model: CausalLM,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    options: StepOptions,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from a global batch of [G, N] arrays (see `BATCH_KEYS`).

    The loss is the mean NLL over all scored tokens of the global batch, whatever the
    accumulation: per-micro-batch sums are accumulated and divided once at the end.
    """
    step_rng = jax.random.fold_in(state.rng, state.step)

    def micro_loss(trainable, micro, rng):
        variables = merge_trees(trainable, frozen)
        return loss_and_count(model, variables, micro, options=options, dropout_rng=rng)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, xs):
        grads_sum, nll_sum, count_sum = carry
        micro, index = xs
        (nll, count), grads = grad_fn(state.trainable, micro, jax.random.fold_in(step_rng, index))
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, nll_sum + nll, count_sum + count), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
    micro = _micro_batches(batch, options.accum_steps)
    carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads_sum, nll_sum, count), _ = jax.lax.scan(
        accumulate, carry, (micro, jnp.arange(options.accum_steps))
    )
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads_sum)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {
        "loss": nll_sum / denom,
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(state.step),
        "tokens": count,
    }
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics


def eval_step(variables: Any, batch: Batch, *, model: CausalLM,
              options: StepOptions) -> tuple[jax.Array, jax.Array]:
    """(summed NLL, token count) with full attention (`train=False`) on [G, N] arrays."""
    return loss_and_count(model, variables, batch, options=options, train=False)


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class TrainSetup:
    """Everything abstract about a run: labels, shardings, and the jitted step.

    Built without allocating any weights (`jax.eval_shape`), so `training.fit` can use it for
    a model that would not fit on the host. `step_fn` is the jitted, sharded `train_step`; it
    runs (and lowers) under its own mesh.
    """

    model: CausalLM
    mesh: Mesh
    labels: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    options: StepOptions
    variable_shardings: Any
    state_shardings: TrainState
    frozen_shardings: Any
    batch_sharding: NamedSharding
    abstract_state: TrainState
    abstract_frozen: Any
    step_fn: Callable[..., Any]

    def abstract_batch(self, global_batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """ShapeDtypeStructs of a global batch, placed like the real one."""
        dtypes = {"loss_mask": jnp.float32}
        return {
            k: jax.ShapeDtypeStruct(
                (global_batch, seq_len), dtypes.get(k, jnp.int32), sharding=self.batch_sharding
            )
            for k in BATCH_KEYS
        }

    def lower(self, global_batch: int, seq_len: int):
        """The step lowered on abstract inputs (for AOT compilation and memory analysis)."""
        batch = self.abstract_batch(global_batch, seq_len)
        return self.step_fn.lower(self.abstract_state, self.abstract_frozen, batch)


def _cast_tree(tree: Any, dtype: jnp.dtype) -> Any:
    """Floating leaves as `dtype`; a quantized base's integer codes keep theirs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
        sharding=x.sharding), tree)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def build_train_setup(
    model: CausalLM,
    mesh: Mesh,
    *,
    mode: str,
    optim_cfg: ml_collections.ConfigDict,
    options: StepOptions,
    frozen_dtype: str = "bfloat16",
) -> TrainSetup:
    """Labels, shardings, abstract state and the jitted step for `model` on `mesh`.

    mode: "lora" | "lora_plus" | "full" (see `lora.trainable_labels`). Trainable leaves are
    fp32; frozen leaves are stored in `frozen_dtype`. optim_cfg: `optim.default_optim_config`.
    """
    boxed = abstract_variables(model)
    variable_shardings = rules.tree_shardings(mesh, boxed)
    abstract_vars = _with_shardings(nn.unbox(boxed), variable_shardings)
    labels = trainable_labels(abstract_vars, mode)
    abstract_trainable, abstract_frozen = split_trainable(abstract_vars, labels)
    abstract_trainable = _cast_tree(abstract_trainable, jnp.float32)
    abstract_frozen = _cast_tree(abstract_frozen, jnp.dtype(frozen_dtype))
    optimizer = make_optimizer(optim_cfg, abstract_trainable)
    schedule = lr_schedule(optim_cfg)

    # Optimizer state mirrors the trainable leaves; derive its shardings from the boxed
    # (logically named) trainable subtree so moments are split exactly like their params.
    boxed_trainable, _ = split_trainable(boxed, labels)
    opt_shardings = rules.tree_shardings(mesh, jax.eval_shape(optimizer.init, boxed_trainable))
    abstract_opt = _with_shardings(
        jax.eval_shape(optimizer.init, abstract_trainable), opt_shardings
    )
    replicated = rules.replicated(mesh)
    trainable_shardings = jax.tree.map(lambda x: x.sharding, abstract_trainable)
    state_shardings = TrainState(
        step=replicated, trainable=trainable_shardings, opt_state=opt_shardings, rng=replicated
    )
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        trainable=abstract_trainable,
        opt_state=abstract_opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    )
    frozen_shardings = jax.tree.map(lambda x: x.sharding, abstract_frozen)
    batch_sharding = rules.batch_sharding(mesh)
    step = functools.partial(
        train_step, model=model, optimizer=optimizer, schedule=schedule, options=options
    )
    step_fn = rules.on_mesh(jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    ), mesh)
    return TrainSetup(
        model=model, mesh=mesh, labels=labels, optimizer=optimizer, schedule=schedule,
        options=options, variable_shardings=variable_shardings, state_shardings=state_shardings,
        frozen_shardings=frozen_shardings, batch_sharding=batch_sharding,
        abstract_state=abstract_state, abstract_frozen=abstract_frozen, step_fn=step_fn,
    )


def _raw_key(rng: jax.Array) -> jax.Array:
    """uint32[2] key data from a typed or raw PRNG key (checkpoints store plain arrays)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def init_state(
    setup: TrainSetup, variables: Mapping[str, Any], rng: jax.Array
) -> tuple[TrainState, Any]:
    """(TrainState at step 0, frozen) from full variables, placed on the mesh.

    `variables` = {"params": ..., "lora": ...} (host or device arrays); trainable leaves are
    cast to fp32 and frozen ones to the setup's frozen dtype.
    """
    trainable, frozen = split_trainable(nn.unbox(variables), setup.labels)

    def place(tree, abstract, copy):
        return jax.tree.map(
            lambda x, a: jax.device_put(jnp.array(x, a.dtype, copy=copy), a.sharding),
            tree, abstract,
        )

    # The step donates the state: copy the trainable leaves so the caller's arrays survive.
    trainable = place(trainable, setup.abstract_state.trainable, copy=True)
    frozen = place(frozen, setup.abstract_frozen, copy=False)
    opt_init = jax.jit(setup.optimizer.init, out_shardings=setup.state_shardings.opt_state)
    replicated = rules.replicated(setup.mesh)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        trainable=trainable,
        opt_state=opt_init(trainable),
        rng=jax.device_put(_raw_key(rng), replicated),
    )
    return state, frozen


__all__ = [
    "BATCH_KEYS", "StepOptions", "TrainSetup", "TrainState", "build_train_setup", "eval_step",
    "init_state", "loss_and_count", "train_step",
]
