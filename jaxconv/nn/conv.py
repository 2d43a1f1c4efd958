"""Convolution layers shaped like torch.nn: same argument names and order, parameters `kernel`
(HWIO) and `bias`, so a torch state_dict converts with one rule table."""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from jaxconv import ops
from jaxconv.nn import init as initializers
from jaxconv.ops._args import pair
from jaxconv.ops.conv import PAD_MODES, conv_padding


def _check_divisible(in_channels: int, out_channels: int, groups: int) -> None:
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups: in_channels ({in_channels}) and out_channels ({out_channels}) "
                         f"must both be divisible by groups={groups}")


class _ConvBase(nnx.Module):
    """Parameters, dtype handling and initialisation shared by Conv2d and ConvTranspose2d."""

    def _make_params(self, shape, bias, kernel_init, bias_init, dtype, param_dtype, rngs):
        """kernel of `shape` and bias of out_channels; torch's default init uses the fan-in of
        everything but the kernel's last axis (for a transposed kernel: out_channels / groups)."""
        self.dtype, self.param_dtype = dtype, param_dtype
        default = initializers.torch_default(math.prod(shape[:-1]))
        self.kernel = nnx.Param((kernel_init or default)(rngs.params(), shape, param_dtype))
        self.bias = (nnx.Param((bias_init or default)(rngs.params(), (self.out_channels,),
                                                       param_dtype)) if bias else None)

    def _params(self, x):
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        if self.dtype is not None:   # the bias stays: ops add it in float32 (ops.conv.add_bias)
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return x, kernel, bias


class Conv2d(_ConvBase):
    """torch.nn.Conv2d on NHWC input. kernel: (kh, kw, in_channels/groups, out_channels)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 dtype=None, param_dtype=jnp.float32, kernel_init=None, bias_init=None,
                 rngs: nnx.Rngs):
        _check_divisible(in_channels, out_channels, groups)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.stride = pair(stride, "stride", minimum=1)
        self.dilation = pair(dilation, "dilation", minimum=1)
        conv_padding(padding, self.kernel_size, self.stride, self.dilation)  # fail early
        if padding_mode not in PAD_MODES:
            raise ValueError(f"padding_mode: expected one of {sorted(PAD_MODES)}, got {padding_mode!r}")
        self.padding, self.padding_mode = padding, padding_mode
        shape = (*self.kernel_size, in_channels // groups, out_channels)
        self._make_params(shape, bias, kernel_init, bias_init, dtype, param_dtype, rngs)

    def __call__(self, x):
        x, kernel, bias = self._params(x)
        return ops.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation, self.groups,
                          self.padding_mode)


class ConvTranspose2d(_ConvBase):
    """torch.nn.ConvTranspose2d on NHWC input. kernel: (kh, kw, out_channels/groups, in_channels),
    torch's (in, out/groups, kh, kw) weight under the conv transpose rule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 output_padding=0, groups: int = 1, bias: bool = True, dilation=1,
                 padding_mode: str = "zeros", *, dtype=None, param_dtype=jnp.float32,
                 kernel_init=None, bias_init=None, rngs: nnx.Rngs):
        _check_divisible(in_channels, out_channels, groups)
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: ConvTranspose2d supports only 'zeros' (as torch), "
                             f"got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.stride = pair(stride, "stride", minimum=1)
        self.padding = pair(padding, "padding", minimum=0)
        self.output_padding = pair(output_padding, "output_padding", minimum=0)
        self.dilation = pair(dilation, "dilation", minimum=1)
        shape = (*self.kernel_size, out_channels // groups, in_channels)
        self._make_params(shape, bias, kernel_init, bias_init, dtype, param_dtype, rngs)

    def __call__(self, x):
        x, kernel, bias = self._params(x)
        return ops.conv_transpose2d(x, kernel, bias, self.stride, self.padding,
                                    self.output_padding, self.groups, self.dilation)


class DepthwiseConv2d(Conv2d):
    """Depthwise conv: each input channel convolved with `depth_multiplier` filters of its own
    (torch: nn.Conv2d(in, in * depth_multiplier, k, groups=in))."""

    def __init__(self, in_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 depth_multiplier: int = 1, bias: bool = True, padding_mode: str = "zeros", **kw):
        super().__init__(in_channels, in_channels * depth_multiplier, kernel_size, stride, padding,
                         dilation, in_channels, bias, padding_mode, **kw)


class PointwiseConv2d(Conv2d):
    """1x1 conv mixing channels at each pixel (torch: nn.Conv2d(in, out, 1))."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, **kw):
        super().__init__(in_channels, out_channels, 1, bias=bias, **kw)


class SeparableConv2d(nnx.Module):
    """Depthwise separable conv: `depthwise` (k x k per channel, x depth_multiplier) then
    `pointwise` (1x1), costing about 1/out + 1/k^2 of a standard conv's multiply-adds.

    `pointwise_first=True` is Xception's "extreme Inception" order: the 1x1 conv first (to
    out_channels / depth_multiplier), then the depthwise conv, with no nonlinearity between.
    `bias` applies to both convs, as in torch code that stacks two nn.Conv2d.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, depth_multiplier: int = 1, bias: bool = True,
                 pointwise_first: bool = False, *, rngs: nnx.Rngs, **kw):
        self.pointwise_first = pointwise_first
        depthwise = lambda c: DepthwiseConv2d(c, kernel_size, stride, padding, dilation,  # noqa: E731
                                              depth_multiplier, bias, rngs=rngs, **kw)
        if pointwise_first:
            if out_channels % depth_multiplier:
                raise ValueError(f"out_channels: expected a multiple of depth_multiplier="
                                 f"{depth_multiplier} with pointwise_first, got {out_channels}")
            self.pointwise = PointwiseConv2d(in_channels, out_channels // depth_multiplier, bias,
                                             rngs=rngs, **kw)
            self.depthwise = depthwise(out_channels // depth_multiplier)
        else:
            self.depthwise = depthwise(in_channels)
            self.pointwise = PointwiseConv2d(in_channels * depth_multiplier, out_channels, bias,
                                             rngs=rngs, **kw)

    def __call__(self, x):
        if self.pointwise_first:
            return self.depthwise(self.pointwise(x))
        return self.pointwise(self.depthwise(x))
