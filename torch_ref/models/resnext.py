"""ResNeXt (Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks"),
in torchvision's ResNet layout so torchvision 0.28 checkpoints load with strict=True.

    stage    output (224 input)   blocks            bottleneck (1x1, 3x3 grouped, 1x1)
    stem     64 x 112 x 112       7x7/2 conv, BN, ReLU, then 3x3/2 max pool
    layer1   256 x 56 x 56        n1                width,  width,  256
    layer2   512 x 28 x 28        n2                2width, 2width, 512
    layer3   1024 x 14 x 14       n3                4width, 4width, 1024
    layer4   2048 x 7 x 7         n4                8width, 8width, 2048
    head     global average pool, dropout (drop_rate), fc

with width = groups * width_per_group (e.g. 32x4d: 128). The stride of a stage sits on the 3x3
grouped conv of its first block; the shortcut is then a strided 1x1 conv + BN ("downsample").
BatchNorm uses torch defaults (eps 1e-5, momentum 0.1).
"""

from __future__ import annotations

import torch
from torch import nn

from torch_ref.deform import ModulatedDeformConv2dPack
from torch_ref.models import check_input, register_model

__all__ = ["Bottleneck", "ResNeXt", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
           "resnext152_32x4d"]


# ----------------------------------------------------------------------------------- layers

class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 grouped conv (carries the stride) -> 1x1 expand, plus shortcut.

    Output channels are ``planes * 4``; the inner width is
    ``int(planes * width_per_group / 64) * groups``.
    """

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, groups: int = 1,
                 width_per_group: int = 64, dcn: bool = False):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # DCN stages: the grouped 3x3 becomes a modulated deformable conv (mmdet's DCNv2 with
        # deform_groups=1; its zero-initialised conv_offset predicts offsets and mask).
        self.conv2 = (ModulatedDeformConv2dPack(width, width, 3, stride, 1, groups=groups, bias=False)
                      if dcn else nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups,
                                            bias=False))
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU()
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


# ------------------------------------------------------------------------------------ model

class ResNeXt(nn.Module):
    """ResNeXt with ``layers`` bottlenecks per stage, ``groups`` x ``width_per_group`` cardinality.

    Output contract: ``model(x)`` returns logits (N, num_classes) in train and eval mode.

    ``feature_maps(x)`` returns, in order (channels, stride):
    ``stem`` (64, 2; after the stem ReLU, before the max pool), ``layer1`` (256, 4),
    ``layer2`` (512, 8), ``layer3`` (1024, 16), ``layer4`` (2048, 32).
    Any input of at least 1x1 works (224x224 native); sizes are ceil(size / stride).

    Init as torchvision: convs kaiming_normal (fan_out, relu), BN weight 1 / bias 0, fc torch
    default; ``zero_init_residual`` zeroes every block's last BN weight.
    """

    min_input_size = 1

    def __init__(self, layers: list[int], groups: int, width_per_group: int,
                 num_classes: int = 1000, drop_rate: float = 0.0,
                 zero_init_residual: bool = False,
                 stage_with_dcn: tuple[bool, ...] = (False, False, False, False)):
        super().__init__()
        self.feature_info = {"act1": (64, 2), "layer1": (256, 4), "layer2": (512, 8),
                             "layer3": (1024, 16), "layer4": (2048, 32)}
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_chs = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(Bottleneck(in_chs, planes, stride if j == 0 else 1, groups,
                                         width_per_group, stage_with_dcn[i]))
                in_chs = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # DCN: mmcv's weight init, conv_offset back to zero
            if isinstance(m, ModulatedDeformConv2dPack):
                m.reset_parameters()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(x, self.min_input_size, type(self).__name__)
        feats = {}
        x = feats["act1"] = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = feats[name] = getattr(self, name)(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_maps(x)["layer4"]
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


# ------------------------------------------------------------------------------ entry points

@register_model
def resnext50_32x4d(**kwargs) -> ResNeXt:
    return ResNeXt([3, 4, 6, 3], 32, 4, **kwargs)


@register_model
def resnext101_32x8d(**kwargs) -> ResNeXt:
    return ResNeXt([3, 4, 23, 3], 32, 8, **kwargs)


@register_model
def resnext101_64x4d(**kwargs) -> ResNeXt:
    return ResNeXt([3, 4, 23, 3], 64, 4, **kwargs)


@register_model
def resnext152_32x4d(**kwargs) -> ResNeXt:
    return ResNeXt([3, 8, 36, 3], 32, 4, **kwargs)


@register_model
def resnext50_32x4d_dcn(**kwargs) -> ResNeXt:
    """ResNeXt-50 32x4d with modulated deformable 3x3 convs in layer2-layer4 (conv3-conv5), the
    DCNv2 setting of mmdetection's DCN ResNeXt configs; at init it equals resnext50_32x4d with
    every deformable conv's output halved (mask = sigmoid(0))."""
    return ResNeXt([3, 4, 6, 3], 32, 4, stage_with_dcn=(False, True, True, True), **kwargs)
