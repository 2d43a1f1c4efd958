"""Backend-aware lowering of grouped, depthwise, small dense and 1x1 2-D convolutions (used by
``ops.conv2d`` and, as a drop-in, by ``nnx.Conv(conv_general_dilated=...)``).

XLA:CPU has no grouped-convolution kernel: it rewrites ``feature_group_count=G`` into a dense
convolution with a block-diagonal kernel (G x the multiply-adds), lowers depthwise convolutions
no better, and lowers the weight gradient through ``batch_group_count`` into something far
worse (tens of seconds for a ResNeXt-50 stage-1 layer at batch 8). Its dense convolution is
also slow for few input channels (a 3-channel stem: 7-9x oneDNN) and for 1x1 kernels (1.3-3x
its own dot). cuDNN and the TPU compiler have native kernels for all of these. So this module
keeps lax's convolution on every backend but CPU, and on CPU computes the same sums of the same
products (in another order, so equal within rounding) in forms that run fast there:

    name    forward                               input grad          weight grad
    xla     lax.conv_general_dilated, feature_group_count=G; autodiff (lax's transpose rules)
    kernel  grouped_cpu.cc through the XLA FFI    the kernel on the   the kernel: per tap,
            (cpu_kernel.py builds it): vector     transposed conv     row sums of products
            FMAs over output channels, one        (dense, C_in % 16:  in registers
            input row cache per thread ('auto':   lax's)
            fma's for depthwise)
    fma     one loop fusion of kh*kw*C_in/G       fma on the          "rows": per tap and
            multiply-adds over the kh x kw        transposed conv     input channel, row sums
            shifted windows, vectorised over C    (flipped kernel,    in one loop fusion, then
                                                  stride as input     one small reduction
                                                  dilation)
    split   G dense convolutions (one per group) and a concatenation; autodiff
    dense   one dense convolution with the block-diagonal kernel (G x the work); autodiff

``auto`` (the default, ``jaxconv.config.grouped_lowering``) chooses per backend and shape with
``choose`` below (its table says which formulation wins where on CPU and why; measured:
BENCHMARKS.md); unpadded 1x1 convs go to ``pointwise_conv`` (a matrix product on CPU). Every
choice is made at trace time from static shapes; nothing is autotuned. 'kernel' needs a C++
compiler at first use (``cpu_kernel.available()``); without one 'auto' keeps fma / split.
The GPU/TPU path is lax's by construction: on CPU-default processes the CPU formulation sits in
a ``lax.platform_dependent`` branch, so a computation lowered for any other platform keeps
lax's convolution; processes whose default backend is not CPU trace lax only.

The weight gradient of the ``fma`` formulation never builds an im2col matrix or a full product
tensor: XLA:CPU allocates every temporary of an executable in one buffer per call, and on this
kind of machine buffers past ~32 MB come back from the kernel as fresh pages at every call
(page faults cost more than the arithmetic).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv import config
from jaxconv.ops import cpu_kernel

Pairs = tuple[tuple[int, int], tuple[int, int]]
_DIMS = ("NHWC", "HWIO", "NHWC")
FORMULATIONS = ("xla", "kernel", "fma", "split", "dense")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static description of one 2-D convolution: NHWC input, HWIO kernel of `kernel` taps."""
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    pads: Pairs = ((0, 0), (0, 0))
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    lhs_dilation: tuple[int, int] = (1, 1)

    def out_hw(self, in_hw) -> tuple[int, int]:
        return tuple(((n - 1) * ld + 1 + lo + hi - d * (k - 1) - 1) // s + 1
                     for n, (lo, hi), k, d, s, ld in zip(in_hw, self.pads, self.kernel,
                                                         self.dilation, self.stride,
                                                         self.lhs_dilation))


# --------------------------------------------------------------------------------- choice

