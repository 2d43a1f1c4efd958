"""Deformable convolution: jaxconv.ops.deform_conv2d and torch_ref.deform against a float64 loop
oracle, against each other in float32 (forward and the five gradients), the custom VJP against
autodiff and finite differences, conv2d equivalence, dtypes, transforms, memory, bad input, and
the DeformConv2d / ...Pack layers with checkpoint conversion."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.test_util import check_grads

import torch_ref.deform as tdeform
from jaxconv import ops
from jaxconv.convert import from_torch, to_torch
from jaxconv.nn import deform as ndeform
from jaxconv.ops.deform import _deform_conv2d_autodiff, deform_conv2d, deform_output_size
from parity_tests import deform_oracle as oracle
from parity_tests.tolerances import DEFORM_FP64, OP_BF16_RTOL, OP_FP32
from tests.helpers import rngs

GRADS = ("x", "offset", "weight", "bias", "mask")

# (id, N, H, W, C_in, C_out, kernel, stride, padding, dilation, groups, offset_groups)
ODD = ("odd", 5, 7, 5, 6, 4, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3)
PLAIN = ("plain", 2, 6, 6, 4, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1)
DEPTHWISE = ("dw-offset-per-channel", 1, 5, 6, 4, 4, (2, 3), (1, 2), (0, 1), (1, 1), 4, 4)
PRIME = ("prime-pixels", 1, 25, 3, 4, 2, (3, 3), (1, 1), (0, 0), (1, 1), 1, 2)  # 23 pixels


def _offsets(rng, kind, cfg):
    """(N, Ho, Wo, 2*G*K) offsets in torchvision's channel order, NHWC.

    random: fractional, within a few pixels; wide: samples pushed across every border and far
    outside; integer: whole-pixel offsets; edges: sample points exactly on -1, -0.5, 0, H-1,
    H-0.5, H, (and beyond), for y and x independently.
    """
    _, N, H, W, C, _, (kh, kw), (sh, sw), (ph, pw), (dh, dw), _, G = cfg
    Ho, Wo = deform_output_size((H, W), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    K = kh * kw
    shape = (N, Ho, Wo, G, K)
    oy = np.arange(Ho)[None, :, None, None, None]
    ox = np.arange(Wo)[None, None, :, None, None]
    tap = np.arange(K)
    base_y = oy * sh - ph + (tap // kw) * dh
    base_x = ox * sw - pw + (tap % kw) * dw
    if kind == "random":
        dy, dx = rng.uniform(-2.5, 2.5, shape), rng.uniform(-2.5, 2.5, shape)
    elif kind == "wide":
        dy, dx = rng.uniform(-H - 3, H + 3, shape), rng.uniform(-W - 3, W + 3, shape)
    elif kind == "integer":
        dy, dx = rng.integers(-3, 4, shape).astype(float), rng.integers(-3, 4, shape).astype(float)
    elif kind == "edges":
        ty = rng.choice([-2, -1.5, -1, -0.5, 0, 1, H - 1, H - 0.5, H, H + 0.5], shape)
        tx = rng.choice([-2, -1.5, -1, -0.5, 0, 1, W - 1, W - 0.5, W, W + 0.5], shape)
        dy, dx = ty - base_y, tx - base_x
    else:
        raise AssertionError(kind)
    return np.stack([dy, dx], -1).reshape(N, Ho, Wo, 2 * G * K)


def _case(cfg, kind, use_mask, seed=0):
    """NHWC / HWIO float64 numpy inputs for one configuration."""
    _, N, H, W, C, Cout, (kh, kw), stride, padding, dilation, groups, G = cfg
    rng = np.random.default_rng(seed)
    Ho, Wo = deform_output_size((H, W), (kh, kw), stride, padding, dilation)
    inputs = dict(
        x=rng.standard_normal((N, H, W, C)),
        offset=_offsets(rng, kind, cfg),
        weight=rng.standard_normal((kh, kw, C // groups, Cout)),
        bias=rng.standard_normal(Cout),
        mask=rng.uniform(0, 1.5, (N, Ho, Wo, G * kh * kw)) if use_mask else None,
    )
    kwargs = dict(stride=stride, padding=padding, dilation=dilation)
    grad_out = rng.standard_normal((N, Ho, Wo, Cout))
    return inputs, kwargs, grad_out


# layout conversions: jaxconv NHWC / HWIO <-> torch NCHW / OIHW
def _to_torch_layout(name, a):
    if a is None or name == "bias":
        return a
    return a.transpose(3, 2, 0, 1) if name == "weight" else a.transpose(0, 3, 1, 2)


def _from_torch_layout(name, a):
    if a is None or name == "bias":
        return a
    return a.transpose(2, 3, 1, 0) if name == "weight" else a.transpose(0, 2, 3, 1)


def _jax_value_and_grads(inputs, kwargs, grad_out, dtype, fn=deform_conv2d, **extra):
    """Forward and the five input gradients of sum(grad_out * out), as numpy (jaxconv layouts)."""
    arrays = {k: None if v is None else jnp.asarray(v, dtype) for k, v in inputs.items()}

    def f(a):
        out = fn(a["x"], a["offset"], a["weight"], a["bias"], mask=a["mask"], **kwargs, **extra)
        return jnp.sum(out * jnp.asarray(grad_out, dtype)), out

    grads, out = jax.jit(jax.grad(f, has_aux=True))(arrays)
    return np.asarray(out), {k: None if g is None else np.asarray(g) for k, g in grads.items()}


def _torch_value_and_grads(inputs, kwargs, grad_out, dtype):
    """torch_ref's forward and gradients, converted back to jaxconv layouts."""
    ts = {k: None if v is None else
          torch.tensor(_to_torch_layout(k, v), dtype=dtype).requires_grad_()
          for k, v in inputs.items()}
    out = tdeform.deform_conv2d(ts["x"], ts["offset"], ts["weight"], ts["bias"],
                                kwargs["stride"], kwargs["padding"], kwargs["dilation"],
                                ts["mask"])
    out.backward(torch.tensor(_to_torch_layout("x", grad_out), dtype=dtype))
    grads = {k: None if t is None else _from_torch_layout(k, t.grad.numpy())
             for k, t in ts.items()}
    return _from_torch_layout("x", out.detach().numpy()), grads


