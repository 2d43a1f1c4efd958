"""Training-mode batch normalisation over NHWC's channel axis, with torch's backward.

`batch_norm_train(x, scale, bias, eps)` returns the normalised output and the batch mean and
(biased) variance, reduced over N, H, W in float32. Three primitives:

    forward_p   (x, scale, bias) -> (y, mean, var)
    tangent_p   the tangent map dy of (dx, dscale, dbias), linear in those
    backward_p  its transpose (x, mean, var, scale, ct) -> (dx, dscale, dbias): the usual closed
                form (two per-channel sums, one elementwise pass: what torch computes)

so reverse mode keeps only x, the statistics and the scale, and jvp, jacfwd, hessian, grad of
grad and vmap all work. Activations keep their dtype (bf16 is never copied to float32 in
memory); everything is computed in float32 or wider. On CPU, NHWC, unless the conv lowering is
'xla' or oneDNN is missing, oneDNN computes (multi-threaded) backward_p for float32, and
forward_p and backward_p for bfloat16 on CPUs with AVX512-BF16; elsewhere, and for derivatives,
the formulas below. A float32 forward stays XLA's: oneDNN sums each channel in float32 in its
own order, statistics within ~2e-6 of float64 where XLA's pairwise reductions are within
~1.5e-7, and through Inception-v3's aux head that moved train-mode logits 1.9e-4 from torch's
(tolerance 1e-4). For bf16, XLA:CPU materialises a float32 copy of x and the centred input
before reducing them; oneDNN reads the bf16 x (BENCHMARKS.md, "bfloat16 on CPU").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir

from jaxconv import config
from jaxconv.ops import native
from jaxconv.ops._formula import formula_primitive

AXES = (0, 1, 2)   # N, H, W of NHWC


def batch_norm_train(x, scale=None, bias=None, eps: float = 1e-5):
    """(y, mean, var) for NHWC `x` normalised with its own statistics over N, H, W; `scale` and
    `bias` (C,) or None (no affine). Computes in float32 or wider; y has x's dtype (the
    gradient too: a bf16 x is never copied to float32 in memory), mean and var are (C,) in the
    compute dtype."""
    c = x.shape[-1]
    acc = _acc(x.dtype)
    scale = jnp.ones((c,), acc) if scale is None else scale.astype(acc)
    bias = jnp.zeros((c,), acc) if bias is None else bias.astype(acc)
    y, mean, var = forward_p.bind(x, scale.reshape(1, 1, 1, c), bias.reshape(1, 1, 1, c),
                                  axes=AXES, eps=float(eps), lowering=config.conv_lowering)
    return y, mean.reshape(c), var.reshape(c)


# ------------------------------------------------------------------------------- the formulas
# Per-channel operands keep the reduced axes as size 1 and the compute dtype (float32 or
# wider); activations (x, y, dx, dy) keep x's dtype and are computed in the compute dtype.

def _acc(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _forward(x, scale, bias, *, axes, eps, lowering=None):
    xf = x.astype(_acc(x.dtype))
    mean = jnp.mean(xf, axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
    y = (xf - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias
    return y.astype(x.dtype), mean, var


def _tangent(x, mean, var, scale, dx, dscale, dbias, *, axes, eps, lowering=None):
    """dy = (dx - mean(dx) - xhat mean(dx xhat)) rstd scale + xhat dscale + dbias."""
    out, x, dx = x.dtype, x.astype(mean.dtype), dx.astype(mean.dtype)
    rstd = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * rstd
    centred = dx - jnp.mean(dx, axes, keepdims=True)
    proj = jnp.mean(dx * xhat, axes, keepdims=True)
    return ((centred - xhat * proj) * (rstd * scale) + xhat * dscale + dbias).astype(out)


def _backward(x, mean, var, scale, ct, *, axes, eps, lowering=None):
    """The tangent map's transpose at cotangent `ct`: (dx, dscale, dbias)."""
    out, x, ct = x.dtype, x.astype(mean.dtype), ct.astype(mean.dtype)
    n = np.prod([x.shape[a] for a in axes])
    rstd = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * rstd
    sum_ct = jnp.sum(ct, axes, keepdims=True)
    sum_ct_xhat = jnp.sum(ct * xhat, axes, keepdims=True)
    return ((ct - sum_ct / n - xhat * (sum_ct_xhat / n)) * (rstd * scale)).astype(out), \
        sum_ct_xhat, sum_ct


