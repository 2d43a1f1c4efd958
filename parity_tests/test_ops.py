"""jaxconv.ops vs torch.nn.functional: the op grid (forward and gradients), plus the transposed
conv as the adjoint of conv2d and the connectivity of grouped convs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import ops
from jaxconv.ops import native
from jaxconv.verify.ops import CASES, OpCase, run_case
from parity_tests.tolerances import OP_FP32


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_torch(case):
    r = run_case(case)
    assert r.passed, f"{case.id}: forward max abs error {r.forward:.3g}, gradients {r.grads}"


# Branches the grid (whose size the verify CLI pins) leaves out: an output_padding of a stride
# or more (allowed where dilation > stride), and adaptive pooling to an output size that
# divides the input unevenly in neither dimension but 1x1 (the reshape-mean path).
EXTRA_CASES = [
    OpCase("conv_transpose2d", (3, 5, 4, 4), dict(stride=(1, 2), dilation=(2, 1),
                                                  output_padding=(1, 0)), (4, 6, 3, 3), bias=True),
    OpCase("adaptive_avg_pool2d", (2, 8, 9, 4), dict(output_size=(4, 3))),
]


@pytest.mark.parametrize("case", EXTRA_CASES, ids=[c.id for c in EXTRA_CASES])
def test_op_branches_outside_the_grid_match_torch(case):
    r = run_case(case)
    assert r.passed, f"{case.id}: forward max abs error {r.forward:.3g}, gradients {r.grads}"


@pytest.mark.parametrize("kw", [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2),
    dict(stride=3, padding=2, dilation=1, groups=4),
])
def test_conv_transpose_is_adjoint_of_conv(kw):
    """The Jacobian of conv_transpose2d is the transpose of conv2d's, for the same kernel."""
    rng = np.random.default_rng(1)
    cin, cout = 8, 2 * kw["groups"]  # conv2d: cin -> cout channels
    kernel = jnp.asarray(rng.standard_normal((3, 2, cin // kw["groups"], cout)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 7, 6, cin)), jnp.float32)
    y = ops.conv2d(x, kernel, **kw)
    # output_padding recovers the rows/cols a strided conv drops, so shapes round-trip
    out_pad = tuple((n + 2 * p - d * (k - 1) - 1) % s for n, p, d, k, s in zip(
        x.shape[1:3], np.broadcast_to(kw["padding"], 2), np.broadcast_to(kw["dilation"], 2),
        kernel.shape[:2], np.broadcast_to(kw["stride"], 2)))
    conv = lambda v: ops.conv2d(v, kernel, **kw)  # noqa: E731
    tconv = lambda v: ops.conv_transpose2d(v, kernel, output_padding=out_pad, **kw)  # noqa: E731
    assert tconv(y).shape == x.shape
    jac_conv = jax.jacobian(conv)(x).reshape(y.size, x.size)
    jac_tconv = jax.jacobian(tconv)(y).reshape(x.size, y.size)
    np.testing.assert_allclose(jac_tconv, jac_conv.T, **OP_FP32)


@pytest.mark.parametrize("groups, cin, cout", [(2, 4, 6), (4, 8, 8), (4, 4, 8)])
def test_grouped_conv_connectivity(groups, cin, cout):
    """A one-hot input channel reaches exactly the output channels of its own group."""
    kernel = jnp.ones((3, 3, cin // groups, cout))
    for c in range(cin):
        x = jnp.zeros((1, 5, 5, cin)).at[0, 2, 2, c].set(1.0)
        touched = np.flatnonzero(np.abs(np.asarray(ops.conv2d(x, kernel, padding=1, groups=groups))).sum((0, 1, 2)))
        g = c // (cin // groups)
        np.testing.assert_array_equal(touched, np.arange(g * cout // groups, (g + 1) * cout // groups))


def _plain_batch_norm(x, scale, bias, eps):
    """The formula as written, differentiated by JAX: the oracle for ops.batch_norm_train."""
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_train_matches_torch_in_float64(affine):
    import torch
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 2, 7)) * 3 + 1
    scale, bias, g = rng.standard_normal(7), rng.standard_normal(7), rng.standard_normal(x.shape)
    args = (scale, bias) if affine else (None, None)
    with jax.enable_x64(True):
        def loss(x, *p):
            return jnp.sum(ops.batch_norm_train(x, *p, eps=1e-3)[0] * g)
        y, mean, var = ops.batch_norm_train(jnp.asarray(x), *args, eps=1e-3)
        grads = jax.grad(loss, argnums=(0, 1, 2) if affine else 0)(x, *args)
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tp = [torch.tensor(p, requires_grad=True) for p in args] if affine else [None, None]
    ty = torch.nn.functional.batch_norm(tx, None, None, *tp, training=True, eps=1e-3)
    (ty * torch.tensor(g.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(var, x.var((0, 1, 2)), rtol=1e-12)
    want = [tx.grad.numpy().transpose(0, 2, 3, 1)] + [p.grad.numpy() for p in tp if p is not None]
    for a, b in zip(jax.tree.leaves(grads), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_batch_norm_train_forward_mode_and_higher_order_ad():
    """jvp (every output), jacfwd, hessian-vector product, grad of grad, vmap of grad and of jvp
    against autodiff of the plain formula, in float64; and finite differences to order 2."""
    from jax.test_util import check_grads
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x, tx = (jnp.asarray(rng.standard_normal((2, 3, 4, 5))) for _ in range(2))
        s, b, ts, tb = (jnp.asarray(rng.standard_normal(5)) for _ in range(4))
        results = {}
        for name, bn in (("ours", lambda x, s, b: ops.batch_norm_train(x, s, b, 1e-3)),
                         ("plain", lambda x, s, b: _plain_batch_norm(x, s, b, 1e-3))):
            def loss(x, s, b, bn=bn):
                y, mean, var = bn(x, s, b)
                return jnp.sum(jnp.tanh(y) ** 2) + jnp.sum(mean * var)
            results[name] = {
                "jvp": jax.jvp(bn, (x, s, b), (tx, ts, tb))[1],
                "jacfwd_x": jax.jacfwd(loss)(x, s, b),
                "hvp": jax.jvp(jax.grad(loss, argnums=(0, 1, 2)), (x, s, b), (tx, ts, tb))[1],
                "grad_of_grad": jax.grad(lambda s: jnp.sum(jax.grad(loss)(x, s, b) ** 2))(s),
                "vmap_grad": jax.vmap(jax.grad(loss), in_axes=(0, None, None))(jnp.stack([x, 2 * x]), s, b),
                "vmap_jvp": jax.vmap(lambda t: jax.jvp(lambda x: bn(x, s, b)[0], (x,), (t,))[1])(
                    jnp.stack([tx, -tx]))}
        for k, want in results["plain"].items():
            for a, w in zip(jax.tree.leaves(results["ours"][k]), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, w, rtol=1e-9, atol=1e-10, err_msg=k)
        check_grads(lambda x, s, b: ops.batch_norm_train(x, s, b, 1e-3)[0], (x, s, b), order=2,
                    modes=("fwd", "rev"))


@pytest.mark.parametrize("shape", [(3, 5, 7, 13), (2, 9, 9, 256), (1, 1, 1, 6)])
def test_batch_norm_train_float32_on_onednn_matches_float64(shape):
    """float32 on CPU runs oneDNN's batch-norm backward (the HLO calls it; the 'xla' lowering
    does not): outputs, statistics, gradients and jvp / vmap of grad against the plain
    formula's autodiff in float64, on an input whose mean is far from 0."""
    from jaxconv import config
    rng = np.random.default_rng(2)
    x, g = (rng.standard_normal(shape) * 3 + 5, rng.standard_normal(shape))
    s, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])

    def outputs(bn, x, s, b):
        def loss(x, s, b):
            y, mean, var = bn(x, s, b, 1e-3)
            return jnp.sum(y * g), (y, mean, var)
        (_, fwd), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, s, b)
        jvp = jax.jvp(lambda x: bn(x, s, b, 1e-3)[0], (x,), (g,))[1]
        vmapped = jax.vmap(jax.grad(lambda x: loss(x, s, b)[0]))(jnp.stack([x, 2 * x]))
        return (*fwd, *grads, jvp, vmapped)

    with jax.enable_x64(True):
        want = outputs(_plain_batch_norm, *(jnp.asarray(a, jnp.float64) for a in (x, s, b)))
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, s, b)]
    got = jax.jit(functools.partial(outputs, ops.batch_norm_train))(*f32)
    hlo = jax.jit(jax.grad(lambda x: ops.batch_norm_train(x, *f32[1:])[0].sum())).lower(f32[0]).as_text()
    assert "jaxconv_onednn_norm_bwd" in hlo
    with config.use_conv_lowering("xla"):
        hlo = jax.jit(lambda x: ops.batch_norm_train(x, *f32[1:])[0]).lower(f32[0]).as_text()
    assert "jaxconv_onednn" not in hlo
    names = ("y", "mean", "var", "dx", "dscale", "dbias", "jvp", "vmap_grad")
    for name, a, w in zip(names, got, want, strict=True):
        w = np.asarray(w)
        np.testing.assert_allclose(a, w, rtol=0, atol=2e-5 * max(1.0, np.abs(w).max()), err_msg=name)


@pytest.mark.parametrize("has_bf16", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 7, 13), (2, 9, 9, 256)])
def test_batch_norm_train_bfloat16_is_the_float32_answer_rounded(shape, has_bf16, monkeypatch):
    """bf16 activations on a CPU with AVX512-BF16 run oneDNN's batch-norm forward and backward
    on bf16 (the HLO calls both; without native bf16, neither): y and dx within bf16's rounding
    of the plain formula's autodiff in float64 on the same values, the statistics and the
    scale / bias gradients (float32) within 2e-6 (oneDNN's per-channel sums at these sizes), on
    an input whose mean is far from 0; for two eps (1 moves y by ~5%: a wrong or cached eps
    fails)."""
    if has_bf16 and not (native.bf16() and native.available("onednn")):
        pytest.skip("this CPU has no AVX512-BF16 (or no oneDNN): the native bf16 path is off")
    monkeypatch.setattr(native, "bf16", lambda: has_bf16)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 5, jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    s, b = (jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32) for _ in range(2))

    def outputs(bn, x, s, b, eps):
        def loss(x, s, b):
            y, mean, var = bn(x, s, b, eps)
            return jnp.sum(y.astype(g.dtype).astype(jnp.float32) * g), (y, mean, var)
        (_, fwd), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, s, b)
        return (*fwd, *grads)

    names = ("y", "mean", "var", "dx", "dscale", "dbias")
    dtypes = (jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16, jnp.float32, jnp.float32)
    for eps in (1e-3, 1.0):
        with jax.enable_x64(True):
            want = outputs(_plain_batch_norm, *(jnp.asarray(a, jnp.float64) for a in (x, s, b)), eps)
        ours = jax.jit(functools.partial(outputs, ops.batch_norm_train, eps=eps))
        hlo = ours.lower(x, s, b).as_text()
        for target in ("jaxconv_onednn_norm_fwd", "jaxconv_onednn_norm_bwd"):
            assert (f"@{target}(" in hlo) == has_bf16, target
        for name, dtype, a, w in zip(names, dtypes, ours(x, s, b), want, strict=True):
            assert a.dtype == dtype, (name, a.dtype)
            w = np.asarray(w)
            tol = 2.0 ** -8 if dtype == jnp.bfloat16 else 2e-6   # bf16: half a unit at the top
            np.testing.assert_allclose(np.asarray(a, np.float64), w, rtol=0,
                                       atol=tol * np.abs(w).max(), err_msg=f"{name}, eps {eps}")


