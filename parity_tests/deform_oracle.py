"""Float64 oracle for deformable convolution, written as obvious loops (small cases only).

Independent of jaxconv and torch_ref. Torch layouts, as in torchvision's documentation:
x (N, C_in, H, W), offset (N, 2*G*kh*kw, H_out, W_out), weight (C_out, C_in/groups, kh, kw),
mask (N, G*kh*kw, H_out, W_out) or None.

`deform_conv2d_vjp` gives the gradients with the conventions of torchvision's CPU kernel: the
derivative with respect to a sample coordinate is taken on the cell [floor(y), floor(y) + 1)
(the right derivative at integer coordinates, also at y = -1 exactly).
"""
from __future__ import annotations

import math

import numpy as np


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pixel(img, yy, xx):
    """img[yy, xx], or 0 outside the image."""
    H, W = img.shape
    if 0 <= yy < H and 0 <= xx < W:
        return img[yy, xx]
    return 0.0


def bilinear(img, y, x):
    """Bilinear sample of a (H, W) image at (y, x); 0 when y <= -1, y >= H, x <= -1 or x >= W."""
    H, W = img.shape
    if y <= -1 or y >= H or x <= -1 or x >= W:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * _pixel(img, y0, x0) + (1 - ly) * lx * _pixel(img, y0, x0 + 1)
            + ly * (1 - lx) * _pixel(img, y0 + 1, x0) + ly * lx * _pixel(img, y0 + 1, x0 + 1))


def bilinear_corners(H, W, y, x):
    """[(row, col, weight)] of the in-image corners that `bilinear` reads (empty outside)."""
    if y <= -1 or y >= H or x <= -1 or x >= W:
        return []
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    out = []
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < H and 0 <= xx < W:
                out.append((yy, xx, wy * wx))
    return out


def bilinear_coordinate_grad(img, y, x):
    """(d/dy, d/dx) of the bilinear formula on the cell [floor(y), floor(y)+1) x [floor(x), ...)."""
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    v00, v01 = _pixel(img, y0, x0), _pixel(img, y0, x0 + 1)
    v10, v11 = _pixel(img, y0 + 1, x0), _pixel(img, y0 + 1, x0 + 1)
    d_dy = (1 - lx) * (v10 - v00) + lx * (v11 - v01)
    d_dx = (1 - ly) * (v01 - v00) + ly * (v11 - v10)
    return d_dy, d_dx


def _sample_point(oy, ox, i, j, offset, n, g, K, kw, stride, padding, dilation):
    k = i * kw + j
    dy = offset[n, g * 2 * K + 2 * k, oy, ox]
    dx = offset[n, g * 2 * K + 2 * k + 1, oy, ox]
    y = oy * stride[0] - padding[0] + i * dilation[0] + dy
    x = ox * stride[1] - padding[1] + j * dilation[1] + dx
    return y, x, k


def _shapes(x, offset, weight, stride, padding, dilation):
    N, C, H, W = x.shape
    Cout, Cig, kh, kw = weight.shape
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    G = offset.shape[1] // (2 * kh * kw)
    return N, C, H, W, Cout, Cig, kh, kw, Ho, Wo, G, C // Cig


def deform_conv2d(x, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Forward in float64 by nested loops over every output element, tap and input channel."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    x, offset, weight = (np.asarray(a, np.float64) for a in (x, offset, weight))
    N, C, H, W, Cout, Cig, kh, kw, Ho, Wo, G, groups = _shapes(x, offset, weight, stride,
                                                               padding, dilation)
    K, Cog = kh * kw, Cout // groups
    out = np.zeros((N, Cout, Ho, Wo))
    for n in range(N):
        for o in range(Cout):
            wg = o // Cog
            for oy in range(Ho):
                for ox in range(Wo):
                    acc = 0.0 if bias is None else float(bias[o])
                    for ci in range(Cig):
                        c = wg * Cig + ci
                        g = c // (C // G)
                        for i in range(kh):
                            for j in range(kw):
                                y, xx, k = _sample_point(oy, ox, i, j, offset, n, g, K, kw,
                                                         stride, padding, dilation)
                                m = 1.0 if mask is None else mask[n, g * K + k, oy, ox]
                                acc += weight[o, ci, i, j] * m * bilinear(x[n, c], y, xx)
                    out[n, o, oy, ox] = acc
    return out


def deform_conv2d_vjp(grad_out, x, offset, weight, bias=None, stride=1, padding=0, dilation=1,
                      mask=None):
    """Gradients (x, offset, weight, bias, mask) of sum(grad_out * deform_conv2d(...)), by loops."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    x, offset, weight, grad_out = (np.asarray(a, np.float64) for a in (x, offset, weight,
                                                                         grad_out))
    N, C, H, W, Cout, Cig, kh, kw, Ho, Wo, G, groups = _shapes(x, offset, weight, stride,
                                                               padding, dilation)
    K, Cog = kh * kw, Cout // groups
    gx, goff, gw = np.zeros_like(x), np.zeros_like(offset), np.zeros_like(weight)
    gmask = None if mask is None else np.zeros(np.shape(mask))
    gbias = grad_out.sum(axis=(0, 2, 3))
    for n in range(N):
        for o in range(Cout):
            wg = o // Cog
            for oy in range(Ho):
                for ox in range(Wo):
                    go = grad_out[n, o, oy, ox]
                    for ci in range(Cig):
                        c = wg * Cig + ci
                        g = c // (C // G)
                        for i in range(kh):
                            for j in range(kw):
                                y, xx, k = _sample_point(oy, ox, i, j, offset, n, g, K, kw,
                                                         stride, padding, dilation)
                                m = 1.0 if mask is None else mask[n, g * K + k, oy, ox]
                                wv = weight[o, ci, i, j]
                                s = bilinear(x[n, c], y, xx)
                                gw[o, ci, i, j] += go * m * s
                                if mask is not None:
                                    gmask[n, g * K + k, oy, ox] += go * wv * s
                                for yy, xc, b in bilinear_corners(H, W, y, xx):
                                    gx[n, c, yy, xc] += go * wv * m * b
                                d_dy, d_dx = bilinear_coordinate_grad(x[n, c], y, xx)
                                goff[n, g * 2 * K + 2 * k, oy, ox] += go * wv * m * d_dy
                                goff[n, g * 2 * K + 2 * k + 1, oy, ox] += go * wv * m * d_dx
    return dict(x=gx, offset=goff, weight=gw, bias=gbias, mask=gmask)
