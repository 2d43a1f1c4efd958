"""ResNeXt (Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks"),
in torchvision's ResNet layout: parameter paths equal torchvision 0.28's state_dict keys
(torch_ref.models.resnext mirrors it), so its checkpoints load with convert.from_torch.

    stage    output (224 input)   blocks            bottleneck (1x1, 3x3 grouped, 1x1)
    stem     112 x 112 x 64       7x7/2 conv, BN, ReLU ("act1"), then 3x3/2 max pool
    layer1   56 x 56 x 256        n1                width,  width,  256
    layer2   28 x 28 x 512        n2                2width, 2width, 512
    layer3   14 x 14 x 1024       n3                4width, 4width, 1024
    layer4   7 x 7 x 2048         n4                8width, 8width, 2048
    head     global average pool, dropout (drop_rate), fc (the model contract: _common.Classifier)

with width = groups * width_per_group (e.g. 32x4d: 128). The stride of a stage sits on the 3x3
grouped conv of its first block; the shortcut is then a strided 1x1 conv + BN ("downsample").
BatchNorm uses torch defaults (eps 1e-5, momentum 0.1).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxconv import nn
from jaxconv.models._common import Classifier
from jaxconv.models.registry import register_model
from jaxconv.models.spec import TORCHVISION_LICENSE, TORCHVISION_URL, FeatureInfo, PretrainedCfg
from jaxconv.nn import init
from jaxconv.ops import fusion_barrier

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
        # stored once: XLA:CPU would otherwise recompute the chain of blocks in every add
        return fusion_barrier(jax.nn.relu(y + shortcut))


# ------------------------------------------------------------------------------------ model

class ResNeXt(Classifier):
    """ResNeXt with ``layers`` bottlenecks per stage, ``groups`` x ``width_per_group`` cardinality.

    ``model(x)`` takes NHWC float input (N, H, W, in_chans) and returns logits (N, num_classes)
    in train and eval mode. ``stage_with_dcn`` swaps the 3x3 grouped convs of the chosen stages
    for modulated deformable convs (nn.ModulatedDeformConv2dPack). Feature levels (timm's):
    ``act1`` (64, 2; after the stem ReLU, before the max pool), ``layer1`` (256, 4), ``layer2``
    (512, 8), ``layer3`` (1024, 16), ``layer4`` (2048, 32). Any input of at least 1x1 works
    (224x224 native); sizes are ceil(size / stride).

    `dtype` is the compute dtype of every layer (parameters `param_dtype`, BN statistics
    float32). Init as torchvision: convs kaiming_normal (fan_out, relu), BN weight 1 / bias 0,
    fc torch default; ``zero_init_residual`` zeroes every block's last BN weight.
    """

    feature_levels = (FeatureInfo("act1", 64, 2), FeatureInfo("layer1", 256, 4),
                      FeatureInfo("layer2", 512, 8), FeatureInfo("layer3", 1024, 16),
                      FeatureInfo("layer4", 2048, 32))
    classifier_name = "fc"
    first_conv = "conv1"

    def __init__(self, layers, groups: int, width_per_group: int, num_classes: int = 1000,
                 drop_rate: float = 0.0, zero_init_residual: bool = False,
                 stage_with_dcn=(False, False, False, False), global_pool: str = "avg",
                 in_chans: int = 3, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        conv = functools.partial(nn.Conv2d, bias=False, dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=init.kaiming_normal_fan_out, rngs=rngs)
        norm = functools.partial(nn.BatchNorm2d, dtype=dtype, param_dtype=param_dtype)
        # mmcv's init for the deformable weight, conv_offset zero (mmdet's DCN ResNeXt)
        deform = functools.partial(nn.ModulatedDeformConv2dPack, bias=False, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
        self.in_chans, self.dtype, self.param_dtype = in_chans, dtype, param_dtype
        self.conv1 = conv(in_chans, 64, 7, stride=2, padding=3)
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
        if zero_init_residual:
            for _, m in nnx.iter_modules(self):
                if isinstance(m, Bottleneck):
                    m.bn3.scale[...] = jnp.zeros_like(m.bn3.scale[...])
        self._head(in_chs, num_classes, drop_rate, global_pool, rngs=rngs)

    def stages(self):
        def stem(m, x, with_aux):
            x = jax.nn.relu(m.bn1(m.conv1(x)))
            return x, x, {}

        def layer(i):
            def run(m, x, with_aux):
                x = getattr(m, f"layer{i}")(m.maxpool(x) if i == 1 else x)
                return x, x, {}
            return run

        return list(zip(self.feature_levels, [stem] + [layer(i) for i in range(1, 5)]))


# ------------------------------------------------------------------------------ entry points

def _tv(name: str, weights: str, file: str, resize: int, top1: float, top5: float,
        enum: str) -> PretrainedCfg:
    return PretrainedCfg(f"{name}.{weights}", TORCHVISION_URL + file, resize_size=resize,
                         top1=top1, top5=top5, license=TORCHVISION_LICENSE,
                         source=f"torchvision 0.28 {enum}")


@register_model(mirrors="torchvision resnext50_32x4d", aliases=("resnext50",), pretrained=(
    _tv("resnext50_32x4d", "tv2_in1k", "resnext50_32x4d-1a0047aa.pth", 232, 81.198, 95.340,
        "ResNeXt50_32X4D_Weights.IMAGENET1K_V2"),
    _tv("resnext50_32x4d", "tv_in1k", "resnext50_32x4d-7cdf4587.pth", 256, 77.618, 93.698,
        "ResNeXt50_32X4D_Weights.IMAGENET1K_V1")))
def resnext50_32x4d(**kwargs) -> ResNeXt:
    return ResNeXt((3, 4, 6, 3), 32, 4, **kwargs)


@register_model(mirrors="torchvision resnext101_32x8d", pretrained=(
    _tv("resnext101_32x8d", "tv2_in1k", "resnext101_32x8d-110c445d.pth", 232, 82.834, 96.228,
        "ResNeXt101_32X8D_Weights.IMAGENET1K_V2"),
    _tv("resnext101_32x8d", "tv_in1k", "resnext101_32x8d-8ba56ff5.pth", 256, 79.312, 94.526,
        "ResNeXt101_32X8D_Weights.IMAGENET1K_V1")))
def resnext101_32x8d(**kwargs) -> ResNeXt:
    return ResNeXt((3, 4, 23, 3), 32, 8, **kwargs)


@register_model(mirrors="torchvision resnext101_64x4d", pretrained=(
    _tv("resnext101_64x4d", "tv_in1k", "resnext101_64x4d-173b62eb.pth", 232, 83.246, 96.454,
        "ResNeXt101_64X4D_Weights.IMAGENET1K_V1"),))
def resnext101_64x4d(**kwargs) -> ResNeXt:
    return ResNeXt((3, 4, 23, 3), 64, 4, **kwargs)


@register_model(mirrors="torchvision ResNet layout, layers (3, 8, 36, 3); no published weights",
                aliases=("resnext152",))
def resnext152_32x4d(**kwargs) -> ResNeXt:
    return ResNeXt((3, 8, 36, 3), 32, 4, **kwargs)


@register_model(mirrors="mmdetection's DCNv2 ResNeXt-50 in torchvision's layout")
def resnext50_32x4d_dcn(**kwargs) -> ResNeXt:
    """ResNeXt-50 32x4d with modulated deformable 3x3 convs (one offset group, zero-initialised
    offset/mask conv) in layer2-layer4 (the paper's conv3-conv5), as mmdetection's DCNv2 configs."""
    return ResNeXt((3, 4, 6, 3), 32, 4, stage_with_dcn=(False, True, True, True), **kwargs)
