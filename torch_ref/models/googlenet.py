"""GoogLeNet / Inception-v1 (Szegedy et al. 2015, "Going Deeper with Convolutions"), in
torchvision's layout so torchvision 0.28 checkpoints load with strict=True.

    stage         output (224)   #1x1  #3x3red #3x3  #"5x5"red #"5x5"  pool proj
    conv1         64 x 112       7x7/2
    maxpool1      64 x 56        3x3/2 (ceil)
    conv2, conv3  192 x 56       1x1, then 3x3
    maxpool2      192 x 28       3x3/2 (ceil)
    inception3a   256 x 28       64    96      128   16        32      32
    inception3b   480 x 28       128   128     192   32        96      64
    maxpool3      480 x 14       3x3/2 (ceil)
    inception4a   512 x 14       192   96      208   16        48      64    -> aux1
    inception4b   512 x 14       160   112     224   24        64      64
    inception4c   512 x 14       128   128     256   24        64      64
    inception4d   528 x 14       112   144     288   32        64      64    -> aux2
    inception4e   832 x 14       256   160     320   32        128     128
    maxpool4      832 x 7        2x2/2 (ceil)
    inception5a   832 x 7        256   160     320   32        128     128
    inception5b   1024 x 7       384   192     384   48        128     128
    head          global average pool, dropout (drop_rate, 0.2), fc

Every conv is conv (no bias) + BatchNorm (eps 1e-3) + ReLU. As in torchvision, the "5x5" branch
uses a 3x3 kernel (the pretrained weights have that shape). Aux heads: adaptive average pool to
4x4, 1x1 conv to 128, fc 2048 -> 1024, ReLU, dropout 0.7, fc 1024 -> num_classes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from torch_ref.blocks import BasicConv2d
from torch_ref.models import check_input, register_model

__all__ = ["Inception", "InceptionAux", "GoogLeNet", "googlenet"]

# channel re-normalisation of transform_input: from torchvision's ImageNet mean/std to [-1, 1]
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def transform_input(x: torch.Tensor) -> torch.Tensor:
    """Map an input normalised with ImageNet mean/std to the [-1, 1] scaling of the TF weights:
    channel c becomes ``x_c * std_c / 0.5 + (mean_c - 0.5) / 0.5``."""
    chans = [x[:, c:c + 1] * (_STD[c] / 0.5) + (_MEAN[c] - 0.5) / 0.5 for c in range(3)]
    return torch.cat(chans, 1)


# ----------------------------------------------------------------------------------- layers

# torchvision's BasicConv2d: conv (no bias) -> BN (eps 1e-3) -> ReLU, keys ``conv.*``, ``bn.*``
ConvBNReLU = functools.partial(BasicConv2d, eps=1e-3)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels:
    1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 (the paper's 5x5) | 3x3/1 max pool (ceil) -> 1x1."""

    def __init__(self, in_chs: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int):
        super().__init__()
        self.branch1 = ConvBNReLU(in_chs, ch1x1, 1)
        self.branch2 = nn.Sequential(ConvBNReLU(in_chs, ch3x3red, 1),
                                     ConvBNReLU(ch3x3red, ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(ConvBNReLU(in_chs, ch5x5red, 1),
                                     ConvBNReLU(ch5x5red, ch5x5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     ConvBNReLU(in_chs, pool_proj, 1))
        self.out_chs = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: adaptive avg pool 4x4 -> 1x1 conv 128 -> fc 1024 -> ReLU ->
    dropout 0.7 -> fc num_classes. Works for any input size (adaptive pooling)."""

    def __init__(self, in_chs: int, num_classes: int, drop_rate: float = 0.7):
        super().__init__()
        self.conv = ConvBNReLU(in_chs, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.adaptive_avg_pool2d(x, 4))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(self.dropout(x))


# ------------------------------------------------------------------------------------ model

# name: (in_chs, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj), as in the paper's table
_INCEPTION_CFG = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
    """GoogLeNet as torchvision's ``GoogLeNet`` (aux_logits=True, transform_input=False defaults).

    Output contract: in eval mode ``model(x)`` returns logits (N, num_classes). In train mode with
    ``aux_logits=True`` it returns ``{"logits": ..., "aux1": ..., "aux2": ...}`` (aux1 taps
    inception4a, aux2 taps inception4d); with ``aux_logits=False`` it returns logits.
    ``aux_logits=False`` builds no aux heads (no ``aux1.*`` / ``aux2.*`` keys).

    ``feature_maps(x)`` returns, in order (channels, stride): ``stem`` (192, 8; after maxpool2),
    ``inception3b`` (480, 8), ``inception4e`` (832, 16), ``inception5b`` (1024, 32). Spatial
    sizes are ceil(size / stride) (ceil-mode pools). ``transform_input`` is applied first, in
    ``forward`` and ``feature_maps`` alike.

    224x224 native; the minimum input is 15x15 (smaller inputs raise ValueError).
    Init as torchvision: conv and linear weights truncated normal (std 0.01, cut at +-2
    absolute, i.e. effectively untruncated), linear biases torch default, BN weight 1 / bias 0.
    """

    min_input_size = 15

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True,
                 transform_input: bool = False, drop_rate: float = 0.2):
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.feature_info = {"conv1": (64, 2), "conv3": (192, 4), "inception3b": (480, 8),
                             "inception4e": (832, 16), "inception5b": (1024, 32)}

        self.conv1 = ConvBNReLU(3, 64, 7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = ConvBNReLU(64, 64, 1)
        self.conv3 = ConvBNReLU(64, 192, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        for name in ("inception3a", "inception3b"):
            setattr(self, name, Inception(*_INCEPTION_CFG[name]))
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"):
            setattr(self, name, Inception(*_INCEPTION_CFG[name]))
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        for name in ("inception5a", "inception5b"):
            setattr(self, name, Inception(*_INCEPTION_CFG[name]))

        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes)
            self.aux2 = InceptionAux(528, num_classes)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(1024, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2.0, b=2.0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _features(self, x: torch.Tensor, with_aux: bool):
        """One pass through the body: (feature maps by name, aux logits by name)."""
        check_input(x, self.min_input_size, type(self).__name__)
        if self.transform_input:
            x = transform_input(x)
        feats, aux = {}, {}
        x = feats["conv1"] = self.conv1(x)
        x = feats["conv3"] = self.conv3(self.conv2(self.maxpool1(x)))
        x = self.inception3a(self.maxpool2(x))
        x = feats["inception3b"] = self.inception3b(x)
        x = self.inception4a(self.maxpool3(x))
        if with_aux:
            aux["aux1"] = self.aux1(x)
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        if with_aux:
            aux["aux2"] = self.aux2(x)
        x = feats["inception4e"] = self.inception4e(x)
        x = self.inception5a(self.maxpool4(x))
        feats["inception5b"] = self.inception5b(x)
        return feats, aux

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._features(x, with_aux=False)[0]

    def forward(self, x: torch.Tensor):
        with_aux = self.training and self.aux_logits
        feats, aux = self._features(x, with_aux)
        x = torch.flatten(self.avgpool(feats["inception5b"]), 1)
        logits = self.fc(self.dropout(x))
        if with_aux:
            return {"logits": logits, **aux}
        return logits


# ------------------------------------------------------------------------------ entry points

@register_model
def googlenet(**kwargs) -> GoogLeNet:
    return GoogLeNet(**kwargs)
