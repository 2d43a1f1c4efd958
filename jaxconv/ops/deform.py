"""Deformable convolution v1 and modulated v2 (DCNv2) on NHWC / HWIO.

`deform_conv2d` computes what `torchvision.ops.deform_conv2d` computes, with channels last:

    out[n, oy, ox, o] = bias[o] + sum_{k=(i,j), c in group(o)} weight[i, j, c', o]
                        * mask[n, oy, ox, g(c)*kh*kw + k] * bilinear(x[n, :, :, c], y, x)
    y = oy*stride_h - pad_h + i*dilation_h + offset[n, oy, ox, g(c)*2*kh*kw + 2k]
    x = ox*stride_w - pad_w + j*dilation_w + offset[n, oy, ox, g(c)*2*kh*kw + 2k + 1]

where g(c) = c // (C_in / offset_groups) is the offset group of input channel c (contiguous
blocks), k = i*kw + j, and `bilinear` reads 0 for every corner outside the image (a point with
y <= -1, y >= H, x <= -1 or x >= W therefore reads 0). Padding only shifts coordinates.

Implementation: the output pixels N*H_out*W_out are processed in chunks (`lax.map` / `lax.scan`).
Per chunk, the four bilinear corners of every (pixel, tap, offset group) are gathered as rows of
C_in/offset_groups contiguous channels from x viewed as (N*H*W*offset_groups, C_in/offset_groups),
blended into columns (pixels, kh*kw*C_in) and contracted with the kernel: a matrix product, or
for grouped kernels a grouped conv of the columns (jaxconv's conv engine, oneDNN on CPU).

Derivatives: a `custom_jvp` whose tangent is `tangent_p`, a primitive linear in the tangents:
computed by forward-mode autodiff of the chunked gather (streaming, nothing stored), and
transposed by a hand-written backward that recomputes the columns chunk by chunk and
scatter-adds the input gradient into the four corners. So reverse mode stores no columns, and
jvp, jacfwd, hessian, grad of grad and vmap of each all work. Gradients follow torchvision's
kernel exactly: the derivative with respect to a sample coordinate is the derivative of the
bilinear formula on the cell [floor(y), floor(y) + 1), i.e. the right derivative at integer
coordinates, including y = -1 exactly (where the value is 0 but the right derivative is not);
this is what autodiff of the per-corner formula gives, and the tests prove the backward equal
to it.

Memory: a chunk holds at most `chunk_elements` column entries (default `DEFAULT_CHUNK_ELEMENTS`,
2**21, i.e. 8 MiB of float32 columns), preferring a chunk size that divides the pixel count so
that no padding or output copy is needed; the working set of one chunk is a few times that,
independent of the batch size (measured: BENCHMARKS.md, "Deformable convolution").
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxconv.ops._args import accumulation, check_rank, pair
from jaxconv.ops.conv import add_bias, conv2d

__all__ = ["deform_conv2d", "DEFAULT_CHUNK_ELEMENTS", "deform_output_size"]

#: Column entries (pixels * kh*kw * C_in) per chunk: 2**21, 8 MiB of float32 columns per chunk.
DEFAULT_CHUNK_ELEMENTS = 1 << 21


class _Geo(NamedTuple):
    """Static shapes and arguments of one call (hashable: it is a `nondiff_argnum`)."""
    N: int
    H: int
    W: int
    C: int          # input channels
    G: int          # offset groups
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    Ho: int
    Wo: int
    groups: int     # weight groups
    Cout: int
    chunk: int      # pixels per chunk
    n_chunks: int
    out_dtype: str
    coord_dtype: str

    @property
    def K(self):
        return self.kh * self.kw

    @property
    def Cg(self):
        return self.C // self.G


def deform_output_size(in_hw, kernel_size, stride=1, padding=0, dilation=1) -> tuple[int, int]:
    """Output (H_out, W_out) of a (deformable) convolution, as torch computes it."""
    kh, kw = pair(kernel_size, "kernel_size", minimum=1)
    sh, sw = pair(stride, "stride", minimum=1)
    ph, pw = pair(padding, "padding", minimum=0)
    dh, dw = pair(dilation, "dilation", minimum=1)
    return ((in_hw[0] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (in_hw[1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


# ---------------------------------------------------------------------------------------------
# Sampling geometry, shared by the forward and the backward pass.

def _sample_points(geo: _Geo, offset_c, pix):
    """Bilinear corners of every (pixel, tap, offset group) of one chunk.

    offset_c: (P, K, G, 2) offsets (dy, dx) in the coordinate dtype; pix: (P,) global pixel ids.
    Returns four corners, (y0,x0), (y0,x1), (y1,x0), (y1,x1), each a tuple
    (rows, w, dw_dy, dw_dx) of (P, K, G) arrays: int32 rows into x viewed as (N*H*W*G, C/G),
    the bilinear weight (zero for a corner outside the image and for chunk padding past the last
    pixel) and its derivatives with respect to the sample coordinates.
    """
    cdt = offset_c.dtype
    hw_out = geo.Ho * geo.Wo
    n = pix // hw_out
    oy = (pix % hw_out) // geo.Wo
    ox = pix % geo.Wo
    live = (n < geo.N)[:, None, None]                  # chunk padding past the last pixel
    n = jnp.minimum(n, geo.N - 1)[:, None, None]
    tap = jnp.arange(geo.K)
    base_y = oy[:, None] * geo.sh - geo.ph + (tap // geo.kw)[None, :] * geo.dh     # (P, K) int
    base_x = ox[:, None] * geo.sw - geo.pw + (tap % geo.kw)[None, :] * geo.dw
    y = base_y[:, :, None].astype(cdt) + offset_c[..., 0]                         # (P, K, G)
    x = base_x[:, :, None].astype(cdt) + offset_c[..., 1]

    y0 = jnp.floor(y)
    x0 = jnp.floor(x)
    ly = y - y0
    lx = x - x0
    hy = 1 - ly
    hx = 1 - lx
    # Corner validity from the float floor (no int overflow for far-away points).
    vy = ((y0 >= 0) & (y0 <= geo.H - 1), (y0 >= -1) & (y0 <= geo.H - 2))
    vx = ((x0 >= 0) & (x0 <= geo.W - 1), (x0 >= -1) & (x0 <= geo.W - 2))
    yi = jnp.clip(y0, -1, geo.H).astype(jnp.int32)
    xi = jnp.clip(x0, -1, geo.W).astype(jnp.int32)
    ys = (jnp.clip(yi, 0, geo.H - 1), jnp.clip(yi + 1, 0, geo.H - 1))
    xs = (jnp.clip(xi, 0, geo.W - 1), jnp.clip(xi + 1, 0, geo.W - 1))
    g = jnp.arange(geo.G, dtype=jnp.int32)
    wy, dy = (hy, ly), (-1, 1)
    wx, dx = (hx, lx), (-1, 1)
    corners = []
    for a in (0, 1):
        for b in (0, 1):
            valid = (vy[a] & vx[b] & live).astype(cdt)
            rows = ((n * geo.H + ys[a]) * geo.W + xs[b]) * geo.G + g
            corners.append((rows, wy[a] * wx[b] * valid, dy[a] * wx[b] * valid,
                            wy[a] * dx[b] * valid))
    return corners


def _gather(x_rows, rows):
    return x_rows.at[rows].get(mode="promise_in_bounds")


def _interpolate(geo: _Geo, x_rows, offset_c, pix):
    """Bilinear samples (P, K, G, C/G) in the coordinate dtype, and the corners they came from.

    Written as four gathers blended elementwise: XLA fuses each gather into the blend, where a
    reduction over a stacked corner axis is far slower on CPU (BENCHMARKS.md).
    """
    corners = _sample_points(geo, offset_c, pix)
    cdt = offset_c.dtype
    sampled = 0
    for rows, w, _, _ in corners:
        sampled = sampled + w[..., None] * _gather(x_rows, rows).astype(cdt)
    return sampled, corners


def _channel_dot(a, b):
    """sum over the last axis of a * b, as a batched dot (XLA's CPU row reductions are slow)."""
    return jnp.einsum("pkgc,pkgc->pkg", a, b)


def _contract(geo: _Geo, cols, wmat):
    """cols (P, K, G, C/G) x kernel (K, C_in/groups, groups, C_out/groups) -> (P, C_out)."""
    P = cols.shape[0]
    cols = cols.astype(wmat.dtype)
    acc = accumulation(wmat.dtype)
    if geo.groups == 1:
        return jnp.dot(cols.reshape(P, -1), wmat.reshape(-1, geo.Cout), preferred_element_type=acc)
    # A grouped conv of the columns as one (P, K) image with a 1 x K kernel: jaxconv's conv
    # engine (oneDNN on CPU) runs it 3-5x faster than XLA's batched einsum (BENCHMARKS.md).
    out = conv2d(cols.reshape(1, P, geo.K, geo.C), wmat.reshape(1, geo.K, -1, geo.Cout),
                 groups=geo.groups)
    return out.reshape(P, geo.Cout)


def _pixels(a, geo: _Geo):
    """(N, Ho, Wo, ...) per-pixel array -> (n_chunks, chunk, ...), zero-padded past the end."""
    P = geo.N * geo.Ho * geo.Wo
    a = a.reshape((P,) + a.shape[3:])
    pad = geo.n_chunks * geo.chunk - P
    if pad:
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((geo.n_chunks, geo.chunk) + a.shape[1:])


def _unpixels(a, geo: _Geo):
    P = geo.N * geo.Ho * geo.Wo
    a = a.reshape((geo.n_chunks * geo.chunk,) + a.shape[2:])[:P]
    return a.reshape((geo.N, geo.Ho, geo.Wo) + a.shape[1:])


def _prepare(geo: _Geo, x, offset, mask, weight):
    """Chunked views of the inputs: x as rows, offsets (.., K, G, 2), mask (.., K, G)."""
    cdt = jnp.dtype(geo.coord_dtype)
    x, offset, weight = jnp.asarray(x), jnp.asarray(offset), jnp.asarray(weight)
    x_rows = x.reshape(geo.N * geo.H * geo.W * geo.G, geo.Cg)
    off = offset.astype(cdt).reshape(geo.N, geo.Ho, geo.Wo, geo.G, geo.K, 2)
    off = _pixels(jnp.swapaxes(off, 3, 4), geo)                     # (nc, P, K, G, 2)
    msk = None
    if mask is not None:
        msk = mask.astype(cdt).reshape(geo.N, geo.Ho, geo.Wo, geo.G, geo.K)
        msk = _pixels(jnp.swapaxes(msk, 3, 4), geo)                 # (nc, P, K, G)
    wmat = weight.reshape(geo.K, geo.C // geo.groups, geo.groups, geo.Cout // geo.groups)
    return x_rows, off, msk, wmat


def _map_chunks(geo: _Geo, body, xs):
    """lax.map over chunks, or a plain call when there is one chunk."""
    if geo.n_chunks == 1:
        return jax.tree.map(lambda a: a[None], body(jax.tree.map(lambda a: a[0], xs)))
    return lax.map(body, xs)


def _forward(geo: _Geo, x, offset, mask, weight):
    x_rows, off, msk, wmat = _prepare(geo, x, offset, mask, weight)
    chunk_ids = jnp.arange(geo.n_chunks, dtype=jnp.int32)

    def body(args):
        ci, off_c, msk_c = args
        pix = ci * geo.chunk + jnp.arange(geo.chunk, dtype=jnp.int32)
        cols = _interpolate(geo, x_rows, off_c, pix)[0]
        if msk_c is not None:
            cols = cols * msk_c[..., None]
        return _contract(geo, cols, wmat)

    out = _map_chunks(geo, body, (chunk_ids, off, msk))
    return _unpixels(out, geo).astype(geo.out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _deform(geo: _Geo, x, offset, mask, weight):
    return _forward(geo, x, offset, mask, weight)


@_deform.defjvp
def _deform_jvp(geo: _Geo, primals, tangents):
    """The output's tangent is `tangent_p`: linear in the tangents, its transpose is the chunked
    backward below, so reverse mode never differentiates the gather (nor stores its columns)."""
    x, offset, mask, weight = primals
    args = [a for a in (x, offset, mask, weight, *tangents) if a is not None]
    return _forward(geo, x, offset, mask, weight), tangent_p.bind(*args, geo=geo,
                                                                  has_mask=mask is not None)


# ---------------------------------------------------------------------------------------------
# The tangent map d out = J(x, offset, mask, weight) . (dx, d offset, d mask, d weight) as a
# primitive linear in its tangent operands (primals first, then as many tangents).

tangent_p = Primitive("jaxconv_deform_tangent")


def _split(args, has_mask):
    n = 4 if has_mask else 3
    primals, tangents = list(args[:n]), list(args[n:])
    if not has_mask:
        primals.insert(2, None)
        tangents.insert(2, None)
    return primals, tangents


def _tangent_impl(*args, geo, has_mask):
    """Forward-mode autodiff of the gather formulation: streams chunk by chunk, no residuals."""
    primals, tangents = _split(args, has_mask)
    keep = [i for i, p in enumerate(primals) if p is not None]

    def f(*arrays):
        full = [None] * 4
        for i, a in zip(keep, arrays):
            full[i] = a
        return _forward(geo, *full)

    return jax.jvp(f, [primals[i] for i in keep], [tangents[i] for i in keep])[1]


def _tangent_transpose(ct, *args, geo, has_mask):
    primals, tangents = _split(args, has_mask)
    if any(ad.is_undefined_primal(p) for p in primals if p is not None):
        raise ValueError("deform_conv2d's tangent map is linear in its tangents only")
    if type(ct) is ad.Zero:
        grads = [None if t is None else ad.Zero(t.aval) for t in tangents]
    else:
        grads = list(_deform_bwd(geo, primals, ct))
    n = len(args) - len([t for t in tangents if t is not None])
    return [None] * n + [g for g, t in zip(grads, tangents) if t is not None]


def _tangent_jvp(primals, tangents, *, geo, has_mask):
    tangents = tuple(jnp.zeros(p.shape, p.dtype) if type(t) is ad.Zero else t
                     for p, t in zip(primals, tangents))
    f = functools.partial(_tangent_impl, geo=geo, has_mask=has_mask)
    return jax.jvp(f, tuple(primals), tangents)


def _tangent_batch(args, dims, *, geo, has_mask):
    """vmap: one tangent map per batch element (the primitive stays, so does its transpose)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
    return lax.map(lambda a: tangent_p.bind(*a, geo=geo, has_mask=has_mask), args), 0


tangent_p.def_impl(_tangent_impl)
tangent_p.def_abstract_eval(lambda *args, geo, has_mask: jax.core.ShapedArray(
    (geo.N, geo.Ho, geo.Wo, geo.Cout), jnp.dtype(geo.out_dtype)))
mlir.register_lowering(tangent_p, mlir.lower_fun(_tangent_impl, multiple_results=False))
ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_jvps[tangent_p] = _tangent_jvp
batching.primitive_batchers[tangent_p] = _tangent_batch


def _deform_bwd(geo: _Geo, res, g_out):
    x, offset, mask, weight = res
    x_rows, off, msk, wmat = _prepare(geo, x, offset, mask, weight)
    cdt = jnp.dtype(geo.coord_dtype)
    wmat_acc = wmat.astype(jnp.promote_types(wmat.dtype, jnp.float32))
    gouts = _pixels(g_out.astype(wmat_acc.dtype), geo)              # (nc, P, Cout)
    chunk_ids = jnp.arange(geo.n_chunks, dtype=jnp.int32)

    def body(carry, args):
        g_rows, g_wmat = carry
        ci, off_c, msk_c, gout = args
        pix = ci * geo.chunk + jnp.arange(geo.chunk, dtype=jnp.int32)
        sampled, corners = _interpolate(geo, x_rows, off_c, pix)
        cols = sampled if msk_c is None else sampled * msk_c[..., None]
        P = gout.shape[0]
        # the contraction's own VJP (oneDNN's backward-data and backward-weights on CPU), in
        # float32 at least, as the accumulation of the forward
        g_cols, g_w = jax.vjp(functools.partial(_contract, geo), cols, wmat_acc)[1](gout)
        g_wmat = g_wmat + g_w.astype(g_wmat.dtype)
        g_cols = g_cols.astype(cdt).reshape(P, geo.K, geo.G, geo.Cg)
        # d loss / d (bilinear weight of corner i) = <g_cols, corner value i> (times the mask);
        # the offset and mask gradients are weighted sums of these four channel dots.
        g_corner = [_channel_dot(g_cols, _gather(x_rows, rows).astype(cdt))
                    for rows, _, _, _ in corners]
        g_dy = sum(gc * dw_dy for gc, (_, _, dw_dy, _) in zip(g_corner, corners))
        g_dx = sum(gc * dw_dx for gc, (_, _, _, dw_dx) in zip(g_corner, corners))
        if msk_c is None:
            g_msk = None
            g_off = jnp.stack([g_dy, g_dx], -1)
        else:
            g_msk = sum(gc * w for gc, (_, w, _, _) in zip(g_corner, corners))
            g_off = jnp.stack([g_dy, g_dx], -1) * msk_c[..., None]
        for rows, w, _, _ in corners:
            w_m = w if msk_c is None else w * msk_c
            g_rows = g_rows.at[rows].add((w_m[..., None] * g_cols).astype(g_rows.dtype),
                                         mode="promise_in_bounds")
        return (g_rows, g_wmat), (g_off, g_msk)

    acc_dtype = jnp.promote_types(cdt, jnp.float32)
    carry = (jnp.zeros(x_rows.shape, acc_dtype), jnp.zeros(wmat.shape, acc_dtype))
    xs = (chunk_ids, off, msk, gouts)
    if geo.n_chunks == 1:
        (g_rows, g_wmat), ys = body(carry, jax.tree.map(lambda a: a[0], xs))
        ys = jax.tree.map(lambda a: a[None], ys)
    else:
        (g_rows, g_wmat), ys = lax.scan(body, carry, xs)
    g_off, g_msk = ys
    g_x = g_rows.reshape(x.shape).astype(x.dtype)
    g_off = _unpixels(g_off, geo)                                           # (N,Ho,Wo,K,G,2)
    g_off = jnp.swapaxes(g_off, 3, 4).reshape(offset.shape).astype(offset.dtype)
    if mask is not None:
        g_msk = _unpixels(g_msk, geo)
        g_msk = jnp.swapaxes(g_msk, 3, 4).reshape(mask.shape).astype(mask.dtype)
    g_weight = g_wmat.reshape(weight.shape).astype(weight.dtype)
    return g_x, g_off, g_msk, g_weight




# ---------------------------------------------------------------------------------------------
# Public function: argument checks, then the custom-VJP core.

def _chunking(pixels: int, per_pixel: int, chunk_elements: int) -> tuple[int, int]:
    """(pixels per chunk, number of chunks) with chunk * per_pixel <= chunk_elements (at least one
    pixel). A chunk size that divides `pixels` is preferred (down to half the largest allowed):
    then no padding is needed and the chunked output is the output, without a copy."""
    if pixels == 0:
        return 1, 1
    largest = max(1, min(pixels, chunk_elements // per_pixel))
    chunk = largest
    for size in range(largest, max(largest // 2, largest - 4096), -1):
        if pixels % size == 0:
            chunk = size
            break
    return chunk, math.ceil(pixels / chunk)


def _geometry(x, offset, weight, bias, stride, padding, dilation, mask, chunk_elements) -> _Geo:
    check_rank(x, 4, "x", "NHWC")
    check_rank(offset, 4, "offset", "N, H_out, W_out, 2*offset_groups*kh*kw")
    check_rank(weight, 4, "weight", "HWIO")
    if mask is not None:
        check_rank(mask, 4, "mask", "N, H_out, W_out, offset_groups*kh*kw")
    for name, a in (("x", x), ("offset", offset), ("weight", weight), ("mask", mask),
                    ("bias", bias)):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    sh, sw = pair(stride, "stride", minimum=1)
    ph, pw = pair(padding, "padding", minimum=0)
    dh, dw = pair(dilation, "dilation", minimum=1)
    N, H, W, C = x.shape
    kh, kw, cig, cout = weight.shape
    if kh < 1 or kw < 1 or cig < 1 or cout < 1:
        raise ValueError(f"weight: expected a non-empty HWIO kernel, got shape {weight.shape}")
    if C % cig:
        raise ValueError(f"weight: expected an input-channel dimension (axis 2) dividing the "
                         f"{C} channels of x, got shape {weight.shape}")
    groups = C // cig
    if cout % groups:
        raise ValueError(f"weight: expected output channels divisible by groups={groups} "
                         f"(= C_in {C} / weight in-channels {cig}), got shape {weight.shape}")
    Ho, Wo = deform_output_size((H, W), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    if Ho < 1 or Wo < 1:
        raise ValueError(f"padding: the kernel ({kh}, {kw}) with dilation ({dh}, {dw}) is larger "
                         f"than the padded input of x {x.shape}; output size would be ({Ho}, {Wo})")
    K = kh * kw
    oc = offset.shape[3]
    if oc == 0 or oc % (2 * K):
        raise ValueError(f"offset: expected 2*offset_groups*kh*kw channels (a positive multiple "
                         f"of {2 * K} for a {kh}x{kw} kernel), got {oc} channels")
    G = oc // (2 * K)
    if C % G:
        raise ValueError(f"offset: expected offset_groups dividing C_in={C}, got offset_groups={G} "
                         f"({oc} offset channels / {2 * K})")
    if offset.shape[:3] != (N, Ho, Wo):
        raise ValueError(f"offset: expected (N, H_out, W_out) = {(N, Ho, Wo)} (the output size), "
                         f"got {offset.shape[:3]}")
    if mask is not None:
        if mask.shape[3] != G * K:
            raise ValueError(f"mask: expected offset_groups*kh*kw = {G * K} channels, got "
                             f"{mask.shape[3]}")
        if mask.shape[:3] != (N, Ho, Wo):
            raise ValueError(f"mask: expected (N, H_out, W_out) = {(N, Ho, Wo)} (the output size), "
                             f"got {mask.shape[:3]}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias: expected shape ({cout},), got {tuple(bias.shape)}")
    if (not isinstance(chunk_elements, numbers.Integral) or isinstance(chunk_elements, bool)
            or chunk_elements < 1):
        raise ValueError(f"chunk_elements: expected a positive int, got {chunk_elements!r}")
    chunk, n_chunks = _chunking(N * Ho * Wo, K * C, chunk_elements)
    out_dtype = jnp.result_type(x.dtype, weight.dtype)
    coord_dtype = jnp.promote_types(jnp.result_type(x.dtype, offset.dtype), jnp.float32)
    return _Geo(N, H, W, C, G, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, groups, cout, chunk,
                n_chunks, jnp.dtype(out_dtype).name, jnp.dtype(coord_dtype).name)


def deform_conv2d(x, offset, weight, bias=None, *, stride=1, padding=0, dilation=1, mask=None,
                  chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """Deformable convolution (v1; v2 when `mask` is given), NHWC, = torchvision's deform_conv2d.

    Args:
      x: (N, H, W, C_in) input.
      offset: (N, H_out, W_out, 2*offset_groups*kh*kw) sampling offsets; for offset group g and
        kernel tap k = i*kw + j, dy is channel g*2*kh*kw + 2k and dx channel g*2*kh*kw + 2k + 1
        (torchvision's order). offset_groups is inferred and must divide C_in; offset group g
        deforms input channels [g*C_in/G, (g+1)*C_in/G).
      weight: (kh, kw, C_in/groups, C_out) HWIO kernel; `groups` is inferred from it.
      bias: optional (C_out,).
      stride, padding, dilation: int or (h, w) pair, as in torch.
      mask: optional (N, H_out, W_out, offset_groups*kh*kw) modulation (channel g*kh*kw + k),
        a plain multiplier (apply a sigmoid before if you want DCNv2's).
      chunk_elements: column entries (pixels * kh*kw * C_in) processed per chunk; bounds the
        working memory (see the module docstring). Does not change the result beyond rounding.

    Returns:
      (N, H_out, W_out, C_out) in the result dtype of x and weight. 16-bit inputs are
      interpolated in float32 and accumulated in float32.
    """
    x, offset, weight, bias, mask = (None if a is None else jnp.asarray(a)
                                     for a in (x, offset, weight, bias, mask))
    geo = _geometry(x, offset, weight, bias, stride, padding, dilation, mask, chunk_elements)
    if geo.N == 0:
        out = jnp.zeros((0, geo.Ho, geo.Wo, geo.Cout), geo.out_dtype)  # gradients: zeros
    else:
        out = _deform(geo, x, offset, mask, weight)
    return add_bias(out, bias, geo.Cout)


def _deform_conv2d_autodiff(x, offset, weight, bias=None, *, stride=1, padding=0, dilation=1,
                            mask=None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """The same forward as `deform_conv2d` without the custom VJP (autodiff of the gather).

    For tests: its gradients are what the custom VJP must reproduce."""
    x, offset, weight, bias, mask = (None if a is None else jnp.asarray(a)
                                     for a in (x, offset, weight, bias, mask))
    geo = _geometry(x, offset, weight, bias, stride, padding, dilation, mask, chunk_elements)
    out = _forward(geo, x, offset, mask, weight)
    return add_bias(out, bias, geo.Cout)
