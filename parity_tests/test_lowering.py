"""The CPU convolution engines (jaxconv.ops.lowering / cpu_conv / policy) against torch and lax.

- every engine (oneDNN, jaxconv's kernel, lax, and 'auto' = the policy table), forced through
  jaxconv.config, on the op grid's conv and transposed-conv cases plus odd grouped ones (stride
  (2,1), padding (1,0), dilation (2,1), kernel (3,2), groups 2/4/32, depthwise with multiplier
  1 and 2, batch 0, non-square, reflect padding), forward and the gradients of x, weight and
  bias vs torch.nn.functional, in fp32 and bf16;
- forward-mode and higher-order AD through the primitive (jvp, jacfwd, hessian, grad of grad,
  vmap of these) against lax's convolution, in float64 (kernel) and float32 (oneDNN);
- every distinct grouped / depthwise layer of ResNeXt-50, Xception and MobileNet-v1: 'auto' vs
  lax in float64, and in float32 against the float64 answer;
- the kernel's vector modes in float64; the policy table row by row; fallbacks (no oneDNN, no
  compiler); the nnx.Conv drop-in; lax's convolution kept whenever a computation is lowered for
  a GPU or TPU; the config switch.

jax.jit caches a trace per function, and the engine is read when tracing: every comparison
below traces a fresh function per engine.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax import lax

from jaxconv import config, ops
from jaxconv.ops import lowering, native, policy
from jaxconv.ops.cpu_conv import Geometry, bind
from jaxconv.summary import conv_layers
from jaxconv.verify.ops import CONV2D, CONV_TRANSPOSE2D, OpCase, _torch_fn, run_case
from parity_tests.tolerances import OP_BF16_RTOL, OP_FP32
from tests.helpers import exported_mlir, rand

ENGINES = ("xla", "onednn", "kernel", "auto")


def _conv(x, w, **kw):
    return OpCase("conv2d", x, kw, w, bias=True)


CASES = CONV2D + CONV_TRANSPOSE2D + [
    _conv((3, 9, 7, 8), (8, 2, 3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=4),
    _conv((3, 10, 7, 64), (64, 2, 3, 3), stride=(2, 1), padding=(1, 0), groups=32),   # G=32
    _conv((3, 8, 11, 64), (128, 2, 3, 3), padding=1, dilation=(2, 1), groups=32),     # C_out/G=4
    _conv((3, 9, 7, 12), (12, 1, 3, 3), stride=2, padding=1, groups=12),              # depthwise
    _conv((3, 9, 7, 6), (12, 1, 3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1),
          groups=6),                                                                  # mult 2
    _conv((0, 9, 7, 6), (12, 1, 3, 3), padding=1, groups=6),                          # batch 0
    _conv((3, 5, 6, 6), (3, 2, 2, 2), groups=3),                                      # C_out/G=1
    _conv((2, 4, 4, 4), (4, 1, 3, 3), padding=3, groups=4),   # padding past the input
    _conv((2, 9, 8, 3), (16, 3, 7, 7), stride=2, padding=3),                          # a stem
    _conv((2, 9, 8, 5), (7, 5, 1, 1), stride=(2, 3)),                                 # 1x1 /2
]
BF16 = [dataclasses.replace(c, dtype="bfloat16") for c in CASES
        if c.op == "conv2d" and c.x[0] and c.kwargs.get("groups", 1) > 1]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_engine_matches_torch(case, engine):
    with config.use_conv_lowering(engine):
        r = run_case(case)      # eager: each primitive compiled for its own parameters
    assert r.passed, f"{engine} {case.id}: forward {r.forward:.3g}, gradients {r.grads}"


def _bf16_grads(case: OpCase, engine: str):
    """jaxconv's bf16 forward and x / weight gradients, and torch's fp32 ones on the same
    bf16-rounded inputs."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(case.x), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(case.weight).transpose(2, 3, 1, 0), jnp.bfloat16)
    kw = case.kwargs
    with config.use_conv_lowering(engine):
        y, vjp = jax.vjp(lambda *a: ops.conv2d(*a, **kw), x, w)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.bfloat16)
    grads = vjp(g)
    f32 = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    tx = f32(x).permute(0, 3, 1, 2).requires_grad_()
    tw = f32(w).permute(3, 2, 0, 1).requires_grad_()
    ty = _torch_fn(case)(tx, tw, None)
    ty.backward(f32(g).permute(0, 3, 1, 2))
    ours = [y.transpose(0, 3, 1, 2), grads[0].transpose(0, 3, 1, 2), grads[1].transpose(3, 2, 0, 1)]
    return [(np.asarray(a, np.float32), t.numpy()) for a, t in zip(ours, [ty.detach(), tx.grad, tw.grad])]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", BF16, ids=[c.id for c in BF16])
