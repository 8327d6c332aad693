"""The fused cross-entropy (gradients computed in the forward pass) against the chunked one
and against plain autodiff of full logits; and the train step with either gives one update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from longlora_jax.io.base import init_variables
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.llama import LlamaForCausalLM
from longlora_jax.modeling.loss import chunked_cross_entropy, fused_cross_entropy
from longlora_jax.parallel.mesh import single_device_mesh
from longlora_jax.training.optim import default_optim_config
from longlora_jax.training.step import StepOptions, build_train_setup, init_state

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("n, chunk", [(37, 8), (64, 64), (64, 16)])
def test_fused_equals_autodiff_of_full_logits(n, chunk):
    h = jnp.asarray(RNG.standard_normal((2, n, 16)), jnp.float32)
    w = jnp.asarray(RNG.standard_normal((16, 50)) * 0.3, jnp.float32)
    targets = jnp.asarray(RNG.integers(0, 50, (2, n)), jnp.int32)
    mask = jnp.asarray(RNG.integers(0, 2, (2, n)), jnp.float32)

    def plain(h, w):  # the reference: whole logits, optax's cross-entropy
        losses = optax.softmax_cross_entropy_with_integer_labels(h @ w, targets)
        return jnp.sum(losses * mask)

    def fused(h, w):
        return fused_cross_entropy(h, w, targets, mask, chunk=chunk)[0]

    def chunked(h, w):
        return chunked_cross_entropy(lambda x: x @ w, h, targets, mask, chunk=chunk)[0]

    for fn in (fused, chunked):
        np.testing.assert_allclose(fn(h, w), plain(h, w), rtol=1e-6)
        for got, want in zip(jax.grad(fn, (0, 1))(h, w), jax.grad(plain, (0, 1))(h, w),
                             strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(fused_cross_entropy(h, w, targets, mask, chunk=chunk)[1]) == float(mask.sum())


@pytest.mark.parametrize("tied", [True, False])
def test_train_step_with_fused_loss_equals_chunked(tied):
    cfg = LlamaConfig.preset("tiny", tie_word_embeddings=tied, scan_layers=True, lora_rank=4,
                             attention_train="s2")
    n = 64
    batch = {"inputs": RNG.integers(0, 512, (2, n)).astype(np.int32),
             "targets": RNG.integers(0, 512, (2, n)).astype(np.int32),
             "loss_mask": np.ones((2, n), np.float32), "segment_ids": np.ones((2, n), np.int32),
             "positions": np.tile(np.arange(n, dtype=np.int32), (2, 1))}
    states = []
    for fused in (True, False):
        setup = build_train_setup(LlamaForCausalLM(cfg), single_device_mesh(), mode="lora_plus",
                                  optim_cfg=default_optim_config(),
                                  options=StepOptions(loss_chunk=16, fused_loss=fused),
                                  frozen_dtype="float32")
        variables = init_variables(setup.model, setup.variable_shardings, jax.random.key(0))
        state, frozen = init_state(setup, variables, jax.random.key(1))
        state, metrics = setup.step_fn(state, frozen, batch)
        states.append((state.trainable, metrics))
    (a, ma), (b, mb) = states
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    assert float(ma["grad_norm"]) == pytest.approx(float(mb["grad_norm"]), rel=1e-5)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
