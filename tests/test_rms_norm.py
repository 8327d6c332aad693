"""`modeling.rms_norm`: forward equal to transformers' LlamaRMSNorm, backward equal to torch's
autograd through it and to JAX's autodiff of the plain formula (fp32 and bf16 compute)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from longlora_jax.modeling.rms_norm import rms_norm

EPS = 1e-5


def plain(x, scale, dtype):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS)
    return scale.astype(dtype) * normed.astype(dtype)


def inputs(shape, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3, dtype)
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(shape[-1]), jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), dtype)
    return x, scale, g


def test_forward_and_backward_equal_transformers_rmsnorm():
    x, scale, g = inputs((2, 37, 48), jnp.float32)
    norm = LlamaRMSNorm(48, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(np.array(scale)))
    tx = torch.from_numpy(np.array(x)).requires_grad_(True)
    ty = norm(tx)
    ty.backward(torch.from_numpy(np.array(g)))
    y, vjp = jax.vjp(lambda x, s: rms_norm(x, s, EPS, jnp.dtype(jnp.float32)), x, scale)
    dx, ds = vjp(g)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds, norm.weight.grad.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_equals_autodiff_of_the_plain_formula(dtype):
    x, scale, g = inputs((3, 64, 96), dtype)
    y_ref, vjp_ref = jax.vjp(lambda x, s: plain(x, s, dtype), x, scale)
    y, vjp = jax.vjp(lambda x, s: rms_norm(x, s, EPS, jnp.dtype(dtype)), x, scale)
    assert y.dtype == y_ref.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    (dx_ref, ds_ref), (dx, ds) = vjp_ref(g), vjp(g)
    assert dx.dtype == x.dtype and ds.dtype == scale.dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: autodiff rounds its sums in bf16
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(ds, np.asarray(ds_ref, np.float32), rtol=tol,
                               atol=tol * float(jnp.abs(ds_ref).max()))


def test_the_scale_gradient_is_a_dot_not_a_fused_column_reduce():
    """At a model's shape ([2048, 576]), the scale's gradient compiles to a dot (a contraction
    XLA:CPU runs fast), where autodiff's is a fused reduce over the tokens."""
    x, scale, g = inputs((1, 2048, 576), jnp.float32)

    def scale_gradient(f):
        text = jax.jit(jax.grad(lambda x, s: jnp.vdot(f(x, s), g), argnums=(0, 1))).lower(
            x, scale).compile().as_text()
        (root,) = [ln for ln in text.splitlines() if ln.lstrip().startswith("ROOT %tuple")
                   and "f32[1,2048,576]{2,1,0}, f32[576]{0}) tuple(" in ln]
        name = root.split("tuple(")[1].split(",")[1].strip(" )%")
        (line,) = [ln for ln in text.splitlines() if ln.lstrip().startswith(f"%{name} = ")]
        return line

    ours = scale_gradient(lambda x, s: rms_norm(x, s, EPS, jnp.dtype(jnp.float32)))
    theirs = scale_gradient(lambda x, s: plain(x, s, jnp.float32))
    assert "dot_general" in ours and "reduce" not in ours, ours
    assert "reduce_sum" in theirs, theirs