def test_engine_bf16_forward_and_grads(case, engine):
    for name, (ours, ref) in zip(["y", "x", "weight"], _bf16_grads(case, engine)):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        err, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
        assert err <= OP_BF16_RTOL * scale, f"{engine} {name}: {err:.3g} vs scale {scale:.3g}"



@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_convs_are_native_only_where_the_cpu_has_bf16(has_bf16, monkeypatch):
    """On a CPU with AVX512-BF16 (and oneDNN) a bf16 conv's three passes are oneDNN calls on
    bf16 operands; otherwise, under a forced lowering, and for a drop-in call that asks for a
    float32 result, they compute in float32 (the drop-in's result then equals the float32
    conv of the same values exactly)."""
    if has_bf16 and not (native.bf16() and native.available("onednn")):
        pytest.skip("this CPU has no AVX512-BF16 (or no oneDNN): the native bf16 path is off")
    monkeypatch.setattr(native, "bf16", lambda: has_bf16)
    x = jnp.asarray(rand((2, 7, 6, 8), 1), jnp.bfloat16)
    w = jnp.asarray(rand((3, 3, 4, 8), 2), jnp.bfloat16)

    def loss(x, w):
        return jnp.sum(ops.conv2d(x, w, padding=1, groups=2).astype(jnp.float32) ** 2)

    def call_types(fn, *args, target="jaxconv_onednn_conv"):
        text = jax.jit(fn).lower(*args).as_text()
        return [line.split(" : (")[-1].split(")")[0]
                for line in text.splitlines() if f"@{target}(" in line]

    grad = lambda x, w: jax.grad(loss, argnums=(0, 1))(x, w)  # noqa: E731
    want = "bf16" if has_bf16 else "f32"
    types = call_types(grad, x, w)
    assert len(types) == 3 and all(t.count(want) == 2 for t in types), types
    with config.use_conv_lowering("kernel"):   # a fresh function: jit caches traces
        types = call_types(lambda x, w: grad(x, w), x, w, target="jaxconv_grouped_conv")
        assert types and all(t.count("f32") == 2 for t in types), types
    drop_in = lambda x, w: lowering.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=2, preferred_element_type=jnp.float32)
    assert [t.count("f32") for t in call_types(drop_in, x, w)] == [2]
    wide = jax.jit(drop_in)(x, w)
    assert wide.dtype == jnp.float32
    np.testing.assert_array_equal(
        wide, jax.jit(lambda x, w: ops.conv2d(x, w, padding=1, groups=2))(
            x.astype(jnp.float32), w.astype(jnp.float32)))


# ------------------------------------------------------------ forward-mode and higher order

AD_CASES = [  # (x shape, w shape HWIO, conv2d keywords): depthwise x2, grouped, stem, dense
    ((2, 7, 6, 4), (3, 2, 1, 8), dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=4)),
    ((2, 6, 7, 8), (3, 3, 2, 8), dict(padding=1, groups=4)),
    ((2, 9, 8, 3), (3, 3, 3, 4), dict(stride=2, padding=1)),
    ((1, 5, 6, 40), (3, 3, 40, 4), dict(padding=(1, 0))),   # over STEM_MAX_CIN channels
]


def _ad_suite(engine, xs, ws, kw, dtype):
    """jvp, jacfwd, hessian-vector product, grad of grad and vmap of grad, traced fresh."""
    x, w = jnp.asarray(rand(xs, 1), dtype), jnp.asarray(rand(ws, 2), dtype)
    tx, tw = jnp.asarray(rand(xs, 3), dtype), jnp.asarray(rand(ws, 4), dtype)
    with config.use_conv_lowering(engine):
        def conv(x, w):
            return ops.conv2d(x, w, **kw)

        def loss(x, w):
            return jnp.sum(jnp.tanh(conv(x, w)) ** 2)

        out = {"jvp": jax.jvp(conv, (x, w), (tx, tw))[1],
               "jacfwd_w": jax.jacfwd(loss, argnums=1)(x, w),
               "hvp": jax.jvp(jax.grad(loss, argnums=(0, 1)), (x, w), (tx, tw))[1],
               "grad_of_grad": jax.grad(lambda w: jnp.sum(jax.grad(loss)(x, w) ** 2))(w),
               "vmap_grad": jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None))(
                   jnp.stack([x, 2 * x]), w),
               "vmap_jvp_w": jax.vmap(lambda t: jax.jvp(lambda w: conv(x, w), (w,), (t,))[1])(
                   jnp.stack([tw, -tw]))}
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("engine", ["kernel", "onednn", "auto"])
@pytest.mark.parametrize("xs, ws, kw", AD_CASES, ids=["depthwise-mult2", "grouped", "stem", "dense"])
def test_forward_mode_and_higher_order_ad(engine, xs, ws, kw):
    """The primitive's JVP, transpose and batching rules against lax's own: float64 where the
    engine has it (the kernel), else float32 (oneDNN) with a tolerance for its rounding."""
    if engine == "onednn":
        got, want = _ad_suite(engine, xs, ws, kw, jnp.float32), _ad_suite("xla", xs, ws, kw, jnp.float32)
        tol = dict(rtol=1e-4, atol=1e-4)
    else:
        with jax.enable_x64(True):
            got, want = (_ad_suite(e, xs, ws, kw, jnp.float64) for e in (engine, "xla"))
        tol = dict(rtol=1e-10, atol=1e-10)
    for k in want:
        for a, b in zip(jax.tree.leaves(got[k]), jax.tree.leaves(want[k]), strict=True):
            scale = max(1.0, float(np.max(np.abs(b))))
            np.testing.assert_allclose(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                       err_msg=f"{engine} {k}")


