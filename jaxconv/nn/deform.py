"""Deformable convolution layers (DCNv1 / DCNv2) over `jaxconv.ops.deform_conv2d`.

Parameter paths mirror the torch state_dicts so `jaxconv.convert.from_torch` loads them:

| layer                      | torch counterpart                          | parameters                          |
|----------------------------|--------------------------------------------|-------------------------------------|
| DeformConv2d               | torchvision.ops.DeformConv2d               | kernel, bias                        |
| DeformConv2dPack           | mmcv.ops.DeformConv2dPack ('DCN')          | kernel, [bias], conv_offset.{kernel,bias} |
| ModulatedDeformConv2dPack  | mmcv.ops.ModulatedDeformConv2dPack ('DCNv2') | kernel, bias, conv_offset.{kernel,bias} |

The Pack layers predict the offset (DCNv1) or offset and mask (DCNv2) with a regular conv of the
same kernel size, stride, padding and dilation, initialised to zero: at init the offsets are 0
(and the DCNv2 mask sigmoid(0) = 0.5), so DCNv1 equals a plain conv and DCNv2 half of one.
DCNv2's conv_offset has 3*G*kh*kw output channels: [0, 2*G*kh*kw) is the offset in
torchvision's channel order and [2*G*kh*kw, 3*G*kh*kw) the mask logits (mmcv's
`o1, o2, m = chunk(out, 3); offset = cat(o1, o2); mask = sigmoid(m)`).
"""
from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
from flax import nnx

from jaxconv.nn import init as initializers
from jaxconv.nn.conv import Conv2d
from jaxconv.ops._args import pair
from jaxconv.ops.deform import DEFAULT_CHUNK_ELEMENTS, deform_conv2d

__all__ = ["DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack"]


def _positive_int(value, name):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class _DeformBase(nnx.Module):
    def _setup(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
               offset_groups, bias, dtype, param_dtype, kernel_init, bias_init, chunk_elements,
               rngs, default_kernel_init, default_bias_init):
        groups = _positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: in_channels ({in_channels}) and out_channels "
                             f"({out_channels}) must both be divisible by groups={groups}")
        if offset_groups is not None:
            offset_groups = _positive_int(offset_groups, "offset_groups")
            if in_channels % offset_groups:
                raise ValueError(f"offset_groups: expected a divisor of in_channels="
                                 f"{in_channels}, got {offset_groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.offset_groups = groups, offset_groups
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.stride = pair(stride, "stride", minimum=1)
        self.padding = pair(padding, "padding", minimum=0)
        self.dilation = pair(dilation, "dilation", minimum=1)
        self.dtype, self.param_dtype, self.chunk_elements = dtype, param_dtype, chunk_elements
        shape = (*self.kernel_size, in_channels // groups, out_channels)
        self.kernel = nnx.Param((kernel_init or default_kernel_init)(rngs.params(), shape,
                                                                     param_dtype))
        self.bias = (nnx.Param((bias_init or default_bias_init)(rngs.params(), (out_channels,),
                                                               param_dtype)) if bias else None)

    def _deform(self, x, offset, mask):
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        if self.dtype is not None:   # the bias stays: ops add it in float32 (ops.conv.add_bias)
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return deform_conv2d(x, offset, kernel, bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask,
                             chunk_elements=self.chunk_elements)


class DeformConv2d(_DeformBase):
    """torchvision.ops.DeformConv2d on NHWC: `layer(x, offset, mask=None)`.

    kernel: (kh, kw, in_channels/groups, out_channels). `offset_groups=None` infers the offset
    groups from the offset's channels (as torchvision does); an int checks them.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, offset_groups: int | None = None,
                 bias: bool = True, *, dtype=None, param_dtype=jnp.float32, kernel_init=None,
                 bias_init=None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, rngs: nnx.Rngs):
        kh, kw = pair(kernel_size, "kernel_size", minimum=1)
        default = initializers.torch_default(in_channels // max(groups, 1) * kh * kw)
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                    offset_groups, bias, dtype, param_dtype, kernel_init, bias_init,
                    chunk_elements, rngs, default, default)

    def __call__(self, x, offset, mask=None):
        if self.offset_groups is not None:
            expected = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
            if offset.shape[-1] != expected:
                raise ValueError(f"offset: expected {expected} channels (2*offset_groups*kh*kw "
                                 f"with offset_groups={self.offset_groups}), got "
                                 f"{offset.shape[-1]}")
        return self._deform(x, offset, mask)


class _Pack(_DeformBase):
    _parts = 2  # conv_offset output channels per (offset group, tap)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, offset_groups: int = 1, bias: bool = False, *,
                 dtype=None, param_dtype=jnp.float32, kernel_init=None, bias_init=None,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, rngs: nnx.Rngs):
        kh, kw = pair(kernel_size, "kernel_size", minimum=1)
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                    offset_groups, bias, dtype, param_dtype, kernel_init, bias_init,
                    chunk_elements, rngs, self._default_kernel_init(in_channels, groups, kh * kw),
                    nnx.initializers.zeros)
        zeros = nnx.initializers.zeros
        self.conv_offset = Conv2d(in_channels, self.offset_groups * self._parts * kh * kw,
                                  self.kernel_size, self.stride, self.padding, self.dilation,
                                  bias=True, dtype=dtype, param_dtype=param_dtype,
                                  kernel_init=zeros, bias_init=zeros, rngs=rngs)


class DeformConv2dPack(_Pack):
    """mmcv's DeformConv2dPack ('DCN', DCNv1) on NHWC: offsets predicted from x by `conv_offset`.

    `layer(x)`. mmcv's layer has no bias (`bias=False`, the default); `bias=True` adds one.
    Kernel init as mmcv: kaiming_uniform (relu gain), U(+-sqrt(6 / fan_in)).
    """

    _parts = 2

    @staticmethod
    def _default_kernel_init(in_channels, groups, taps):
        return initializers.uniform(math.sqrt(6.0 / (in_channels // groups * taps)))

    def __call__(self, x):
        return self._deform(x, self.conv_offset(x), None)


class ModulatedDeformConv2dPack(_Pack):
    """mmcv's ModulatedDeformConv2dPack ('DCNv2') on NHWC: offset and sigmoid mask from x.

    `layer(x)`; `bias=True` by default as in mmcv. Kernel init as mmcv: U(+-1/sqrt(in*kh*kw)),
    bias 0.
    """

    _parts = 3

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, offset_groups: int = 1, bias: bool = True, **kw):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, offset_groups, bias, **kw)

    @staticmethod
    def _default_kernel_init(in_channels, groups, taps):
        return initializers.uniform(1.0 / math.sqrt(in_channels * taps))

    def __call__(self, x):
        out = self.conv_offset(x)
        n_offset = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, mask = out[..., :n_offset], out[..., n_offset:]
        return self._deform(x, offset, nnx.sigmoid(mask))
