"""Deformable convolution v1 / v2 in plain PyTorch (no torchvision, no mmcv, no custom kernels).

`deform_conv2d` has torchvision.ops.deform_conv2d's signature and semantics (NCHW, OIHW);
gradients come from autograd of a vectorised bilinear gather. The modules mirror the parameter
names of the layers whose checkpoints should load:

- `DeformConv2d`: torchvision.ops.DeformConv2d (`weight`, `bias`), called as (x, offset, mask=None).
- `DeformConv2dPack`: mmcv.ops.DeformConv2dPack / 'DCN' (`weight`, `conv_offset.weight`,
  `conv_offset.bias`; mmcv has no main bias, `bias=True` adds one).
- `ModulatedDeformConv2dPack`: mmcv.ops.ModulatedDeformConv2dPack / 'DCNv2' (`weight`, `bias`,
  `conv_offset.weight`, `conv_offset.bias`). conv_offset predicts 3*G*kh*kw channels; the first
  2*G*kh*kw are the offset in torchvision's channel order (mmcv's `cat(o1, o2)` of its first two
  thirds), the last G*kh*kw go through a sigmoid and are the mask.

Offset layout: for offset group g and tap k = i*kw + j, dy is channel g*2*kh*kw + 2k and dx is
channel g*2*kh*kw + 2k + 1; the mask of that tap is channel g*kh*kw + k.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = ["deform_conv2d", "DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack"]


def _check(input, offset, weight, bias, stride, padding, dilation, mask):
    for name, t, layout in (("input", input, "NCHW"), ("offset", offset, "N, 2*G*kh*kw, Ho, Wo"),
                            ("weight", weight, "OIHW")):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a rank-4 tensor ({layout}), got shape "
                             f"{tuple(t.shape)}")
    N, C, H, W = input.shape
    Cout, Cig, kh, kw = weight.shape
    if Cig == 0 or C % Cig:
        raise ValueError(f"weight: expected in-channels (dim 1) dividing the {C} channels of "
                         f"input, got shape {tuple(weight.shape)}")
    groups = C // Cig
    if Cout % groups:
        raise ValueError(f"weight: expected out-channels divisible by groups={groups}, got shape "
                         f"{tuple(weight.shape)}")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"padding: the kernel is larger than the padded input {tuple(input.shape)};"
                         f" output size would be ({Ho}, {Wo})")
    K = kh * kw
    oc = offset.shape[1]
    if oc == 0 or oc % (2 * K):
        raise ValueError(f"offset: expected 2*offset_groups*kh*kw channels (a positive multiple of "
                         f"{2 * K}), got {oc}")
    G = oc // (2 * K)
    if C % G:
        raise ValueError(f"offset: expected offset_groups dividing C_in={C}, got offset_groups={G}")
    if tuple(offset.shape[:1]) + tuple(offset.shape[2:]) != (N, Ho, Wo):
        raise ValueError(f"offset: expected (N, Ho, Wo) = {(N, Ho, Wo)}, got "
                         f"{(offset.shape[0], *offset.shape[2:])}")
    if mask is not None:
        if mask.dim() != 4 or mask.shape[1] != G * K:
            raise ValueError(f"mask: expected {G * K} channels (offset_groups*kh*kw), got shape "
                             f"{tuple(mask.shape)}")
        if tuple(mask.shape[:1]) + tuple(mask.shape[2:]) != (N, Ho, Wo):
            raise ValueError(f"mask: expected (N, Ho, Wo) = {(N, Ho, Wo)}, got "
                             f"{(mask.shape[0], *mask.shape[2:])}")
    if bias is not None and tuple(bias.shape) != (Cout,):
        raise ValueError(f"bias: expected shape ({Cout},), got {tuple(bias.shape)}")
    return N, C, H, W, Cout, Cig, kh, kw, Ho, Wo, G, groups


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask=None):
    """torchvision.ops.deform_conv2d in plain PyTorch (NCHW input, OIHW weight)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W, Cout, Cig, kh, kw, Ho, Wo, G, groups = _check(
        input, offset, weight, bias, stride, padding, dilation, mask)
    K, Cg = kh * kw, C // G
    if N == 0:
        # Keep every input in the graph so that its gradient is zeros of its shape, not None.
        keep = sum(t.sum() * 0 for t in (input, offset, weight, mask) if t is not None)
        out = input.new_zeros((0, Cout, Ho, Wo)) + keep
        return out if bias is None else out + bias.view(1, -1, 1, 1)
    dev = input.device
    # Per (n, oy, ox, tap, group): offsets as (N, Ho, Wo, K, G) so that the gathered rows are
    # already the im2col columns (N*Ho*Wo, K*C) in the kernel's (tap, channel) order.
    off = offset.view(N, G, K, 2, Ho, Wo).permute(0, 4, 5, 2, 1, 3)
    tap = torch.arange(K, device=dev)
    base_y = (torch.arange(Ho, device=dev) * stride[0] - padding[0])[:, None] \
        + (tap // kw * dilation[0])[None, :]                                   # (Ho, K)
    base_x = (torch.arange(Wo, device=dev) * stride[1] - padding[1])[:, None] \
        + (tap % kw * dilation[1])[None, :]                                    # (Wo, K)
    y = base_y.to(off.dtype)[None, :, None, :, None] + off[..., 0]             # (N,Ho,Wo,K,G)
    x = base_x.to(off.dtype)[None, None, :, :, None] + off[..., 1]
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    vy = ((y0 >= 0) & (y0 <= H - 1), (y0 >= -1) & (y0 <= H - 2))
    vx = ((x0 >= 0) & (x0 <= W - 1), (x0 >= -1) & (x0 <= W - 2))
    yi = y0.detach().clamp(-1, H).long()
    xi = x0.detach().clamp(-1, W).long()
    ys = (yi.clamp(0, H - 1), (yi + 1).clamp(0, H - 1))
    xs = (xi.clamp(0, W - 1), (xi + 1).clamp(0, W - 1))
    wy, wx = (1 - ly, ly), (1 - lx, lx)
    n = torch.arange(N, device=dev).view(N, 1, 1, 1, 1)
    g = torch.arange(G, device=dev)
    x_rows = input.permute(0, 2, 3, 1).reshape(N * H * W * G, Cg)
    sampled = 0
    for a in (0, 1):
        for b in (0, 1):
            rows = ((n * H + ys[a]) * W + xs[b]) * G + g
            w = wy[a] * wx[b] * (vy[a] & vx[b]).to(ly.dtype)
            corner = torch.index_select(x_rows, 0, rows.reshape(-1)).view(*rows.shape, Cg)
            sampled = sampled + w[..., None] * corner
    if mask is not None:
        sampled = sampled * mask.view(N, G, K, Ho, Wo).permute(0, 3, 4, 2, 1)[..., None]
    cols = sampled.reshape(N * Ho * Wo, K, groups, Cig)
    wmat = weight.view(groups, Cout // groups, Cig, K).permute(3, 2, 0, 1)      # (K, Cig, g, Cog)
    if groups == 1:
        out = cols.reshape(N * Ho * Wo, K * C) @ wmat.reshape(K * C, Cout)
    else:
        out = torch.einsum("pkgc,kcgo->pgo", cols, wmat).reshape(N * Ho * Wo, Cout)
    out = out.view(N, Ho, Wo, Cout).permute(0, 3, 1, 2)
    if bias is not None:
        out = out + bias.view(1, Cout, 1, 1)
    return out.contiguous()


class DeformConv2d(nn.Module):
    """torchvision.ops.DeformConv2d: parameters `weight` (O, I/groups, kh, kw) and `bias`."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__()
        if in_channels % groups:
            raise ValueError(f"in_channels: expected a multiple of groups={groups}, got "
                             f"{in_channels}")
        if out_channels % groups:
            raise ValueError(f"out_channels: expected a multiple of groups={groups}, got "
                             f"{out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                               *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input, offset, mask=None):
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)


class _Pack(nn.Module):
    """Shared body of the mmcv ...Pack layers: `weight`, optional `bias`, `conv_offset`."""

    _offset_parts = 2  # conv_offset channels per (offset group, tap)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, offset_groups=1, bias=False):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: expected a divisor of in_channels={in_channels} and "
                             f"out_channels={out_channels}, got {groups}")
        if in_channels % offset_groups:
            raise ValueError(f"offset_groups: expected a divisor of in_channels={in_channels}, got "
                             f"{offset_groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.offset_groups = groups, offset_groups
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                               *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        K = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(in_channels, offset_groups * self._offset_parts * K,
                                     self.kernel_size, self.stride, self.padding, self.dilation,
                                     bias=True)
        self.reset_parameters()

    def reset_parameters(self):
        # The offset conv starts at zero so that the layer starts as a plain convolution.
        self._init_weight()
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def _offset_mask(self, x):
        return self.conv_offset(x), None

    def forward(self, x):
        offset, mask = self._offset_mask(x)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)


class DeformConv2dPack(_Pack):
    """mmcv's DeformConv2dPack ('DCN', DCNv1): offsets predicted by `conv_offset` from x.

    mmcv's layer has no bias (its default and only option); `bias=True` adds one."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, offset_groups=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, offset_groups, bias)

    def _init_weight(self):
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")  # mmcv's DeformConv2d


class ModulatedDeformConv2dPack(_Pack):
    """mmcv's ModulatedDeformConv2dPack ('DCNv2'): offsets and sigmoid mask from `conv_offset`."""

    _offset_parts = 3

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, offset_groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, offset_groups, bias)

    def _init_weight(self):
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)  # mmcv's ModulatedDeformConv2d

    def _offset_mask(self, x):
        out = self.conv_offset(x)
        n_off = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        # mmcv: o1, o2, m = chunk(out, 3, dim=1); offset = cat(o1, o2) -- the first two thirds.
        return out[:, :n_off], torch.sigmoid(out[:, n_off:])