def test_concurrent_onednn_calls_match_one_at_a_time():
    """Independent convs and batch-norm gradients in one computation (XLA:CPU runs them
    concurrently, as an Inception module's branches), that computation from three Python
    threads at once: the values computed alone, bit for bit, and every thread done in time."""
    x = jnp.asarray(rand((4, 12, 12, 16), 1))
    ws = [jnp.asarray(rand((k, k, 16, 24), 2 + k)) for k in (1, 3, 5)]

    def branches(x, ws):
        ys = [ops.batch_norm_train(ops.conv2d(x, w, padding=w.shape[0] // 2))[0] for w in ws]
        return jnp.sum(jnp.concatenate(ys, -1) ** 2)

    with config.use_conv_lowering("onednn"):   # read when traced: at the first call
        step = jax.jit(jax.grad(branches, argnums=(0, 1)))
        alone = jax.tree.map(np.asarray, step(x, ws))
    assert "jaxconv_onednn_norm_bwd" in step.lower(x, ws).as_text()
    results = [None] * 3

    def run(i):
        results[i] = [jax.tree.map(np.asarray, step(x, ws)) for _ in range(2)]

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:   # daemon threads: a deadlock fails here instead of hanging the run
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "concurrent calls did not finish in 120 s"
    for got in (g for r in results for g in r):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(alone), strict=True):
            np.testing.assert_array_equal(a, b)


def test_transposed_conv_forward_mode_ad():
    x, w = jnp.asarray(rand((2, 4, 5, 4))), jnp.asarray(rand((3, 3, 3, 4), 1))
    outs = {}
    for engine in ("onednn", "xla"):
        with config.use_conv_lowering(engine):
            f = lambda x, w: jnp.sum(ops.conv_transpose2d(x, w, stride=2, padding=1) ** 3)  # noqa: E731
            outs[engine] = jax.jacfwd(f, argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(outs["onednn"]), jax.tree.leaves(outs["xla"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1, float(np.abs(b).max())))


# ----------------------------------------------------------------------- real layer shapes

# every distinct grouped / depthwise layer of the models that have them:
# (name, C, H = W, stride, groups), 3x3 kernel, padding 1, C -> C channels
LAYERS = [(f"{m}.{paths[0]}", layer.in_hwc[2], layer.in_hwc[0], layer.stride[0], layer.groups)
          for m in ("resnext50_32x4d", "xception", "mobilenet_v1")
          for layer, paths in conv_layers(m).items() if layer.groups > 1]


def _layer_problem(c, hw, stride, groups, batch=2, dtype=jnp.float64):
    rng = np.random.default_rng(c + hw + stride)
    x = jnp.asarray(rng.standard_normal((batch, hw, hw, c)), dtype)
    w = jnp.asarray(rng.standard_normal((3, 3, c // groups, c)) / np.sqrt(9 * c / groups), dtype)
    ho = (hw - 1) // stride + 1
    g = jnp.asarray(rng.standard_normal((batch, ho, ho, c)), dtype)
    return x, w, g


def _all_passes(engine, x, w, g, stride, groups):
    with config.use_conv_lowering(engine):
        f = lambda x, w: ops.conv2d(x, w, stride=stride, padding=1, groups=groups)  # noqa: E731
        return jax.jit(lambda x, w, g: (f(x, w), *jax.vjp(f, x, w)[1](g)))(x, w, g)


def _close(a, b, what, scale=1.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=OP_FP32["rtol"],
                               atol=OP_FP32["atol"] * scale, err_msg=what)


@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_auto_equals_xla_on_model_layers_in_float64(layer):
    """Forward, input and weight gradient of 'auto' (float64: the kernel) and lax."""
    name, c, hw, stride, groups = layer
    with jax.enable_x64(True):
        x, w, g = _layer_problem(c, hw, stride, groups)
        got, want = (_all_passes(e, x, w, g, stride, groups) for e in ("auto", "xla"))
    for what, a, b in zip(("forward", "input gradient", "weight gradient"), got, want):
        assert a.dtype == jnp.float64
        scale = max(1.0, float(np.max(np.abs(b))))   # float64 sums: no float32 rounding
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * scale, err_msg=f"{name} {what}")


@pytest.mark.parametrize("engine", ["onednn", "kernel"])
def test_model_layers_in_float32(engine):
    """Every grouped / depthwise model layer in float32, all three passes, against the float64
    answer, to the op tolerance scaled by each result's largest value."""
    for name, c, hw, stride, groups in LAYERS:
        x, w, g = _layer_problem(c, hw, stride, groups, batch=1, dtype=jnp.float32)
        got = _all_passes(engine, x, w, g, stride, groups)
        with jax.enable_x64(True):
            f64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)  # noqa: E731
            want = _all_passes("xla", f64(x), f64(w), f64(g), stride, groups)
        for what, a, b in zip(("forward", "input gradient", "weight gradient"), got, want):
            _close(np.asarray(a, np.float64), b, f"{engine} {name} {what}",
                   max(1.0, float(np.max(np.abs(b)))))


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
            geo = Geometry(k, stride, pads, dil, groups)
            outs = {}
            for engine in ("kernel", "xla"):
                f = lambda x, w, e=engine: lowering.conv(x, w, geo, lowering=e)  # noqa: E731
                y, vjp = jax.vjp(f, x, w)
                outs[engine] = (y, *vjp(jnp.cos(y)))
            for what, a, b in zip(("forward", "x grad", "w grad"), outs["kernel"], outs["xla"]):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12,
                                           err_msg=f"{what} {shape} groups={groups}")


# ------------------------------------------------------------------------ the policy table

def _targets(text):
    """The computation's convolution engines: FFI targets and lax convolutions, by name."""
    found = {t for t in native.TARGETS if f"@{t}(" in text}
    return found | ({"stablehlo.convolution"} if "stablehlo.convolution" in text else set())


ROW_SHAPES = {  # kind -> (x shape, w shape HWIO, conv2d keywords)
    "pointwise": ((1, 6, 6, 16), (1, 1, 16, 8), dict(stride=2)),
    "depthwise": ((1, 6, 6, 16), (3, 3, 1, 16), dict(padding=1, groups=16)),
    "grouped": ((1, 6, 6, 16), (3, 3, 4, 16), dict(padding=1, groups=4)),
    "grouped_large": ((1, 56, 56, 8), (3, 3, 2, 8), dict(padding=1, groups=4)),
    "stem": ((1, 9, 9, 3), (3, 3, 3, 16), dict(stride=2, padding=1)),
    "dense": ((1, 6, 6, 64), (3, 3, 64, 16), dict(padding=1)),
}
TARGET = {"onednn": {"jaxconv_onednn_conv"}, "xla": {"stablehlo.convolution"},
          "kernel": {"jaxconv_grouped_conv", "jaxconv_grouped_conv_wgrad"}}


def _one_pass(kind: str, op: str):
    """(fn, x, w): a function of (x, w) computing only pass `op` of ROW_SHAPES[kind]'s conv."""
    xs, ws, kw = ROW_SHAPES[kind]
    x, w = jnp.ones(xs), jnp.ones(ws)
    g = jnp.ones(jax.eval_shape(lambda x, w: ops.conv2d(x, w, **kw), x, w).shape)
    fn = {"fwd": lambda x, w: ops.conv2d(x, w, **kw),
          "bwd_data": lambda x, w: jax.vjp(lambda x: ops.conv2d(x, w, **kw), x)[1](g),
          "bwd_weights": lambda x, w: jax.vjp(lambda w: ops.conv2d(x, w, **kw), w)[1](g)}[op]
    return fn, x, w


@pytest.mark.parametrize("engine", ["onednn", "kernel"])
@pytest.mark.parametrize("kind", sorted(ROW_SHAPES))
def test_a_forced_engine_computes_every_float32_pass(engine, kind):
    """conv_lowering='onednn' / 'kernel' runs each pass of every kind of conv on that engine
    (the tests comparing values under a forced engine would also pass on lax's convolution)."""
    if not native.available(engine):
        pytest.skip(f"{engine} cannot be built here")
    for op in policy.PASSES:
        fn, x, w = _one_pass(kind, op)
        with config.use_conv_lowering(engine):
            found = _targets(exported_mlir(fn, x, w))
        assert found and found <= TARGET[engine], (kind, op, found)


_ALL = ("onednn", "kernel", "xla")
EXPECTED_TABLE = {  # the policy, written out: a change to a row must change this too
    **{("pointwise", p): ("onednn", "matmul", "xla") for p in policy.PASSES},
    **{(k, p): _ALL for k in ("depthwise", "grouped") for p in policy.PASSES},
    ("grouped_large", "fwd"): _ALL, ("grouped_large", "bwd_data"): _ALL,
    ("grouped_large", "bwd_weights"): ("kernel", "onednn", "xla"),
    ("stem", "fwd"): ("onednn", "xla"), ("stem", "bwd_data"): ("onednn", "xla"),
    ("stem", "bwd_weights"): _ALL,
    **{("dense", p): ("onednn", "xla") for p in policy.PASSES},
}


def test_policy_table_is_the_measured_one():
    assert policy.TABLE == EXPECTED_TABLE


@pytest.mark.parametrize("row", sorted(EXPECTED_TABLE), ids=lambda r: "-".join(r))
def test_policy_table_row(row, monkeypatch):
    """Each (kind, pass) row: the shape is classified as that kind, and the pass, traced and
    lowered for CPU, runs on the first available engine of the row (on an AVX-512 CPU: the
    grouped_large rows' condition, whatever this CPU is), and without it on the second."""
    monkeypatch.setattr(native, "avx512", lambda: True)
    kind, op = row
    xs, ws, kw = ROW_SHAPES[kind]
    geo_pads = kw.get("padding", 0)
    assert policy.kind(ws[:2], xs[3], kw.get("groups", 1), bool(geo_pads), xs[1:3]) == kind
    fn, x, w = _one_pass(kind, op)
    text = exported_mlir(fn, x, w)
    chosen = policy.first_available(EXPECTED_TABLE[row])
    if chosen == "matmul":
        assert "stablehlo.dot_general" in text and not _targets(text), (row, _targets(text))
    else:
        found = _targets(text)
        assert found and found <= TARGET[chosen], (row, chosen, found)
    # and the second choice, where the first is missing (the fallback path)
    rest = [e for e in EXPECTED_TABLE[row] if e != chosen]
    if rest:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(native, "available", lambda name: name != chosen)
            text = exported_mlir(lambda *a: fn(*a), x, w)
        second = policy.first_available(rest)
        found = _targets(text)
        if second == "matmul":
            assert not found and "stablehlo.dot_general" in text, (row, found)
        else:
            assert found and found <= TARGET[second], (row, second, found)


def test_grouped_kind_by_map_size(monkeypatch):
    """Grouped convs over maps of LARGE_HW pixels or more have a row of their own on AVX-512
    CPUs, decided by the input map in every pass (bwd_data gets it as in_hw)."""
    assert policy.LARGE_HW == 56 * 56
    monkeypatch.setattr(native, "avx512", lambda: True)
    assert policy.kind((3, 3), 16, 4, True, (56, 56)) == "grouped_large"
    assert policy.kind((3, 3), 16, 4, True, (55, 57)) == "grouped"
    assert policy.kind((3, 3), 16, 16, True, (112, 112)) == "depthwise"
    geo = Geometry((3, 3), stride=(2, 2), pads=((1, 1), (1, 1)), groups=4)
    gy = jax.core.ShapedArray((1, 28, 28, 16), jnp.float32)
    w = jax.core.ShapedArray((3, 3, 4, 16), jnp.float32)
    # rows that differ in every pass, so that each answer says which row was taken
    for op in policy.PASSES:
        monkeypatch.setitem(policy.TABLE, ("grouped_large", op), ("kernel", "xla"))
        monkeypatch.setitem(policy.TABLE, ("grouped", op), ("xla",))
    for hw, want in (((56, 56), "kernel"), ((54, 54), "xla")):
        x = jax.core.ShapedArray((1, *hw, 16), jnp.float32)
        assert policy.engine("fwd", geo, x, w) == want
        assert policy.engine("bwd_weights", geo, x, gy) == want
        assert policy.engine("bwd_data", geo, gy, w, in_hw=hw) == want
    with pytest.raises(ValueError, match="in_hw"):
        policy.engine("bwd_data", geo, gy, w)
    monkeypatch.setattr(native, "avx512", lambda: False)   # the kernel is slow there on AVX2
    assert policy.kind((3, 3), 16, 4, True, (56, 56)) == "grouped"


def test_policy_falls_back_when_an_engine_is_missing(monkeypatch):
    """Without oneDNN 'auto' takes the kernel where the row lists it (else lax); without any
    compiler, lax everywhere; a forced engine that cannot be had raises, naming what is missing."""
    geo = Geometry((3, 3), pads=((1, 1), (1, 1)), groups=4)
    x, w = jax.core.ShapedArray((1, 6, 6, 16), jnp.float32), jax.core.ShapedArray((3, 3, 4, 16), jnp.float32)
    dense = Geometry((3, 3), pads=((1, 1), (1, 1)))
    xd, wd = jax.core.ShapedArray((1, 6, 6, 64), jnp.float32), jax.core.ShapedArray((3, 3, 64, 8), jnp.float32)
    monkeypatch.setattr(native, "available", lambda name: True)
    assert policy.engine("fwd", geo, x, w) == "onednn"
    monkeypatch.setattr(native, "available", lambda name: name in ("kernel", "xla", "matmul"))
    assert policy.engine("fwd", geo, x, w) == "kernel"
    assert policy.engine("bwd_weights", geo, x, w) == "kernel"
    assert policy.engine("fwd", dense, xd, wd) == "xla"
    monkeypatch.setattr(native, "available", lambda name: name in ("xla", "matmul"))
    assert policy.engine("fwd", geo, x, w) == "xla"
    # float64: oneDNN has none, so forcing it computes that pass with lax
    x64, w64 = x.update(dtype=jnp.float64), w.update(dtype=jnp.float64)
    monkeypatch.undo()
    assert policy.engine("fwd", geo, x64, w64, "onednn") == "xla"

    def load(name):
        raise RuntimeError(f"no {name} here: install it")
    monkeypatch.setattr(native, "load", load)
    with pytest.raises(RuntimeError, match="no onednn here: install it"):
        policy.engine("fwd", geo, x, w, "onednn")
    with config.use_conv_lowering("kernel"), pytest.raises(RuntimeError, match="no kernel here"):
        exported_mlir(lambda x, w: ops.conv2d(x, w, padding=1, groups=4), jnp.ones(x.shape),
                      jnp.ones(w.shape))


def test_forced_engine_without_a_compiler_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler.*CXX='no-such-compiler'"):
        native.load.__wrapped__("kernel")
    monkeypatch.setattr(native, "available", lambda name: name in ("xla", "matmul"))
    x, w = jnp.ones((1, 5, 5, 16)), jnp.ones((3, 3, 2, 16))
    text = exported_mlir(lambda x, w: ops.conv2d(x, w, padding=1, groups=8), x, w)
    assert _targets(text) == {"stablehlo.convolution"}


def test_onednn_missing_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXCONV_ONEDNN_ROOT", str(tmp_path))
    with pytest.raises(RuntimeError, match="oneDNN not found: install the wheels"):
        native.onednn_paths()


# ----------------------------------------------------------- drop-in, backends, config

@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 0), (2, 1))])
@pytest.mark.parametrize("groups, features", [(4, 8), (8, 8), (2, 6), (1, 6)])
def test_nnx_conv_drop_in(padding, groups, features):
    """nnx.Conv with conv_general_dilated=lowering.conv_general_dilated equals plain nnx.Conv,
    and really goes through the primitive."""
    kw = dict(in_features=8, out_features=features, kernel_size=(3, 2), strides=(2, 1),
              kernel_dilation=(1, 2), padding=padding, feature_group_count=groups)
    ref = nnx.Conv(**kw, rngs=nnx.Rngs(0))
    ours = nnx.Conv(**kw, conv_general_dilated=lowering.conv_general_dilated, rngs=nnx.Rngs(0))
    x = jnp.asarray(rand((3, 9, 7, 8)))
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))  # noqa: E731
    (l_ref, (g_ref, gx_ref)), (l_ours, (g_ours, gx_ours)) = (
        jax.value_and_grad(lambda m, x: loss(m, x), argnums=(0, 1))(m, x) for m in (ref, ours))
    _close(l_ours, l_ref, "loss")
    _close(gx_ours, gx_ref, "input gradient")
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        _close(a, b, "parameter gradient")
    assert "jaxconv_conv" in str(jax.make_jaxpr(lambda x: ours(x))(x))