def _oracle_value_and_grads(inputs, kwargs, grad_out):
    t = {k: _to_torch_layout(k, v) for k, v in inputs.items()}
    args = (t["x"], t["offset"], t["weight"], t["bias"], kwargs["stride"], kwargs["padding"],
            kwargs["dilation"], t["mask"])
    out = oracle.deform_conv2d(*args)
    grads = oracle.deform_conv2d_vjp(_to_torch_layout("x", grad_out), *args)
    return (_from_torch_layout("x", out),
            {k: _from_torch_layout(k, g) for k, g in grads.items()})


def _assert_close(name, got, want, **tol):
    if want is None:
        assert got is None, name
        return
    np.testing.assert_allclose(got, want, err_msg=name, **tol)


# ---------------------------------------------------------------------------------------------
# float64: jaxconv and torch_ref against the loop oracle

ORACLE_CASES = [(ODD, "random", True), (ODD, "edges", False), (ODD, "integer", True),
                (ODD, "wide", True), (PLAIN, "edges", True), (DEPTHWISE, "random", False),
                (PRIME, "wide", True)]


@pytest.mark.parametrize("cfg, kind, use_mask", ORACLE_CASES,
                         ids=[f"{c[0]}-{k}-{'mask' if m else 'nomask'}" for c, k, m in ORACLE_CASES])
def test_fp64_matches_oracle(cfg, kind, use_mask):
    inputs, kwargs, grad_out = _case(cfg, kind, use_mask)
    want, want_grads = _oracle_value_and_grads(inputs, kwargs, grad_out)
    with jax.enable_x64(True):
        got, grads = _jax_value_and_grads(inputs, kwargs, grad_out, jnp.float64,
                                          chunk_elements=97)  # several chunks (PRIME: padded)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=DEFORM_FP64, err_msg="jaxconv forward")
    for k in GRADS:
        _assert_close(f"jaxconv grad {k}", grads[k], want_grads[k], rtol=0, atol=DEFORM_FP64)
    t_out, t_grads = _torch_value_and_grads(inputs, kwargs, grad_out, torch.float64)
    np.testing.assert_allclose(t_out, want, rtol=0, atol=DEFORM_FP64, err_msg="torch_ref forward")
    for k in GRADS:
        _assert_close(f"torch_ref grad {k}", t_grads[k], want_grads[k], rtol=0, atol=DEFORM_FP64)


