"""GoogLeNet / Inception-v1 (Szegedy et al. 2015, "Going Deeper with Convolutions") as an NNX
model mirroring torch_ref.models.googlenet (torchvision 0.28's layout), so a torchvision
state_dict loads with `jaxconv.convert.from_torch` and no per-model code.

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
4x4, 1x1 conv to 128, fc 2048 -> 1024, ReLU, dropout 0.7, fc 1024 -> num_classes. Activations
are NHWC; the aux heads flatten (4, 4, 128) in HWC order, and `torch_flatten_inputs` tells the
converter to reorder fc1's input rows from torch's CHW flatten order.
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxconv import ops
from jaxconv.models._common import check_input
from jaxconv.models.registry import register_model
from jaxconv.nn import AdaptiveAvgPool2d, Dropout, Linear, MaxPool2d, Sequential, init as initializers
from jaxconv.nn.blocks import BasicConv2d

__all__ = ["Inception", "InceptionAux", "GoogLeNet", "googlenet", "transform_input"]

# channel re-normalisation of transform_input: from torchvision's ImageNet mean/std to [-1, 1]
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def transform_input(x):
    """Map an NHWC input normalised with ImageNet mean/std to the [-1, 1] scaling of the TF
    weights: channel c (last axis) becomes ``x_c * std_c / 0.5 + (mean_c - 0.5) / 0.5``."""
    scale = np.asarray([s / 0.5 for s in _STD], np.float32)
    shift = np.asarray([(m - 0.5) / 0.5 for m in _MEAN], np.float32)
    return (x * scale.astype(x.dtype) + shift.astype(x.dtype)).astype(x.dtype)


# ----------------------------------------------------------------------------------- layers

class Inception(nnx.Module):
    """Four parallel branches concatenated on channels:
    1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 (the paper's 5x5) | 3x3/1 max pool (ceil) -> 1x1."""

    def __init__(self, in_chs: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int, *, conv, rngs: nnx.Rngs):
        self.branch1 = conv(in_chs, ch1x1, 1, rngs=rngs)
        self.branch2 = Sequential(conv(in_chs, ch3x3red, 1, rngs=rngs),
                                  conv(ch3x3red, ch3x3, 3, padding=1, rngs=rngs))
        self.branch3 = Sequential(conv(in_chs, ch5x5red, 1, rngs=rngs),
                                  conv(ch5x5red, ch5x5, 3, padding=1, rngs=rngs))
        self.branch4 = Sequential(MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                  conv(in_chs, pool_proj, 1, rngs=rngs))
        self.out_chs = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def __call__(self, x):
        return jnp.concatenate([self.branch1(x), self.branch2(x), self.branch3(x),
                                self.branch4(x)], axis=-1)


class InceptionAux(nnx.Module):
    """Auxiliary classifier: adaptive avg pool 4x4 -> 1x1 conv 128 -> fc 1024 -> ReLU ->
    dropout 0.7 -> fc num_classes. Works for any input size (adaptive pooling). fc1 reads the
    (4, 4, 128) map flattened in NHWC order (see GoogLeNet.torch_flatten_inputs)."""

    def __init__(self, in_chs: int, num_classes: int, drop_rate: float = 0.7, *, conv, linear,
                 rngs: nnx.Rngs):
        self.conv = conv(in_chs, 128, 1, rngs=rngs)
        self.fc1 = linear(128 * 4 * 4, 1024, rngs=rngs)
        self.fc2 = linear(1024, num_classes, rngs=rngs)
        self.dropout = Dropout(drop_rate, rngs=rngs)

    def __call__(self, x):
        x = self.conv(ops.adaptive_avg_pool2d(x, 4))
        x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
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


class GoogLeNet(nnx.Module):
    """GoogLeNet as torchvision's ``GoogLeNet`` (aux_logits=True, transform_input=False defaults).

    Output contract: in eval mode ``model(x)`` returns logits (N, num_classes). In train mode with
    ``aux_logits=True`` it returns ``{"logits": ..., "aux1": ..., "aux2": ...}`` (aux1 taps
    inception4a, aux2 taps inception4d); with ``aux_logits=False`` it returns logits.
    ``aux_logits=False`` builds no aux heads (no ``aux1.*`` / ``aux2.*`` keys).
    Train / eval mode is ``model.train()`` / ``model.eval()`` (BatchNorm's use_running_average).

    ``feature_maps(x)`` returns, in order (channels, stride), NHWC: ``stem`` (192, 8; after
    maxpool2), ``inception3b`` (480, 8), ``inception4e`` (832, 16), ``inception5b`` (1024, 32).
    Spatial sizes are ceil(size / stride) (ceil-mode pools). ``transform_input`` is applied first,
    in ``__call__`` and ``feature_maps`` alike.

    Input: NHWC float (N, H, W, 3). 224x224 native; the minimum input is 15x15 (smaller inputs
    raise ValueError). ``dtype`` is the compute dtype; parameters and BN statistics are float32.
    Init as torchvision: conv and linear weights truncated normal (std 0.01, cut at +-2
    absolute, i.e. effectively untruncated), linear biases torch default, BN weight 1 / bias 0.
    """

    min_input_size = 15

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True,
                 transform_input: bool = False, drop_rate: float = 0.2, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.feature_info = {"stem": (192, 8), "inception3b": (480, 8),
                             "inception4e": (832, 16), "inception5b": (1024, 32)}
        # torch flattens the aux heads' (128, 4, 4) NCHW map; we flatten NHWC (see convert/)
        self.torch_flatten_inputs = ({"aux1.fc1": (128, 4, 4), "aux2.fc1": (128, 4, 4)}
                                     if aux_logits else {})
        w_init = initializers.trunc_normal(0.01, -2.0, 2.0)
        conv = functools.partial(BasicConv2d, eps=1e-3, dtype=dtype, kernel_init=w_init)
        linear = functools.partial(Linear, dtype=dtype, kernel_init=w_init)
        inception = functools.partial(Inception, conv=conv, rngs=rngs)

        self.conv1 = conv(3, 64, 7, stride=2, padding=3, rngs=rngs)
        self.maxpool1 = MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = conv(64, 64, 1, rngs=rngs)
        self.conv3 = conv(64, 192, 3, padding=1, rngs=rngs)
        self.maxpool2 = MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = inception(*_INCEPTION_CFG["inception3a"])
        self.inception3b = inception(*_INCEPTION_CFG["inception3b"])
        self.maxpool3 = MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = inception(*_INCEPTION_CFG["inception4a"])
        self.inception4b = inception(*_INCEPTION_CFG["inception4b"])
        self.inception4c = inception(*_INCEPTION_CFG["inception4c"])
        self.inception4d = inception(*_INCEPTION_CFG["inception4d"])
        self.inception4e = inception(*_INCEPTION_CFG["inception4e"])
        self.maxpool4 = MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = inception(*_INCEPTION_CFG["inception5a"])
        self.inception5b = inception(*_INCEPTION_CFG["inception5b"])

        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, conv=conv, linear=linear, rngs=rngs)
            self.aux2 = InceptionAux(528, num_classes, conv=conv, linear=linear, rngs=rngs)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = AdaptiveAvgPool2d(1)
        self.dropout = Dropout(drop_rate, rngs=rngs)
        self.fc = linear(1024, num_classes, rngs=rngs)

    @property
    def training(self) -> bool:
        """True after ``model.train()`` (BatchNorm uses batch statistics), as torch's flag."""
        return not self.conv1.bn.use_running_average

    def _features(self, x, with_aux: bool):
        """One pass through the body: (feature maps by name, aux logits by name)."""
        check_input(x, self.min_input_size, type(self).__name__)
        if self.transform_input:
            x = transform_input(x)
        # OrderedDict: jax keeps its key order through jit (a plain dict comes back sorted)
        feats, aux = collections.OrderedDict(), {}
        x = self.maxpool1(self.conv1(x))
        x = feats["stem"] = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.inception3a(x)
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

    def feature_maps(self, x) -> dict:
        """The per-stage NHWC feature maps named in the class docstring, in order."""
        return self._features(x, with_aux=False)[0]

    def __call__(self, x):
        with_aux = self.training and self.aux_logits
        feats, aux = self._features(x, with_aux)
        x = self.avgpool(feats["inception5b"])
        logits = self.fc(self.dropout(x.reshape(x.shape[0], -1)))
        if with_aux:
            return collections.OrderedDict(logits=logits, **aux)
        return logits


# ------------------------------------------------------------------------------ entry points

@register_model
def googlenet(**kwargs) -> GoogLeNet:
    return GoogLeNet(**kwargs)
