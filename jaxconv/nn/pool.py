"""Pooling layers shaped like torch.nn (no parameters), over jaxconv.ops on NHWC input."""
from __future__ import annotations

from flax import nnx

from jaxconv import ops


class MaxPool2d(nnx.Module):
    """torch.nn.MaxPool2d: padding counts as -inf, `ceil_mode` as in torch."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    def __call__(self, x):
        return ops.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                              self.ceil_mode)


class AvgPool2d(nnx.Module):
    """torch.nn.AvgPool2d with `ceil_mode`, `count_include_pad` and `divisor_override`."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: int | None = None):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        self.divisor_override = divisor_override

    def __call__(self, x):
        return ops.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                              self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool2d(nnx.Module):
    """torch.nn.AdaptiveAvgPool2d: torch's (possibly overlapping, uneven) windows."""

    def __init__(self, output_size):
        self.output_size = output_size

    def __call__(self, x):
        return ops.adaptive_avg_pool2d(x, self.output_size)