def test_oracle_border_rule():
    """The oracle itself: the corner / border rule on a tiny image, by hand."""
    img = np.arange(1.0, 7.0).reshape(2, 3)  # [[1, 2, 3], [4, 5, 6]]
    assert oracle.bilinear(img, 0, 0) == 1 and oracle.bilinear(img, 1, 2) == 6
    assert oracle.bilinear(img, 0.5, 1.5) == (2 + 3 + 5 + 6) / 4
    assert oracle.bilinear(img, -0.5, 0) == 0.5 * 1          # top corners outside read 0
    assert oracle.bilinear(img, 1.5, 2) == 0.5 * 6
    for y, x in [(-1, 0), (2, 0), (0, -1), (0, 3), (-1.5, 1)]:
        assert oracle.bilinear(img, y, x) == 0
    # right derivative on the cell: at y = -1 the value is 0 but d/dy is row 0
    assert oracle.bilinear_coordinate_grad(img, -1.0, 1.0) == (2.0, 0.0)


# ---------------------------------------------------------------------------------------------
# float32: jaxconv against torch_ref, forward and all five gradients

FP32_CASES = [(cfg, kind, m) for cfg in (ODD, PLAIN) for kind in ("random", "wide", "integer",
                                                                   "edges") for m in (True, False)]


@pytest.mark.parametrize("cfg, kind, use_mask", FP32_CASES,
                         ids=[f"{c[0]}-{k}-{'mask' if m else 'nomask'}" for c, k, m in FP32_CASES])
def test_fp32_matches_torch_ref(cfg, kind, use_mask):
    inputs, kwargs, grad_out = _case(cfg, kind, use_mask, seed=1)
    inputs = {k: None if v is None else v.astype(np.float32) for k, v in inputs.items()}
    grad_out = grad_out.astype(np.float32)
    want, want_grads = _torch_value_and_grads(inputs, kwargs, grad_out, torch.float32)
    # one chunk (default) without mask; many chunks (a lax.map / lax.scan over 2 pixels each)
    # with mask
    extra = dict(chunk_elements=80) if use_mask else {}
    got, grads = _jax_value_and_grads(inputs, kwargs, grad_out, jnp.float32, **extra)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, err_msg="forward", **OP_FP32)
    for k in GRADS:
        _assert_close(f"grad {k}", grads[k], want_grads[k], **OP_FP32)


@pytest.mark.parametrize("use_mask", [True, False])
def test_fp32_batch_zero(use_mask):
    cfg = (ODD[0], 0) + ODD[2:]
    inputs, kwargs, grad_out = _case(cfg, "random", use_mask)
    inputs = {k: None if v is None else v.astype(np.float32) for k, v in inputs.items()}
    got, grads = _jax_value_and_grads(inputs, kwargs, grad_out, jnp.float32)
    want, want_grads = _torch_value_and_grads(inputs, kwargs, grad_out.astype(np.float32),
                                              torch.float32)
    assert got.shape == want.shape == (0, 3, 4, 4)
    for k in GRADS:
        if inputs[k] is not None:
            assert grads[k].shape == inputs[k].shape and not np.any(grads[k]), k
        _assert_close(f"grad {k}", grads[k], want_grads[k], **OP_FP32)


# ---------------------------------------------------------------------------------------------
# The custom derivatives (a JVP whose tangent map transposes to the chunked backward): equal
# to autodiff of the gather and to finite differences, in every mode and to second order

@pytest.mark.parametrize("cfg, use_mask", [(ODD, True), (PLAIN, False)], ids=["odd", "plain"])
def test_custom_vjp_equals_autodiff(cfg, use_mask):
    inputs, kwargs, grad_out = _case(cfg, "edges", use_mask, seed=2)
    with jax.enable_x64(True):
        _, want = _jax_value_and_grads(inputs, kwargs, grad_out, jnp.float64,
                                       fn=_deform_conv2d_autodiff)
        for chunk in (None, 100):  # one chunk; chunks of 2 pixels
            extra = {} if chunk is None else dict(chunk_elements=chunk)
            _, got = _jax_value_and_grads(inputs, kwargs, grad_out, jnp.float64, **extra)
            for k in GRADS:
                _assert_close(f"grad {k} chunk={chunk}", got[k], want[k], rtol=0, atol=1e-12)


