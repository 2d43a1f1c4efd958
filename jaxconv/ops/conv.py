"""2-D convolution and transposed convolution with torch.nn.functional semantics on NHWC / HWIO.

Every torch variant is `conv2d` with some arguments: pointwise (1x1 kernel), grouped (`groups`),
depthwise (`groups == in_channels`, out = in x depth multiplier), dilated (`dilation`) and
asymmetric (1xk / kx1 kernels) convolutions.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import jax.numpy as jnp

from jaxconv.ops import lowering
from jaxconv.ops._args import accumulation, check_rank, pair
from jaxconv.ops.cpu_conv import Geometry

Pad = tuple[tuple[int, int], tuple[int, int]]
PAD_MODES = {"zeros": None, "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def conv_padding(padding, kernel_size: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> Pad:
    """torch's `padding` argument (int, pair, 'same', 'valid') as explicit ((top, bottom), (left, right))."""
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding != "same":
            raise ValueError(f"padding: expected an int, a pair, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding: 'same' needs stride 1 (as in torch), got stride={stride}")
        extent = tuple(d * (k - 1) for k, d in zip(kernel_size, dilation))
        if any(e % 2 for e in extent):
            raise ValueError(
                "padding: 'same' needs an odd effective kernel size (dilation*(kernel-1)+1) so that "
                f"padding is symmetric, got kernel_size={kernel_size}, dilation={dilation}")
        return tuple((e // 2, e // 2) for e in extent)
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding: expected non-negative values, got {padding!r}")
    return ((ph, ph), (pw, pw))


def pad_input(x, pads: Pad, padding_mode: str):
    """Pad the H and W axes of NHWC `x` like torch's non-zero padding modes."""
    if padding_mode not in PAD_MODES:
        raise ValueError(f"padding_mode: expected one of {sorted(PAD_MODES)}, got {padding_mode!r}")
    mode = PAD_MODES[padding_mode]
    if mode is None or not any(p for side in pads for p in side):
        return x
    for axis, (lo, hi) in zip((1, 2), pads):
        size = x.shape[axis]
        limit = size - 1 if mode == "reflect" else size if mode == "wrap" else None
        if limit is not None and max(lo, hi) > limit:
            raise ValueError(
                f"padding: {padding_mode} padding of {max(lo, hi)} needs an input dimension of at "
                f"least {max(lo, hi) + (mode == 'reflect')}, got size {size} on axis {axis} (NHWC)")
    return jnp.pad(x, ((0, 0), *pads, (0, 0)), mode=mode)


def _groups(groups) -> int:
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    return int(groups)


def _check_output_size(in_hw: Sequence[int], out_hw: Sequence[int], what: str) -> None:
    if min(out_hw) < 1:
        raise ValueError(f"padding: {what} gives an empty output {tuple(out_hw)} for input size "
                         f"{tuple(in_hw)}; the kernel is larger than the padded input")


def add_bias(y, bias, channels: int):
    """`y` + `bias` (`channels` values) over the last axis, in y's dtype. A 16-bit `y` gets the
    bias added in float32, so that the bias gradient, a sum over every other axis, accumulates
    in float32: XLA sums a bfloat16 cotangent in bfloat16, where a sum of 25,088 values near 1
    stalls at 4,416 (parity_tests/test_layers.py, bias gradients)."""
    if bias is None:
        return y
    if bias.shape != (channels,):
        raise ValueError(f"bias: expected shape ({channels},), got {tuple(bias.shape)}")
    acc = accumulation(y.dtype) or y.dtype
    return (y.astype(acc) + bias.astype(acc)).astype(y.dtype)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           padding_mode: str = "zeros"):
    """torch.nn.functional.conv2d on NHWC `x` with HWIO `weight` of shape (kh, kw, C_in/groups, C_out).

    `padding` is an int, a pair, 'same' (stride 1, symmetric) or 'valid'; `padding_mode` is torch's
    zeros / reflect / replicate / circular.
    """
    check_rank(x, 4, "x", "NHWC")
    check_rank(weight, 4, "weight", "HWIO: (kh, kw, C_in/groups, C_out)")
    kh, kw, cin_per_group, cout = weight.shape
    stride = pair(stride, "stride", minimum=1)
    dilation = pair(dilation, "dilation", minimum=1)
    groups = _groups(groups)
    cin = x.shape[-1]
    if cin % groups or cout % groups:
        raise ValueError(f"groups: input channels ({cin}) and output channels ({cout}) must both be "
                         f"divisible by groups={groups}")
    if cin != cin_per_group * groups:
        raise ValueError(
            f"x: expected {cin_per_group * groups} channels on the last axis (NHWC; weight has "
            f"{cin_per_group} input channels per group x groups={groups}), got {cin} in shape "
            f"{tuple(x.shape)}; an NCHW input shows up this way")
    pads = conv_padding(padding, (kh, kw), stride, dilation)
    if padding_mode != "zeros":
        x, pads = pad_input(x, pads, padding_mode), ((0, 0), (0, 0))
    in_hw = x.shape[1:3]
    out_hw = [(n + lo + hi - d * (k - 1) - 1) // s + 1
              for n, (lo, hi), k, d, s in zip(in_hw, pads, (kh, kw), dilation, stride)]
    _check_output_size(in_hw, out_hw, f"kernel_size={(kh, kw)}, dilation={dilation}, padding={pads}")
    dtype = jnp.result_type(x, weight)
    # the backend-aware lowering of ops/lowering.py (lax's convolution on GPU / TPU)
    y = lowering.conv(x.astype(dtype), weight.astype(dtype),
                      Geometry((kh, kw), stride, tuple(pads), dilation, groups),
                      preferred_element_type=accumulation(dtype), rounded=True)
    return add_bias(y.astype(dtype), bias, cout)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """torch.nn.functional.conv_transpose2d on NHWC `x`.

    `weight` has shape (kh, kw, C_out/groups, C_in): the HWIO kernel of the convolution
    C_out -> C_in whose adjoint this is, i.e. torch's (C_in, C_out/groups, kh, kw) weight under
    the same OIHW -> HWIO transpose as a regular conv.
    """
    check_rank(x, 4, "x", "NHWC")
    check_rank(weight, 4, "weight", "(kh, kw, C_out/groups, C_in)")
    kh, kw, cout_per_group, cin = weight.shape
    stride = pair(stride, "stride", minimum=1)
    dilation = pair(dilation, "dilation", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    output_padding = pair(output_padding, "output_padding", minimum=0)
    groups = _groups(groups)
    if x.shape[-1] != cin:
        raise ValueError(f"x: expected {cin} channels on the last axis (NHWC, weight's last axis), "
                         f"got {x.shape[-1]} in shape {tuple(x.shape)}; an NCHW input shows up this way")
    if cin % groups:
        raise ValueError(f"groups: input channels ({cin}) must be divisible by groups={groups}")
    for op, s, d in zip(output_padding, stride, dilation):
        if op >= max(s, d):
            raise ValueError(f"output_padding: expected values smaller than stride or dilation "
                             f"({stride}, {dilation}), got {output_padding}")
    in_hw = x.shape[1:3]
    out_hw = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, p, d, k, op
              in zip(in_hw, stride, padding, dilation, (kh, kw), output_padding)]
    _check_output_size(in_hw, out_hw, f"padding={padding} with kernel_size={(kh, kw)}")
    # the adjoint of the convolution C_out -> C_in (out_hw -> in_hw) with this kernel; an
    # output_padding of a stride or more (possible when dilation > stride) is extra zero rows
    # of x that conv reaches
    extra = [op // s for op, s in zip(output_padding, stride)]
    if any(extra):
        x = jnp.pad(x, ((0, 0), (0, extra[0]), (0, extra[1]), (0, 0)))
    dtype = jnp.result_type(x, weight)
    geo = Geometry((kh, kw), stride, tuple((p, p) for p in padding), dilation, groups)
    y = lowering.conv_transpose(x.astype(dtype), weight.astype(dtype), geo, tuple(out_hw))
    return add_bias(y, bias, groups * cout_per_group)