@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=1, padding=1),
                                dict(kernel_size=5, stride=3),
                                dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1),
                                     ceil_mode=True, count_include_pad=False)])
@pytest.mark.parametrize("engines", [True, False])
def test_avg_pool_window_sums_are_a_conv_on_cpu(kw, engines, monkeypatch):
    """On CPU an avg pool's window sums are a depthwise conv of ones on the conv engine (its
    gradient one engine call); under 'xla', and where no CPU engine exists (lax's depthwise
    gradient would be slow), the taps, with no convolution at all: the forward of both
    bit-identical, the gradient within float32 rounding of the taps' and of torch's; jacfwd ==
    jacrev."""
    import torch

    from jaxconv import config
    if not engines:   # no C++ compiler: lax and the matmul engine only
        monkeypatch.setattr(native, "available", lambda name: name in ("xla", "matmul"))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 11, 10, 6)), jnp.float32)
    f = functools.partial(ops.avg_pool2d, **kw)
    g = jnp.asarray(rng.standard_normal(f(x).shape), jnp.float32)

    def run():   # a fresh jit per lowering: jit caches traces
        fwd = jax.jit(lambda x: f(x))
        grad = jax.jit(jax.grad(lambda x: jnp.sum(f(x) * g)))
        text = grad.lower(x).as_text()
        return fwd(x), grad(x), [t for t in (*native.TARGETS, "convolution") if "conv" in t and t in text]

    y, dx, convs = run()
    assert convs == (["jaxconv_onednn_conv"] if engines else []), convs
    with config.use_conv_lowering("xla"):
        y_taps, dx_taps, convs = run()
    assert convs == [], convs
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_taps))
    tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    (torch.nn.functional.avg_pool2d(tx, **kw) * torch.tensor(np.asarray(g).transpose(0, 3, 1, 2))).sum().backward()
    for want in (dx_taps, tx.grad.numpy().transpose(0, 2, 3, 1)):
        np.testing.assert_allclose(np.asarray(dx), want, rtol=1e-6, atol=1e-6)
    small = x[:1, :6, :5, :2]
    np.testing.assert_allclose(np.asarray(jax.jacfwd(f)(small)), np.asarray(jax.jacrev(f)(small)),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=1, padding=1),
                                dict(kernel_size=3, stride=2, ceil_mode=True),
                                dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))])