def choose(backend: str, x_shape, w_shape, geo: Geometry) -> str:
    """The formulation 'auto' uses for a grouped conv on `backend` (static shapes only).

    CPU, measured on 2 cores (AVX-512), batch 8, jaxconv / torch 2.13 (oneDNN), fwd+bwd:

      layer kind                          kernel   best pure-JAX     why the kernel wins
      depthwise (C_in/G == 1)             0.6-1.2  fma 0.7-1.7       one pass per gradient,
                                                                     skips dilation holes
                                                                     (forward: fma, _plan)
      grouped, C_in/G <= 8 (ResNeXt       0.6-1.1  fma 2.2-3.0       a permute per term
        stages 1-2)                                                  instead of XLA's gathers
      grouped, C_in/G >= 16 (ResNeXt      1.1-1.8  split 2.1-4.0     broadcast FMAs, weight
        stages 3-4)                                                  grad in registers

    Without a C++ compiler (``cpu_kernel.available()`` False) the pure-JAX choice: fma for
    depthwise and C_in/G <= 8 (36-72 FMAs per output vector in one fusion), split (G dense
    convs) for wider groups. GPU / TPU: xla (cuDNN / the TPU compiler have grouped kernels;
    jax#13800 concerns the backward on GPU, whose fix belongs to XLA:GPU).
    """
    if backend != "cpu":
        return "xla"
    kh, kw, cin_per_group, cout = w_shape
    groups = geo.groups
    if groups == 1:   # dense: the kernel only where XLA:CPU's conv is slow (few input channels)
        small = kh * kw > 1 and cin_per_group <= _DENSE_MAX_CIN
        return "kernel" if small and cpu_kernel.available() else "xla"
    if cpu_kernel.available():
        return "kernel"
    if cin_per_group == 1 or (cin_per_group <= 8 and groups > 4):
        return "fma"
    return "split"


def _plan(name: str, x_shape, w_shape, geo: Geometry) -> tuple[str, str, str]:
    """(forward, input-gradient, weight-gradient) formulations for `name` (a forced formulation
    or 'auto'); the weight gradient is 'kernel' or 'rows' (fma's, _wgrad_cols)."""
    if name != "auto":
        return name, name, ("kernel" if name == "kernel" else "rows")
    fwd = choose("cpu", x_shape, w_shape, geo)
    kh, kw, cin_per_group, cout = w_shape
    if fwd != "kernel":
        # The input gradient is a grouped conv with C_out/G inputs per group; choose for it too.
        dx = choose("cpu", None, (kh, kw, cout // geo.groups, cin_per_group * geo.groups), geo)
        return fwd, (dx if fwd == "fma" else fwd), "rows"
    if geo.groups == 1:
        # dense: the kernel's input gradient needs whole vectors of input channels; a stem's
        # 3 are lax's (and an image's gradient is rarely asked for)
        return fwd, ("kernel" if cin_per_group % 16 == 0 else "xla"), "kernel"
    if cin_per_group == 1 and cout == geo.groups:
        # depthwise: fma's one fusion of 9 shifted multiply-adds matches or beats the kernel's
        # forward (no row copies) and XLA fuses it with its neighbours in inference; the
        # gradients stay the kernel's (BENCHMARKS.md)
        return "fma", "kernel", "kernel"
    return "kernel", "kernel", "kernel"


_DENSE_MAX_CIN = 32   # dense convs with at most this many input channels go to the kernel


# ---------------------------------------------------------------------------- formulations

def _windows(x, geo: Geometry, padded: bool):
    """(H_out, W_out) and, per kernel tap (i, j), what it multiplies: (window, (r0, r1),
    (c0, c1)), the strided slice of the input that the tap reads for the output rows [r0, r1)
    and columns [c0, c1), or None if the tap only ever reads padding. An input dilation (the
    input gradient of a strided conv) is applied with lax.pad first.

    padded=False: slices of `x` itself, covering only the outputs where the tap does not fall
    into the padding (no padded copy: the big depthwise maps stay out of XLA's temporary
    buffer). padded=True: slices of a zero-padded copy, covering every output (plain slices
    keep the many-term grouped sums vectorised)."""
    (lo_h, hi_h), (lo_w, hi_w) = geo.pads
    ld_h, ld_w = geo.lhs_dilation
    if padded or geo.lhs_dilation != (1, 1):
        x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (lo_h, hi_h, ld_h - 1) if padded else
                                                (0, 0, ld_h - 1), (lo_w, hi_w, ld_w - 1) if padded
                                                else (0, 0, ld_w - 1), (0, 0, 0)))
    n, h, w_in, c = x.shape
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.stride, geo.dilation
    if padded:
        lo_h = hi_h = lo_w = hi_w = 0
    ho = (h + lo_h + hi_h - dh * (kh - 1) - 1) // sh + 1
    wo = (w_in + lo_w + hi_w - dw * (kw - 1) - 1) // sw + 1
    wins = []
    for i in range(kh):
        r0, r1 = _valid(h, ho, i * dh - lo_h, sh)
        row = []
        for j in range(kw):
            c0, c1 = _valid(w_in, wo, j * dw - lo_w, sw)
            if r0 == r1 or c0 == c1:
                row.append(None)
                continue
            y0, x0 = r0 * sh + i * dh - lo_h, c0 * sw + j * dw - lo_w
            win = lax.slice(x, (0, y0, x0, 0),
                            (n, y0 + (r1 - r0 - 1) * sh + 1, x0 + (c1 - c0 - 1) * sw + 1, c),
                            (1, sh, sw, 1))
            row.append((win, (r0, r1), (c0, c1)))
        wins.append(row)
    return (ho, wo), wins


