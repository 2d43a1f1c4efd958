"""NNX layers over jaxconv.ops with torch.nn's constructors and torch-mirroring parameter paths."""
from jaxconv.nn.conv import Conv2d, ConvTranspose2d, DepthwiseConv2d, PointwiseConv2d, SeparableConv2d
from jaxconv.nn.deform import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack
from jaxconv.nn.linear import Dropout, Linear, Sequential
from jaxconv.nn.norm import BatchNorm2d
from jaxconv.nn.pool import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d

__all__ = ["Conv2d", "ConvTranspose2d", "DepthwiseConv2d", "PointwiseConv2d", "SeparableConv2d",
           "DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack",
           "BatchNorm2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Linear", "Dropout",
           "Sequential"]