def test_max_pool_gradient_goes_to_the_first_maximum_as_torch(kw):
    """Inputs from {0, 1, 2} tie in most windows, and one NaN: the output (NaN propagates) and
    the gradient (torch's rule: the first maximum in row-major order, NaN counting as one) equal
    torch's; jacfwd == jacrev."""
    import torch
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (2, 7, 8, 3)).astype(np.float32)
    x[1, 3, 4, 2] = np.nan
    g = rng.standard_normal(np.asarray(ops.max_pool2d(jnp.asarray(x), **kw)).shape).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(jnp.nan_to_num(ops.max_pool2d(x, **kw)) * g))(jnp.asarray(x))
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, **kw)
    (torch.nan_to_num(ty) * torch.tensor(g.transpose(0, 3, 1, 2))).sum().backward()
    y = np.asarray(jax.jit(lambda x: ops.max_pool2d(x, **kw))(jnp.asarray(x)))
    np.testing.assert_array_equal(y, ty.detach().numpy().transpose(0, 2, 3, 1))   # NaN == NaN
    assert np.isnan(y).any()
    np.testing.assert_array_equal(np.asarray(grad), tx.grad.numpy().transpose(0, 2, 3, 1))
    small = jnp.asarray(x[:1, :5, :5, :2])
    fwd, rev = (jax.jacfwd(lambda v: ops.max_pool2d(v, **kw))(small),
                jax.jacrev(lambda v: ops.max_pool2d(v, **kw))(small))
    np.testing.assert_array_equal(np.asarray(fwd), np.asarray(rev))