def _ad_suite(fn, a, kwargs, tangents):
    """jvp, jacfwd w.r.t. the offset, a Hessian-vector product, grad of grad and vmap of jvp
    and of grad, for deform op `fn` on the float64 inputs `a`."""
    names = ("x", "offset", "weight", "mask")

    def out(x, o, w, m):
        return fn(x, o, w, a["bias"], mask=m, **kwargs)

    def loss(*args):
        return jnp.sum(jnp.tanh(out(*args)))

    args = tuple(a[k] for k in names)
    t = tuple(tangents[k] for k in names)
    return {"jvp": jax.jvp(out, args, t)[1],
            "jacfwd_offset": jax.jacfwd(lambda o: out(a["x"], o, a["weight"], a["mask"]))(a["offset"]),
            "hvp": jax.jvp(jax.grad(loss, argnums=(0, 1, 2, 3)), args, t)[1],
            "grad_of_grad": jax.grad(lambda x: jnp.sum(jax.grad(loss, argnums=1)(
                x, *args[1:]) ** 2))(a["x"]),
            "vmap_jvp": jax.vmap(lambda tw: jax.jvp(lambda w: out(a["x"], a["offset"], w, a["mask"]),
                                                    (a["weight"],), (tw,))[1])(
                jnp.stack([t[2], -2 * t[2]])),
            "vmap_grad": jax.vmap(jax.grad(loss), in_axes=(0, None, None, None))(
                jnp.stack([a["x"], 0.5 * a["x"]]), *args[1:])}


@pytest.mark.parametrize("cfg, kind, use_mask", [(ODD, "edges", True), (PLAIN, "random", False)],
                         ids=["odd-edges-mask", "plain"])
def test_forward_mode_and_higher_order_equal_autodiff(cfg, kind, use_mask):
    """Forward-mode and second-order derivatives (the custom JVP, its linear tangent map's
    transpose and batching rules) equal autodiff of the plain gather formulation, in float64,
    with several chunks, at sample points exactly on cell edges too."""
    inputs, kwargs, _ = _case(cfg, kind, use_mask, seed=8)
    rng = np.random.default_rng(9)
    with jax.enable_x64(True):
        a = {k: None if v is None else jnp.asarray(v) for k, v in inputs.items()}
        tangents = {k: None if v is None else jnp.asarray(rng.standard_normal(v.shape))
                    for k, v in inputs.items()}
        got = _ad_suite(functools.partial(deform_conv2d, chunk_elements=100), a, kwargs, tangents)
        want = _ad_suite(_deform_conv2d_autodiff, a, kwargs, tangents)
    for k in want:
        for g, w in zip(jax.tree.leaves(got[k]), jax.tree.leaves(want[k]), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10, err_msg=k)


def test_check_grads_second_order_fp64():
    """Forward and reverse mode, to second order, against finite differences (offsets away
    from cell edges, where the interpolation has kinks)."""
    inputs, kwargs, _ = _case(PLAIN, "random", True, seed=10)
    frac = inputs["offset"] - np.floor(inputs["offset"])
    inputs["offset"] = np.floor(inputs["offset"]) + 0.15 + 0.7 * frac
    with jax.enable_x64(True):
        args = [jnp.asarray(inputs[k]) for k in ("x", "offset", "weight", "mask")]
        fn = lambda x, o, w, m: deform_conv2d(x, o, w, mask=m, chunk_elements=100,  # noqa: E731
                                              **kwargs)
        check_grads(fn, args, order=2, modes=["fwd", "rev"], eps=1e-5, atol=1e-6, rtol=1e-6)


def test_chunking_rule():
    from jaxconv.ops.deform import _chunking
    assert _chunking(32 * 56 * 56, 9 * 256, 2**21) == (896, 112)  # divides: no padding
    assert _chunking(23, 36, 97) == (2, 12)                         # prime: padded last chunk
    assert _chunking(5, 36, 2**21) == (5, 1) and _chunking(5, 36, 1) == (1, 5)
    for pixels, per_pixel, budget in [(60, 36, 97), (1000, 7, 300), (97, 1, 20)]:
        chunk, n = _chunking(pixels, per_pixel, budget)
        assert chunk * per_pixel <= max(budget, per_pixel) and chunk * n >= pixels > chunk * (n - 1)