def test_drop_in_passes_other_convolutions_to_lax():
    x = jnp.ones((2, 6, 6, 4))
    wg = jnp.ones((3, 3, 1, 4))
    for w_, kw in ((wg, dict(lhs_dilation=(2, 2), feature_group_count=4)),
                   (wg, dict(dimension_numbers=("NCHW", "HWIO", "NCHW"), feature_group_count=4)),
                   (jnp.ones((3, 3, 4, 8)), dict(batch_group_count=2))):
        kw = dict(dict(dimension_numbers=("NHWC", "HWIO", "NHWC")), **kw)
        x_ = jnp.asarray(rand((2, 4, 6, 6) if "NCHW" in str(kw) else x.shape))
        w_ = jnp.asarray(rand(w_.shape, 1))
        ours, theirs = (functools.partial(f, window_strides=(1, 1), padding=((1, 1), (1, 1)), **kw)
                        for f in (lowering.conv_general_dilated, lax.conv_general_dilated))
        jaxpr = str(jax.make_jaxpr(ours)(x_, w_))
        assert "conv_general_dilated" in jaxpr and "jaxconv_conv" not in jaxpr, kw
        np.testing.assert_array_equal(ours(x_, w_), theirs(x_, w_), err_msg=str(kw))


def _model_like(x, wd, wg, wt):
    """A depthwise, a grouped, a dense and a transposed conv, and their gradients."""
    def f(x, wd, wg, wt):
        y = ops.conv2d(ops.conv2d(x, wd, padding=1, groups=32), wg, padding=1, groups=8)
        y = ops.conv_transpose2d(y, wt, stride=2, padding=1)
        return jnp.sum(y * y)
    return jax.grad(f, argnums=(0, 1, 2, 3))(x, wd, wg, wt)


