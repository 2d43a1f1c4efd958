"""ops.fusion_barrier: the identity under every transformation, a custom call on CPU only, and
what it is for: a residual chain compiled by XLA:CPU is not recomputed in every block."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import ops
from jaxconv.ops import native
from tests.helpers import exported_mlir, rand


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
@pytest.mark.parametrize("shape", [(2, 5, 3), (0, 4)])
def test_values_pass_unchanged(dtype, shape):
    x = jnp.asarray(rand(shape) * 10).astype(dtype)
    for fn in (ops.fusion_barrier, jax.jit(ops.fusion_barrier), jax.jit(jax.vmap(ops.fusion_barrier)),
               jax.jit(jax.vmap(ops.fusion_barrier, in_axes=-1, out_axes=-1))):
        y = fn(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    # the operand stays intact when XLA has to keep it alive beside the aliased result
    y, z = jax.jit(lambda x: (ops.fusion_barrier(x * 2), x * 2 + 1))(x)
    np.testing.assert_array_equal(np.asarray(y) + 1, np.asarray(z))


def test_derivatives_are_those_of_the_identity():
    x = jnp.asarray(rand((3, 4)))

    def f(x, barrier):
        h = jnp.sin(x) * 2
        return jnp.tanh(barrier(h) * h)

    with_b, plain = (lambda x: f(x, ops.fusion_barrier)), (lambda x: f(x, lambda v: v))
    for transform in (lambda g: jax.grad(lambda x: g(x).sum()),
                      lambda g: (lambda x: jax.jvp(g, (x,), (jnp.cos(x),))[1]),
                      jax.jacfwd, jax.jacrev, jax.vmap,
                      lambda g: jax.hessian(lambda x: g(x).sum())):
        np.testing.assert_allclose(jax.jit(transform(with_b))(x), transform(plain)(x),
                                   rtol=1e-6, atol=1e-6)


def test_a_custom_call_on_cpu_the_identity_elsewhere(monkeypatch):
    x = jnp.ones((2, 3))

    def grad():   # a new function each time: jax caches lowerings per function
        return jax.grad(lambda x: (ops.fusion_barrier(x) ** 2).sum())

    assert exported_mlir(grad(), x).count("@jaxconv_fusion_barrier(") == 2   # and its transpose
    for platform in ("cuda", "tpu"):
        assert "jaxconv_fusion_barrier" not in exported_mlir(grad(), x, platform=platform)
    monkeypatch.setattr(native, "available", lambda name: False)   # e.g. no C++ compiler
    assert "jaxconv_fusion_barrier" not in exported_mlir(grad(), x)
    np.testing.assert_array_equal(jax.jit(grad())(x), 2 * x)


def _largest_fusion(compiled_text: str) -> int:
    """The most parameters any fused computation of XLA's optimised module takes."""
    heads = re.findall(r"^%fused_computation\S* \((.*)\) ->", compiled_text, re.M)
    return max(h.count("param_") for h in heads)


@pytest.mark.parametrize("depth", [4, 16])
def test_residual_chain_is_computed_once(depth):
    """Blocks y = relu(conv(y) * s + b + y): without the barrier XLA:CPU fuses block k's add
    with every block before it (the chain recomputed: a fusion of depth + 3 parameters, a cost
    quadratic in the depth); with it, every fusion stays the size of one block (4)."""
    x = jnp.asarray(rand((2, 5, 5, 8)))
    ws = jnp.asarray(rand((depth, 1, 1, 8, 8), seed=1) / 3)
    s, b = jnp.asarray(rand((depth, 8), seed=2)), jnp.asarray(rand((depth, 8), seed=3))

    def net(x, ws, s, b, barrier):
        for k in range(depth):
            x = barrier(jax.nn.relu(ops.conv2d(x, ws[k]) * s[k] + b[k] + x))
        return x

    with_b = jax.jit(lambda *a: net(*a, ops.fusion_barrier))
    assert _largest_fusion(with_b.lower(x, ws, s, b).compile().as_text()) <= 6
    np.testing.assert_allclose(with_b(x, ws, s, b), jax.jit(lambda *a: net(*a, lambda v: v))(
        x, ws, s, b), rtol=1e-6, atol=1e-6)
