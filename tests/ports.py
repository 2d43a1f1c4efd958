"""A user's port that is not in the registry, for jaxconv.verify.compare's tests and CLI: a small
detection-style backbone (stem, a block with a shortcut, a DCNv2 layer, a head) in torch and in
jaxconv.nn with the same attribute names, plus factories with one planted bug each.

Every factory takes no arguments (the CLI calls ``--torch tests.ports:torch_net --jax
tests.ports:jax_net``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from flax import nnx

import torch_ref.deform as tdeform
from jaxconv import nn, ops

# ----------------------------------------------------------------------------------- torch

class TorchBlock(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.block = TorchBlock(8)
        self.dcn = tdeform.ModulatedDeformConv2dPack(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.dcn(self.block(x))
        return self.fc(torch.relu(self.head(x.mean(dim=(2, 3)))))


def torch_net() -> TorchNet:
    torch.manual_seed(0)
    net = TorchNet()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # non-trivial BN statistics and offsets, so that eval tests them
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        net.dcn.conv_offset.weight.copy_(0.3 * torch.randn(net.dcn.conv_offset.weight.shape,
                                                           generator=g))
    return net.eval()


# ----------------------------------------------------------------------------------- jaxconv

class Block(nnx.Module):
    def __init__(self, c, *, eps=1e-5, final_relu=True, pad=1, rngs):
        self.conv1 = nn.Conv2d(c, c, 3, padding=pad, bias=False, rngs=rngs)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False, rngs=rngs)
        self.bn2 = nn.BatchNorm2d(c, eps=eps)
        self.final_relu = final_relu

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + x
        return jax.nn.relu(y) if self.final_relu else y


class SwappedDeform(nn.ModulatedDeformConv2dPack):
    """A DCNv2 port that reads the offset channels as (dx, dy) instead of torch's (dy, dx)."""

    def __call__(self, x):
        out = self.conv_offset(x)
        k = 2 * self.kernel.shape[0] * self.kernel.shape[1]
        offset = out[..., :k]
        offset = offset.reshape(*offset.shape[:-1], -1, 2)[..., ::-1].reshape(offset.shape)
        mask = jax.nn.sigmoid(out[..., k:])
        return ops.deform_conv2d(x, offset, self.kernel[...], self.bias[...], padding=1, mask=mask)


class Net(nnx.Module):
    def __init__(self, *, block=None, dcn=nn.ModulatedDeformConv2dPack, rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False, rngs=rngs)
        self.bn = nn.BatchNorm2d(8)
        self.block = block(rngs) if block else Block(8, rngs=rngs)
        self.dcn = dcn(8, 8, 3, padding=1, rngs=rngs)
        self.head = nn.Linear(8, 8, rngs=rngs)
        self.fc = nn.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn(self.stem(x)))
        x = self.dcn(self.block(x))
        return self.fc(jax.nn.relu(self.head(jnp.mean(x, axis=(1, 2)))))


def jax_net() -> Net:
    return Net()


def padding_off_by_one() -> Net:
    return Net(block=lambda r: Block(8, pad=2, rngs=r))


def wrong_eps() -> Net:
    return Net(block=lambda r: Block(8, eps=1e-3, rngs=r))


def missing_relu() -> Net:
    return Net(block=lambda r: Block(8, final_relu=False, rngs=r))


def swapped_offsets() -> Net:
    return Net(dcn=SwappedDeform)