ARGS = (jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 1, 32)), jnp.ones((3, 3, 4, 32)),
        jnp.ones((3, 3, 16, 32)))


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_gpu_and_tpu_keep_lax_convolutions(platform):
    """Lowered for an accelerator, 'auto' is lax's convolution (cuDNN / the TPU compiler):
    every convolution keeps its feature_group_count and no CPU engine is left."""
    text = exported_mlir(_model_like, *ARGS, platform=platform)
    assert "feature_group_count = 32" in text and "feature_group_count = 8" in text
    assert _targets(text) == {"stablehlo.convolution"}


def _per_example_weight_grads(x, w):
    """vmap of a weight gradient over examples: the batching rule's mapped-kernel case."""
    loss = lambda x, w: jnp.sum(ops.conv2d(x, w, padding=1, groups=4) ** 2)  # noqa: E731
    return jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None))(x, w)


def test_float32_convs_trace_without_a_platform_branch():
    """A float32 conv binds conv_p itself, which lowers to lax's convolution off CPU: no
    platform branch to trace and linearise (it was a third of the time to trace a ResNeXt-50
    train step), nor for a transposed conv. Per-example weight gradients still lower to lax's
    batched convolution for a GPU (no loop; an ensemble's input is not copied per kernel) and to
    the engine's loop on CPU."""
    x, w = jnp.ones((2, 4, 6, 6, 8)), jnp.ones((3, 3, 2, 8))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(ops.conv2d(x, w, groups=4) ** 2)))(
        x[0], w))
    assert "jaxconv_conv" in jaxpr and "platform_index" not in jaxpr and "cond" not in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda x, w: ops.conv_transpose2d(x, w, stride=2, groups=4))(
        x[0], jnp.ones((3, 3, 2, 8))))
    assert "jaxconv_conv" in jaxpr and "platform_index" not in jaxpr
    # the precision in force where the conv is traced holds off CPU, though lowering is later
    # (this suite's global default is "highest")
    def high(x, w):
        with jax.default_matmul_precision("high"):
            return ops.conv2d(x, w, groups=4)
    assert "precision_config = [#stablehlo<precision HIGH>, #stablehlo<precision HIGH>]" in \
        exported_mlir(high, x[0], w, platform="cuda")
    # an ensemble (kernels mapped, one input) is one grouped conv of the input as it is
    ensemble = exported_mlir(lambda x, ws: jax.vmap(lambda w: ops.conv2d(x, w, groups=4))(ws),
                             x[0], jnp.ones((5, *w.shape)), platform="cuda")
    assert _targets(ensemble) == {"stablehlo.convolution"} and "broadcast_in_dim" not in ensemble
    gpu = exported_mlir(_per_example_weight_grads, x, w, platform="cuda")
    assert "stablehlo.while" not in gpu and _targets(gpu) == {"stablehlo.convolution"}
    assert "stablehlo.while" in exported_mlir(_per_example_weight_grads, x, w)
    with config.use_conv_lowering("xla"):
        want = jax.jit(_per_example_weight_grads)(x, w)
    np.testing.assert_allclose(jax.jit(_per_example_weight_grads)(x, w), want, rtol=1e-5)


