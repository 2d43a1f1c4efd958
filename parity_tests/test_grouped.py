"""The grouped / depthwise lowering (jaxconv.ops.grouped) against torch and against lax.

- every formulation, forced through jaxconv.config, on the op grid's grouped cases plus odd
  ones (stride (2,1), padding (1,0), dilation (2,1), kernel (3,2), groups 2/4/32, depthwise
  with multiplier 1 and 2, batch 0 and 3, non-square, reflect padding), forward and the
  gradients of x, weight and bias vs torch.nn.functional.conv2d, in fp32 and in bf16;
- 'auto' vs 'xla' (lax's feature_group_count) on every distinct grouped / depthwise layer
  shape of ResNeXt-50, Xception and MobileNet-v1 at batch 2;
- the C++ kernel's vector modes (direct, broadcast, shuffle, expand, dense stems) against lax
  in float64, vmap through it, and what happens without a compiler;
- 1x1 convs as matrix products (CPU only) against torch;
- the nnx.Conv drop-in, the backend choice (lax's conv whenever the computation is lowered for
  a GPU or TPU), the config switch and its errors.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxconv import config, ops
from jaxconv.ops import grouped
from jaxconv.summary import conv_layers
from jaxconv.verify.ops import CONV2D, OpCase, _torch_fn, run_case
from parity_tests.tolerances import OP_BF16_RTOL, OP_FP32

FORMULATIONS = ("xla", "kernel", "fma", "split", "dense", "auto")
# every distinct grouped / depthwise layer of the models that have them:
# (name, C, H = W, stride, groups), 3x3 kernel, padding 1, C -> C channels
LAYERS = [(f"{m}.{paths[0]}", layer.in_hwc[2], layer.in_hwc[0], layer.stride[0], layer.groups)
          for m in ("resnext50_32x4d", "xception", "mobilenet_v1")
          for layer, paths in conv_layers(m).items() if layer.groups > 1]


def _conv(x, w, **kw):
    return OpCase("conv2d", x, kw, w, bias=True)


CASES = [c for c in CONV2D if c.kwargs.get("groups", 1) > 1] + [
    _conv((3, 9, 7, 8), (8, 2, 3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=4),
    _conv((3, 10, 7, 64), (64, 2, 3, 3), stride=(2, 1), padding=(1, 0), groups=32),   # G=32
    _conv((3, 8, 11, 64), (128, 2, 3, 3), padding=1, dilation=(2, 1), groups=32),     # C_out/G=4
    _conv((3, 9, 7, 12), (12, 1, 3, 3), stride=2, padding=1, groups=12),              # depthwise
    _conv((3, 9, 7, 6), (12, 1, 3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1),
          groups=6),                                                                  # mult 2
    _conv((0, 9, 7, 6), (12, 1, 3, 3), padding=1, groups=6),                          # batch 0
    _conv((3, 5, 6, 6), (3, 2, 2, 2), groups=3),                                      # C_out/G=1
    _conv((2, 4, 4, 4), (4, 1, 3, 3), padding=3, groups=4),   # padding past the input: taps
]                                                             # with no valid rows or columns
BF16 = [dataclasses.replace(c, dtype="bfloat16") for c in CASES if c.x[0]]


@pytest.mark.parametrize("lowering", FORMULATIONS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_formulation_matches_torch(case, lowering):
    with config.use_grouped_lowering(lowering):
        r = run_case(case)
    assert r.passed, f"{lowering} {case.id}: forward {r.forward:.3g}, gradients {r.grads}"


def _bf16_grads(case: OpCase, lowering: str):
    """jaxconv's bf16 forward and x / weight / bias gradients, and torch's fp32 ones on the same
    bf16-rounded inputs (the exact answer jaxconv's fp32 accumulation should reach within bf16
    rounding)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(case.x), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(case.weight).transpose(2, 3, 1, 0), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(case.weight[0]), jnp.bfloat16)
    kw = case.kwargs
    with config.use_grouped_lowering(lowering):
        y, vjp = jax.vjp(lambda *a: ops.conv2d(*a, **kw), x, w, b)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.bfloat16)
    grads = vjp(g)
    f32 = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    tx = f32(x).permute(0, 3, 1, 2).requires_grad_()
    tw = f32(w).permute(3, 2, 0, 1).requires_grad_()
    tb = f32(b).requires_grad_()
    ty = _torch_fn(case)(tx, tw, tb)
    ty.backward(f32(g).permute(0, 3, 1, 2))
    ours = [y.transpose(0, 3, 1, 2), grads[0].transpose(0, 3, 1, 2), grads[1].transpose(3, 2, 0, 1),
            grads[2]]
    theirs = [ty.detach(), tx.grad, tw.grad, tb.grad]
    return [(np.asarray(a, np.float32), t.numpy()) for a, t in zip(ours, theirs)]