def _fma(x, w, geo: Geometry, precision=None):
    """Grouped conv as sum over taps (i, j) and input channels c of window(i, j)[..., g, c]
    (broadcast over the group's outputs) x w[i, j, c, g, :]: one loop fusion, no temporaries
    but the padded input."""
    kh, kw, cin_per_group, cout = w.shape
    groups = geo.groups
    cout_per_group = cout // groups
    if cin_per_group == 1 and cout_per_group > 1:
        # depth multiplier: repeat each input channel over its outputs (torch's channel order
        # c * m + k), then it is a multiplier-1 depthwise conv
        x = jnp.repeat(x, cout_per_group, axis=-1)
        cout_per_group, groups = 1, cout
    if kh * kw * cin_per_group > _FUSE_TERMS and cin_per_group > 1 and cout_per_group > 1:
        return _fma_tap_loop(x, w, geo)
    (ho, wo), wins = _windows(x, geo, padded=cin_per_group > 1)
    n = x.shape[0]
    y = None

    def acc(term):
        nonlocal y
        y = term if y is None else y + term

    for i in range(kh):
        for j in range(kw):
            win = wins[i][j]
            if win is None:                             # the tap only ever reads padding
                continue
            win, (r0, r1), (c0, c1) = win
            rows, cols = r1 - r0, c1 - c0
            place = ((0, 0), (r0, ho - r1), (c0, wo - c1))   # the tap's valid outputs
            pad = (lambda a, p: jnp.pad(a, p)) if (rows, cols) != (ho, wo) else (lambda a, p: a)
            if cin_per_group == 1:                      # depthwise: vectorised over C
                acc(pad(win * w[i, j, 0], place + ((0, 0),)))
            elif cout_per_group == 1:                   # one output per group
                xs = win.reshape(n, rows, cols, groups, cin_per_group)
                for c in range(cin_per_group):
                    acc(pad(xs[..., c] * w[i, j, c], place + ((0, 0),)))
            else:                                       # accumulate in (..., G, C_out/G)
                wr = w[i, j].reshape(cin_per_group, groups, cout_per_group)
                for c in range(cin_per_group):
                    # channel c of every group: a strided slice (one use each, so that XLA
                    # fuses all of them into one loop)
                    xc = lax.slice_in_dim(win, c, win.shape[3], cin_per_group, axis=3)
                    acc(pad(xc[..., None] * wr[c], place + ((0, 0), (0, 0))))
    if y is None:
        return jnp.zeros((n, ho, wo, cout), x.dtype)
    return y.reshape(n, ho, wo, cout)


_FUSE_TERMS = 72    # multiply-adds per output element that XLA:CPU still fuses and vectorises


