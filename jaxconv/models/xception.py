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

import collections
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxconv import nn
from jaxconv.models._common import check_input
from jaxconv.models.registry import register_model
from jaxconv.nn import init

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
        return self.rep(x) + shortcut


# ------------------------------------------------------------------------------------ model

# (in_chs, out_chs, reps, stride, start_with_relu, grow_first) for block1 .. block12
_BLOCKS = (
    [(64, 128, 2, 2, False, True), (128, 256, 2, 2, True, True), (256, 728, 2, 2, True, True)]
    + [(728, 728, 3, 1, True, True)] * 8
    + [(728, 1024, 2, 2, True, False)]
)


class Xception(nnx.Module):
    """Xception as timm's legacy ``Xception``.

    Output contract: ``model(x)`` takes NHWC float input (N, H, W, 3) and returns logits
    (N, num_classes) in train and eval mode.

    ``feature_maps(x)`` returns, in order (channels, nominal stride), NHWC: ``stem`` (64, 2;
    after conv2's ReLU), ``block1`` (128, 4), ``block2`` (256, 8), ``entry_flow`` (728, 16;
    block3), ``middle_flow`` (728, 16; block11), ``exit_flow`` (2048, 32; after conv4's BN and
    ReLU). The two stem convs are unpadded, so sizes sit a little below size / stride
    (299 -> 147, 74, 37, 19, 19, 10).

    299x299 native; the minimum input is 7x7 (smaller raises ValueError).
    `dtype` is the compute dtype of every layer (parameters `param_dtype`, BN statistics
    float32). Init as timm: convs kaiming_normal (fan_out, relu), BN weight 1 / bias 0, fc
    torch default. Unlike timm (whose legacy head discards the dropout result), ``drop_rate``
    > 0 really applies dropout before the fc; the default 0.0 makes the two identical.
    """

    min_input_size = 7
    feature_info = {"stem": (64, 2), "block1": (128, 4), "block2": (256, 8),
                    "entry_flow": (728, 16), "middle_flow": (728, 16), "exit_flow": (2048, 32)}

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        conv = functools.partial(nn.Conv2d, bias=False, dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=init.kaiming_normal_fan_out, rngs=rngs)
        norm = functools.partial(nn.BatchNorm2d, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = conv(3, 32, 3, stride=2)
        self.bn1 = norm(32)
        self.conv2 = conv(32, 64, 3)
        self.bn2 = norm(64)
        for i, cfg in enumerate(_BLOCKS):
            setattr(self, f"block{i + 1}", Block(*cfg, conv=conv, norm=norm))
        self.conv3 = SeparableConv2d(1024, 1536, conv=conv)
        self.bn3 = norm(1536)
        self.conv4 = SeparableConv2d(1536, 2048, conv=conv)
        self.bn4 = norm(2048)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate, rngs=rngs)
        self.fc = nn.Linear(2048, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def feature_maps(self, x) -> collections.OrderedDict:
        check_input(x, self.min_input_size, type(self).__name__)
        feats = collections.OrderedDict()  # jit keeps an OrderedDict's order (a dict's it sorts)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = feats["stem"] = jax.nn.relu(self.bn2(self.conv2(x)))
        x = feats["block1"] = self.block1(x)
        x = feats["block2"] = self.block2(x)
        x = feats["entry_flow"] = self.block3(x)
        for i in range(4, 12):
            x = getattr(self, f"block{i}")(x)
        feats["middle_flow"] = x
        x = self.block12(x)
        x = jax.nn.relu(self.bn3(self.conv3(x)))
        feats["exit_flow"] = jax.nn.relu(self.bn4(self.conv4(x)))
        return feats

    def __call__(self, x):
        x = self.feature_maps(x)["exit_flow"]
        x = self.global_pool(x).reshape(x.shape[0], -1)
        return self.fc(self.dropout(x))


# ------------------------------------------------------------------------------ entry points

@register_model
def xception(**kwargs) -> Xception:
    return Xception(**kwargs)