def test_cpu_auto_uses_the_engines():
    text = exported_mlir(_model_like, *ARGS)
    assert "feature_group_count" not in text
    assert _targets(text) and "stablehlo.convolution" not in _targets(text)
    with config.use_conv_lowering("xla"):
        assert "feature_group_count = 8" in exported_mlir(lambda *a: _model_like(*a), *ARGS)


def test_config_switch_and_its_former_name():
    assert config.conv_lowering == config.grouped_lowering == "auto"
    with config.use_conv_lowering("kernel"):
        assert config.conv_lowering == config.grouped_lowering == "kernel"
        with pytest.raises(ValueError, match="conv_lowering"):
            with config.use_grouped_lowering("fast"):
                pass
        assert config.conv_lowering == "kernel"
    assert config.conv_lowering == "auto"
    with pytest.raises(ValueError, match=r"conv_lowering: expected one of \('auto', 'xla'"):
        config.set_conv_lowering("fma")     # the pure-JAX formulations are gone
    with pytest.raises(ValueError, match="conv_lowering"):
        lowering.conv(jnp.ones((1, 4, 4, 4)), jnp.ones((3, 3, 1, 4)), Geometry((3, 3), groups=4),
                      lowering="nope")


def test_lowering_argument_overrides_config():
    x, w = jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 1, 4))
    with config.use_conv_lowering("xla"):
        jaxpr = str(jax.make_jaxpr(lambda x, w: lowering.conv(
            x, w, Geometry((3, 3), pads=((1, 1), (1, 1)), groups=4), lowering="kernel"))(x, w))
    assert "jaxconv_conv" in jaxpr and "lowering=kernel" in jaxpr


