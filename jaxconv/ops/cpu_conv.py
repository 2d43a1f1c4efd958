"""The CPU convolution engines as one JAX primitive, with the rules that make it a first-class
citizen of JAX's transformations.

``conv_p`` computes one of the three bilinear maps of a 2-D convolution (NHWC activations, HWIO
kernel of ``geo.groups`` groups):

    op            operands        result
    "fwd"         x, w            y  = conv(x, w)
    "bwd_data"    gy, w           gx = the adjoint of conv(., w) applied to gy (x's shape from
                                       ``in_hw``); also the transposed convolution
    "bwd_weights" x, gy           gw = the adjoint of conv(x, .) applied to gy

Each is linear in each operand, and the set is closed under transposition, so JVP (a bilinear
map's derivative), transpose (reverse mode) and therefore grad, jvp, jacfwd, jacrev, hessian and
grad-of-grad all come from ``ad.defbilinear`` with no custom_vjp; a batching rule makes vmap work.

Which engine computes a pass is decided when the primitive is lowered, from the static shapes
and dtype, by ``jaxconv.ops.policy`` (the one table): oneDNN or jaxconv's own kernel through the
XLA FFI on CPU, or lax's convolution (the "xla" engine). For any platform but CPU the primitive
lowers to lax's convolution, so a computation exported for GPU/TPU keeps cuDNN's kernels.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxconv.ops import native, policy
from jaxconv.ops._formula import def_jitted_impl

Pairs = tuple[tuple[int, int], tuple[int, int]]
DIMS = ("NHWC", "HWIO", "NHWC")
OPS = ("fwd", "bwd_data", "bwd_weights")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static description of one convolution: kernel taps, stride, explicit ((top, bottom),
    (left, right)) padding, kernel dilation and feature groups."""
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    pads: Pairs = ((0, 0), (0, 0))
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def out_hw(self, in_hw) -> tuple[int, int]:
        return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1 for n, (lo, hi), k, d, s
                     in zip(in_hw, self.pads, self.kernel, self.dilation, self.stride))


def bind(op: str, a, b, geo: Geometry, *, in_hw=None, lowering: str = "auto", precision=None):
    """conv_p.bind with checked, hashable parameters (`lowering`: 'auto' or a forced engine;
    `precision`: lax's, for the lowering off CPU, where the CPU engines compute float32 products
    exactly)."""
    return conv_p.bind(a, b, op=op, geo=geo, in_hw=None if in_hw is None else tuple(in_hw),
                       lowering=lowering,
                       precision=tuple(precision) if isinstance(precision, list) else precision)


# ------------------------------------------------------------------------------ the primitive

conv_p = Primitive("jaxconv_conv")


