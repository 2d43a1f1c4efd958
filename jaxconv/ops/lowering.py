"""How ``ops.conv2d`` / ``ops.conv_transpose2d`` (and, as a drop-in, ``nnx.Conv``) compute a
convolution, per backend.

On every backend but CPU: lax's convolution (cuDNN and the TPU compiler have fast kernels for
every variant). On CPU, XLA's own convolution is slow for grouped and depthwise convs (it
expands them into dense convs with block-diagonal kernels, and its weight gradient into
something far worse), for few input channels and, in its backward pass, generally; so CPU convs
go through ``jaxconv.ops.cpu_conv.conv_p`` (oneDNN or jaxconv's kernel, pass by pass, as
``jaxconv.ops.policy`` decides) or, for 1x1 convs, a matrix product.

``jaxconv.config.conv_lowering`` (or the ``lowering`` argument) forces one engine instead of
'auto': 'xla' (lax everywhere, the reference), 'onednn' or 'kernel' (CPU; passes the engine
cannot compute, e.g. oneDNN in float64, use lax). The choice is read when a function is traced.

``conv_p`` itself lowers to lax's convolution on every platform but CPU (with the precision in
force where the conv was traced), so a computation a CPU-default process lowers for GPU/TPU
(``jax.export``) keeps cuDNN's kernels. Where lax's convolution would be called otherwise than
conv_p's (a float32 result of bfloat16 inputs) or the CPU computes in another dtype (bfloat16
in float32 on CPUs without AVX512-BF16), the CPU formulation sits in a
``lax.platform_dependent`` branch whose other branch is lax's convolution; processes whose
default backend is not CPU trace lax only. ``jax.export`` of a computation lowered for CPU
needs ``disabled_checks=EXPORT_CHECKS`` (this package's FFI targets carry no cross-version
guarantee).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv import config
from jaxconv.ops import native
from jaxconv.ops._args import accumulation
from jaxconv.ops.cpu_conv import DIMS, Geometry, bind

EXPORT_CHECKS = [jax.export.DisabledSafetyCheck.custom_call(t) for t in native.TARGETS]


def _compute_dtype(dtype, lowering: str):
    """The dtype a CPU conv of `dtype` inputs computes in under `lowering`: bfloat16 itself
    where oneDNN computes it natively (CPUs with AVX512-BF16; as torch does there), else
    floating inputs below 32 bits in float32; None: not a floating dtype (lax only)."""
    if not jnp.issubdtype(dtype, jnp.floating):
        return None
    if (dtype == jnp.bfloat16 and lowering in ("auto", "onednn") and native.bf16()
            and native.available("onednn")):
        return dtype
    return jnp.promote_types(dtype, jnp.float32)


def on_cpu(x, w, cpu_fn, lax_fn):
    """cpu_fn where the computation is lowered for CPU, lax_fn on any other platform."""
    if jax.default_backend() != "cpu":
        return lax_fn(x, w)
    return lax.platform_dependent(x, w, cpu=cpu_fn, default=lax_fn)


def conv(x, w, geo: Geometry, *, preferred_element_type=None, precision=None,
         lowering: str | None = None, rounded: bool = False):
    """``lax.conv_general_dilated(x, w, geo.stride, geo.pads, rhs_dilation=geo.dilation,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=geo.groups)``, computed as
    the configured lowering says, in `preferred_element_type` or x's dtype; `rounded`: in x's
    dtype however it accumulated (what ops.conv2d wants). On CPU, low-precision inputs are
    computed in float32, or in bfloat16 natively (``_compute_dtype``) where the result is
    bfloat16."""
    name = config.check_conv_lowering(config.conv_lowering if lowering is None else lowering)
    out_dtype = x.dtype if rounded else preferred_element_type or x.dtype

    def native_conv(x, w):
        return lax.conv_general_dilated(x, w, geo.stride, geo.pads, None, geo.dilation, DIMS,
                                        feature_group_count=geo.groups, precision=precision,
                                        preferred_element_type=preferred_element_type
                                        ).astype(out_dtype)

    ct = _compute_dtype(x.dtype, name)
    if ct == x.dtype and jnp.dtype(out_dtype) != x.dtype:
        ct = jnp.promote_types(x.dtype, jnp.float32)   # a wider result: float32 products
    if name == "xla" or ct is None or jax.default_backend() != "cpu":
        return native_conv(x, w)
    if ct == x.dtype == jnp.dtype(out_dtype) and preferred_element_type in (None, x.dtype):
        # conv_p is lax's convolution off CPU: no platform branch (its linearisation was a
        # third of the time to trace a ResNeXt-50 train step)
        return bind("fwd", x, w, geo, lowering=name, precision=_precision(precision))

    def cpu(x, w):
        return bind("fwd", x.astype(ct), w.astype(ct), geo, lowering=name).astype(out_dtype)
    return on_cpu(x, w, cpu, native_conv)


def conv_transpose(x, w, geo: Geometry, out_hw, *, lowering: str | None = None):
    """The transposed convolution: the adjoint of ``conv(., w, geo)`` (from an input of spatial
    size `out_hw`) applied to `x`; torch's conv_transpose2d with its padding in `geo.pads`."""
    name = config.check_conv_lowering(config.conv_lowering if lowering is None else lowering)

    def native_tconv(x, w):
        y = jax.ShapeDtypeStruct((x.shape[0], *out_hw, w.shape[2] * geo.groups), x.dtype)
        return jax.linear_transpose(lambda y: lax.conv_general_dilated(
            y, w, geo.stride, geo.pads, None, geo.dilation, DIMS,
            feature_group_count=geo.groups, preferred_element_type=accumulation(x.dtype)
        ).astype(x.dtype), y)(x)[0]

    ct = _compute_dtype(x.dtype, name)
    if name == "xla" or ct is None or jax.default_backend() != "cpu":
        return native_tconv(x, w)
    if ct == x.dtype and accumulation(x.dtype) is None:   # conv_p is lax's convolution off CPU
        return bind("bwd_data", x, w, geo, in_hw=out_hw, lowering=name, precision=_precision(None))

    def cpu(x, w):
        return bind("bwd_data", x.astype(ct), w.astype(ct), geo, in_hw=out_hw,
                    lowering=name).astype(x.dtype)
    return on_cpu(x, w, cpu, native_tconv)


