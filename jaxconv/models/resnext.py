"""ResNeXt (Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks"),
in torchvision's ResNet layout: parameter paths equal torchvision 0.28's state_dict keys
(torch_ref.models.resnext mirrors it), so its checkpoints load with convert.from_torch.

    stage    output (224 input)   blocks            bottleneck (1x1, 3x3 grouped, 1x1)
    stem     112 x 112 x 64       7x7/2 conv, BN, ReLU, then 3x3/2 max pool
    layer1   56 x 56 x 256        n1                width,  width,  256
    layer2   28 x 28 x 512        n2                2width, 2width, 512
    layer3   14 x 14 x 1024       n3                4width, 4width, 1024
    layer4   7 x 7 x 2048         n4                8width, 8width, 2048
    head     global average pool, dropout (drop_rate), fc

with width = groups * width_per_group (e.g. 32x4d: 128). The stride of a stage sits on the 3x3
grouped conv of its first block; the shortcut is then a strided 1x1 conv + BN ("downsample").
BatchNorm uses torch defaults (eps 1e-5, momentum 0.1).
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxconv import nn
from jaxconv.models._common import check_input
from jaxconv.models.registry import register_model
from jaxconv.nn import init

__all__ = ["Bottleneck", "ResNeXt", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
           "resnext152_32x4d", "resnext50_32x4d_dcn"]


# ----------------------------------------------------------------------------------- layers

class Bottleneck(nnx.Module):
    """1x1 reduce -> 3x3 grouped conv (carries the stride) -> 1x1 expand, plus shortcut.

    Output channels are ``planes * 4``; the inner width is
    ``int(planes * width_per_group / 64) * groups``. `conv` and `norm` are the layer factories
    (Conv2d / BatchNorm2d with the model's dtype and initialisers already bound).
    """

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, groups: int = 1,
                 width_per_group: int = 64, *, conv, norm, deform=None):
        width = int(planes * width_per_group / 64) * groups
        out_chs = planes * self.expansion
        self.conv1 = conv(in_chs, width, 1)
        self.bn1 = norm(width)
        # `deform` (DCN stages): the grouped 3x3 becomes a modulated deformable conv
        self.conv2 = (deform or conv)(width, width, 3, stride=stride, padding=1, groups=groups)
        self.bn2 = norm(width)
        self.conv3 = conv(width, out_chs, 1)
        self.bn3 = norm(out_chs)
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(conv(in_chs, out_chs, 1, stride=stride), norm(out_chs))
        else:
            self.downsample = None

    def __call__(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return jax.nn.relu(y + shortcut)


# ------------------------------------------------------------------------------------ model

class ResNeXt(nnx.Module):
    """ResNeXt with ``layers`` bottlenecks per stage, ``groups`` x ``width_per_group`` cardinality.

    Output contract: ``model(x)`` takes NHWC float input (N, H, W, 3) and returns logits
    (N, num_classes) in train and eval mode. ``stage_with_dcn`` swaps the 3x3 grouped convs of
    the chosen stages for modulated deformable convs (nn.ModulatedDeformConv2dPack).

    ``feature_maps(x)`` returns, in order (channels, stride), NHWC:
    ``stem`` (64, 2; after the stem ReLU, before the max pool), ``layer1`` (256, 4),
    ``layer2`` (512, 8), ``layer3`` (1024, 16), ``layer4`` (2048, 32).
    Any input of at least 1x1 works (224x224 native); sizes are ceil(size / stride).

    `dtype` is the compute dtype of every layer (parameters `param_dtype`, BN statistics
    float32). Init as torchvision: convs kaiming_normal (fan_out, relu), BN weight 1 / bias 0,
    fc torch default; ``zero_init_residual`` zeroes every block's last BN weight.
    """

    min_input_size = 1
    feature_info = {"stem": (64, 2), "layer1": (256, 4), "layer2": (512, 8),
                    "layer3": (1024, 16), "layer4": (2048, 32)}

    def __init__(self, layers, groups: int, width_per_group: int, num_classes: int = 1000,
                 drop_rate: float = 0.0, zero_init_residual: bool = False,
                 stage_with_dcn=(False, False, False, False), *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        conv = functools.partial(nn.Conv2d, bias=False, dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=init.kaiming_normal_fan_out, rngs=rngs)
        norm = functools.partial(nn.BatchNorm2d, dtype=dtype, param_dtype=param_dtype)
        # mmcv's init for the deformable weight, conv_offset zero (mmdet's DCN ResNeXt)
        deform = functools.partial(nn.ModulatedDeformConv2dPack, bias=False, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
        self.conv1 = conv(3, 64, 7, stride=2, padding=3)
        self.bn1 = norm(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_chs = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(Bottleneck(in_chs, planes, stride if j == 0 else 1, groups,
                                         width_per_group, conv=conv, norm=norm,
                                         deform=deform if stage_with_dcn[i] else None))
                in_chs = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate, rngs=rngs)
        self.fc = nn.Linear(in_chs, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if zero_init_residual:
            for _, m in nnx.iter_modules(self):
                if isinstance(m, Bottleneck):
                    m.bn3.scale[...] = jnp.zeros_like(m.bn3.scale[...])

    def feature_maps(self, x) -> collections.OrderedDict:
        check_input(x, self.min_input_size, type(self).__name__)
        feats = collections.OrderedDict()  # jit keeps an OrderedDict's order (a dict's it sorts)
        x = feats["stem"] = jax.nn.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = feats[name] = getattr(self, name)(x)
        return feats

    def __call__(self, x):
        x = self.feature_maps(x)["layer4"]
        x = self.avgpool(x).reshape(x.shape[0], -1)
        return self.fc(self.dropout(x))


# ------------------------------------------------------------------------------ entry points

@register_model
def resnext50_32x4d(**kwargs) -> ResNeXt:
    return ResNeXt((3, 4, 6, 3), 32, 4, **kwargs)


@register_model
def resnext101_32x8d(**kwargs) -> ResNeXt:
    return ResNeXt((3, 4, 23, 3), 32, 8, **kwargs)


@register_model
def resnext101_64x4d(**kwargs) -> ResNeXt:
    return ResNeXt((3, 4, 23, 3), 64, 4, **kwargs)


@register_model
def resnext152_32x4d(**kwargs) -> ResNeXt:
    return ResNeXt((3, 8, 36, 3), 32, 4, **kwargs)


@register_model
def resnext50_32x4d_dcn(**kwargs) -> ResNeXt:
    """ResNeXt-50 32x4d with modulated deformable 3x3 convs (one offset group, zero-initialised
    offset/mask conv) in layer2-layer4 (the paper's conv3-conv5), as mmdetection's DCNv2 configs."""
    return ResNeXt((3, 4, 6, 3), 32, 4, stage_with_dcn=(False, True, True, True), **kwargs)
