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

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxconv import ops
from jaxconv.models._common import Classifier
from jaxconv.models.registry import register_model
from jaxconv.models.spec import TORCHVISION_LICENSE, TORCHVISION_URL, AuxHead, FeatureInfo, PretrainedCfg
from jaxconv.nn import Dropout, Linear, MaxPool2d, Sequential, init as initializers
from jaxconv.nn.blocks import BasicConv2d

__all__ = ["Inception", "InceptionAux", "TorchvisionInception", "GoogLeNet", "googlenet",
           "transform_input"]

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
        x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], self.fc1.in_features)))
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


class TorchvisionInception(Classifier):
    """What GoogLeNet and Inception-v3 share: torchvision's ``transform_input`` (applied
    first, in every forward) and the aux heads (``aux_logits``), whose logits ``model(x)``
    returns by name in train mode."""

    def _prepare(self, x):
        x = super()._prepare(x)
        return transform_input(x) if self.transform_input else x

    def _aux_classifier(self, aux, in_features, num_classes, rngs):
        return Linear(in_features, num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self._aux_init, rngs=rngs)


class GoogLeNet(TorchvisionInception):
    """GoogLeNet as torchvision's ``GoogLeNet`` (aux_logits=True, transform_input=False defaults).

    In eval mode ``model(x)`` returns logits (N, num_classes). In train mode with
    ``aux_logits=True`` it returns ``{"logits": ..., "aux1": ..., "aux2": ...}`` (aux1 taps
    inception4a, aux2 taps inception4d); with ``aux_logits=False`` it returns logits and builds
    no aux heads (no ``aux1.*`` / ``aux2.*`` keys). Feature levels: ``conv1`` (64, 2),
    ``conv3`` (192, 4), ``inception3b`` (480, 8), ``inception4e`` (832, 16), ``inception5b``
    (1024, 32); sizes are ceil(size / stride) (ceil-mode pools).

    Input: NHWC float (N, H, W, in_chans). 224x224 native; the minimum input is 15x15 (smaller
    inputs raise ValueError). ``dtype`` is the compute dtype; parameters and BN statistics are
    float32. Init as torchvision: conv and linear weights truncated normal (std 0.01, cut at +-2
    absolute, i.e. effectively untruncated), linear biases torch default, BN weight 1 / bias 0.
    """

    min_input_size = 15
    feature_levels = (FeatureInfo("conv1", 64, 2), FeatureInfo("conv3", 192, 4),
                      FeatureInfo("inception3b", 480, 8), FeatureInfo("inception4e", 832, 16),
                      FeatureInfo("inception5b", 1024, 32))
    classifier_name = "fc"
    first_conv = "conv1.conv"
    # each aux loss with weight 0.3 (the paper, sec. 5)
    aux_heads = (AuxHead("aux1", "aux1", 0.3, "aux1.fc2"), AuxHead("aux2", "aux2", 0.3, "aux2.fc2"))

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True,
                 transform_input: bool = False, drop_rate: float = 0.2, global_pool: str = "avg",
                 in_chans: int = 3, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        aux_logits = aux_logits and num_classes > 0
        self.in_chans, self.dtype, self.param_dtype = in_chans, dtype, param_dtype
        self.transform_input = transform_input
        # torch flattens the aux heads' (128, 4, 4) NCHW map; we flatten NHWC (see convert/)
        self.torch_flatten_inputs = ({"aux1.fc1": (128, 4, 4), "aux2.fc1": (128, 4, 4)}
                                     if aux_logits else {})
        self._aux_init = initializers.trunc_normal(0.01, -2.0, 2.0)
        conv = functools.partial(BasicConv2d, eps=1e-3, dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=self._aux_init)
        linear = functools.partial(Linear, dtype=dtype, param_dtype=param_dtype, kernel_init=self._aux_init)
        inception = functools.partial(Inception, conv=conv, rngs=rngs)

        self.conv1 = conv(in_chans, 64, 7, stride=2, padding=3, rngs=rngs)
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
            self.aux1 = self.aux2 = nnx.data(None)
        self._head(1024, num_classes, drop_rate, global_pool, rngs=rngs)

    def _classifier(self, num_classes, rngs):
        return Linear(self.num_features, num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self._aux_init, rngs=rngs)

    @property
    def aux_logits(self) -> bool:
        return self.aux1 is not None

    def stages(self):
        def run(*names):
            def fn(m, x, with_aux):
                aux = {}
                for name in names:
                    x = getattr(m, name)(x)
                    if with_aux and name in ("inception4a", "inception4d"):
                        head = "aux1" if name == "inception4a" else "aux2"
                        aux[head] = getattr(m, head)(x)
                return x, x, aux
            return fn

        return list(zip(self.feature_levels, [
            run("conv1"), run("maxpool1", "conv2", "conv3"),
            run("maxpool2", "inception3a", "inception3b"),
            run("maxpool3", "inception4a", "inception4b", "inception4c", "inception4d",
                "inception4e"),
            run("maxpool4", "inception5a", "inception5b")]))


# ------------------------------------------------------------------------------ entry points

@register_model(mirrors="torchvision googlenet", pretrained=(PretrainedCfg(
    "googlenet.tv_in1k", TORCHVISION_URL + "googlenet-1378be20.pth", top1=69.778, top5=89.530,
    license=TORCHVISION_LICENSE, model_kwargs=(("transform_input", True),),
    source="torchvision 0.28 GoogLeNet_Weights.IMAGENET1K_V1 (ported from the paper's weights; "
           "its aux heads are in the file, untrained)"),))
def googlenet(**kwargs) -> GoogLeNet:
    return GoogLeNet(**kwargs)
