"""MobileNet-v1 (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for
Mobile Vision Applications"), in timm 1.0's ``mobilenetv1_100`` layout: parameter paths equal
timm's state_dict keys (torch_ref.models.mobilenet mirrors it), so its checkpoints load with
convert.from_torch.

    stage      output (224)   blocks                            stride
    stem       112 x 32       3x3/2 conv, BN, ReLU6             2
    blocks.0   112 x 64       1 x dw-sep, 64                    2
    blocks.1   56 x 128       2 x dw-sep, 128 (first strided)   4
    blocks.2   28 x 256       2 x dw-sep, 256 (first strided)   8
    blocks.3   14 x 512       6 x dw-sep, 512 (first strided)   16
    blocks.4   7 x 1024       2 x dw-sep, 1024 (first strided)  32
    head       global average pool, dropout (drop_rate), classifier (no 1x1 head conv)

A depthwise-separable block is 3x3 depthwise conv (carries the stride) -> BN -> ReLU6 -> 1x1
conv -> BN -> ReLU6, with no residual (timm's "dsa" block). Convs have no bias and pad
symmetrically (k // 2); BatchNorm uses torch defaults (eps 1e-5). The activation is ReLU6.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxconv import nn
from jaxconv.models._common import Classifier
from jaxconv.models.registry import register_model
from jaxconv.models.spec import INCEPTION_MEAN, INCEPTION_STD, FeatureInfo, PretrainedCfg, resize_for
from jaxconv.nn import init

__all__ = ["DepthwiseSeparable", "MobileNetV1", "mobilenet_v1"]


# ----------------------------------------------------------------------------------- layers

def _tf_conv(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1, *,
             dtype, param_dtype, rngs: nnx.Rngs) -> nn.Conv2d:
    """Conv2d without bias, padding k // 2, weights normal(0, sqrt(2 / fan_out)) with
    fan_out = k * k * out_chs / groups (timm's TF-style init; untruncated)."""
    fan_out = kernel_size * kernel_size * out_chs // groups
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups,
                     bias=False, dtype=dtype, param_dtype=param_dtype,
                     kernel_init=init.normal(math.sqrt(2.0 / fan_out)), rngs=rngs)


class DepthwiseSeparable(nnx.Module):
    """3x3 depthwise conv (``conv_dw``, stride) -> ``bn1`` -> ReLU6 -> 1x1 conv (``conv_pw``)
    -> ``bn2`` -> ReLU6. No shortcut. `conv` / `norm` are the model's layer factories."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, *, conv, norm):
        self.conv_dw = conv(in_chs, in_chs, 3, stride, groups=in_chs)
        self.bn1 = norm(in_chs)
        self.conv_pw = conv(in_chs, out_chs, 1)
        self.bn2 = norm(out_chs)

    def __call__(self, x):
        x = jax.nn.relu6(self.bn1(self.conv_dw(x)))
        return jax.nn.relu6(self.bn2(self.conv_pw(x)))


# ------------------------------------------------------------------------------------ model

# per stage: (repeats, stride of the first block, output channels), as in the paper's table
_STAGES = ((1, 1, 64), (2, 2, 128), (2, 2, 256), (6, 2, 512), (2, 2, 1024))


class MobileNetV1(Classifier):
    """MobileNet-v1 (width 1.0) as timm's ``mobilenetv1_100``.

    ``model(x)`` takes NHWC float input (N, H, W, in_chans) and returns logits
    (N, num_classes) in train and eval mode. Feature levels (timm's): the output of each stage,
    ``blocks.0`` (64, 2) .. ``blocks.4`` (1024, 32); sizes are ceil(size / stride). Any input
    of at least 1x1 works (224x224 native).

    `dtype` is the compute dtype of every layer (parameters `param_dtype`, BN statistics
    float32). Init as timm (TF style): conv weights normal(0, sqrt(2 / fan_out)) with
    fan_out = k * k * out_channels / groups; BN weight 1 / bias 0; classifier weight
    uniform(+-1 / sqrt(num_classes)), bias 0.
    """

    feature_levels = tuple(FeatureInfo(f"blocks.{i}", c, 2 ** (i + 1))
                           for i, (_, _, c) in enumerate(_STAGES))
    classifier_name = "classifier"
    first_conv = "conv_stem"

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0, global_pool: str = "avg",
                 in_chans: int = 3, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        conv = functools.partial(_tf_conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = functools.partial(nn.BatchNorm2d, dtype=dtype, param_dtype=param_dtype)
        self.in_chans, self.dtype, self.param_dtype = in_chans, dtype, param_dtype
        self.conv_stem = conv(in_chans, 32, 3, 2)
        self.bn1 = norm(32)
        in_chs, stages = 32, []
        for repeats, stride, out_chs in _STAGES:
            blocks = []
            for i in range(repeats):
                blocks.append(DepthwiseSeparable(in_chs, out_chs, stride if i == 0 else 1,
                                                 conv=conv, norm=norm))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self._head(in_chs, num_classes, drop_rate, global_pool, rngs=rngs)

    def _classifier(self, num_classes, rngs):
        return nn.Linear(self.num_features, num_classes, dtype=self.dtype,
                         param_dtype=self.param_dtype,
                         kernel_init=init.uniform(1.0 / math.sqrt(num_classes)),
                         bias_init=nnx.initializers.zeros, rngs=rngs)

    def stages(self):
        def stage(i):
            def run(m, x, with_aux):
                if i == 0:
                    x = jax.nn.relu6(m.bn1(m.conv_stem(x)))
                x = m.blocks[i](x)
                return x, x, {}
            return run
        return list(zip(self.feature_levels, [stage(i) for i in range(len(_STAGES))]))


# ------------------------------------------------------------------------------ entry points

@register_model(mirrors="timm mobilenetv1_100", aliases=("mobilenetv1_100",), pretrained=(
    PretrainedCfg("mobilenet_v1.ra4_e3600_r224_in1k",
                  "https://huggingface.co/timm/mobilenetv1_100.ra4_e3600_r224_in1k/resolve/main/"
                  "model.safetensors", resize_size=resize_for(224, 0.875), interpolation="bicubic",
                  mean=INCEPTION_MEAN, std=INCEPTION_STD, top1=75.382, top5=92.312,
                  license="apache-2.0", hf_hub_id="timm/mobilenetv1_100.ra4_e3600_r224_in1k",
                  cache_name="mobilenetv1_100.ra4_e3600_r224_in1k.safetensors",
                  source="timm 1.0 mobilenetv1_100.ra4_e3600_r224_in1k (Hugging Face Hub); "
                         "top-1/5 from timm's release notes at 224"),))
def mobilenet_v1(**kwargs) -> MobileNetV1:
    return MobileNetV1(**kwargs)