def test_primitive_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="operands of one dtype"):
        bind("fwd", jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2), jnp.bfloat16), Geometry((3, 3)))


@pytest.mark.parametrize("name", ["conv", "conv batch", "norm fwd", "norm bwd"])
def test_onednn_targets_reject_buffers_that_disagree(name):
    """Called directly with buffers whose shapes disagree, the oneDNN FFI targets return an
    error (oneDNN would otherwise read and write past the smaller buffers)."""
    if not native.available("onednn"):
        pytest.skip("oneDNN is not available here")
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    x, c = jnp.ones((2, 4, 4, 8)), jnp.ones((1, 1, 1, 8))
    conv = dict(op=np.int64(0), **{k: np.int64(v) for k, v in dict(
        sh=1, sw=1, dh=1, dw=1, pt=0, pb=0, pl=0, pr=0, groups=1).items()})
    calls = {   # conv: w's C_in 4 for x's 8 channels; y's batch 3 for x's 2
        "conv": lambda: jax.ffi.ffi_call("jaxconv_onednn_conv", f32(2, 2, 2, 16))(
            x, jnp.ones((3, 3, 4, 16)), **conv),
        "conv batch": lambda: jax.ffi.ffi_call("jaxconv_onednn_conv", f32(3, 2, 2, 16))(
            x, jnp.ones((3, 3, 8, 16)), **conv),
        "norm fwd": lambda: jax.ffi.ffi_call(   # per-channel outputs of 1 value for 8 channels
            "jaxconv_onednn_norm_fwd", (f32(*x.shape), f32(1), f32(1)))(x, c, c, eps=np.float32(1e-5)),
        "norm bwd": lambda: jax.ffi.ffi_call(   # dy of another shape
            "jaxconv_onednn_norm_bwd", (f32(*x.shape), f32(8), f32(8)))(
            x, c, c, c, jnp.ones((2, 4, 4, 4)), eps=np.float32(1e-5)),
    }
    with pytest.raises(Exception, match="disagree|of x's shape"):
        jax.block_until_ready(jax.jit(calls[name])())