@pytest.mark.parametrize("lowering", FORMULATIONS)
@pytest.mark.parametrize("case", BF16, ids=[c.id for c in BF16])
def test_formulation_bf16_forward_and_grads(case, lowering):
    # (the bias gradient is conv2d's bf16 sum over N, H, W, outside the lowering)
    for name, (ours, ref) in zip(["y", "x", "weight"], _bf16_grads(case, lowering)):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        err, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
        assert err <= OP_BF16_RTOL * scale, f"{lowering} {name}: {err:.3g} vs scale {scale:.3g}"


def test_bf16_run_case_forward():
    for case in BF16:
        for lowering in FORMULATIONS:
            with config.use_grouped_lowering(lowering):
                assert run_case(case).passed, f"{lowering} {case.id}"


# ----------------------------------------------------------------------- real layer shapes

def _layer_problem(c, hw, stride, groups, batch=2, dtype=jnp.float64):
    rng = np.random.default_rng(c + hw + stride)
    x = jnp.asarray(rng.standard_normal((batch, hw, hw, c)), dtype)
    w = jnp.asarray(rng.standard_normal((3, 3, c // groups, c)) / np.sqrt(9 * c / groups), dtype)
    ho = (hw - 1) // stride + 1
    g = jnp.asarray(rng.standard_normal((batch, ho, ho, c)), dtype)
    f = lambda x, w: ops.conv2d(x, w, stride=stride, padding=1, groups=groups)  # noqa: E731
    return f, x, w, g


def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=what, **OP_FP32)


# The layer checks run in float64: a weight gradient sums N*H*W products, and two float32
# summation orders differ by more than the op tolerance at these sizes (for any two lowerings,
# lax's included); in float64 the lowerings must agree to the op tolerance and any slip shows.
@pytest.mark.parametrize("layer", LAYERS, ids=[l[0] for l in LAYERS])
def test_auto_equals_xla_on_model_layers(layer):
    """Forward and input gradient of 'auto' and 'xla'; the weight gradient against the
    'dense' formulation (autodiff through one dense conv: lax's own weight gradient of a
    grouped conv takes minutes on CPU; -m slow compares it too)."""
    name, c, hw, stride, groups = layer
    with jax.enable_x64(True):
        f, x, w, g = _layer_problem(c, hw, stride, groups)
        results = {}
        for lowering in ("auto", "xla", "dense"):
            with config.use_grouped_lowering(lowering):
                results[lowering] = jax.jit(
                    lambda x, w, g: (f(x, w), jax.vjp(f, x, w)[1](g)))(x, w, g)
    (y, (dx, dw)), (y_x, (dx_x, _)), (_, (_, dw_d)) = (results[k] for k in ("auto", "xla", "dense"))
    assert y.dtype == dw.dtype == jnp.float64
    _close(y, y_x, f"{name} forward")
    _close(dx, dx_x, f"{name} input gradient")
    _close(dw, dw_d, f"{name} weight gradient")


@pytest.mark.slow
@pytest.mark.parametrize("layer", LAYERS, ids=[l[0] for l in LAYERS])
def test_auto_weight_gradient_equals_xla_on_model_layers(layer):
    name, c, hw, stride, groups = layer
    with jax.enable_x64(True):
        f, x, w, g = _layer_problem(c, hw, stride, groups)
        dws = []
        for lowering in ("auto", "xla"):
            with config.use_grouped_lowering(lowering):
                dws.append(jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g)[1])(x, w, g))
    _close(*dws, f"{name} weight gradient")