# ------------------------------------------------------------------------------ the primitives

def _primitive(name, formula, multiple_results=True):
    """A primitive computed by `formula` (its abstract evaluation, eager evaluation, lowering
    off CPU, JVP and vmap all come from it)."""
    p = formula_primitive(name, formula, multiple_results)

    def batch(args, dims, *, axes, **params):
        """vmap: the mapped axis in front of every operand; the reduced axes move up by one."""
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
        out = p.bind(*args, axes=tuple(a + 1 for a in axes), **params)
        return out, [0] * len(out) if multiple_results else 0

    def jvp(primals, tangents, **params):
        tangents = tuple(jnp.zeros(v.shape, v.dtype) if type(t) is ad.Zero else t
                         for v, t in zip(primals, tangents))
        return jax.jvp(functools.partial(formula, **params), tuple(primals), tangents)

    batching.primitive_batchers[p] = batch
    ad.primitive_jvps[p] = jvp
    return p


def _onednn(x, axes, lowering) -> bool:
    """Whether oneDNN can compute a batch-norm pass of `x` over `axes` (NHWC, not empty,
    float32, or bfloat16 on CPUs with AVX512-BF16)."""
    dtype_ok = x.dtype == np.float32 or (x.dtype == jnp.bfloat16 and native.bf16())
    return (axes == AXES and dtype_ok and 0 not in x.shape
            and lowering != "xla" and native.available("onednn"))


def _cpu_lowering(target, formula, float32=True):
    """A CPU lowering: oneDNN's `target` where `_onednn` says so (and, unless `float32`, only
    for bfloat16 x), else `formula`."""
    def lower(ctx, *args, axes, eps, lowering):
        x = ctx.avals_in[0]
        if _onednn(x, axes, lowering) and (float32 or x.dtype == jnp.bfloat16):
            shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ctx.avals_out]
            fn = lambda *a: jax.ffi.ffi_call(target, shapes)(*a, eps=np.float32(eps))  # noqa: E731
        else:
            fn = functools.partial(formula, axes=axes, eps=eps)
        return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
    return lower


forward_p = _primitive("jaxconv_batch_norm", _forward)
backward_p = _primitive("jaxconv_batch_norm_backward", _backward)
tangent_p = _primitive("jaxconv_batch_norm_tangent", _tangent, multiple_results=False)
mlir.register_lowering(backward_p, _cpu_lowering("jaxconv_onednn_norm_bwd", _backward), platform="cpu")
# bf16 only: XLA:CPU materialises a float32 copy and the centred input to reduce a bf16 x
mlir.register_lowering(forward_p, _cpu_lowering("jaxconv_onednn_norm_fwd", _forward, float32=False),
                       platform="cpu")


def _forward_jvp(primals, tangents, *, axes, eps, lowering):
    x, scale, bias = primals
    dx, dscale, dbias = (jnp.zeros(v.shape, v.dtype) if type(t) is ad.Zero else t
                         for v, t in zip(primals, tangents))
    y, mean, var = forward_p.bind(x, scale, bias, axes=axes, eps=eps, lowering=lowering)
    dxf = dx.astype(mean.dtype)
    dmean = jnp.mean(dxf, axes, keepdims=True)
    dvar = 2 * jnp.mean((x.astype(mean.dtype) - mean) * (dxf - dmean), axes, keepdims=True)
    dy = tangent_p.bind(x, mean, var, scale, dx, dscale, dbias, axes=axes, eps=eps,
                        lowering=lowering)
    return (y, mean, var), (dy, dmean, dvar)


def _tangent_transpose(ct, x, mean, var, scale, dx, dscale, dbias, **params):
    if any(ad.is_undefined_primal(p) for p in (x, mean, var, scale)):
        raise ValueError("batch_norm's tangent map is linear in its tangents only")
    linear = [ad.is_undefined_primal(t) for t in (dx, dscale, dbias)]
    if type(ct) is ad.Zero:
        grads = [ad.Zero(t.aval) for t in (dx, dscale, dbias)]
    else:
        grads = backward_p.bind(x, mean, var, scale, ct, **params)
    return [None] * 4 + [g if lin else None for g, lin in zip(grads, linear)]


ad.primitive_jvps[forward_p] = _forward_jvp
ad.primitive_transposes[tangent_p] = _tangent_transpose
