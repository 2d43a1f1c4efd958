"""Training-mode batch normalisation over NHWC's channel axis, with torch's backward.

`batch_norm_train(x, scale, bias, eps)` returns the normalised output and the batch mean and
(biased) variance, reduced over N, H, W in float32. Autodiff of the plain formula makes XLA
materialise the centred input and reduce several times in the backward pass; here the output's
tangent is `tangent_p`, a primitive linear in the tangents whose transpose is the usual closed
form (two per-channel sums, one elementwise pass: what torch computes), so reverse mode keeps
only x, the statistics and the scale, and jvp, jacfwd, hessian, grad of grad and vmap all work.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


def _stats(x, axes):
    mean = jnp.mean(x, axes, keepdims=True)
    return mean, jnp.mean(jnp.square(x - mean), axes, keepdims=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _bn(x, scale, bias, eps):
    mean, var = _stats(x, (0, 1, 2))
    return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias, mean, var


@_bn.defjvp
def _bn_jvp(eps, primals, tangents):
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    axes = (0, 1, 2)
    mean, var = _stats(x, axes)
    rstd = jax.lax.rsqrt(var + eps)
    y = (x - mean) * (rstd * scale) + bias
    dmean = jnp.mean(dx, axes, keepdims=True)
    dvar = 2 * jnp.mean((x - mean) * (dx - dmean), axes, keepdims=True)
    dy = tangent_p.bind(x, mean, rstd, scale, dx, dscale, dbias, axes=axes)
    return (y, mean, var), (dy, dmean, dvar)


def batch_norm_train(x, scale=None, bias=None, eps: float = 1e-5):
    """(y, mean, var) for NHWC `x` normalised with its own statistics over N, H, W; `scale` and
    `bias` (C,) or None (no affine). Computes in float32 or wider; mean and var are (C,)."""
    c = x.shape[-1]
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    scale = jnp.ones((c,), x.dtype) if scale is None else scale.astype(x.dtype)
    bias = jnp.zeros((c,), x.dtype) if bias is None else bias.astype(x.dtype)
    y, mean, var = _bn(x, scale.reshape(1, 1, 1, c), bias.reshape(1, 1, 1, c), float(eps))
    return y, mean.reshape(c), var.reshape(c)


# ---------------------------------------------------------------------------------------------
# The tangent map dy = (dx - mean(dx) - xhat * mean(dx * xhat)) * rstd * scale + xhat * dscale
# + dbias, xhat = (x - mean) * rstd, as a primitive linear in (dx, dscale, dbias); per-channel
# operands keep the reduced axes as size 1.

tangent_p = Primitive("jaxconv_batch_norm_tangent")


def _tangent_impl(x, mean, rstd, scale, dx, dscale, dbias, *, axes):
    xhat = (x - mean) * rstd
    centred = dx - jnp.mean(dx, axes, keepdims=True)
    proj = jnp.mean(dx * xhat, axes, keepdims=True)
    return (centred - xhat * proj) * (rstd * scale) + xhat * dscale + dbias


def _tangent_transpose(ct, x, mean, rstd, scale, dx, dscale, dbias, *, axes):
    if any(ad.is_undefined_primal(p) for p in (x, mean, rstd, scale)):
        raise ValueError("batch_norm's tangent map is linear in its tangents only")
    linear = [ad.is_undefined_primal(t) for t in (dx, dscale, dbias)]
    if type(ct) is ad.Zero:
        return [None] * 4 + [ad.Zero(t.aval) if lin else None
                             for t, lin in zip((dx, dscale, dbias), linear)]
    n = 1
    for a in axes:
        n *= x.shape[a]
    xhat = (x - mean) * rstd
    sum_ct = jnp.sum(ct, axes, keepdims=True)
    sum_ct_xhat = jnp.sum(ct * xhat, axes, keepdims=True)
    grads = (((ct - sum_ct / n) - xhat * (sum_ct_xhat / n)) * (rstd * scale),
             sum_ct_xhat, sum_ct)
    return [None] * 4 + [g if lin else None for g, lin in zip(grads, linear)]


def _tangent_jvp(primals, tangents, *, axes):
    tangents = tuple(jnp.zeros(p.shape, p.dtype) if type(t) is ad.Zero else t
                     for p, t in zip(primals, tangents))
    return jax.jvp(functools.partial(_tangent_impl, axes=axes), primals, tangents)


def _tangent_batch(args, dims, *, axes):
    """vmap: the mapped axis in front of every operand; the reduced axes move up by one."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
    return tangent_p.bind(*args, axes=tuple(a + 1 for a in axes)), 0


tangent_p.def_impl(_tangent_impl)
tangent_p.def_abstract_eval(lambda x, *args, axes: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(tangent_p, mlir.lower_fun(_tangent_impl, multiple_results=False))
ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_jvps[tangent_p] = _tangent_jvp
batching.primitive_batchers[tangent_p] = _tangent_batch