def test_check_grads_fp64():
    """Reverse-mode gradients against finite differences (offsets kept away from cell edges,
    where the bilinear interpolation has kinks)."""
    inputs, kwargs, _ = _case(ODD, "random", True, seed=3)
    frac = inputs["offset"] - np.floor(inputs["offset"])
    inputs["offset"] = np.floor(inputs["offset"]) + 0.15 + 0.7 * frac
    with jax.enable_x64(True):
        args = [jnp.asarray(inputs[k]) for k in ("x", "offset", "weight", "bias", "mask")]
        fn = lambda x, o, w, b, m: deform_conv2d(x, o, w, b, mask=m, chunk_elements=100,  # noqa: E731
                                                 **kwargs)
        check_grads(fn, args, order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# Equivalences, dtypes, transforms, memory

@pytest.mark.parametrize("cfg", [ODD, PLAIN], ids=["odd", "plain"])
def test_zero_offset_unit_mask_is_conv2d(cfg):
    _, N, H, W, C, Cout, k, stride, padding, dilation, groups, G = cfg
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((N, H, W, C)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*k, C // groups, Cout)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(Cout), jnp.float32)
    Ho, Wo = deform_output_size((H, W), k, stride, padding, dilation)
    offset = jnp.zeros((N, Ho, Wo, 2 * G * k[0] * k[1]), jnp.float32)
    mask = jnp.ones((N, Ho, Wo, G * k[0] * k[1]), jnp.float32)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    conv = lambda x, w, b: ops.conv2d(x, w, b, groups=groups, **kw)  # noqa: E731
    grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))  # noqa: E731
    for m in (None, mask):
        deform = lambda x, w, b: deform_conv2d(x, offset, w, b, mask=m, **kw)  # noqa: E731
        np.testing.assert_allclose(jax.jit(deform)(x, w, b), conv(x, w, b), **OP_FP32)
        for name, gd, gc in zip(("x", "weight", "bias"), grads(deform)(x, w, b),
                                grads(conv)(x, w, b)):
            np.testing.assert_allclose(gd, gc, err_msg=name, **OP_FP32)


def test_bfloat16_accumulates_in_fp32():
    inputs, kwargs, grad_out = _case(ODD, "random", True, seed=5)
    bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
    f32 = {k: v.astype(jnp.float32) for k, v in bf.items()}  # the same (rounded) values in fp32
    call = jax.jit(lambda a: deform_conv2d(a["x"], a["offset"], a["weight"], a["bias"],
                                           mask=a["mask"], **kwargs))
    out, ref = call(bf), call(f32)
    assert out.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) <= OP_BF16_RTOL * scale
    g_out = jnp.asarray(grad_out, jnp.bfloat16)
    gb = jax.jit(jax.grad(lambda a: jnp.sum(call(a).astype(jnp.float32) * g_out)))(bf)
    gf = jax.jit(jax.grad(lambda a: jnp.sum(call(a) * g_out.astype(jnp.float32))))(f32)
    for k in GRADS:
        assert gb[k].dtype == jnp.bfloat16, k
        err = float(jnp.max(jnp.abs(gb[k].astype(jnp.float32) - gf[k])))
        assert err <= OP_BF16_RTOL * float(jnp.max(jnp.abs(gf[k]))), k


def test_jit_vmap_grad():
    inputs, kwargs, grad_out = _case(ODD, "random", True, seed=6)
    a = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}

    def f(x, o, m):  # 3 pixels of 36 column entries per chunk: 20 chunks for the batch of 5
        return deform_conv2d(x, o, a["weight"], a["bias"], mask=m, chunk_elements=108, **kwargs)

    eager = f(a["x"], a["offset"], a["mask"])
    np.testing.assert_allclose(jax.jit(f)(a["x"], a["offset"], a["mask"]), eager, **OP_FP32)
    # vmap over a leading axis of single-image batches == the batched call, forward and grads
    split = lambda v: v[:, None]  # noqa: E731
    vm = jax.jit(jax.vmap(f))(split(a["x"]), split(a["offset"]), split(a["mask"]))
    np.testing.assert_allclose(vm[:, 0], eager, **OP_FP32)
    loss = lambda x, o, m, go: jnp.sum(f(x, o, m) * go)  # noqa: E731
    grad = jax.grad(loss, argnums=(0, 1, 2))
    g = jax.jit(grad)(a["x"], a["offset"], a["mask"], jnp.asarray(grad_out, jnp.float32))
    gv = jax.jit(jax.vmap(grad))(split(a["x"]), split(a["offset"]), split(a["mask"]),
                                 split(jnp.asarray(grad_out, jnp.float32)))
    want = _torch_value_and_grads(inputs, kwargs, grad_out, torch.float64)[1]
    for i, name in enumerate(("x", "offset", "mask")):
        np.testing.assert_allclose(g[i], want[name], err_msg=name, **OP_FP32)
        np.testing.assert_allclose(gv[i][:, 0], g[i], err_msg=name, **OP_FP32)