def test_model_layers_in_float32():
    """A ResNeXt and a MobileNet layer in float32: 'auto' against the float64 answer, to the
    op tolerance scaled by each result's largest value (float32 summation noise)."""
    for name, c, hw, stride, groups in (LAYERS[0], LAYERS[-6]):
        f, x, w, g = _layer_problem(c, hw, stride, groups, dtype=jnp.float32)
        y, (dx, dw) = jax.jit(lambda x, w, g: (f(x, w), jax.vjp(f, x, w)[1](g)))(x, w, g)
        with jax.enable_x64(True):
            f64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)  # noqa: E731
            with config.use_grouped_lowering("dense"):
                refs = jax.jit(lambda x, w, g: (f(x, w), jax.vjp(f, x, w)[1](g)))(
                    f64(x), f64(w), f64(g))
        for what, a, b in zip(("forward", "input gradient", "weight gradient"), (y, dx, dw),
                              (refs[0], *refs[1])):
            scale = float(np.max(np.abs(b)))
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b),
                                       rtol=OP_FP32["rtol"], atol=OP_FP32["atol"] * max(1, scale),
                                       err_msg=f"{name} {what} (float32)")


# --------------------------------------------------------------- drop-in, backends, config

@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 0), (2, 1))])
@pytest.mark.parametrize("groups, features", [(4, 8), (8, 8), (2, 6)])
def test_nnx_conv_drop_in(padding, groups, features):
    """nnx.Conv with conv_general_dilated=grouped.conv_general_dilated equals plain nnx.Conv."""
    kw = dict(in_features=8, out_features=features, kernel_size=(3, 2), strides=(2, 1),
              kernel_dilation=(1, 2), padding=padding, feature_group_count=groups)
    ref = nnx.Conv(**kw, rngs=nnx.Rngs(0))
    ours = nnx.Conv(**kw, conv_general_dilated=grouped.conv_general_dilated, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 9, 7, 8)), jnp.float32)
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))  # noqa: E731
    (l_ref, (g_ref, gx_ref)), (l_ours, (g_ours, gx_ours)) = (
        jax.value_and_grad(lambda m, x: loss(m, x), argnums=(0, 1))(m, x) for m in (ref, ours))
    _close(l_ours, l_ref, "loss")
    _close(gx_ours, gx_ref, "input gradient")
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        _close(a, b, "parameter gradient")
    with config.use_grouped_lowering("fma"):  # and it really routes through the lowering
        jaxpr = str(jax.make_jaxpr(lambda x: ours(x))(x))
    assert "conv_general_dilated" not in jaxpr and "custom_vjp" in jaxpr


def test_drop_in_passes_other_convolutions_to_lax():
    x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 4))
    wg = jnp.ones((3, 3, 1, 4))
    for w_, kw in ((w, dict()), (wg, dict(lhs_dilation=(2, 2), feature_group_count=4)),
                   (wg, dict(dimension_numbers=("NCHW", "HWIO", "NCHW"), feature_group_count=4)),
                   (jnp.ones((3, 3, 4, 8)), dict(batch_group_count=2))):
        kw = dict(dict(dimension_numbers=("NHWC", "HWIO", "NHWC")), **kw)
        jaxpr = str(jax.make_jaxpr(lambda x, w: grouped.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), **kw))(x if "NCHW" not in str(kw) else
                                                   jnp.ones((2, 4, 6, 6)), w_))
        assert "conv_general_dilated" in jaxpr, kw


def _hlo(platform, lowering="auto"):
    """StableHLO of a depthwise + a grouped conv and their gradients, lowered for `platform`."""
    x, wd, wg = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 1, 32)), jnp.ones((3, 3, 4, 32))

    def f(x, wd, wg):
        y = ops.conv2d(ops.conv2d(x, wd, padding=1, groups=32), wg, padding=1, groups=8)
        return jnp.sum(y * y)

    with config.use_grouped_lowering(lowering):
        # the C++ kernel's FFI targets carry no cross-version guarantee: export must be told
        exp = jax.export.export(jax.jit(jax.grad(f, argnums=(0, 1, 2))), platforms=[platform],
                                disabled_checks=grouped.EXPORT_CHECKS)(x, wd, wg)
    return exp.mlir_module()


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_gpu_and_tpu_keep_lax_feature_group_count(platform):
    """Lowered for an accelerator, 'auto' is lax's grouped conv (cuDNN / the TPU compiler):
    every convolution keeps its feature_group_count and no CPU formulation is left."""
    text = _hlo(platform)
    assert "feature_group_count = 32" in text and "feature_group_count = 8" in text
    assert "stablehlo.pad" not in text and "custom_vjp" not in text