def _fma_tap_loop(x, w, geo: Geometry):
    """`_fma` for many input channels per group (C_in/G >= 16): one loop iteration per tap,
    each a loop fusion of C_in/G vectorised multiply-adds into the running output (one fusion
    of all kh*kw*C_in/G terms is past what XLA:CPU fuses and LLVM vectorises)."""
    kh, kw, cin_per_group, cout = w.shape
    groups = geo.groups
    cout_per_group = cout // groups
    (lo_h, hi_h), (lo_w, hi_w) = geo.pads
    ld_h, ld_w = geo.lhs_dilation
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (lo_h, hi_h, ld_h - 1), (lo_w, hi_w, ld_w - 1), (0, 0, 0)))
    n, hp, wp, cin = xp.shape
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    wt = w.reshape(kh * kw, cin_per_group, groups, cout_per_group)

    def tap(t, y):
        win = lax.dynamic_slice(xp, (0, (t // kw) * dh, (t % kw) * dw, 0),
                                (n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, cin))
        win = win[:, ::sh, ::sw]
        wr = lax.dynamic_index_in_dim(wt, t, 0, keepdims=False)
        for c in range(cin_per_group):
            y = y + lax.slice_in_dim(win, c, cin, cin_per_group, axis=3)[..., None] * wr[c]
        return y

    y = lax.fori_loop(0, kh * kw, tap, jnp.zeros((n, ho, wo, groups, cout_per_group), x.dtype))
    return y.reshape(n, ho, wo, cout)


def _xla(x, w, geo: Geometry, precision=None):
    return lax.conv_general_dilated(x, w, geo.stride, geo.pads, geo.lhs_dilation, geo.dilation,
                                    _DIMS, feature_group_count=geo.groups, precision=precision)


def _dense_conv(x, w, geo: Geometry, precision=None):
    return lax.conv_general_dilated(x, w, geo.stride, geo.pads, geo.lhs_dilation, geo.dilation,
                                    _DIMS, precision=precision)


def _split(x, w, geo: Geometry, precision=None):
    """One dense conv per group, concatenated along channels."""
    cin_per_group, cout_per_group = w.shape[2], w.shape[3] // geo.groups
    return jnp.concatenate(
        [_dense_conv(x[..., g * cin_per_group:(g + 1) * cin_per_group],
                     w[..., g * cout_per_group:(g + 1) * cout_per_group], geo, precision)
         for g in range(geo.groups)], axis=-1)


def block_diagonal(w, groups: int):
    """HWIO grouped kernel (kh, kw, C_in/G, C_out) -> the dense (kh, kw, C_in, C_out) kernel
    with the groups' kernels on the diagonal (exact: a product with 0/1)."""
    kh, kw, cin_per_group, cout = w.shape
    wr = w.reshape(kh, kw, cin_per_group, groups, cout // groups).transpose(0, 1, 3, 2, 4)
    eye = jnp.eye(groups, dtype=w.dtype)[:, None, :, None]
    return (wr[:, :, :, :, None, :] * eye).reshape(kh, kw, groups * cin_per_group, cout)


def _dense(x, w, geo: Geometry, precision=None):
    """One dense conv with the block-diagonal kernel (what XLA:CPU does with lax's forward,
    here with autodiff through a dense conv instead of batch_group_count)."""
    return _dense_conv(x, block_diagonal(w, geo.groups), geo, precision)


def _kernel(x, w, geo: Geometry, precision=None):
    """The C++ direct convolution (grouped_cpu.cc through the XLA FFI; CPU only)."""
    cpu_kernel.load()
    ho, wo = geo.out_hw(x.shape[1:3])
    shape = (x.shape[0], ho, wo, w.shape[3])
    if 0 in shape or 0 in x.shape:
        return jnp.zeros(shape, x.dtype)
    return jax.ffi.ffi_call("jaxconv_grouped_conv", jax.ShapeDtypeStruct(shape, x.dtype),
                            vmap_method="sequential")(x, w, **_attrs(geo))


# For ``jax.export`` of a CPU computation that uses the kernel (its FFI targets are this
# package's, with no cross-version guarantee): ``disabled_checks=grouped.EXPORT_CHECKS``.
EXPORT_CHECKS = [jax.export.DisabledSafetyCheck.custom_call(name) for name in cpu_kernel.TARGETS]


def _attrs(geo: Geometry):
    """The kernel's attributes for `geo`: stride, kernel dilation, low padding, input dilation
    (the high padding follows from the output's shape)."""
    (lo_h, _), (lo_w, _) = geo.pads
    values = dict(sh=geo.stride[0], sw=geo.stride[1], dh=geo.dilation[0], dw=geo.dilation[1],
                  lo_h=lo_h, lo_w=lo_w, ld_h=geo.lhs_dilation[0], ld_w=geo.lhs_dilation[1])
    return {k: np.int64(v) for k, v in values.items()}


_FORWARD = {"xla": _xla, "kernel": _kernel, "fma": _fma, "split": _split, "dense": _dense}


# ------------------------------------------------------------------------------- gradients

def _transposed(w_shape, geo: Geometry, in_hw, out_hw):
    """The geometry of the input gradient as a conv over the output cotangent: stride becomes
    input dilation, padding d*(k-1)-lo in front and whatever reaches the input size behind."""
    pads = tuple((d * (k - 1) - lo, n + lo - (no - 1) * s - 1)
                 for (lo, _), k, d, s, n, no in zip(geo.pads, geo.kernel, geo.dilation,
                                                   geo.stride, in_hw, out_hw))
    return Geometry(geo.kernel, (1, 1), pads, geo.dilation, geo.groups, geo.stride)


def transposed_kernel(w, groups: int):
    """(kh, kw, C_in/G, C_out) -> (kh, kw, C_out/G, C_in): flipped, in/out swapped per group."""
    kh, kw, cin_per_group, cout = w.shape
    wr = w[::-1, ::-1].reshape(kh, kw, cin_per_group, groups, cout // groups)
    return wr.transpose(0, 1, 4, 3, 2).reshape(kh, kw, cout // groups, groups * cin_per_group)


def _valid(n_in: int, n_out: int, offset: int, stride: int):
    """Output positions [o0, o1) whose input index o * stride + offset lies in [0, n_in)."""
    o0 = max(0, -(offset // stride))
    o1 = min(n_out, (n_in - 1 - offset) // stride + 1)
    return o0, max(o0, o1)


_MAX_TERMS = 96     # products per sum in one loop fusion (LLVM stops vectorising near ~128)


def _wgrad_cols(x, gy, w_shape, geo: Geometry):
    """Weight gradient of a grouped conv without materialising any product tensor.

    dw[i, j, c, o] = sum over n, r, w of x[n, r*sh + i*dh - pad, w*sw + j*dw - pad, c]
    * gy[n, r, w, o] (c, o within a group). Per tap, the products of one-column slices of x and
    gy are summed over the output columns: one loop fusion per tap (per block of at most
    _MAX_TERMS columns) that reads its operands along image rows and writes only
    (N, H_out, G, C_in/G, C_out/G) row sums; one reduction of the stacked row sums over
    (N, H_out) finishes. (A reduce of the products would have XLA:CPU materialise each tap's
    product tensor first; summing over rows instead of columns strides by a whole image row
    per term and thrashes the caches.)"""
    kh, kw, cin_per_group, cout = w_shape
    groups = geo.groups
    cout_per_group = cout // groups
    n, h, w_in, _ = x.shape
    _, ho, wo, _ = gy.shape
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    (lo_h, _), (lo_w, _) = geo.pads
    # channels as (G, C_in/G, C_out/G) with the size-1 axes dropped (depthwise: just C), so
    # that the innermost axis is a vector axis
    inner = (groups,) + tuple(d for d in (cin_per_group, cout_per_group) if d > 1)
    xg = x.reshape(n, h, w_in, *((groups, cin_per_group) if cin_per_group > 1 else (groups,)))
    gg = gy.reshape(n, ho, wo, *((groups, cout_per_group) if cout_per_group > 1 else (groups,)))
    if cin_per_group > 1 and cout_per_group > 1:
        xg, gg = xg[..., None], gg[..., None, :]
    elif cout_per_group > 1:                          # depth multiplier: x broadcast over it
        xg = xg[..., None]
    elif cin_per_group > 1:                           # one output per group
        gg = gg[..., None]
    xdims = xg.ndim - 3
    sums, owner = [], []                              # column sums and their kernel row
    for i in range(kh):
        r0, r1 = _valid(h, ho, i * dh - lo_h, sh)
        if r0 == r1 or n == 0:
            continue
        y0, y1 = r0 * sh + i * dh - lo_h, (r1 - 1) * sh + i * dh - lo_h + 1
        blocks = -(-wo // _MAX_TERMS)
        step = -(-wo // blocks)
        for a0 in range(0, wo, step):
            acc = None
            for c in range(a0, min(a0 + step, wo)):
                # the input columns of the kw taps for output column c: one strided slice
                cols = [c * sw + j * dw - lo_w for j in range(kw)]
                j0 = next((j for j in range(kw) if cols[j] >= 0), kw)
                j1 = next((j for j in range(kw) if cols[j] >= w_in), kw)
                if j0 >= j1:
                    continue
                xc = lax.slice(xg, (0, y0, cols[j0]) + (0,) * xdims,
                               (n, y1, cols[j1 - 1] + 1) + xg.shape[3:], (1, sh, dw) + (1,) * xdims)
                if (j0, j1) != (0, kw):
                    xc = jnp.pad(xc, ((0, 0), (0, 0), (j0, kw - j1)) + ((0, 0),) * xdims)
                term = xc * gg[:, r0:r1, c, None]          # (N, rows, kw, G[, ...])
                acc = term if acc is None else acc + term
            if acc is not None:
                sums.append(jnp.pad(acc, ((0, 0), (r0, ho - r1)) + ((0, 0),) * (1 + len(inner))))
                owner.append(i)
    if not sums:
        return jnp.zeros(w_shape, x.dtype)
    per_sum = jnp.sum(jnp.stack(sums), axis=(1, 2))   # (sums, kw, G[, C_in/G][, C_out/G])
    dw_ = jnp.zeros((kh, kw) + inner, x.dtype).at[np.asarray(owner)].add(per_sum)
    dw_ = dw_.reshape(kh, kw, groups, cin_per_group, cout_per_group)
    return dw_.transpose(0, 1, 3, 2, 4).reshape(kh, kw, cin_per_group, cout)


def _wgrad_kernel(x, gy, w_shape, geo: Geometry):
    """The weight gradient by the C++ kernel: per tap, row sums of products in registers."""
    if 0 in x.shape or 0 in gy.shape:
        return jnp.zeros(w_shape, x.dtype)
    return jax.ffi.ffi_call("jaxconv_grouped_conv_wgrad", jax.ShapeDtypeStruct(w_shape, x.dtype),
                            vmap_method="sequential")(x, gy, **_attrs(geo))


def _fenced(fn, key, *args):
    """fn(*args) behind a conditional that XLA cannot see through.

    The formulations above are loop fusions of cheap ops (slices, multiplies, adds), which
    XLA's fusion passes freely duplicate: without a fence a consumer of the result (a
    BatchNorm, its backward, a ReLU mask) recomputes the whole convolution inside its own
    loop, once per consumer, and the producers of the operands (the previous BatchNorm and
    ReLU) are recomputed once per kernel tap. The operands and results of a conditional are
    buffers, so they are computed once. The predicate is always true (every float is finite,
    infinite or NaN) but XLA does not know it; the other branch is never run."""
    k = key.reshape(-1)[0]
    always = jnp.isfinite(k) | jnp.isnan(k) | jnp.isinf(k)
    shapes = jax.eval_shape(fn, *args)
    never = lambda *a: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    return lax.cond(always, fn, never, *args)


@dataclasses.dataclass(frozen=True)
class _Plan:
    geo: Geometry
    forward: str
    input_grad: str
    weight_grad: str
    precision: object = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _custom(x, w, plan: _Plan):
    fwd = functools.partial(_FORWARD[plan.forward], geo=plan.geo, precision=plan.precision)
    return _maybe_fenced(plan.forward, fwd, w, x, w)


def _maybe_fenced(name, fn, key, *args):
    """The kernel is one opaque custom call already; the fma formulations need the fence."""
    return fn(*args) if name == "kernel" else _fenced(fn, key, *args)


def _custom_fwd(x, w, plan: _Plan):
    return _custom(x, w, plan), (x, w)


def _custom_bwd(plan: _Plan, res, gy):
    x, w = res
    gy = gy.astype(x.dtype)
    geo = plan.geo
    in_hw, out_hw = x.shape[1:3], gy.shape[1:3]
    geo_t = _transposed(w.shape, geo, in_hw, out_hw)
    dx_fn = functools.partial(_FORWARD[plan.input_grad], geo=geo_t, precision=plan.precision)
    dx = _maybe_fenced(plan.input_grad, dx_fn, w, gy, transposed_kernel(w, geo.groups))
    if plan.weight_grad == "kernel":
        dw = _wgrad_kernel(x, gy, w.shape, geo)
    else:
        dw = _fenced(functools.partial(_wgrad_cols, w_shape=w.shape, geo=geo), w, x, gy)
    return dx, dw


_custom.defvjp(_custom_fwd, _custom_bwd)


def _lower(x, w, geo: Geometry, name: str, precision):
    """The CPU (or forced) formulation `name` on compute-dtype operands."""
    fwd, dx, dw = _plan(name, x.shape, w.shape, geo)
    if fwd == "xla":
        return _xla(x, w, geo, precision)
    if fwd in ("split", "dense"):                       # dense convs: autodiff is fine
        return _FORWARD[fwd](x, w, geo, precision)
    return _custom(x, w, _Plan(geo, fwd, dx, dw, precision))


# ---------------------------------------------------------------------------------- public

def _compute_dtype(dtype, preferred):
    out = jnp.dtype(preferred) if preferred is not None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return None
    return jnp.promote_types(out, jnp.float32)


def grouped_conv(x, w, stride=(1, 1), padding: Pairs = ((0, 0), (0, 0)), dilation=(1, 1),
                 groups: int = 1, *, preferred_element_type=None, precision=None,
                 lowering: str | None = None):
    """Grouped / depthwise conv on NHWC `x` and HWIO `w` (kh, kw, C_in/groups, C_out):
    the result of ``lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=dilation,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups,
    preferred_element_type=preferred_element_type)``, lowered as `lowering` says (default:
    ``jaxconv.config.grouped_lowering``; 'auto', 'xla', 'fma', 'split' or 'dense').

    `padding` is explicit ((top, bottom), (left, right)). `x` and `w` have one dtype; low
    precision inputs are computed in float32 (like lax with preferred_element_type=float32)
    and returned in `preferred_element_type` or their own dtype.
    """
    name = config.check_grouped_lowering(config.grouped_lowering if lowering is None else lowering)
    geo = Geometry(tuple(w.shape[:2]), tuple(stride), tuple(tuple(p) for p in padding),
                   tuple(dilation), int(groups))
    ct = _compute_dtype(x.dtype, preferred_element_type)
    out_dtype = preferred_element_type if preferred_element_type is not None else x.dtype

    def native(x, w):
        return lax.conv_general_dilated(x, w, geo.stride, geo.pads, None, geo.dilation, _DIMS,
                                        feature_group_count=groups, precision=precision,
                                        preferred_element_type=preferred_element_type)

    if name == "xla" or ct is None or (groups == 1 and name not in ("auto", "kernel")):
        return native(x, w)

    def lowered(x, w):
        return _lower(x.astype(ct), w.astype(ct), geo, name, precision).astype(out_dtype)

    if name != "auto":                                  # forced: on every backend
        return lowered(x, w)
    if jax.default_backend() != "cpu" or (
            groups == 1 and choose("cpu", x.shape, w.shape, geo) == "xla"):
        return native(x, w)
    # CPU by default: the CPU formulation only where the computation is lowered for CPU.
    return lax.platform_dependent(x, w, cpu=lowered, default=native)


def pointwise_conv(x, w, stride=(1, 1), *, preferred_element_type=None, precision=None,
                   lowering: str | None = None):
    """A dense 1x1 conv without padding on NHWC `x` and HWIO `w` (1, 1, C_in, C_out), as a
    matrix product on CPU under 'auto': XLA:CPU's convolution runs a 1x1 conv 1.3-3x slower
    than its own dot, forward and backward, and ResNeXt / MobileNet / Xception spend most of
    their multiply-adds in 1x1 convs. A stride is a strided slice first. Other backends and
    lowerings: lax's conv."""
    name = config.check_grouped_lowering(config.grouped_lowering if lowering is None else lowering)

    def native(x, w):
        return lax.conv_general_dilated(x, w, stride, ((0, 0), (0, 0)), None, None, _DIMS,
                                        precision=precision,
                                        preferred_element_type=preferred_element_type)

    ct = _compute_dtype(x.dtype, preferred_element_type)
    out_dtype = preferred_element_type if preferred_element_type is not None else x.dtype

    def matmul(x, w):
        if stride != (1, 1):
            x = x[:, ::stride[0], ::stride[1]]
        return _matmul(x.astype(ct), w[0, 0].astype(ct), precision).astype(out_dtype)

    if name != "auto" or ct is None or jax.default_backend() != "cpu":
        return native(x, w)
    return lax.platform_dependent(x, w, cpu=matmul, default=native)


def _matmul(x, w, precision):
    """(N, H, W, C_in) x (C_in, C_out) as a 2-D product: autodiff then gives the weight
    gradient as one (N*H*W, C_in)^T (N*H*W, C_out) product; through a 4-D contraction it comes
    with a transpose for which XLA:CPU writes a transposed copy of the output gradient of every
    1x1 conv (a 128 -> 256 conv's fwd+bwd at 56x56: 70 ms -> 48 ms, measured)."""
    n, h, w_, c = x.shape
    y = lax.dot_general(x.reshape(n * h * w_, c), w, (((1,), (0,)), ((), ())),
                        precision=precision)
    return y.reshape(n, h, w_, w.shape[1])


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs):
    """Drop-in for ``lax.conv_general_dilated`` (e.g. ``nnx.Conv(...,
    conv_general_dilated=jaxconv.ops.grouped.conv_general_dilated)``): 2-D NHWC / HWIO
    convolutions with ``feature_group_count > 1`` go through this module's lowering, and
    unpadded 1x1 ones through ``pointwise_conv``; everything else straight to lax."""
    routed = (batch_group_count == 1 and lhs.ndim == 4
              and all(d == 1 for d in (lhs_dilation or (1, 1)))
              and not any(v is not None for v in kwargs.values())
              and _is_nhwc(lhs.ndim, dimension_numbers))
    if routed and isinstance(padding, str):
        dilation = tuple(rhs_dilation or (1, 1))
        window = [d * (k - 1) + 1 for k, d in zip(rhs.shape[:2], dilation)]
        padding = lax.padtype_to_pads(lhs.shape[1:3], window, window_strides, padding)
    if routed and rhs.shape[:2] == (1, 1) and feature_group_count == 1 and all(
            tuple(p) == (0, 0) for p in padding):
        return pointwise_conv(lhs, rhs, tuple(window_strides), precision=precision,
                              preferred_element_type=preferred_element_type)
    if routed:
        return grouped_conv(lhs, rhs, tuple(window_strides), padding,
                            tuple(rhs_dilation or (1, 1)), feature_group_count,
                            preferred_element_type=preferred_element_type, precision=precision)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
        **{k: v for k, v in kwargs.items() if v is not None})


def _is_nhwc(ndim: int, dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    return dn == lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, _DIMS)