def _precision(precision):
    """`precision`, or the default in force now (`jax.default_matmul_precision`), which lax
    reads when a conv is traced: conv_p is lowered later, maybe outside that context."""
    return jax.config.jax_default_matmul_precision if precision is None else precision


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs):
    """Drop-in for ``lax.conv_general_dilated`` (e.g. ``nnx.Conv(...,
    conv_general_dilated=jaxconv.ops.lowering.conv_general_dilated)``): 2-D NHWC / HWIO
    convolutions go through ``conv`` (this module's lowering); everything else straight to lax."""
    routed = (batch_group_count == 1 and lhs.ndim == 4
              and all(d == 1 for d in (lhs_dilation or (1, 1)))
              and not any(v is not None for v in kwargs.values())
              and _is_nhwc(lhs.ndim, dimension_numbers))
    if not routed:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
            **{k: v for k, v in kwargs.items() if v is not None})
    dilation = tuple(rhs_dilation or (1, 1))
    if isinstance(padding, str):
        window = [d * (k - 1) + 1 for k, d in zip(rhs.shape[:2], dilation)]
        padding = lax.padtype_to_pads(lhs.shape[1:3], window, window_strides, padding)
    geo = Geometry(tuple(rhs.shape[:2]), tuple(window_strides),
                   tuple(tuple(p) for p in padding), dilation, feature_group_count)
    return conv(lhs, rhs, geo, preferred_element_type=preferred_element_type,
                precision=precision)


def _is_nhwc(ndim: int, dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    return dn == lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, DIMS)
