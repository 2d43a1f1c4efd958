"""Xception (Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions"),
in timm 1.0's ``legacy_xception`` layout: parameter paths equal timm's state_dict keys
(torch_ref.models.xception mirrors it), so its checkpoints load with convert.from_torch.

    stage         module     output (299)   what
    entry flow    conv1      149 x 32       3x3/2 valid conv, BN, ReLU
                  conv2      147 x 64       3x3 valid conv, BN, ReLU
                  block1     74 x 128       2 sep convs (no leading ReLU), 3x3/2 max pool
                  block2     37 x 256       2 sep convs, 3x3/2 max pool
                  block3     19 x 728       2 sep convs, 3x3/2 max pool
    middle flow   block4-11  19 x 728       3 sep convs each, identity shortcut
    exit flow     block12    10 x 1024      sep 728, sep 1024, 3x3/2 max pool
                  conv3      10 x 1536      sep conv, BN, ReLU
                  conv4      10 x 2048      sep conv, BN, ReLU
    head          global average pool, dropout (drop_rate), fc

A block's repeated unit is ReLU -> SeparableConv2d (3x3 depthwise pad 1, then 1x1, no biases)
-> BN; blocks that change width or stride have a 1x1 strided conv + BN shortcut (``skip``,
``skipbn``). Max pools pad 1 (floor mode). BatchNorm uses torch defaults (eps 1e-5).
The ReLUs and max pools sit in ``rep`` as parameterless entries so the indices of the convs
and BNs in it equal timm's (``block1.rep.0.conv1``, ``block1.rep.1``, ``block1.rep.3...``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxconv import nn
from jaxconv.models._common import Classifier
from jaxconv.models.registry import register_model
from jaxconv.models.spec import INCEPTION_MEAN, INCEPTION_STD, FeatureInfo, PretrainedCfg, resize_for
from jaxconv.nn import init
from jaxconv.ops import fusion_barrier

__all__ = ["ReLU", "SeparableConv2d", "Block", "Xception", "xception"]


# ----------------------------------------------------------------------------------- layers

class ReLU(nnx.Module):
    """Parameterless ReLU, a placeholder that keeps Sequential indices equal to torch's."""

    def __call__(self, x):
        return jax.nn.relu(x)