def test_bounded_memory_default_chunking():
    """A 32x256x56x56 3x3 DCNv2 layer: XLA's buffer assignment (compile only, nothing runs)
    needs a few hundred MB of temporaries beyond inputs and outputs, forward and backward."""
    S = jax.ShapeDtypeStruct
    N, H, W, C = 32, 56, 56, 256
    args = (S((N, H, W, C), jnp.float32), S((N, H, W, 18), jnp.float32),
            S((3, 3, C, C), jnp.float32), S((N, H, W, 9), jnp.float32))
    f = lambda x, o, w, m: deform_conv2d(x, o, w, padding=1, mask=m)  # noqa: E731
    fwd = jax.jit(f).lower(*args).compile().memory_analysis()
    bwd = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2, 3))).lower(*args)
    bwd = bwd.compile().memory_analysis()
    columns = N * H * W * 9 * C * 4
    assert columns > 800 * 2**20  # what an unchunked im2col would need (autodiff: ~5 GB)
    assert fwd.temp_size_in_bytes < 128 * 2**20, fwd.temp_size_in_bytes
    assert bwd.temp_size_in_bytes < 256 * 2**20, bwd.temp_size_in_bytes


# ---------------------------------------------------------------------------------------------
# Bad input

def _bad(**changes):
    rng = np.random.default_rng(0)
    a = dict(x=np.zeros((2, 7, 5, 6)), offset=np.zeros((2, 3, 4, 2 * 3 * 6)),
             weight=np.zeros((3, 2, 3, 4)), mask=np.zeros((2, 3, 4, 3 * 6)))
    a.update({k: rng.standard_normal(v) for k, v in changes.items()})
    return {k: jnp.asarray(v, jnp.float32) for k, v in a.items()}


@pytest.mark.parametrize("changes, pattern", [
    (dict(offset=(2, 3, 4, 35)), r"offset: expected 2\*offset_groups\*kh\*kw .*multiple of 12.* got 35"),
    (dict(offset=(2, 3, 4, 48)), r"offset: expected offset_groups dividing C_in=6, got offset_groups=4"),
    (dict(offset=(2, 4, 4, 36)), r"offset: expected .*\(2, 3, 4\).* got \(2, 4, 4\)"),
    (dict(offset=(1, 3, 4, 36)), r"offset: expected .*\(2, 3, 4\).* got \(1, 3, 4\)"),
    (dict(mask=(2, 3, 4, 17)), r"mask: expected offset_groups\*kh\*kw = 18 channels, got 17"),
    (dict(mask=(2, 3, 3, 18)), r"mask: expected .*\(2, 3, 4\).* got \(2, 3, 3\)"),
    (dict(weight=(3, 2, 4, 4)), r"weight: expected .*dividing the 6 channels.* got shape \(3, 2, 4, 4\)"),
    (dict(weight=(3, 2, 3, 5)), r"weight: expected output channels divisible by groups=2"),
    (dict(x=(2, 7, 5)), r"x: expected a rank-4 array \(NHWC\), got shape \(2, 7, 5\)"),
])
def test_bad_input(changes, pattern):
    a = _bad(**changes)
    with pytest.raises(ValueError, match=pattern):
        deform_conv2d(a["x"], a["offset"], a["weight"], stride=(2, 1), padding=(1, 0),
                      dilation=(2, 1), mask=a["mask"])


def test_bad_arguments():
    a = _bad()
    with pytest.raises(ValueError, match=r"stride: expected values >= 1, got 0"):
        deform_conv2d(a["x"], a["offset"], a["weight"], stride=0)
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\), got \(3,\)"):
        deform_conv2d(a["x"], a["offset"], a["weight"], jnp.zeros(3), stride=(2, 1),
                      padding=(1, 0), dilation=(2, 1))
    with pytest.raises(ValueError, match=r"padding: the kernel .* output size would be"):
        deform_conv2d(a["x"][:, :1], a["offset"], a["weight"], dilation=4)
    with pytest.raises(ValueError, match=r"chunk_elements: expected a positive int, got 0"):
        deform_conv2d(a["x"], a["offset"], a["weight"], stride=(2, 1), padding=(1, 0),
                      dilation=(2, 1), chunk_elements=0)


