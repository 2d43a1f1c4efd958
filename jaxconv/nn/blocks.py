"""The Inception -> Xception family (Xception paper, Figures 1-4) and the ResNeXt block in its
three equivalent forms (ResNeXt paper, Figure 3), as NNX modules.

Every conv is followed by BatchNorm and ReLU (`BasicConv2d`), as in Inception v3; each branch
owns its weights. torch_ref.blocks mirrors these classes with the same attribute names.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxconv.nn.conv import Conv2d
from jaxconv.nn.linear import Sequential
from jaxconv.nn.norm import BatchNorm2d
from jaxconv.nn.pool import AvgPool2d
from jaxconv.ops import fusion_barrier


class BasicConv2d(nnx.Module):
    """conv (no bias) -> BatchNorm -> ReLU, torchvision's BasicConv2d (`conv`, `bn`); `dtype`
    and `param_dtype` (in `kw`, with the conv's other options) apply to both."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
                 eps=1e-5, *, rngs: nnx.Rngs, **kw):
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                           bias=False, rngs=rngs, **kw)
        self.bn = BatchNorm2d(out_channels, eps=eps, dtype=kw.get("dtype"),
                              param_dtype=kw.get("param_dtype", jnp.float32))

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionModule(nnx.Module):
    """Figure 1, the canonical Inception module: 1x1 | 1x1->3x3 | 1x1->3x3->3x3 | avgpool->1x1,
    concatenated on channels."""

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch3x3dbl_red, ch3x3dbl, pool_proj, *,
                 rngs: nnx.Rngs):
        self.branch1 = BasicConv2d(in_channels, ch1x1, 1, rngs=rngs)
        self.branch2 = Sequential(BasicConv2d(in_channels, ch3x3red, 1, rngs=rngs),
                                  BasicConv2d(ch3x3red, ch3x3, 3, padding=1, rngs=rngs))
        self.branch3 = Sequential(BasicConv2d(in_channels, ch3x3dbl_red, 1, rngs=rngs),
                                  BasicConv2d(ch3x3dbl_red, ch3x3dbl, 3, padding=1, rngs=rngs),
                                  BasicConv2d(ch3x3dbl, ch3x3dbl, 3, padding=1, rngs=rngs))
        self.branch4 = Sequential(AvgPool2d(3, stride=1, padding=1),
                                  BasicConv2d(in_channels, pool_proj, 1, rngs=rngs))

    def __call__(self, x):
        return jnp.concatenate([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)],
                               axis=-1)


class SimplifiedInception(nnx.Module):
    """Figure 2: `towers` independent 1x1 -> 3x3 towers, concatenated (towers * out_channels)."""

    def __init__(self, in_channels, reduce_channels, out_channels, towers=3, *, rngs: nnx.Rngs):
        self.towers = nnx.List([
            Sequential(BasicConv2d(in_channels, reduce_channels, 1, rngs=rngs),
                       BasicConv2d(reduce_channels, out_channels, 3, padding=1, rngs=rngs))
            for _ in range(towers)])

    def __call__(self, x):
        return jnp.concatenate([tower(x) for tower in self.towers], axis=-1)


class SegmentedInception(nnx.Module):
    """Figure 3: one large 1x1 conv, then a 3x3 conv over `segments` non-overlapping channel
    segments (a grouped conv). With tied weights it equals SimplifiedInception(towers=segments)."""

    def __init__(self, in_channels, mid_channels, out_channels, segments=3, *, rngs: nnx.Rngs):
        self.reduce = BasicConv2d(in_channels, mid_channels, 1, rngs=rngs)
        self.spatial = BasicConv2d(mid_channels, out_channels, 3, padding=1, groups=segments,
                                   rngs=rngs)

    def __call__(self, x):
        return self.spatial(self.reduce(x))


class ExtremeInception(SegmentedInception):
    """Figure 4: segments = channels, i.e. a 1x1 conv then a depthwise 3x3 conv, each followed by
    BN + ReLU. Xception drops the intermediate ReLU: SeparableConv2d(pointwise_first=True)."""

    def __init__(self, in_channels, out_channels, *, rngs: nnx.Rngs):
        super().__init__(in_channels, out_channels, out_channels, segments=out_channels, rngs=rngs)


def _downsample(in_channels, out_channels, stride, rngs):
    """1x1 projection shortcut (torchvision's `downsample`), or None for the identity."""
    if stride == 1 and in_channels == out_channels:
        return None
    return Sequential(Conv2d(in_channels, out_channels, 1, stride, bias=False, rngs=rngs),
                      BatchNorm2d(out_channels))


class _ResNeXtBase(nnx.Module):
    def _residual(self, x, y):
        shortcut = x if self.downsample is None else self.downsample(x)
        return fusion_barrier(jax.nn.relu(self.bn3(y) + shortcut))   # see ops.barrier


class _Path(nnx.Module):
    """One of the `cardinality` paths: 1x1 (in -> width) -> 3x3 (width -> width) [-> 1x1 (width -> out)]."""

    def __init__(self, in_channels, width, out_channels, stride, *, rngs):
        self.conv1 = Conv2d(in_channels, width, 1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = Conv2d(width, width, 3, stride, 1, bias=False, rngs=rngs)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = Conv2d(width, out_channels, 1, bias=False, rngs=rngs) if out_channels is not None else None

    def __call__(self, x):
        y = jax.nn.relu(self.bn2(self.conv2(jax.nn.relu(self.bn1(self.conv1(x))))))
        return y if self.conv3 is None else self.conv3(y)


class ResNeXtBlockA(_ResNeXtBase):
    """Form (a): `cardinality` explicit paths, each ending in its own 1x1 conv, summed."""

    def __init__(self, in_channels, out_channels, cardinality=32, width=4, stride=1, *,
                 rngs: nnx.Rngs):
        self.paths = nnx.List([_Path(in_channels, width, out_channels, stride, rngs=rngs)
                               for _ in range(cardinality)])
        self.bn3 = BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride, rngs)

    def __call__(self, x):
        return self._residual(x, sum(path(x) for path in self.paths))


class ResNeXtBlockB(_ResNeXtBase):
    """Form (b): paths of 1x1 -> 3x3, concatenated, then one 1x1 conv."""

    def __init__(self, in_channels, out_channels, cardinality=32, width=4, stride=1, *,
                 rngs: nnx.Rngs):
        self.paths = nnx.List([_Path(in_channels, width, None, stride, rngs=rngs)
                               for _ in range(cardinality)])
        self.conv3 = Conv2d(cardinality * width, out_channels, 1, bias=False, rngs=rngs)
        self.bn3 = BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride, rngs)

    def __call__(self, x):
        return self._residual(x, self.conv3(jnp.concatenate([p(x) for p in self.paths], axis=-1)))


class ResNeXtBlockC(_ResNeXtBase):
    """Form (c): 1x1 -> grouped 3x3 (groups = cardinality) -> 1x1; torchvision's Bottleneck layout."""

    def __init__(self, in_channels, out_channels, cardinality=32, width=4, stride=1, *,
                 rngs: nnx.Rngs):
        inner = cardinality * width
        self.conv1 = Conv2d(in_channels, inner, 1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm2d(inner)
        self.conv2 = Conv2d(inner, inner, 3, stride, 1, groups=cardinality, bias=False, rngs=rngs)
        self.bn2 = BatchNorm2d(inner)
        self.conv3 = Conv2d(inner, out_channels, 1, bias=False, rngs=rngs)
        self.bn3 = BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride, rngs)

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        return self._residual(x, self.conv3(y))
