"""MobileNet-v1 (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for
Mobile Vision Applications"), in timm 1.0's ``mobilenetv1_100`` layout (timm's EfficientNet
class with depthwise-separable blocks) so its checkpoints load with strict=True.

    stage      output (224)   blocks                            stride
    stem       32 x 112       3x3/2 conv, BN, ReLU6             2
    blocks.0   64 x 112       1 x dw-sep, 64                    2
    blocks.1   128 x 56       2 x dw-sep, 128 (first strided)   4
    blocks.2   256 x 28       2 x dw-sep, 256 (first strided)   8
    blocks.3   512 x 14       6 x dw-sep, 512 (first strided)   16
    blocks.4   1024 x 7       2 x dw-sep, 1024 (first strided)  32
    head       global average pool, dropout (drop_rate), classifier (no 1x1 head conv)

A depthwise-separable block is 3x3 depthwise conv (carries the stride) -> BN -> ReLU6 -> 1x1
conv -> BN -> ReLU6, with no residual (timm's "dsa" block). Convs have no bias and pad
symmetrically (k // 2); BatchNorm uses torch defaults (eps 1e-5). The activation is ReLU6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch_ref.models import check_input, register_model

__all__ = ["DepthwiseSeparable", "MobileNetV1", "mobilenet_v1"]


# ----------------------------------------------------------------------------------- layers

class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv (``conv_dw``, stride) -> ``bn1`` -> ReLU6 -> 1x1 conv (``conv_pw``)
    -> ``bn2`` -> ReLU6. No shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride=stride, padding=1, groups=in_chs,
                                 bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.conv_dw(x)))
        return F.relu6(self.bn2(self.conv_pw(x)))


# ------------------------------------------------------------------------------------ model

# per stage: (repeats, stride of the first block, output channels), as in the paper's table
_STAGES = ((1, 1, 64), (2, 2, 128), (2, 2, 256), (6, 2, 512), (2, 2, 1024))


class MobileNetV1(nn.Module):
    """MobileNet-v1 (width 1.0) as timm's ``mobilenetv1_100``.

    Output contract: ``model(x)`` returns logits (N, num_classes) in train and eval mode.

    ``feature_maps(x)`` returns the output of each stage, in order (channels, stride):
    ``stride2`` (64, 2; blocks.0), ``stride4`` (128, 4; blocks.1), ``stride8`` (256, 8;
    blocks.2), ``stride16`` (512, 16; blocks.3), ``stride32`` (1024, 32; blocks.4).
    Sizes are ceil(size / stride). Any input of at least 1x1 works (224x224 native).

    Init as timm (TF style): conv weights normal(0, sqrt(2 / fan_out)) with
    fan_out = k * k * out_channels / groups; BN weight 1 / bias 0; classifier weight
    uniform(+-1 / sqrt(num_classes)), bias 0.
    """

    min_input_size = 1

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0):
        super().__init__()
        self.feature_info = {"blocks.0": (64, 2), "blocks.1": (128, 4), "blocks.2": (256, 8),
                             "blocks.3": (512, 16), "blocks.4": (1024, 32)}
        self.conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        in_chs, stages = 32, []
        for repeats, stride, out_chs in _STAGES:
            blocks = []
            for i in range(repeats):
                blocks.append(DepthwiseSeparable(in_chs, out_chs, stride if i == 0 else 1))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(in_chs, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k_h, k_w = m.kernel_size
                fan_out = k_h * k_w * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(x, self.min_input_size, type(self).__name__)
        x = F.relu6(self.bn1(self.conv_stem(x)))
        feats = {}
        for name, stage in zip(self.feature_info, self.blocks):
            x = feats[name] = stage(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_maps(x)["blocks.4"]
        x = torch.flatten(self.global_pool(x), 1)
        return self.classifier(self.dropout(x))


# ------------------------------------------------------------------------------ entry points

@register_model
def mobilenet_v1(**kwargs) -> MobileNetV1:
    return MobileNetV1(**kwargs)