@pytest.mark.parametrize("path", ["kernel", "formula", "no kernel"])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                                dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 1),
                                     dilation=(2, 1))])
def test_max_pool_gradient_paths_match_torch(path, kw, monkeypatch):
    """The gradient of every path (jaxconv's CPU kernel, the XLA formula under
    conv_lowering='xla', the formula when the kernel is missing) equals torch's bit for bit on
    ties, NaN and windows of -inf (torch: the window's first element inside the input), for a
    cotangent that is non-zero at the -inf and NaN outputs too; so do vmap of the VJP and the
    Hessian-vector product (each jitted afresh, so that each path is lowered anew)."""
    import re

    import torch

    from jaxconv import config
    from jaxconv.ops import pool
    if path == "no kernel":
        monkeypatch.setattr(pool.native, "available", lambda name: False)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (2, 8, 7, 20)).astype(np.float32)
    x[0, :4, :4] = -np.inf
    x[1, 5, 2, 3] = np.nan
    f = functools.partial(ops.max_pool2d, **kw)
    y = np.asarray(f(jnp.asarray(x)))
    assert np.isneginf(y).any() and np.isnan(y).any()
    g = rng.standard_normal(y.shape).astype(np.float32)
    vjp = lambda x, g: jax.vjp(f, x)[1](g)[0]  # noqa: E731
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    want = torch.autograd.grad(torch.nn.functional.max_pool2d(tx, **kw), tx,
                               torch.tensor(g.transpose(0, 3, 1, 2)))[0]
    want = want.numpy().transpose(0, 2, 3, 1)
    xs = jnp.asarray(rng.standard_normal((1, 6, 5, 3)), jnp.float32)
    with config.use_conv_lowering("xla" if path == "formula" else "auto"):
        hlo = jax.jit(vjp).lower(jnp.asarray(x), jnp.asarray(g)).as_text()
        grad = jax.jit(vjp)(jnp.asarray(x), jnp.asarray(g))
        per_image = jax.jit(jax.vmap(lambda v, gi: vjp(v[None], gi[None])[0]))(
            jnp.asarray(x), jnp.asarray(g))
        hvp = jax.jit(lambda v: jax.jvp(jax.grad(lambda v: jnp.sum(f(v) ** 2)), (v,),
                                        (jnp.ones_like(v),))[1])(xs)
    on_kernel = path == "kernel" and native.available("kernel")
    assert set(re.findall(r"custom_call @(jaxconv_max_pool\w*)", hlo)) == (
        {"jaxconv_max_pool", "jaxconv_max_pool_bwd"} if on_kernel else set())
    np.testing.assert_array_equal(np.asarray(grad), want)
    np.testing.assert_array_equal(np.asarray(per_image), want)
    txs = torch.tensor(np.asarray(xs).transpose(0, 3, 1, 2))
    th = torch.autograd.functional.hvp(
        lambda v: (torch.nn.functional.max_pool2d(v, **kw) ** 2).sum(), txs, torch.ones_like(txs))[1]
    np.testing.assert_allclose(np.asarray(hvp), th.numpy().transpose(0, 2, 3, 1), rtol=1e-6)