class SeparableConv2d(nnx.Module):
    """Depthwise kxk conv (``conv1``) followed by pointwise 1x1 conv (``pointwise``), no biases
    (timm's legacy names; jaxconv.nn.SeparableConv2d names them depthwise / pointwise)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, padding: int = 1, *,
                 conv):
        self.conv1 = conv(in_chs, in_chs, kernel_size, padding=padding, groups=in_chs)
        self.pointwise = conv(in_chs, out_chs, 1)

    def __call__(self, x):
        return self.pointwise(self.conv1(x))


class Block(nnx.Module):
    """``reps`` x (ReLU, SeparableConv2d, BN) in ``rep``, then a 3x3 max pool if strided; plus a
    shortcut. With ``grow_first`` the first sep conv changes the width, otherwise the last one.
    ``start_with_relu=False`` drops the leading ReLU (block1, right after the stem ReLU)."""

    def __init__(self, in_chs: int, out_chs: int, reps: int, stride: int = 1,
                 start_with_relu: bool = True, grow_first: bool = True, *, conv, norm):
        if out_chs != in_chs or stride != 1:
            self.skip = conv(in_chs, out_chs, 1, stride=stride)
            self.skipbn = norm(out_chs)
        else:
            self.skip = self.skipbn = None

        # channel widths along the block: widen at the first or at the last sep conv
        mid = out_chs if grow_first else in_chs
        widths = [in_chs] + [mid] * (reps - 1) + [out_chs]
        layers = []
        for i in range(reps):
            if i > 0 or start_with_relu:
                layers.append(ReLU())
            layers.append(SeparableConv2d(widths[i], widths[i + 1], conv=conv))
            layers.append(norm(widths[i + 1]))
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.rep = nn.Sequential(*layers)

    def __call__(self, x):
        shortcut = x if self.skip is None else self.skipbn(self.skip(x))
        # stored once: XLA:CPU would otherwise recompute the chain of blocks in every add
        return fusion_barrier(self.rep(x) + shortcut)


# ------------------------------------------------------------------------------------ model

# (in_chs, out_chs, reps, stride, start_with_relu, grow_first) for block1 .. block12
_BLOCKS = (
    [(64, 128, 2, 2, False, True), (128, 256, 2, 2, True, True), (256, 728, 2, 2, True, True)]
    + [(728, 728, 3, 1, True, True)] * 8
    + [(728, 1024, 2, 2, True, False)]
)


class Xception(Classifier):
    """Xception as timm's legacy ``Xception``.

    ``model(x)`` takes NHWC float input (N, H, W, in_chans) and returns logits
    (N, num_classes) in train and eval mode. Feature levels (timm's, hooks on those modules):
    ``act2`` (64, 2; the stem's output), ``block2.rep.0`` (128, 4; ReLU of block1's output),
    ``block3.rep.0`` (256, 8; ReLU of block2's), ``block12.rep.0`` (728, 16; ReLU of the
    middle flow's), ``act4`` (2048, 32; after conv4's BN and ReLU). The two stem convs are
    unpadded, so sizes sit a little below size / stride (299 -> 147, 74, 37, 19, 10).

    299x299 native; the minimum input is 7x7 (smaller raises ValueError).
    `dtype` is the compute dtype of every layer (parameters `param_dtype`, BN statistics
    float32). Init as timm: convs kaiming_normal (fan_out, relu), BN weight 1 / bias 0, fc
    torch default. Unlike timm (whose legacy head discards the dropout result), ``drop_rate``
    > 0 really applies dropout before the fc; the default 0.0 makes the two identical.
    """

    min_input_size = 7
    feature_levels = (FeatureInfo("act2", 64, 2), FeatureInfo("block2.rep.0", 128, 4),
                      FeatureInfo("block3.rep.0", 256, 8), FeatureInfo("block12.rep.0", 728, 16),
                      FeatureInfo("act4", 2048, 32))
    classifier_name = "fc"
    first_conv = "conv1"

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0, global_pool: str = "avg",
                 in_chans: int = 3, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        conv = functools.partial(nn.Conv2d, bias=False, dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=init.kaiming_normal_fan_out, rngs=rngs)
        norm = functools.partial(nn.BatchNorm2d, dtype=dtype, param_dtype=param_dtype)
        self.in_chans, self.dtype, self.param_dtype = in_chans, dtype, param_dtype
        self.conv1 = conv(in_chans, 32, 3, stride=2)
        self.bn1 = norm(32)
        self.conv2 = conv(32, 64, 3)
        self.bn2 = norm(64)
        for i, cfg in enumerate(_BLOCKS):
            setattr(self, f"block{i + 1}", Block(*cfg, conv=conv, norm=norm))
        self.conv3 = SeparableConv2d(1024, 1536, conv=conv)
        self.bn3 = norm(1536)
        self.conv4 = SeparableConv2d(1536, 2048, conv=conv)
        self.bn4 = norm(2048)
        self._head(2048, num_classes, drop_rate, global_pool, rngs=rngs)

    def stages(self):
        def stem(m, x, with_aux):
            x = jax.nn.relu(m.bn1(m.conv1(x)))
            x = jax.nn.relu(m.bn2(m.conv2(x)))
            return x, x, {}

        def blocks(first, last):   # the feature: the ReLU that starts the next block
            def run(m, x, with_aux):
                for i in range(first, last + 1):
                    x = getattr(m, f"block{i}")(x)
                return x, jax.nn.relu(x), {}
            return run

        def exit_flow(m, x, with_aux):
            x = m.block12(x)
            x = jax.nn.relu(m.bn3(m.conv3(x)))
            x = jax.nn.relu(m.bn4(m.conv4(x)))
            return x, x, {}

        return list(zip(self.feature_levels,
                        [stem, blocks(1, 1), blocks(2, 2), blocks(3, 11), exit_flow]))


# ------------------------------------------------------------------------------ entry points

@register_model(mirrors="timm legacy_xception", aliases=("legacy_xception",), input_size=299,
                pretrained=(PretrainedCfg(
                    "xception.tf_in1k", "https://github.com/rwightman/pytorch-image-models/"
                    "releases/download/v0.1-cadene/xception-43020ad28.pth", input_size=299,
                    resize_size=resize_for(299, 0.8975), interpolation="bicubic",
                    mean=INCEPTION_MEAN, std=INCEPTION_STD, top1=79.058, top5=94.396,
                    license="apache-2.0",
                    source="timm 1.0 legacy_xception.tf_in1k (Cadene's port of the Keras "
                           "weights); top-1/5 from timm's results-imagenet.csv"),))
def xception(**kwargs) -> Xception:
    return Xception(**kwargs)