def test_cpu_auto_uses_no_grouped_lax_conv():
    text = _hlo("cpu")
    assert "feature_group_count" not in text
    assert "@jaxconv_grouped_conv(" in text and "@jaxconv_grouped_conv_wgrad(" in text
    assert "feature_group_count = 8" in _hlo("cpu", "xla")


def test_choose_table(monkeypatch):
    geo = grouped.Geometry((3, 3), groups=32)
    assert grouped.choose("gpu", None, (3, 3, 4, 128), geo) == "xla"
    assert grouped.choose("tpu", None, (3, 3, 1, 128), geo) == "xla"
    for w_shape in ((3, 3, 1, 128), (3, 3, 4, 128), (3, 3, 32, 1024)):
        assert grouped.choose("cpu", None, w_shape, geo) == "kernel"
    # without a C++ compiler: the pure-JAX formulations
    monkeypatch.setattr(grouped.cpu_kernel, "available", lambda: False)
    assert grouped.choose("cpu", None, (3, 3, 1, 128), geo) == "fma"
    assert grouped.choose("cpu", None, (3, 3, 4, 128), geo) == "fma"
    assert grouped.choose("cpu", None, (3, 3, 32, 1024), geo) == "split"


def test_config_switch():
    assert config.grouped_lowering == "auto"
    with config.use_grouped_lowering("split"):
        assert config.grouped_lowering == "split"
        with pytest.raises(ValueError, match="grouped_lowering"):
            with config.use_grouped_lowering("fast"):
                pass
        assert config.grouped_lowering == "split"
    assert config.grouped_lowering == "auto"
    with pytest.raises(ValueError, match="grouped_lowering: expected one of"):
        config.set_grouped_lowering("cudnn")
    with pytest.raises(ValueError, match="grouped_lowering"):
        grouped.grouped_conv(jnp.ones((1, 4, 4, 4)), jnp.ones((3, 3, 1, 4)), groups=4,
                             lowering="nope")


def test_lowering_argument_overrides_config():
    x, w = jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 1, 4))
    with config.use_grouped_lowering("xla"):
        jaxpr = str(jax.make_jaxpr(lambda x, w: grouped.grouped_conv(
            x, w, padding=((1, 1), (1, 1)), groups=4, lowering="fma"))(x, w))
    assert "conv_general_dilated" not in jaxpr


def test_vmap_and_jacrev_through_the_custom_vjp():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 6, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 8)), jnp.float32)
    f = lambda x, w: jnp.sum(ops.conv2d(x, w, stride=(2, 1), padding=1, groups=4) ** 2)  # noqa: E731
    grads = {}
    for lowering in ("fma", "xla"):
        with config.use_grouped_lowering(lowering):
            grads[lowering] = jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=(0, None))(x, w)
    jax.tree.map(lambda a, b: _close(a, b, "vmapped gradients"), grads["fma"], grads["xla"])
    with config.use_grouped_lowering("kernel"):   # the FFI call, vmapped one example at a time
        grads["kernel"] = jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=(0, None))(x, w)
    jax.tree.map(lambda a, b: _close(a, b, "vmapped gradients"), grads["kernel"], grads["xla"])


# ------------------------------------------------------------------- the C++ kernel itself

