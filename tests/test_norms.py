"""`modeling.norms`: forwards equal to transformers' LlamaRMSNorm and torch's LayerNorm (GPT-NeoX),
backwards equal to torch's autograd and to JAX's autodiff of the plain formulas (fp32, bf16),
and the parameter gradients compiled as dots, not autodiff's fused column reductions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from longlora_jax.modeling.norms import layer_norm, rms_norm

EPS = 1e-5


def plain_rms(x, scale, dtype):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS)
    return scale.astype(dtype) * normed.astype(dtype)


def plain_ln(x, weight, bias, dtype):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + EPS)
    return (normed * weight + bias).astype(dtype)


def ours_rms(dtype):
    return lambda x, s: rms_norm(x, s, EPS, jnp.dtype(dtype))


def ours_ln(dtype):
    return lambda x, w, b: layer_norm(x, w, b, EPS, jnp.dtype(dtype))


def inputs(shape, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 0.5, dtype)
    weight = jnp.asarray(1 + 0.1 * rng.standard_normal(shape[-1]), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal(shape[-1]), jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), dtype)
    return x, weight, bias, g


def torch_grads(module, x, g):
    tx = torch.from_numpy(np.array(x)).requires_grad_(True)
    ty = module(tx)
    ty.backward(torch.from_numpy(np.array(g)))
    return ty.detach().numpy(), tx.grad.numpy(), [p.grad.numpy() for p in module.parameters()]


def test_rms_norm_equals_transformers_llama_rmsnorm():
    x, weight, _, g = inputs((2, 37, 48), jnp.float32)
    norm = LlamaRMSNorm(48, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(np.array(weight)))
    ty, tdx, (tdw,) = torch_grads(norm, x, g)
    y, vjp = jax.vjp(ours_rms(jnp.float32), x, weight)
    dx, dw = vjp(g)
    np.testing.assert_allclose(y, ty, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, tdx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, tdw, rtol=1e-5, atol=1e-4)


def test_layer_norm_equals_torch_layer_norm():
    x, weight, bias, g = inputs((2, 37, 48), jnp.float32)
    norm = torch.nn.LayerNorm(48, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(np.array(weight)))
        norm.bias.copy_(torch.from_numpy(np.array(bias)))
    ty, tdx, (tdw, tdb) = torch_grads(norm, x, g)
    y, vjp = jax.vjp(ours_ln(jnp.float32), x, weight, bias)
    dx, dw, db = vjp(g)
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, tdx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, tdw, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(db, tdb, rtol=1e-5, atol=1e-4)


def assert_close(got, want, tol):
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol,
                               atol=tol * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_backward_equals_autodiff_of_the_plain_formula(norm, dtype):
    x, weight, bias, g = inputs((3, 64, 96), dtype)
    params = (weight,) if norm == "rms" else (weight, bias)
    plain = (lambda x, s: plain_rms(x, s, dtype)) if norm == "rms" else (
        lambda x, w, b: plain_ln(x, w, b, dtype))
    ours = ours_rms(dtype) if norm == "rms" else ours_ln(dtype)
    y_ref, vjp_ref = jax.vjp(plain, x, *params)
    y, vjp = jax.vjp(ours, x, *params)
    assert y.dtype == y_ref.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: autodiff rounds its sums in bf16
    for got, want in zip(vjp(g), vjp_ref(g), strict=True):
        assert got.dtype == want.dtype
        assert_close(got, want, tol)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_parameter_gradients_are_dots_not_fused_column_reduces(norm):
    """At a model's shape ([2048, 576]) each parameter's gradient compiles to a dot (XLA:CPU
    runs it fast), where autodiff's is a fused reduce over the tokens."""
    x, weight, bias, g = inputs((1, 2048, 576), jnp.float32)
    params = (weight,) if norm == "rms" else (weight, bias)
    plain = (lambda x, s: plain_rms(x, s, jnp.float32)) if norm == "rms" else (
        lambda x, w, b: plain_ln(x, w, b, jnp.float32))
    ours = ours_rms(jnp.float32) if norm == "rms" else ours_ln(jnp.float32)

    def parameter_gradients(f):
        argnums = tuple(range(1, 2 + len(params)))  # g is an argument: no constant folding
        text = jax.jit(jax.grad(lambda g, *a: jnp.vdot(f(*a), g), argnums=argnums)).lower(
            g, x, *params).compile().as_text()
        (root,) = [ln for ln in text.splitlines() if ln.lstrip().startswith("ROOT %tuple")
                   and "f32[1,2048,576]{2,1,0}, f32[576]{0}" in ln]
        names = [a.strip(" )%") for a in root.split("tuple(")[1].split(",")[1:]]
        lines = {ln.lstrip().split(" = ")[0][1:]: ln for ln in text.splitlines()
                 if " = " in ln and ln.lstrip().startswith("%")}
        return [lines[name] for name in names]

    for line in parameter_gradients(ours):
        assert "dot_general" in line and "reduce" not in line, line
    assert all("reduce" in line for line in parameter_gradients(plain))