# ---------------------------------------------------------------------------------------------
# Layers: torch_ref modules' state_dicts load into the jaxconv layers and give the same outputs

def _randomise(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _layer_parity(jmod, tmod, x, call_j, call_t):
    """Load tmod's state_dict into jmod (strict), then forward, input gradient and every
    parameter gradient agree; the state_dict also round-trips bit for bit."""
    from_torch(jmod, tmod.state_dict())
    back = to_torch(jmod)
    assert set(back) == set(tmod.state_dict())
    for k, v in tmod.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    xt = torch.tensor(_to_torch_layout("x", x), requires_grad=True)
    out_t = call_t(tmod, xt)
    (out_t ** 2).sum().backward()

    def loss(m, x):
        y = call_j(m, x)
        return jnp.sum(y ** 2), y

    (_, y), (g_mod, g_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jmod, jnp.asarray(x))
    np.testing.assert_allclose(y, _from_torch_layout("x", out_t.detach().numpy()),
                               err_msg="forward", **OP_FP32)
    np.testing.assert_allclose(g_x, _from_torch_layout("x", xt.grad.numpy()), err_msg="grad x",
                               **OP_FP32)
    grads = nnx.clone(jmod)
    nnx.update(grads, g_mod)
    j_grads = to_torch(grads)
    for name, p in tmod.named_parameters():
        np.testing.assert_allclose(j_grads[name], p.grad.numpy(), err_msg=f"grad {name}",
                                   **OP_FP32)


def test_deform_conv2d_layer_matches_torch_ref():
    tmod = tdeform.DeformConv2d(6, 4, (3, 2), (2, 1), (1, 0), (2, 1), groups=2)
    _randomise(tmod)
    jmod = ndeform.DeformConv2d(6, 4, (3, 2), (2, 1), (1, 0), (2, 1), groups=2,
                                offset_groups=3, rngs=rngs())
    inputs, _, _ = _case(ODD, "random", True, seed=7)
    off, mask = (inputs[k].astype(np.float32) for k in ("offset", "mask"))
    _layer_parity(
        jmod, tmod, inputs["x"].astype(np.float32),
        lambda m, x: m(x, jnp.asarray(off), jnp.asarray(mask)),
        lambda m, x: m(x, torch.tensor(_to_torch_layout("offset", off)),
                       torch.tensor(_to_torch_layout("mask", mask))))
    assert set(tmod.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("modulated", [False, True], ids=["DCNv1", "DCNv2"])
def test_pack_layers_match_torch_ref(modulated):
    jcls = ndeform.ModulatedDeformConv2dPack if modulated else ndeform.DeformConv2dPack
    tcls = tdeform.ModulatedDeformConv2dPack if modulated else tdeform.DeformConv2dPack
    args = (6, 4, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3)  # ..., groups, offset_groups
    tmod, jmod = tcls(*args), jcls(*args, rngs=rngs())
    keys = {"weight", "conv_offset.weight", "conv_offset.bias"} | ({"bias"} if modulated else set())
    assert set(tmod.state_dict()) == keys  # mmcv's parameter names
    assert tmod.conv_offset.out_channels == (3 if modulated else 2) * 3 * 6
    _randomise(tmod)  # offsets of ~ +-2 px, so the deformation matters
    x = np.random.default_rng(8).standard_normal((3, 7, 5, 6)).astype(np.float32)
    _layer_parity(jmod, tmod, x, lambda m, x: m(x), lambda m, x: m(x))


@pytest.mark.parametrize("modulated", [False, True], ids=["DCNv1", "DCNv2"])
def test_pack_layers_start_as_plain_conv(modulated):
    """conv_offset is zero-initialised: DCNv1 == conv, DCNv2 == conv with a 0.5 mask."""
    cls = ndeform.ModulatedDeformConv2dPack if modulated else ndeform.DeformConv2dPack
    layer = cls(6, 4, 3, 2, 1, 1, 2, 3, bias=True, rngs=rngs())
    assert not np.any(np.asarray(layer.conv_offset.kernel[...]))
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 7, 6, 6)), jnp.float32)
    kernel = layer.kernel[...] * (0.5 if modulated else 1.0)
    conv = ops.conv2d(x, kernel, None, 2, 1, 1, 2) + layer.bias[...]
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), conv, **OP_FP32)