def test_auto_sends_stems_to_the_kernel_and_wide_dense_convs_to_lax():
    """Dense convs: the kernel where XLA:CPU's conv is slow (few input channels, e.g. a 3-channel
    stem), lax's conv otherwise; 1x1 convs are matrix products."""
    def jaxpr(cin, k):
        x, w = jnp.ones((1, 9, 9, cin)), jnp.ones((k, k, cin, 32))
        return str(jax.make_jaxpr(lambda x, w: ops.conv2d(x, w, stride=2, padding=k // 2))(x, w))
    assert "jaxconv_grouped_conv" in jaxpr(3, 7)
    assert "ffi_call" not in jaxpr(64, 3) and "conv_general_dilated" in jaxpr(64, 3)
    assert "dot_general" in jaxpr(64, 1) and "ffi_call" not in jaxpr(64, 1)


def test_kernel_needs_a_compiler(monkeypatch):
    """No C++ compiler: forcing 'kernel' names what is missing, 'auto' uses pure JAX."""
    from jaxconv.ops import cpu_kernel
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler.*CXX='no-such-compiler'"):
        cpu_kernel.load.__wrapped__()
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    x, w = jnp.ones((1, 5, 5, 16)), jnp.ones((3, 3, 2, 16))
    jaxpr = str(jax.make_jaxpr(lambda x, w: ops.conv2d(x, w, padding=1, groups=8))(x, w))
    assert "ffi_call" not in jaxpr and "custom_vjp" in jaxpr


def test_kernel_modes_in_float64():
    """Every vector mode of grouped_cpu.cc (direct, broadcast, shuffle, expand) and the partial
    last vector, with strides, dilations and crops, forward and both gradients, against lax in
    float64 (where any indexing slip is far above rounding)."""
    rng = np.random.default_rng(7)
    # (x shape, C_out, groups, kernel, stride, padding, dilation): the mode each one hits
    cases = [((2, 9, 7, 40), 40, 40, (3, 3), (2, 1), ((1, 1), (0, 2)), (1, 2)),     # direct
             ((2, 6, 7, 64), 64, 2, (3, 2), (1, 2), ((2, 0), (1, 1)), (1, 1)),      # broadcast
             ((2, 9, 8, 32), 32, 8, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),      # shuffle
             ((1, 7, 9, 12), 24, 6, (2, 3), (1, 1), ((3, -1), (1, 2)), (2, 1)),     # shuffle, 2L
             ((2, 8, 9, 10), 15, 5, (3, 3), (1, 2), ((1, 1), (1, 1)), (1, 1)),      # expand
             ((2, 5, 6, 6), 12, 6, (3, 1), (1, 1), ((1, 1), (0, 0)), (1, 1)),       # multiplier 2
             ((2, 11, 9, 3), 32, 1, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),      # dense stem
             ((1, 8, 7, 16), 48, 1, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1))]      # dense
    with jax.enable_x64(True):
        for shape, cout, groups, k, stride, pads, dil in cases:
            x = jnp.asarray(rng.standard_normal(shape))
            w = jnp.asarray(rng.standard_normal((*k, shape[3] // groups, cout)))
            outs = {}
            for lowering in ("kernel", "xla"):
                f = lambda x, w: grouped.grouped_conv(  # noqa: E731
                    x, w, stride, pads, dil, groups, lowering=lowering)
                y, vjp = jax.vjp(f, x, w)
                outs[lowering] = (y, *vjp(jnp.cos(y)))
            for what, a, b in zip(("forward", "x grad", "w grad"), outs["kernel"], outs["xla"]):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12,
                                           err_msg=f"{what} {shape} groups={groups}")


# ------------------------------------------------------------------------- pointwise convs

POINTWISE = [_conv((3, 9, 7, 5), (6, 5, 1, 1), stride=s) for s in (1, 2, 3)] + [
    _conv((2, 8, 8, 64), (32, 64, 1, 1), stride=(2, 1))]


@pytest.mark.parametrize("lowering", ["auto", "xla"])
@pytest.mark.parametrize("case", POINTWISE, ids=[c.id for c in POINTWISE])
def test_pointwise_matches_torch(case, lowering):
    with config.use_grouped_lowering(lowering):
        r = run_case(case)
        bf16 = run_case(dataclasses.replace(case, dtype="bfloat16"))
    assert r.passed, f"{lowering} {case.id}: forward {r.forward:.3g}, gradients {r.grads}"
    assert bf16.passed, f"{lowering} {case.id} bf16: forward {bf16.forward:.3g}"


def test_pointwise_is_a_matrix_product_on_cpu_only():
    x, w = jnp.ones((2, 6, 6, 8)), jnp.ones((1, 1, 8, 4))

    def hlo(platform):   # a fresh jit each time: the lowering is read when traced
        f = jax.grad(lambda x, w: jnp.sum(ops.conv2d(x, w, stride=2) ** 2), argnums=(0, 1))
        return jax.export.export(jax.jit(f), platforms=[platform])(x, w).mlir_module()

    cpu, gpu = hlo("cpu"), hlo("cuda")
    assert "stablehlo.convolution" not in cpu and "stablehlo.dot_general" in cpu
    assert "stablehlo.convolution" in gpu and "stablehlo.dot_general" not in gpu
    with config.use_grouped_lowering("xla"):
        assert "stablehlo.convolution" in hlo("cpu")
    padded = str(jax.make_jaxpr(lambda x, w: ops.conv2d(x, w, padding=1))(x, w))
    assert "conv_general_dilated" in padded and "dot_general" not in padded
