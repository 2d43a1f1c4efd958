"""Pooling with torch's semantics on NHWC: ceil_mode, count_include_pad, -inf max padding, and
adaptive average pooling with torch's uneven windows."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad, batching, mlir

from jaxconv import config
from jaxconv.ops import lowering, native, policy
from jaxconv.ops._args import check_rank, pair
from jaxconv.ops._formula import formula_primitive
from jaxconv.ops.barrier import fusion_barrier
from jaxconv.ops.cpu_conv import Geometry, bind


def _window(x, kernel_size, stride, padding, dilation, ceil_mode):
    """Validate torch pooling arguments; return (kernel, stride, dilation, pads, out_hw).

    pads are explicit (lo, hi) per spatial axis: lo = padding, hi = what the last window needs
    (torch's output size rule, with ceil_mode's extra partial window that must start inside the
    left-padded input).
    """
    check_rank(x, 4, "x", "NHWC")
    k = pair(kernel_size, "kernel_size", minimum=1)
    s = k if stride is None or stride == () else pair(stride, "stride", minimum=1)
    p = pair(padding, "padding", minimum=0)
    d = pair(dilation, "dilation", minimum=1)
    if any(pi > ki // 2 for pi, ki in zip(p, k)):
        raise ValueError(f"padding: expected at most half the kernel size {k} (as torch), got {p}")
    pads, out_hw = [], []
    for n, ki, si, pi, di in zip(x.shape[1:3], k, s, p, d):
        span = n + 2 * pi - di * (ki - 1) - 1
        # torch's size rule: in ceil_mode a window larger than the padded input still gives
        # one output if it starts inside it (GoogLeNet's ceil-mode pools at its minimum size)
        if span + (si - 1 if ceil_mode else 0) < 0:
            raise ValueError(f"kernel_size: window {ki} (dilation {di}) is larger than the padded "
                             f"input {n + 2 * pi} (input {n}, padding {pi})")
        out = (span + (si - 1 if ceil_mode else 0)) // si + 1
        if ceil_mode and (out - 1) * si >= n + pi:
            out -= 1
        pads.append((pi, max((out - 1) * si + di * (ki - 1) + 1 - n - pi, 0)))
        out_hw.append(out)
    return k, s, d, tuple(pads), tuple(out_hw)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """torch.nn.functional.max_pool2d on NHWC `x` (padding counts as -inf). The gradient goes
    to the first maximum of each window in row-major order, NaN counting as a maximum: torch's
    rule."""
    k, s, d, pads, out_hw = _window(x, kernel_size, stride, padding, dilation, ceil_mode)
    return _max_pool(x, (k, s, d, pads, out_hw))


def _taps(x, window, fill):
    """The k_h * k_w strided views of `x` padded with `fill`, one per window position, in
    row-major order: tap t holds, for every output, the input under window position t.

    The padded input is reshaped (for free) to (n, h / s_h, s_h, w / s_w, s_w, c), so that every
    tap is a plain slice, whose gradient is a plain pad rather than an interior one (a GoogLeNet
    train step 306 -> 287 ms, min of 10; BENCHMARKS.md, "Pooling").
    """
    k, s, d, pads, out_hw = window
    n, h, w, c = x.shape
    ends = [hi + (-(size + lo + hi)) % st for size, (lo, hi), st in zip((h, w), pads, s)]
    xp = jnp.pad(x, ((0, 0), (pads[0][0], ends[0]), (pads[1][0], ends[1]), (0, 0)), constant_values=fill)
    xr = xp.reshape(n, xp.shape[1] // s[0], s[0], xp.shape[2] // s[1], s[1], c)
    taps = []
    for i in range(k[0]):
        qi, ri = divmod(i * d[0], s[0])
        for j in range(k[1]):
            qj, rj = divmod(j * d[1], s[1])
            taps.append(xr[:, qi:qi + out_hw[0], ri, qj:qj + out_hw[1], rj])
    return taps


# Windows of up to this many taps are reduced as strided slices, which XLA:CPU fuses into one
# multi-threaded pass (forward and gradient): 2-7x faster than its reduce-window for the models'
# 3x3 max pools and Inception-v3's 3x3 and 5x5 average pools; a 7x7 window over a 7x7 input was
# 5x slower (BENCHMARKS.md, "Pooling").
_MAX_TAPS = 25


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_pool(x, window):
    k, s, d, pads, out_hw = window
    init = np.array(-np.inf, x.dtype)  # concrete: jit keeps the max window
    if k[0] * k[1] <= _MAX_TAPS or d != (1, 1):   # XLA has no dilated max windows
        return functools.reduce(jnp.maximum, _taps(x, window, init))   # NaN wins, as in torch
    y = lax.reduce_window(x, init, lax.max, (1, *k, 1), (1, *s, 1), ((0, 0), *pads, (0, 0)))
    return y[:, :out_hw[0], :out_hw[1]]


@_max_pool.defjvp
def _max_pool_jvp(window, primals, tangents):
    """Each window's tangent at its winning tap (argmax_p, gather_p below); reverse mode
    transposes gather_p into scatter_p."""
    (x,), (t,) = primals, tangents
    y, won = argmax_p.bind(x, window=window, lowering=config.conv_lowering)
    return y, gather_p.bind(t, won, window=window, lowering=config.conv_lowering)


# ------------------------------------------------------------------ max pooling's derivatives
# Three primitives carry max pooling through JAX's transformations (`won`: int32, per output
# element, the window tap i * k_w + j its maximum came from):
#   argmax_p   x -> (y, won)       the first maximum in row-major order, NaN counting as one
#                                  (torch's rule); a window of -inf keeps its first tap inside
#                                  the input, as torch
#   gather_p   (t, won) -> t_y     each window's t at its winning tap (linear in t)
#   scatter_p  (ct, won) -> ct_x   gather_p's transpose: ct added at each winning tap
# On CPU, float32 / float64 / bfloat16, argmax_p and scatter_p are jaxconv's kernels
# (grouped_cpu.cc, engine "kernel": one pass each, where XLA ran the formulas as several
# fusions; bf16 sums in float32, rounded once; measured on whole train steps in BENCHMARKS.md,
# "Pooling") unless the conv lowering is 'xla' or the kernel is missing; elsewhere, and
# gather_p always, the formulas below.

def _first_tap(window, in_hw) -> np.ndarray:
    """(out_h, out_w) int32: each window's first tap inside the input."""
    k, s, d, pads, out_hw = window
    first = []
    for size, ki, si, di, (lo, _), out in zip(in_hw, k, s, d, pads, out_hw):
        start = np.arange(out) * si - lo
        first.append(np.where(start >= 0, 0, (-start + di - 1) // di))
    return (first[0][:, None] * k[1] + first[1][None, :]).astype(np.int32)


def _argmax(x, *, window, lowering=None):
    xs = _taps(x, window, np.array(-np.inf, x.dtype))
    best = jnp.full(xs[0].shape, -np.inf, x.dtype)
    won = jnp.broadcast_to(_first_tap(window, x.shape[1:3])[None, :, :, None], xs[0].shape)
    for i, xt in enumerate(xs):
        take = (xt > best) | jnp.isnan(xt)
        best, won = jnp.where(take, xt, best), jnp.where(take, i, won)
    return best, fusion_barrier(won)   # computed once, not in every tap's pass of the gradient


def _gather(t, won, *, window, lowering=None):
    """The barriers keep the gradient's sum of the taps' pads in one place, not in every
    consumer of the pool's input (BENCHMARKS.md, "Pooling")."""
    ts = _taps(fusion_barrier(t), window, np.array(0, t.dtype))
    return fusion_barrier(functools.reduce(jnp.add, (jnp.where(won == i, tt, 0)
                                                     for i, tt in enumerate(ts))))


def _scatter(ct, won, *, window, in_hw, lowering=None):
    t = jax.ShapeDtypeStruct((ct.shape[0], *in_hw, ct.shape[3]), ct.dtype)
    return jax.linear_transpose(lambda t: _gather(t, won, window=window), t)(ct)[0]


def _pool_primitive(name, formula, multiple_results=False):
    """A primitive computed by `formula` (its shapes, eager evaluation and lowering off CPU);
    vmap folds the mapped axis into the batch."""
    p = formula_primitive(name, formula, multiple_results)

    def batch(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
        outs = p.bind(*(a.reshape(-1, *a.shape[2:]) for a in args), **params)
        unfold = lambda o: o.reshape(size, -1, *o.shape[1:])  # noqa: E731
        return (([unfold(o) for o in outs], [0] * len(outs)) if multiple_results
                else (unfold(outs), 0))

    batching.primitive_batchers[p] = batch
    return p


argmax_p = _pool_primitive("jaxconv_max_pool", _argmax, multiple_results=True)
gather_p = _pool_primitive("jaxconv_max_pool_gather", _gather)
scatter_p = _pool_primitive("jaxconv_max_pool_scatter", _scatter)


def _kernel_attrs(window):
    k, s, d, ((pt, _), (pl, _)), _ = window
    values = dict(kh=k[0], kw=k[1], sh=s[0], sw=s[1], dh=d[0], dw=d[1], pt=pt, pl=pl)
    return {name: np.int64(v) for name, v in values.items()}


def _on_kernel(aval, lowering) -> bool:
    return (aval.dtype in (np.float32, np.float64, jnp.bfloat16) and 0 not in aval.shape
            and lowering != "xla" and native.available("kernel"))


def _argmax_cpu(ctx, x, *, window, lowering):
    if not _on_kernel(ctx.avals_in[0], lowering):
        return mlir.lower_fun(functools.partial(_argmax, window=window), True)(ctx, x)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ctx.avals_out]
    call = jax.ffi.ffi_call("jaxconv_max_pool", shapes)
    return mlir.lower_fun(lambda x: call(x, **_kernel_attrs(window)), True)(ctx, x)


def _scatter_cpu(ctx, ct, won, *, window, in_hw, lowering):
    if not _on_kernel(ctx.avals_in[0], lowering):
        fn = functools.partial(_scatter, window=window, in_hw=in_hw)
        return mlir.lower_fun(fn, False)(ctx, ct, won)
    out = ctx.avals_out[0]
    call = jax.ffi.ffi_call("jaxconv_max_pool_bwd", jax.ShapeDtypeStruct(out.shape, out.dtype))
    return mlir.lower_fun(lambda ct, won: call(ct, won, **_kernel_attrs(window)), False)(
        ctx, ct, won)


mlir.register_lowering(argmax_p, _argmax_cpu, platform="cpu")
mlir.register_lowering(scatter_p, _scatter_cpu, platform="cpu")


def _zero(x):
    """The symbolic zero tangent of `x` (float0 for integers)."""
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _argmax_jvp(primals, tangents, *, window, lowering):
    (x,), (t,) = primals, tangents
    y, won = argmax_p.bind(x, window=window, lowering=lowering)
    ty = (_zero(y) if type(t) is ad.Zero
          else gather_p.bind(t, won, window=window, lowering=lowering))
    return (y, won), (ty, _zero(won))


def _linear_in_first(p, transpose_p, transpose_params):
    """JVP and transpose rules of a primitive linear in its first operand (`won` fixed)."""
    def jvp(primals, tangents, **params):
        t, won = primals
        out = p.bind(t, won, **params)
        dt = tangents[0]
        return out, (_zero(out) if type(dt) is ad.Zero
                     else p.bind(dt, won, **params))

    def transpose(ct, t, won, **params):
        if not ad.is_undefined_primal(t) or ad.is_undefined_primal(won):
            raise ValueError(f"{p.name}: linear in its first operand only")
        if type(ct) is ad.Zero:
            return [ad.Zero(t.aval), None]
        return [transpose_p.bind(ct, won, **transpose_params(t.aval, params)), None]

    ad.primitive_jvps[p] = jvp
    ad.primitive_transposes[p] = transpose


ad.primitive_jvps[argmax_p] = _argmax_jvp
_linear_in_first(gather_p, scatter_p,
                 lambda aval, params: dict(params, in_hw=tuple(aval.shape[1:3])))
_linear_in_first(scatter_p, gather_p,
                 lambda aval, params: {k: v for k, v in params.items() if k != "in_hw"})


def _pool_counts(size: int, k: int, s: int, pad: tuple[int, int], out: int,
                 count_include_pad: bool) -> np.ndarray:
    """How many elements torch divides by in each window along one axis.

    torch counts the symmetric padding (when count_include_pad) but never the extra right
    padding that ceil_mode adds.
    """
    lo, hi = pad
    inside = np.zeros(size + lo + hi)
    inside[lo:lo + size] = 1
    if count_include_pad:
        inside[:2 * lo + size] = 1
    return np.array([inside[i * s:i * s + k].sum() for i in range(out)])


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """torch.nn.functional.avg_pool2d on NHWC `x`; low precision inputs are summed in float32."""
    window = _window(x, kernel_size, stride, padding, 1, ceil_mode)
    k, s, _, pads, out_hw = window
    acc = jnp.promote_types(x.dtype, jnp.float32)
    if k[0] * k[1] <= _MAX_TAPS:
        total = _window_sum(x.astype(acc), window)
    else:
        total = lax.reduce_window(x.astype(acc), np.array(0, acc), lax.add, (1, *k, 1),
                                  (1, *s, 1), ((0, 0), *pads, (0, 0)))[:, :out_hw[0], :out_hw[1]]
    if divisor_override is not None:
        if not isinstance(divisor_override, int) or divisor_override < 1:
            raise ValueError(f"divisor_override: expected a positive int, got {divisor_override!r}")
        return (total / divisor_override).astype(x.dtype)
    counts = [_pool_counts(n, ki, si, pi, o, count_include_pad)
              for n, ki, si, pi, o in zip(x.shape[1:3], k, s, pads, out_hw)]
    divisor = np.outer(*counts)[None, :, :, None]
    return (total / divisor.astype(acc)).astype(x.dtype)


def _window_sum(x, window):
    """Each window's sum (zeros outside `x`). On CPU, where a CPU conv engine computes both its
    passes (not under conv_lowering 'xla', nor where lax's conv would: XLA:CPU's depthwise
    gradient is ~26x slower than the taps'), a depthwise conv with a kernel of ones: the same
    sums in the same order (bit-identical forward), and its gradient one multi-threaded
    backward-data call, where the taps' gradient wrote one padded copy per tap (an Inception-v3
    train step 4-9% faster; BENCHMARKS.md, "Pooling"). Elsewhere, the taps that XLA fuses."""
    k, s, d, pads, out_hw = window
    n, c = x.shape[0], x.shape[-1]
    geo, name = Geometry(k, s, pads, d, groups=c), config.conv_lowering
    w, g = (jax.ShapeDtypeStruct(shape, x.dtype) for shape in ((*k, 1, c), (n, *out_hw, c)))

    def taps(x, w):
        return sum(_taps(x, window, np.array(0, x.dtype)))
    if (name == "xla" or 0 in x.shape or jax.default_backend() != "cpu"
            or "xla" in (policy.engine("fwd", geo, x, w, name),
                         policy.engine("bwd_data", geo, g, w, name, x.shape[1:3]))):
        return taps(x, None)

    def engine(x, w):
        return bind("fwd", x, w, geo, lowering=name)[:, :out_hw[0], :out_hw[1]]
    return lowering.on_cpu(x, jnp.ones(w.shape, x.dtype), engine, taps)


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging matrix over torch's windows [floor(i*size/out), ceil((i+1)*size/out))."""
    m = np.zeros((out, size))
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool2d(x, output_size):
    """torch.nn.functional.adaptive_avg_pool2d on NHWC `x`; `output_size` entries may be None
    (keep that dimension). Windows may overlap and differ in size, exactly as in torch."""
    check_rank(x, 4, "x", "NHWC")
    n, h, w, c = x.shape
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2:
        output_size = tuple(size if o is None else o for o, size in zip(output_size, (h, w)))
    oh, ow = pair(output_size, "output_size", minimum=1)
    if h % oh == 0 and w % ow == 0:  # equal windows: a plain reshape-mean
        acc = jnp.promote_types(x.dtype, jnp.float32)
        y = x.astype(acc).reshape(n, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))
        return y.astype(x.dtype)
    mh = jnp.asarray(_adaptive_matrix(h, oh), jnp.float32)
    mw = jnp.asarray(_adaptive_matrix(w, ow), jnp.float32)
    y = jnp.einsum("nhwc,ph,qw->npqc", x.astype(jnp.promote_types(x.dtype, jnp.float32)), mh, mw,
                   precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)