def _out_shape(a_shape, b_shape, op, geo: Geometry, in_hw):
    if op == "fwd":
        return (a_shape[0], *geo.out_hw(a_shape[1:3]), b_shape[3])
    if op == "bwd_data":
        return (a_shape[0], *in_hw, b_shape[2] * geo.groups)
    return (*geo.kernel, a_shape[3] // geo.groups, b_shape[3])


def _abstract_eval(a, b, *, op, geo, in_hw, lowering, precision):
    if a.dtype != b.dtype:
        raise ValueError(f"conv_p: operands of one dtype expected, got {a.dtype} and {b.dtype}")
    return jax.core.ShapedArray(_out_shape(a.shape, b.shape, op, geo, in_hw), a.dtype)


conv_p.def_abstract_eval(_abstract_eval)


def_jitted_impl(conv_p)


# ----------------------------------------------------------------------------- lax reference

def _lax_fwd(x, w, geo: Geometry, precision=None):
    return lax.conv_general_dilated(x, w, geo.stride, geo.pads, None, geo.dilation, DIMS,
                                    feature_group_count=geo.groups, precision=precision)


def _lax(a, b, *, op, geo, in_hw, lowering=None, precision=None):
    """The pass `op` with lax's convolution (its own transposes for the two adjoints)."""
    if op == "fwd":
        return _lax_fwd(a, b, geo, precision)
    if op == "bwd_data":
        x = jax.ShapeDtypeStruct(_out_shape(a.shape, b.shape, op, geo, in_hw), a.dtype)
        return jax.linear_transpose(lambda x: _lax_fwd(x, b, geo, precision), x)(a)[0]
    w = jax.ShapeDtypeStruct(_out_shape(a.shape, b.shape, op, geo, in_hw), a.dtype)
    return jax.linear_transpose(lambda w: _lax_fwd(a, w, geo, precision), w)(b)[0]


# ------------------------------------------------------------------------------ the engines

def _kernel_attrs(geo: Geometry, lhs_dilation=(1, 1), pads=None):
    """jaxconv's kernel attributes: stride, kernel dilation, low padding, input dilation (the
    high padding follows from the output's shape)."""
    (lo_h, _), (lo_w, _) = pads or geo.pads
    values = dict(sh=geo.stride[0], sw=geo.stride[1], dh=geo.dilation[0], dw=geo.dilation[1],
                  lo_h=lo_h, lo_w=lo_w, ld_h=lhs_dilation[0], ld_w=lhs_dilation[1])
    return {k: np.int64(v) for k, v in values.items()}


def transposed_kernel(w, groups: int):
    """(kh, kw, C_in/G, C_out) -> (kh, kw, C_out/G, C_in): flipped, in/out swapped per group
    (the kernel of the convolution that computes the input gradient)."""
    kh, kw, cin_per_group, cout = w.shape
    wr = w[::-1, ::-1].reshape(kh, kw, cin_per_group, groups, cout // groups)
    return wr.transpose(0, 1, 4, 3, 2).reshape(kh, kw, cout // groups, groups * cin_per_group)


def _kernel(a, b, *, op, geo, in_hw):
    """jaxconv's direct convolution (grouped_cpu.cc): a forward (which, over the stride-dilated
    output gradient with the transposed kernel, is also the input gradient) and a weight
    gradient."""
    shape = jax.ShapeDtypeStruct(_out_shape(a.shape, b.shape, op, geo, in_hw), a.dtype)
    if op == "bwd_weights":
        return jax.ffi.ffi_call("jaxconv_grouped_conv_wgrad", shape)(a, b, **_kernel_attrs(geo))
    if op == "fwd":
        return jax.ffi.ffi_call("jaxconv_grouped_conv", shape)(a, b, **_kernel_attrs(geo))
    # input gradient: a conv over gy with input dilation = stride, padding d*(k-1)-lo in front
    pads = tuple((d * (k - 1) - lo, 0) for (lo, _), k, d in zip(geo.pads, geo.kernel, geo.dilation))
    attrs = _kernel_attrs(dataclasses.replace(geo, stride=(1, 1)), geo.stride, pads)
    return jax.ffi.ffi_call("jaxconv_grouped_conv", shape)(
        a, transposed_kernel(b, geo.groups), **attrs)


def _onednn(a, b, *, op, geo, in_hw):
    """oneDNN's convolution primitives (onednn.cc): forward, backward data, backward
    weights, on NHWC / HWIO memory as it is (no layout copies of the activations)."""
    shape = jax.ShapeDtypeStruct(_out_shape(a.shape, b.shape, op, geo, in_hw), a.dtype)
    (pt, pb), (pl, pr) = geo.pads
    attrs = dict(op=OPS.index(op), sh=geo.stride[0], sw=geo.stride[1], dh=geo.dilation[0],
                 dw=geo.dilation[1], pt=pt, pb=pb, pl=pl, pr=pr, groups=geo.groups)
    return jax.ffi.ffi_call("jaxconv_onednn_conv", shape)(
        a, b, **{k: np.int64(v) for k, v in attrs.items()})


def _matmul(a, b, *, op, geo, in_hw):
    """A 1x1 conv without padding as (N*H*W, C_in) x (C_in, C_out) matrix products (a stride is
    a strided slice, and its adjoint an interior padding)."""
    sh, sw = geo.stride

    def rows(t):
        return t.reshape(-1, t.shape[-1])

    if op == "fwd":
        x = a[:, ::sh, ::sw]
        return (rows(x) @ b[0, 0]).reshape(*x.shape[:3], b.shape[3])
    if op == "bwd_weights":
        x = a[:, ::sh, ::sw]
        return (rows(x).T @ rows(b)).reshape(1, 1, x.shape[3], b.shape[3])
    gx = (rows(a) @ b[0, 0].T).reshape(*a.shape[:3], b.shape[2])
    high = [n - ((m - 1) * s + 1) for n, m, s in zip(in_hw, a.shape[1:3], geo.stride)]
    return lax.pad(gx, jnp.zeros((), gx.dtype), ((0, 0, 0), (0, high[0], sh - 1),
                                                 (0, high[1], sw - 1), (0, 0, 0)))


ENGINES = {"xla": _lax, "kernel": _kernel, "onednn": _onednn, "matmul": _matmul}


def _cpu_lowering(ctx, a, b, *, op, geo, in_hw, lowering, precision):
    a_aval, b_aval = ctx.avals_in
    out = ctx.avals_out[0]
    if 0 in a_aval.shape or 0 in b_aval.shape or 0 in out.shape:   # batch 0, empty kernel
        fn = lambda a, b: jnp.zeros(out.shape, out.dtype)  # noqa: E731
    else:
        engine = policy.engine(op, geo, a_aval, b_aval, lowering, in_hw)
        native.load(engine)
        fn = functools.partial(ENGINES[engine], op=op, geo=geo, in_hw=in_hw)
    return mlir.lower_fun(fn, multiple_results=False)(ctx, a, b)


mlir.register_lowering(conv_p, mlir.lower_fun(_lax, multiple_results=False))
mlir.register_lowering(conv_p, _cpu_lowering, platform="cpu")


# ------------------------------------------------------------------------------------ autodiff
# conv_p(a, b) is linear in a and in b; the adjoint of each operand is another op of conv_p:
#   fwd(x, w):         x <- bwd_data(ct, w)        w <- bwd_weights(x, ct)
#   bwd_data(gy, w):   gy <- fwd(ct, w)            w <- bwd_weights(ct, gy)
#   bwd_weights(x, gy): x <- bwd_data(gy, ct)      gy <- fwd(x, ct)

def _transpose_lhs(ct, a, b, *, op, geo, in_hw, lowering, precision):
    kw = dict(geo=geo, lowering=lowering, precision=precision)
    if op == "fwd":
        return bind("bwd_data", ct, b, in_hw=a.aval.shape[1:3], **kw)
    if op == "bwd_data":
        return bind("fwd", ct, b, **kw)
    return bind("bwd_data", b, ct, in_hw=a.aval.shape[1:3], **kw)


def _transpose_rhs(ct, a, b, *, op, geo, in_hw, lowering, precision):
    kw = dict(geo=geo, lowering=lowering, precision=precision)
    if op == "fwd":
        return bind("bwd_weights", a, ct, **kw)
    if op == "bwd_data":
        return bind("bwd_weights", ct, a, **kw)
    return bind("fwd", a, ct, **kw)


ad.defbilinear(conv_p, _transpose_lhs, _transpose_rhs)


# ------------------------------------------------------------------------------------ batching

def _batch_rule(args, dims, *, op, geo, in_hw, lowering, precision):
    """vmap: a batch axis on the activation operand of fwd / bwd_data folds into N; any other
    combination maps the primitive over the batch axis on CPU (a loop, as lax.map) and is lax's
    own batched convolution elsewhere (grouped, as cuDNN likes it)."""
    a, b = args
    da, db = dims
    params = dict(op=op, geo=geo, in_hw=in_hw, lowering=lowering, precision=precision)
    if db is None and op in ("fwd", "bwd_data"):
        a = jnp.moveaxis(a, da, 0)
        k, n = a.shape[:2]
        out = conv_p.bind(a.reshape(k * n, *a.shape[2:]), b, **params)
        return out.reshape(k, n, *out.shape[1:]), 0
    size = a.shape[da] if da is not None else b.shape[db]

    def cpu(a, b):
        ab = batching.bdim_at_front(a, da, size), batching.bdim_at_front(b, db, size)
        return lax.map(lambda ab: conv_p.bind(*ab, **params), ab)
    default = jax.vmap(functools.partial(_lax, op=op, geo=geo, in_hw=in_hw, precision=precision),
                       in_axes=(da, db))
    return lax.platform_dependent(a, b, cpu=cpu, default=default), 0


batching.primitive_batchers[conv_p] = _batch_rule
