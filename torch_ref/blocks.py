"""The Inception -> Xception family (Xception paper, Figures 1-4) and the three ResNeXt block
forms (ResNeXt paper, Figure 3) in PyTorch, mirroring jaxconv.nn.blocks name for name."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU (`conv`, `bn`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
                 eps=1e-5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionModule(nn.Module):
    """Figure 1: 1x1 | 1x1->3x3 | 1x1->3x3->3x3 | avgpool->1x1, concatenated."""

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch3x3dbl_red, ch3x3dbl, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, 1),
                                     BasicConv2d(ch3x3red, ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch3x3dbl_red, 1),
                                     BasicConv2d(ch3x3dbl_red, ch3x3dbl, 3, padding=1),
                                     BasicConv2d(ch3x3dbl, ch3x3dbl, 3, padding=1))
        self.branch4 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1),
                                     BasicConv2d(in_channels, pool_proj, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class SimplifiedInception(nn.Module):
    """Figure 2: independent 1x1 -> 3x3 towers, concatenated."""

    def __init__(self, in_channels, reduce_channels, out_channels, towers=3):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(BasicConv2d(in_channels, reduce_channels, 1),
                          BasicConv2d(reduce_channels, out_channels, 3, padding=1))
            for _ in range(towers))

    def forward(self, x):
        return torch.cat([tower(x) for tower in self.towers], 1)


class SegmentedInception(nn.Module):
    """Figure 3: a large 1x1 conv, then a 3x3 conv over `segments` channel segments."""

    def __init__(self, in_channels, mid_channels, out_channels, segments=3):
        super().__init__()
        self.reduce = BasicConv2d(in_channels, mid_channels, 1)
        self.spatial = BasicConv2d(mid_channels, out_channels, 3, padding=1, groups=segments)

    def forward(self, x):
        return self.spatial(self.reduce(x))


class ExtremeInception(SegmentedInception):
    """Figure 4: segments = channels (1x1 conv, then depthwise 3x3)."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, out_channels, segments=out_channels)


def _downsample(in_channels, out_channels, stride):
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class _ResNeXtBase(nn.Module):
    def _residual(self, x, y):
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn3(y) + shortcut)


class _Path(nn.Module):
    def __init__(self, in_channels, width, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False) if out_channels is not None else None

    def forward(self, x):
        y = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return y if self.conv3 is None else self.conv3(y)


class ResNeXtBlockA(_ResNeXtBase):
    """Form (a): explicit paths summed."""

    def __init__(self, in_channels, out_channels, cardinality=32, width=4, stride=1):
        super().__init__()
        self.paths = nn.ModuleList(_Path(in_channels, width, out_channels, stride)
                                   for _ in range(cardinality))
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x):
        return self._residual(x, sum(path(x) for path in self.paths))


class ResNeXtBlockB(_ResNeXtBase):
    """Form (b): paths concatenated, then one 1x1 conv."""

    def __init__(self, in_channels, out_channels, cardinality=32, width=4, stride=1):
        super().__init__()
        self.paths = nn.ModuleList(_Path(in_channels, width, None, stride)
                                   for _ in range(cardinality))
        self.conv3 = nn.Conv2d(cardinality * width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x):
        return self._residual(x, self.conv3(torch.cat([p(x) for p in self.paths], 1)))


class ResNeXtBlockC(_ResNeXtBase):
    """Form (c): 1x1 -> grouped 3x3 -> 1x1 (torchvision's Bottleneck layout)."""

    def __init__(self, in_channels, out_channels, cardinality=32, width=4, stride=1):
        super().__init__()
        inner = cardinality * width
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return self._residual(x, self.conv3(y))
