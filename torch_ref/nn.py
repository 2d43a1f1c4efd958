"""torch counterparts of jaxconv.nn's conv layers that torch.nn lacks, with the same names."""
from __future__ import annotations

from torch import nn


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d(in, in * depth_multiplier, k, groups=in)."""

    def __init__(self, in_channels, kernel_size, stride=1, padding=0, dilation=1,
                 depth_multiplier=1, bias=True, padding_mode="zeros"):
        super().__init__(in_channels, in_channels * depth_multiplier, kernel_size, stride, padding,
                         dilation, in_channels, bias, padding_mode)


class PointwiseConv2d(nn.Conv2d):
    """nn.Conv2d(in, out, 1)."""

    def __init__(self, in_channels, out_channels, bias=True):
        super().__init__(in_channels, out_channels, 1, bias=bias)


class SeparableConv2d(nn.Module):
    """`depthwise` then `pointwise`; `pointwise_first` is Xception's order (1x1 first, to
    out_channels / depth_multiplier), with no nonlinearity between."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 depth_multiplier=1, bias=True, pointwise_first=False):
        super().__init__()
        self.pointwise_first = pointwise_first
        if pointwise_first:
            self.pointwise = PointwiseConv2d(in_channels, out_channels // depth_multiplier, bias)
            self.depthwise = DepthwiseConv2d(out_channels // depth_multiplier, kernel_size, stride,
                                             padding, dilation, depth_multiplier, bias)
        else:
            self.depthwise = DepthwiseConv2d(in_channels, kernel_size, stride, padding, dilation,
                                             depth_multiplier, bias)
            self.pointwise = PointwiseConv2d(in_channels * depth_multiplier, out_channels, bias)

    def forward(self, x):
        if self.pointwise_first:
            return self.depthwise(self.pointwise(x))
        return self.pointwise(self.depthwise(x))