def test_max_pool_bf16_kernel_is_the_rounded_float32_answer():
    """In bfloat16 the kernel's forward is exact and its gradient sums in float32, rounded
    once: it equals the float32 gradient of the same (bf16-valued) inputs, rounded to bf16."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.integers(0, 3, (2, 9, 8, 19)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((2, 9, 8, 19)), jnp.bfloat16)
    f = functools.partial(ops.max_pool2d, kernel_size=3, stride=1, padding=1)
    vjp = lambda x, g: jax.vjp(f, x)[1](g)[0]  # noqa: E731
    hlo = jax.jit(vjp).lower(x, g).as_text()
    assert ("jaxconv_max_pool_bwd" in hlo) == native.available("kernel")
    y, grad = jax.jit(f)(x), jax.jit(vjp)(x, g)
    y32, grad32 = jax.jit(f)(x.astype(jnp.float32)), jax.jit(vjp)(x.astype(jnp.float32),
                                                                    g.astype(jnp.float32))
    assert y.dtype == grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y32))
    np.testing.assert_array_equal(np.asarray(grad, np.float32),
                                  np.asarray(grad32.astype(jnp.bfloat16), np.float32))
    assert np.abs(np.asarray(grad32)).max() > 4   # windows overlap: sums of up to 9 values
