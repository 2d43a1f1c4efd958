"""Xception (Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions"),
in timm 1.0's ``legacy_xception`` layout so its checkpoints load with strict=True.

    stage         module     output (299)   what
    entry flow    conv1      32 x 149       3x3/2 valid conv, BN, ReLU
                  conv2      64 x 147       3x3 valid conv, BN, ReLU
                  block1     128 x 74       2 sep convs (no leading ReLU), 3x3/2 max pool
                  block2     256 x 37       2 sep convs, 3x3/2 max pool
                  block3     728 x 19       2 sep convs, 3x3/2 max pool
    middle flow   block4-11  728 x 19       3 sep convs each, identity shortcut
    exit flow     block12    1024 x 10      sep 728, sep 1024, 3x3/2 max pool
                  conv3      1536 x 10      sep conv, BN, ReLU
                  conv4      2048 x 10      sep conv, BN, ReLU
    head          global average pool, dropout (drop_rate), fc

A block's repeated unit is ReLU -> SeparableConv2d (3x3 depthwise pad 1, then 1x1, no biases)
-> BN; blocks that change width or stride have a 1x1 strided conv + BN shortcut (``skip``,
``skipbn``). Max pools pad 1 (floor mode). BatchNorm uses torch defaults (eps 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_ref.models import check_input, register_model

__all__ = ["SeparableConv2d", "Block", "Xception", "xception"]


# ----------------------------------------------------------------------------------- layers

class SeparableConv2d(nn.Module):
    """Depthwise kxk conv (``conv1``) followed by pointwise 1x1 conv (``pointwise``), no biases."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, in_chs, kernel_size, padding=padding, groups=in_chs,
                               bias=False)
        self.pointwise = nn.Conv2d(in_chs, out_chs, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv1(x))


class Block(nn.Module):
    """``reps`` x (ReLU, SeparableConv2d, BN) in ``rep``, then a 3x3 max pool if strided; plus a
    shortcut. With ``grow_first`` the first sep conv changes the width, otherwise the last one.
    ``start_with_relu=False`` drops the leading ReLU (block1, right after the stem ReLU)."""

    def __init__(self, in_chs: int, out_chs: int, reps: int, stride: int = 1,
                 start_with_relu: bool = True, grow_first: bool = True):
        super().__init__()
        if out_chs != in_chs or stride != 1:
            self.skip = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_chs)
        else:
            self.skip = self.skipbn = None

        # channel widths along the block: widen at the first or at the last sep conv
        mid = out_chs if grow_first else in_chs
        widths = [in_chs] + [mid] * (reps - 1) + [out_chs]
        layers = []
        for i in range(reps):
            if i > 0 or start_with_relu:
                layers.append(nn.ReLU())
            layers.append(SeparableConv2d(widths[i], widths[i + 1]))
            layers.append(nn.BatchNorm2d(widths[i + 1]))
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.rep = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.skip is None else self.skipbn(self.skip(x))
        return self.rep(x) + shortcut


# ------------------------------------------------------------------------------------ model

# (in_chs, out_chs, reps, stride, start_with_relu, grow_first) for block1 .. block12
_BLOCKS = (
    [(64, 128, 2, 2, False, True), (128, 256, 2, 2, True, True), (256, 728, 2, 2, True, True)]
    + [(728, 728, 3, 1, True, True)] * 8
    + [(728, 1024, 2, 2, True, False)]
)


class Xception(nn.Module):
    """Xception as timm's legacy ``Xception``.

    Output contract: ``model(x)`` returns logits (N, num_classes) in train and eval mode.

    ``feature_maps(x)`` returns, in order (channels, nominal stride): ``stem`` (64, 2; after
    conv2's ReLU), ``block1`` (128, 4), ``block2`` (256, 8), ``entry_flow`` (728, 16; block3),
    ``middle_flow`` (728, 16; block11), ``exit_flow`` (2048, 32; after conv4's BN and ReLU).
    The two stem convs are unpadded, so sizes sit a little below size / stride
    (299 -> 147, 74, 37, 19, 19, 10).

    299x299 native; the minimum input is 7x7 (smaller raises ValueError).
    Init as timm: convs kaiming_normal (fan_out, relu), BN weight 1 / bias 0, fc torch default.
    Unlike timm (whose legacy head discards the dropout result), ``drop_rate`` > 0 really applies
    dropout before the fc; the default 0.0 makes the two identical.
    """

    min_input_size = 7

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0):
        super().__init__()
        # timm's feature levels: hooks on these modules (blockN.rep.0 is the ReLU that starts
        # block N: the ReLU of the previous block's output)
        self.feature_info = {"act2": (64, 2), "block2.rep.0": (128, 4), "block3.rep.0": (256, 8),
                             "block12.rep.0": (728, 16), "act4": (2048, 32)}
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        for i, cfg in enumerate(_BLOCKS):
            setattr(self, f"block{i + 1}", Block(*cfg))
        self.conv3 = SeparableConv2d(1024, 1536)
        self.bn3 = nn.BatchNorm2d(1536)
        self.conv4 = SeparableConv2d(1536, 2048)
        self.bn4 = nn.BatchNorm2d(2048)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(2048, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input(x, self.min_input_size, type(self).__name__)
        feats = {}
        x = F.relu(self.bn1(self.conv1(x)))
        x = feats["act2"] = F.relu(self.bn2(self.conv2(x)))
        x = self.block1(x)
        feats["block2.rep.0"] = F.relu(x)
        x = self.block2(x)
        feats["block3.rep.0"] = F.relu(x)
        for i in range(3, 12):
            x = getattr(self, f"block{i}")(x)
        feats["block12.rep.0"] = F.relu(x)
        x = self.block12(x)
        x = F.relu(self.bn3(self.conv3(x)))
        feats["act4"] = F.relu(self.bn4(self.conv4(x)))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_maps(x)["act4"]
        x = torch.flatten(self.global_pool(x), 1)
        return self.fc(self.dropout(x))


# ------------------------------------------------------------------------------ entry points

@register_model
def xception(**kwargs) -> Xception:
    return Xception(**kwargs)