# ------------------------------------------------------------------------- pointwise convs

POINTWISE = [_conv((3, 9, 7, 5), (6, 5, 1, 1), stride=s) for s in (1, 2, 3)] + [
    _conv((2, 8, 8, 64), (32, 64, 1, 1), stride=(2, 1))]


@pytest.mark.parametrize("engine", ENGINES + ("matmul",))
@pytest.mark.parametrize("case", POINTWISE, ids=[c.id for c in POINTWISE])
def test_pointwise_matches_torch(case, engine):
    with config.use_conv_lowering(engine):
        r = run_case(case)
        bf16 = run_case(dataclasses.replace(case, dtype="bfloat16"))
    assert r.passed, f"{engine} {case.id}: forward {r.forward:.3g}, gradients {r.grads}"
    assert bf16.passed, f"{engine} {case.id} bf16: forward {bf16.forward:.3g}"


def test_matmul_engine_is_for_1x1_convs_on_cpu_only():
    x, w = jnp.ones((2, 6, 6, 8)), jnp.ones((1, 1, 8, 4))

    def f(x, w):
        return jax.grad(lambda x, w: jnp.sum(ops.conv2d(x, w, stride=2) ** 2), argnums=(0, 1))(x, w)

    with config.use_conv_lowering("matmul"):
        cpu, gpu = exported_mlir(lambda *a: f(*a), x, w), exported_mlir(lambda *a: f(*a), x, w, platform="cuda")
        padded = exported_mlir(lambda x, w: ops.conv2d(x, w, padding=1), x, w)
    assert not _targets(cpu) and "stablehlo.dot_general" in cpu
    assert _targets(gpu) == {"stablehlo.convolution"} and "stablehlo.dot_general" not in gpu
    assert _targets(padded) == {"stablehlo.convolution"}    # not a matrix product: lax
