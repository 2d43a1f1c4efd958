"""Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer
Vision") as an NNX model mirroring torch_ref.models.inception_v3 (torchvision 0.28's layout), so
a torchvision state_dict loads with `jaxconv.convert.from_torch` and no per-model code.

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
The aux head pools to 1x1 before its fc, so its flatten needs no NCHW/NHWC reorder.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from jaxconv import ops
from jaxconv.models.googlenet import TorchvisionInception
from jaxconv.models.registry import register_model
from jaxconv.models.spec import TORCHVISION_LICENSE, TORCHVISION_URL, AuxHead, FeatureInfo, PretrainedCfg
from jaxconv.nn import Linear, MaxPool2d, init as initializers
from jaxconv.nn.blocks import BasicConv2d

__all__ = ["InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE",
           "InceptionAux", "InceptionV3", "inception_v3"]


# ----------------------------------------------------------------------------------- layers

def _avg_pool_3x3(x):
    return ops.avg_pool2d(x, 3, stride=1, padding=1)


def _cat(*xs):
    return jnp.concatenate(xs, axis=-1)


class InceptionA(nnx.Module):
    """35x35 block: 1x1 64 | 1x1 48 -> 5x5 64 | 1x1 64 -> 3x3 96 -> 3x3 96 | avg -> 1x1 pool.
    Output channels 224 + pool_features."""

    def __init__(self, in_chs: int, pool_features: int, *, conv, rngs: nnx.Rngs):
        self.branch1x1 = conv(in_chs, 64, 1, rngs=rngs)
        self.branch5x5_1 = conv(in_chs, 48, 1, rngs=rngs)
        self.branch5x5_2 = conv(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = conv(in_chs, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = conv(in_chs, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return _cat(b1, b5, b3, bp)


class InceptionB(nnx.Module):
    """35 -> 17 grid reduction: 3x3/2 384 | 1x1 64 -> 3x3 96 -> 3x3/2 96 | 3x3/2 max pool.
    Output channels 480 + in_chs."""

    def __init__(self, in_chs: int, *, conv, rngs: nnx.Rngs):
        self.branch3x3 = conv(in_chs, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = conv(in_chs, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = ops.max_pool2d(x, 3, stride=2)
        return _cat(b3, b3d, bp)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7: 1x1 192 | 1x1 c7 -> 1x7 c7 -> 7x1 192 |
    1x1 c7 -> 7x1 -> 1x7 -> 7x1 -> 1x7 192 | avg -> 1x1 192. Output channels 768."""

    def __init__(self, in_chs: int, channels_7x7: int, *, conv, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = conv(in_chs, 192, 1, rngs=rngs)
        self.branch7x7_1 = conv(in_chs, c7, 1, rngs=rngs)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = conv(in_chs, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = conv(in_chs, 192, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return _cat(b1, b7, b7d, bp)


class InceptionD(nnx.Module):
    """17 -> 8 grid reduction: 1x1 192 -> 3x3/2 320 | 1x1 192 -> 1x7 -> 7x1 -> 3x3/2 192 |
    3x3/2 max pool. Output channels 512 + in_chs."""

    def __init__(self, in_chs: int, *, conv, rngs: nnx.Rngs):
        self.branch3x3_1 = conv(in_chs, 192, 1, rngs=rngs)
        self.branch3x3_2 = conv(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = conv(in_chs, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        bp = ops.max_pool2d(x, 3, stride=2)
        return _cat(b3, b7, bp)


class InceptionE(nnx.Module):
    """8x8 block with expanded filter banks: 1x1 320 | 1x1 384 -> (1x3 384, 3x1 384) |
    1x1 448 -> 3x3 384 -> (1x3 384, 3x1 384) | avg -> 1x1 192. Output channels 2048."""

    def __init__(self, in_chs: int, *, conv, rngs: nnx.Rngs):
        self.branch1x1 = conv(in_chs, 320, 1, rngs=rngs)
        self.branch3x3_1 = conv(in_chs, 384, 1, rngs=rngs)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = conv(in_chs, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = conv(in_chs, 192, 1, rngs=rngs)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = _cat(self.branch3x3_2a(b3), self.branch3x3_2b(b3))
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = _cat(self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return _cat(b1, b3, b3d, bp)


class InceptionAux(nnx.Module):
    """Auxiliary classifier on the 17x17 grid: 5x5/3 avg pool -> 1x1 conv 128 -> 5x5 conv 768
    (valid) -> global average pool -> fc. Needs a Mixed_6e map of at least 17x17."""

    def __init__(self, in_chs: int, num_classes: int, *, conv, linear, fc_init,
                 rngs: nnx.Rngs):
        self.conv0 = conv(in_chs, 128, 1, rngs=rngs)
        self.conv1 = conv(128, 768, 5, rngs=rngs)
        self.fc = linear(768, num_classes, kernel_init=fc_init, rngs=rngs)

    def __call__(self, x):
        x = ops.avg_pool2d(x, 5, stride=3)
        x = self.conv1(self.conv0(x))
        x = jnp.mean(x, axis=(1, 2))  # global average: NHWC and NCHW flatten agree
        return self.fc(x)


# ------------------------------------------------------------------------------------ model

class InceptionV3(TorchvisionInception):
    """Inception-v3 as torchvision's ``Inception3`` (aux_logits=True, transform_input=False
    defaults).

    In eval mode ``model(x)`` returns logits (N, num_classes). In train mode with
    ``aux_logits=True`` it returns ``{"logits": ..., "aux": ...}`` (the aux head taps Mixed_6e);
    with ``aux_logits=False`` it returns logits and builds no ``AuxLogits``. Feature levels
    (timm's): ``Conv2d_2b_3x3`` (64, 2), ``Conv2d_4a_3x3`` (192, 4), ``Mixed_5d`` (288, 8),
    ``Mixed_6e`` (768, 16), ``Mixed_7c`` (2048, 32); the convs and pools are unpadded, so sizes
    are a little below size / stride (299 -> 147, 71, 35, 17, 8).

    Input: NHWC float (N, H, W, in_chans). 299x299 native. The minimum input is 75x75 (smaller
    raises ValueError); in train mode the aux head additionally needs Mixed_6e >= 17x17, i.e.
    an input of at least 299x299 (smaller raises ValueError). ``dtype`` is the compute dtype;
    parameters and BN statistics are float32. Init as torchvision: conv and linear weights
    truncated normal std 0.1 (cut at +-2 absolute), except AuxLogits.fc std 0.001; linear
    biases torch default; BN weight 1 / bias 0. (torchvision also tags AuxLogits.conv1 with std
    0.01, but on the wrapper module, so its conv gets 0.1; we reproduce that effective init.)
    """

    min_input_size = 75
    aux_min_input_size = 299     # Mixed_6e of at least 17x17 for the aux head's 5x5/3 pool and 5x5 conv
    feature_levels = (FeatureInfo("Conv2d_2b_3x3", 64, 2), FeatureInfo("Conv2d_4a_3x3", 192, 4),
                      FeatureInfo("Mixed_5d", 288, 8), FeatureInfo("Mixed_6e", 768, 16),
                      FeatureInfo("Mixed_7c", 2048, 32))
    classifier_name = "fc"
    first_conv = "Conv2d_1a_3x3.conv"
    # loss + 0.4 * aux (torchvision's fine-tuning guide)
    aux_heads = (AuxHead("AuxLogits", "aux", 0.4, "AuxLogits.fc"),)

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True,
                 transform_input: bool = False, drop_rate: float = 0.5, global_pool: str = "avg",
                 in_chans: int = 3, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        aux_logits = aux_logits and num_classes > 0
        self.in_chans, self.dtype, self.param_dtype = in_chans, dtype, param_dtype
        self.transform_input = transform_input
        self._w_init = initializers.trunc_normal(0.1, -2.0, 2.0)
        self._aux_init = initializers.trunc_normal(0.001, -2.0, 2.0)
        conv = functools.partial(BasicConv2d, eps=1e-3, dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=self._w_init)
        linear = functools.partial(Linear, dtype=dtype, param_dtype=param_dtype)
        blk = dict(conv=conv, rngs=rngs)

        self.Conv2d_1a_3x3 = conv(in_chans, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = conv(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1, rngs=rngs)
        self.maxpool1 = MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = conv(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = conv(80, 192, 3, rngs=rngs)
        self.maxpool2 = MaxPool2d(3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32, **blk)
        self.Mixed_5c = InceptionA(256, pool_features=64, **blk)
        self.Mixed_5d = InceptionA(288, pool_features=64, **blk)
        self.Mixed_6a = InceptionB(288, **blk)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, **blk)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, **blk)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, **blk)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, **blk)
        self.AuxLogits = nnx.data(InceptionAux(768, num_classes, conv=conv, linear=linear,
                                               fc_init=self._aux_init, rngs=rngs)
                                  if aux_logits else None)
        self.Mixed_7a = InceptionD(768, **blk)
        self.Mixed_7b = InceptionE(1280, **blk)
        self.Mixed_7c = InceptionE(2048, **blk)
        self._head(2048, num_classes, drop_rate, global_pool, rngs=rngs)

    def _classifier(self, num_classes, rngs):
        return Linear(self.num_features, num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self._w_init, rngs=rngs)

    @property
    def aux_logits(self) -> bool:
        return self.AuxLogits is not None

    def stages(self):
        def run(*names):
            def fn(m, x, with_aux):
                for name in names:
                    x = getattr(m, name)(x)
                aux = {}
                if with_aux and names[-1] == "Mixed_6e":
                    if min(x.shape[1:3]) < 17:   # Mixed_6e < 17x17 exactly when input < 299 px
                        raise ValueError(f"{type(m).__name__}: x: the aux head (train mode, "
                                         f"aux_logits=True) needs an input of at least 299x299; "
                                         f"build the model with aux_logits=False for smaller "
                                         f"inputs")
                    aux["aux"] = m.AuxLogits(x)
                return x, x, aux
            return fn

        return list(zip(self.feature_levels, [
            run("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
            run("maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3"),
            run("maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d"),
            run("Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
            run("Mixed_7a", "Mixed_7b", "Mixed_7c")]))


# ------------------------------------------------------------------------------ entry points

@register_model(mirrors="torchvision inception_v3", input_size=299, pretrained=(PretrainedCfg(
    "inception_v3.tv_in1k", TORCHVISION_URL + "inception_v3_google-0cc3c7bd.pth",
    input_size=299, resize_size=342, top1=77.294, top5=93.450, license=TORCHVISION_LICENSE,
    model_kwargs=(("transform_input", True),),
    source="torchvision 0.28 Inception_V3_Weights.IMAGENET1K_V1 (ported from TensorFlow; the "
           "file holds the AuxLogits head)"),))
def inception_v3(**kwargs) -> InceptionV3:
    return InceptionV3(**kwargs)
