"""Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer
Vision"), in torchvision's layout so torchvision 0.28 checkpoints load with strict=True.

    module          output (299)    what
    Conv2d_1a_3x3   32 x 149        3x3/2 valid
    Conv2d_2a_3x3   32 x 147        3x3 valid
    Conv2d_2b_3x3   64 x 147        3x3 pad 1
    maxpool1        64 x 73         3x3/2 max pool
    Conv2d_3b_1x1   80 x 73         1x1
    Conv2d_4a_3x3   192 x 71        3x3 valid
    maxpool2        192 x 35        3x3/2 max pool
    Mixed_5b/5c/5d  256/288/288 x 35   InceptionA, pool features 32/64/64
    Mixed_6a        768 x 17        InceptionB (grid reduction)
    Mixed_6b..6e    768 x 17        InceptionC, 7x7 channels 128/160/160/192  -> AuxLogits
    Mixed_7a        1280 x 8        InceptionD (grid reduction)
    Mixed_7b/7c     2048 x 8        InceptionE
    head            global average pool, dropout (drop_rate, 0.5), fc

Every conv is conv (no bias) + BatchNorm (eps 1e-3) + ReLU. Max pools are floor-mode without
padding; the 3x3/1 average pools inside the blocks pad 1 and count the padding (torch default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_ref.models import check_input, register_model
from torch_ref.models.googlenet import ConvBNReLU, transform_input

__all__ = ["InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE",
           "InceptionAux", "InceptionV3", "inception_v3"]


# ----------------------------------------------------------------------------------- layers

def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1)


class InceptionA(nn.Module):
    """35x35 block: 1x1 64 | 1x1 48 -> 5x5 64 | 1x1 64 -> 3x3 96 -> 3x3 96 | avg -> 1x1 pool.
    Output channels 224 + pool_features."""

    def __init__(self, in_chs: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(in_chs, 64, 1)
        self.branch5x5_1 = ConvBNReLU(in_chs, 48, 1)
        self.branch5x5_2 = ConvBNReLU(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBNReLU(in_chs, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, padding=1)
        self.branch_pool = ConvBNReLU(in_chs, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35 -> 17 grid reduction: 3x3/2 384 | 1x1 64 -> 3x3 96 -> 3x3/2 96 | 3x3/2 max pool.
    Output channels 480 + in_chs."""

    def __init__(self, in_chs: int):
        super().__init__()
        self.branch3x3 = ConvBNReLU(in_chs, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBNReLU(in_chs, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7: 1x1 192 | 1x1 c7 -> 1x7 c7 -> 7x1 192 |
    1x1 c7 -> 7x1 -> 1x7 -> 7x1 -> 1x7 192 | avg -> 1x1 192. Output channels 768."""

    def __init__(self, in_chs: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBNReLU(in_chs, 192, 1)
        self.branch7x7_1 = ConvBNReLU(in_chs, c7, 1)
        self.branch7x7_2 = ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBNReLU(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBNReLU(in_chs, c7, 1)
        self.branch7x7dbl_2 = ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBNReLU(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBNReLU(in_chs, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """17 -> 8 grid reduction: 1x1 192 -> 3x3/2 320 | 1x1 192 -> 1x7 -> 7x1 -> 3x3/2 192 |
    3x3/2 max pool. Output channels 512 + in_chs."""

    def __init__(self, in_chs: int):
        super().__init__()
        self.branch3x3_1 = ConvBNReLU(in_chs, 192, 1)
        self.branch3x3_2 = ConvBNReLU(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBNReLU(in_chs, 192, 1)
        self.branch7x7x3_2 = ConvBNReLU(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBNReLU(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBNReLU(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks: 1x1 320 | 1x1 384 -> (1x3 384, 3x1 384) |
    1x1 448 -> 3x3 384 -> (1x3 384, 3x1 384) | avg -> 1x1 192. Output channels 2048."""

    def __init__(self, in_chs: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(in_chs, 320, 1)
        self.branch3x3_1 = ConvBNReLU(in_chs, 384, 1)
        self.branch3x3_2a = ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBNReLU(in_chs, 448, 1)
        self.branch3x3dbl_2 = ConvBNReLU(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBNReLU(in_chs, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b3, b3d, bp], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the 17x17 grid: 5x5/3 avg pool -> 1x1 conv 128 -> 5x5 conv 768
    (valid) -> global average pool -> fc. Needs a Mixed_6e map of at least 17x17."""

    def __init__(self, in_chs: int, num_classes: int):
        super().__init__()
        self.conv0 = ConvBNReLU(in_chs, 128, 1)
        self.conv1 = ConvBNReLU(128, 768, 5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 5, stride=3)
        x = self.conv1(self.conv0(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# ------------------------------------------------------------------------------------ model

class InceptionV3(nn.Module):
    """Inception-v3 as torchvision's ``Inception3`` (aux_logits=True, transform_input=False
    defaults).

    Output contract: in eval mode ``model(x)`` returns logits (N, num_classes). In train mode with
    ``aux_logits=True`` it returns ``{"logits": ..., "aux": ...}`` (the aux head taps Mixed_6e);
    with ``aux_logits=False`` it returns logits. ``aux_logits=False`` builds no ``AuxLogits``.

    ``feature_maps(x)`` returns, in order (channels, nominal stride): ``Conv2d_4a_3x3`` (192, 4),
    ``Mixed_5d`` (288, 8), ``Mixed_6e`` (768, 16), ``Mixed_7c`` (2048, 32); the convs and pools
    are unpadded, so sizes are a little below size / stride (299 -> 71, 35, 17, 8).
    ``transform_input`` is applied first, in ``forward`` and ``feature_maps`` alike.

    299x299 native. The minimum input is 75x75 (smaller raises ValueError); in train mode the aux
    head additionally needs Mixed_6e >= 17x17, i.e. an input of at least 299x299 (smaller raises
    ValueError).
    Init as torchvision: conv and linear weights truncated normal std 0.1 (cut at +-2 absolute),
    except AuxLogits.fc std 0.001; linear biases torch default; BN weight 1 / bias 0. (torchvision
    also tags AuxLogits.conv1 with std 0.01, but on the wrapper module, so its conv gets 0.1;
    we reproduce that effective init.)
    """

    min_input_size = 75

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True,
                 transform_input: bool = False, drop_rate: float = 0.5):
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.feature_info = {"Conv2d_2b_3x3": (64, 2), "Conv2d_4a_3x3": (192, 4),
                             "Mixed_5d": (288, 8), "Mixed_6e": (768, 16), "Mixed_7c": (2048, 32)}

        self.Conv2d_1a_3x3 = ConvBNReLU(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBNReLU(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBNReLU(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = ConvBNReLU(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBNReLU(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.AuxLogits = InceptionAux(768, num_classes) if aux_logits else None
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(2048, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = 0.001 if self.AuxLogits is not None and m is self.AuxLogits.fc else 0.1
                nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2.0, b=2.0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _features(self, x: torch.Tensor, with_aux: bool):
        """One pass through the body: (feature maps by name, aux logits by name)."""
        check_input(x, self.min_input_size, type(self).__name__)
        if self.transform_input:
            x = transform_input(x)
        feats, aux = {}, {}
        in_h, in_w = x.shape[2:]
        x = feats["Conv2d_2b_3x3"] = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_3b_1x1(self.maxpool1(x))
        x = feats["Conv2d_4a_3x3"] = self.Conv2d_4a_3x3(x)
        x = self.maxpool2(x)
        x = feats["Mixed_5d"] = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = feats["Mixed_6e"] = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        if with_aux:
            if min(x.shape[2:]) < 17:
                raise ValueError(f"{type(self).__name__}: x must be at least 299x299 for the aux "
                                 f"head (train mode, aux_logits=True), got {in_h}x{in_w}")
            aux["aux"] = self.AuxLogits(x)
        feats["Mixed_7c"] = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return feats, aux

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._features(x, with_aux=False)[0]

    def forward(self, x: torch.Tensor):
        with_aux = self.training and self.aux_logits
        feats, aux = self._features(x, with_aux)
        x = torch.flatten(self.avgpool(feats["Mixed_7c"]), 1)
        logits = self.fc(self.dropout(x))
        if with_aux:
            return {"logits": logits, **aux}
        return logits


# ------------------------------------------------------------------------------ entry points

@register_model
def inception_v3(**kwargs) -> InceptionV3:
    return InceptionV3(**kwargs)
