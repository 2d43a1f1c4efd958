"""Every registered jaxconv model vs its torch_ref twin, weights moved with convert.from_torch.

Parameterised over the registry, so a newly registered model is covered without edits here
(a model without a torch_ref twin fails). One torch / jaxconv pair is built per model and xdist
worker and shared by the tests (a module-scoped fixture: pytest runs a model's tests together).

- eval logits and every feature map on a small non-square input, and logits at the native size,
  in float32 with the library's default lowering;
- one train step (batch statistics, dropout off on both sides) computed in float64 on both
  sides: every head's output, the gradient of a scalar loss w.r.t. the input and every
  parameter, and the BN running statistics afterwards (float32 train outputs: -m slow);
- the torch -> jaxconv -> torch round trip of the state_dict, bit for bit, and the parameter
  count against torch_ref and the torchvision / timm fixture.

Checkpoints are random but well-conditioned (see _torch_model / _calibrate). The jaxconv model
is never initialised: nnx.eval_shape, placeholders, then from_torch (the initialisers compile a
sampler per parameter shape; tests/test_models.py covers them).

Big variants (resnext101_32x8d, resnext101_64x4d, resnext152_32x4d) and resnext50_32x4d_dcn run
the native-size and train-step checks only under ``-m slow``; their small-input eval parity,
round trip and parameter count run by default.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref
from jaxconv import config
from jaxconv.convert import from_torch, to_torch
from jaxconv.models import input_size, list_models
from parity_tests.tolerances import BN_STATS, MODEL_LOGITS_ATOL
from tests.helpers import HEAVY, filled_model, heads, nchw, nhwc, num_params, params, rand, reference

MODELS = list_models()

# Eval logits and feature maps: MODEL_LOGITS_ATOL (features: times the map's scale when above
# 1), or NOISE_FACTOR x torch's own float32 error on the same input (measured against torch in
# float64) where that is larger. On random checkpoints the deep ResNeXts are chaotic enough that
# torch's float32 logits are 1.5e-4 (resnext50) to 2.4e-3 (resnext152) away from float64; no
# float32 implementation can then be within 1e-4 of torch's float32 result, and the factor
# asks jaxconv to be about as accurate as torch. Real checkpoints sit far below 1e-4.
NOISE_FACTOR = 3.0
# Train step in float64. In float32 the gradients of these batch-statistics networks are
# ill-conditioned at test sizes: torch's own float32 gradients are a median 1.6e-2 and up to
# 30% of a tensor's scale away from float64 for resnext50 (BN-bias gradients are small
# differences of large terms), so no float32 bound both passes and catches bugs. In float64
# (float32 weights, so both compute the same function) the jaxconv gradients come back rounded
# to the float32 parameters: a few float32 ulps relative to each tensor's scale.
GRAD_RTOL = 1e-6
FP64_ATOL = 1e-7  # float64 train outputs (measured worst: 5e-9, inception_v3)
# Models built with other keywords for the small-input train checks: inception_v3's aux head
# needs a 17x17 Mixed_6e map (a 299 input); its train checks run aux-less at the small size and
# with the aux head at the native size under -m slow.
TRAIN_KWARGS = {"inception_v3": {"aux_logits": False}}
# Both lowerings are covered: the float64 train step and the small-input eval of the HEAVY
# models are traced with lax's convolutions ("xla", the reference lowering), the train step runs
# again under the default lowering (the CPU kernel, 1x1 convs as matrix products) for the models
# with grouped / depthwise convs (resnext50 and mobilenet_v1 by default, xception under -m slow),
# and the eval tests of the others run the default lowering. The engines have their own parity
# tests (parity_tests/test_lowering.py).
FAST_LOWERING = "xla"
# The models with grouped or depthwise convs, whose train step also runs with the default
# lowering (the slow ones under -m slow).
GROUPED, GROUPED_SLOW = {"resnext50_32x4d", "xception", "mobilenet_v1"}, {"xception"}


def _small_hw(model, size: int = 64) -> tuple[int, int]:
    """A small non-square input the model accepts: `size` or the model's minimum, by +25%."""
    h = max(size, model.min_input_size)
    return h, h + h // 4


def _check_hw(model, size: int) -> tuple[int, int]:
    """The smallest _small_hw from `size` up (in steps of 25%) whose last feature map is at
    least 2x2. Train-mode BN over the 2 values per channel of a 1x1 map at batch 2 returns
    +-1 whichever value is larger, so float32 rounding flips outputs by O(1) (inception_v3 at
    its 75 minimum); eval-mode statistics calibrated on such a batch are as fragile."""
    model = nnx.clone(model)
    model.eval()  # shapes only: no BN statistics update
    while True:
        hw = _small_hw(model, size)
        feats = jax.eval_shape(model.feature_maps, jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32))
        if min(list(feats.values())[-1].shape[1:3]) >= 2:
            return hw
        size = hw[0] + hw[0] // 4


def _nchw(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """NCHW input for torch_ref (float64 in channels_last, as _as_float64's model)."""
    t = nchw(x, dtype)
    return t.to(memory_format=torch.channels_last) if dtype == torch.float64 else t


def _as_float64(tm: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy (channels_last: torch's float64 grouped convs are ~5x faster so)."""
    return copy.deepcopy(tm).double().to(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------ model pairs

def _torch_model(name: str) -> torch.nn.Module:
    """torch_ref model in eval mode with a well-conditioned random checkpoint: BN affines random
    (weight U(0.5, 1.5), bias N(0, 0.2)), every Linear at torch's default scale (inception_v3's
    std-0.1 init would give logits of ~100), the deformable convs' offset convs random (weight
    N(0, 0.02), bias N(0, 0.5): fractional offsets and masks other than 0.5); running statistics
    are set per input by _calibrate."""
    torch.manual_seed(0)
    model = torch_ref.create_model(name).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
            elif isinstance(m, torch.nn.Linear):
                bound = m.in_features ** -0.5
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
        for name_, m in model.named_modules():
            if name_.endswith("conv_offset"):   # zero-initialised: offsets 0, masks 0.5
                m.weight.normal_(0.0, 0.02, generator=g)
                m.bias.normal_(0.0, 0.5, generator=g)
    return model


def _calibrate(tm, jm, x: np.ndarray) -> None:
    """Set the BN running statistics of both models from `x`: torch's statistics of the batch
    (a pass with only the BNs in train mode, cumulative averaging), then perturbed (var x
    U(0.8, 1.25), mean + 0.1 std N(0, 1)) so eval mode differs from batch statistics.

    Statistics of the very input checked keep every layer's eval-mode activations near unit
    scale; statistics of another batch leave the deepest channels of these random networks
    badly normalised and the logits 10x noisier."""
    bns = [m for m in tm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        tm(_nchw(x))
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
            m.eval()
            m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.8, 1.25, generator=g))
            m.running_mean.add_(0.1 * m.running_var.sqrt()
                                * torch.randn(m.running_mean.shape, generator=g))
    stats = {k: v for k, v in tm.state_dict().items()
             if k.endswith(("running_mean", "running_var"))}
    from_torch(jm, stats, strict=False)


@pytest.fixture(scope="module")
def pair(request):
    """(name, torch model, jaxconv model with the torch weights), both in eval mode. Tests may
    recalibrate the BN statistics of both (together); other changes go to copies."""
    name = request.param
    tm = _torch_model(name)
    jm = from_torch(filled_model(name, fill="zeros"), tm.state_dict())
    jm.eval()
    yield name, tm, jm
    jax.clear_caches()  # this model's executables (hundreds of MB on 2-core CI boxes)


def _models(slow=frozenset(), only=None):
    return params(MODELS, slow, only)


# ------------------------------------------------------------------------------ jitted steps

@nnx.jit
def _eval(model, x):
    return model(x), model.feature_maps(x)


@nnx.jit
def _logits(model, x):
    return model(x)


@nnx.jit
def _train_forward(model, x):
    return heads(model(x))


def _train_step(model, x, cot):
    """Outputs of a train-mode forward, and the gradients of sum(output * cot) w.r.t. every
    parameter and the input; `model`'s BN running statistics are updated as in torch. Jitted
    afresh per check: the lowering is read when tracing, and nnx.jit would reuse the trace of
    another lowering for a model of the same structure."""
    def loss_fn(model, x):
        outs = heads(model(x))
        return sum(jnp.vdot(outs[k], cot[k]) for k in cot), outs

    (_, outs), (grads, gx) = nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(model, x)
    return outs, grads, gx


# ----------------------------------------------------------------------------------- checks

def _assert_close(name, got, want, want64, scale_floor=None):
    """|got - want| <= max(MODEL_LOGITS_ATOL (x the scale of `want` above `scale_floor`),
    NOISE_FACTOR x torch's own float32 error |want - want64|)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
    atol = MODEL_LOGITS_ATOL
    if scale_floor is not None:
        atol *= max(scale_floor, float(np.abs(want).max()))
    noise = float(np.abs(want - want64).max())
    err = float(np.abs(got - want).max())
    assert err <= max(atol, NOISE_FACTOR * noise), (
        f"{name}: max |jaxconv - torch| = {err:.3g} > max({atol:.3g}, {NOISE_FACTOR} x torch "
        f"float32 vs float64 {noise:.3g})")
    return err, noise


def _train_copies(name, tm, dtype, kwargs):
    """Fresh train-mode copies of the pair built with `kwargs` (jaxconv with compute `dtype`,
    torch in the matching precision), dropout off on both sides so they are deterministic; BN
    uses batch statistics. Weights come from the pair's torch model."""
    if kwargs:
        t = torch_ref.create_model(name, **kwargs)
        t.load_state_dict(tm.state_dict(), strict=False)  # drops the heads kwargs remove
    else:
        t = copy.deepcopy(tm)
    j = from_torch(filled_model(name, fill="zeros", dtype=dtype, **kwargs), t.state_dict())
    if dtype == jnp.float64:
        t = _as_float64(t)
    t.train()
    j.train()
    for m in t.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    j.set_attributes(nnx.Dropout, deterministic=True)
    return t, j


def _rel(a, b) -> float:
    """max |a - b| relative to max |b| (the plain max |a - b| when b is all zero)."""
    scale = float(np.abs(b).max())
    err = float(np.abs(np.asarray(a, np.float64) - b).max())
    return err / scale if scale > 0 else err


def _check_train_fp32(name, tm, kwargs, hw):
    """Train-mode forward (batch statistics) in float32: every head's output."""
    tm, jm = _train_copies(name, tm, jnp.float32, kwargs)
    x = rand((2, *hw, 3), seed=3)
    with config.use_grouped_lowering(FAST_LOWERING):
        outs = _train_forward(jm, jnp.asarray(x))
    with torch.no_grad():
        t_outs = heads(tm(_nchw(x)))
        t64 = heads(_as_float64(tm)(_nchw(x, torch.float64)))
    assert set(outs) == set(t_outs), f"{name}: train-mode heads"
    for k, t in t_outs.items():
        _assert_close(f"{name} train output {k}", outs[k], t.numpy(), t64[k].numpy())


def _check_train_step_fp64(name, tm, kwargs, hw, record=lambda k, v: None,
                           lowering=FAST_LOWERING):
    """One train step computed in float64 on both sides (float32 weights, so both compute the
    same function): every head's output, the gradient of sum(output * cot) w.r.t. the input and
    every parameter, and the BN running statistics afterwards."""
    tm, jm = _train_copies(name, tm, jnp.float64, kwargs)
    x = rand((2, *hw, 3), seed=3)
    xt = _nchw(x, torch.float64).requires_grad_(True)
    t_outs = heads(tm(xt))
    rng = np.random.default_rng(4)
    cot = {k: rng.standard_normal(tuple(v.shape)) for k, v in t_outs.items()}
    sum((v * torch.from_numpy(cot[k])).sum() for k, v in t_outs.items()).backward()
    step = nnx.jit(_train_step)
    with jax.enable_x64(True), config.use_grouped_lowering(lowering):
        args = (jm, jnp.asarray(x), {k: jnp.asarray(v) for k, v in cot.items()})
        if lowering == "auto":   # float64 grouped / depthwise convs: jaxconv's kernel
            assert "@jaxconv_grouped_conv" in step.lower(*args).as_text(), name
        outs, grads, gx = step(*args)
        outs = {k: np.asarray(v) for k, v in outs.items()}
        g_model = nnx.clone(jm)
        nnx.update(g_model, grads)
        j_grads, j_state = to_torch(g_model), to_torch(jm)
        gx = np.asarray(gx)

    assert set(outs) == set(t_outs), f"{name}: train-mode heads"
    record("input", x.shape)
    record("outputs_err", max(float(np.abs(outs[k] - t.detach().numpy()).max())
                              for k, t in t_outs.items()))
    record("input_grad_rel", _rel(gx, nhwc(xt.grad)))
    for k, t in t_outs.items():
        assert outs[k].dtype == np.float64, f"{name} {k}: computed in {outs[k].dtype}"
        np.testing.assert_allclose(outs[k], t.detach().numpy(), rtol=0, atol=FP64_ATOL,
                                   err_msg=f"{name} train output {k} (float64)")
    assert _rel(gx, nhwc(xt.grad)) <= GRAD_RTOL, f"{name}: input gradient"
    t_params = dict(tm.named_parameters())
    assert set(t_params) <= set(j_grads)
    bad = {}
    for key, p in t_params.items():
        g = j_grads[key]
        assert np.isfinite(g).all() and np.abs(g).max() > 0, f"{name}: gradient of {key}"
        err = _rel(g, p.grad.numpy())
        if err > GRAD_RTOL:
            bad[key] = err
    assert not bad, f"{name}: gradients off by more than {GRAD_RTOL} of their scale: {bad}"
    record("param_grad_rel_max",
           max(_rel(j_grads[k], p.grad.numpy()) for k, p in t_params.items()))
    record("bn_stats_err", max(float(np.abs(j_state[k] - t.numpy()).max())
                               for k, t in tm.state_dict().items()
                               if k.endswith(("running_mean", "running_var"))))
    for key, t in tm.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(j_state[key], t.numpy(), rtol=BN_STATS, atol=BN_STATS,
                                       err_msg=f"{name} {key} after one train step")


# ------------------------------------------------------------------------------------- tests

def test_every_model_has_a_torch_ref_twin():
    assert set(MODELS) <= set(torch_ref.list_models())


@pytest.mark.parametrize("pair", _models(), indirect=True)
def test_eval_logits_and_feature_maps_small_input(pair, record_property):
    name, tm, jm = pair
    x = rand((2, *_check_hw(jm, 32 if name in HEAVY else 64), 3))
    _calibrate(tm, jm, x)
    lowering = FAST_LOWERING if name in HEAVY else config.grouped_lowering
    with config.use_grouped_lowering(lowering):
        logits, feats = _eval(jm, jnp.asarray(x))
    t64 = _as_float64(tm)
    with torch.no_grad():
        t_logits, t_feats = tm(_nchw(x)), tm.feature_maps(_nchw(x))
        t_logits64 = t64(_nchw(x, torch.float64))
        t_feats64 = t64.feature_maps(_nchw(x, torch.float64))
    err, noise = _assert_close(f"{name} logits", logits, t_logits.numpy(), t_logits64.numpy())
    record_property("logits_err", err)  # --junitxml keeps the measured errors
    record_property("torch_fp32_noise", noise)
    record_property("input", x.shape)
    assert list(feats) == list(t_feats), f"{name}: feature names and order"
    for k, t in t_feats.items():
        err, noise = _assert_close(f"{name} feature {k}", feats[k], nhwc(t),
                                   nhwc(t_feats64[k]), scale_floor=1.0)
        record_property(f"feature_{k}_err", err)


@pytest.mark.parametrize("pair", _models(slow=HEAVY), indirect=True)
def test_eval_logits_native_size(pair, record_property):
    name, tm, jm = pair
    size = input_size(name)
    x = rand((1, size, size, 3), seed=2)
    _calibrate(tm, jm, x)
    logits = _logits(jm, jnp.asarray(x))
    with torch.no_grad():
        t_logits = tm(_nchw(x))
        t_logits64 = _as_float64(tm)(_nchw(x, torch.float64))
    err, noise = _assert_close(f"{name} logits at {size}", logits, t_logits.numpy(),
                               t_logits64.numpy())
    record_property("logits_err", err)
    record_property("torch_fp32_noise", noise)


@pytest.mark.parametrize("pair", _models(slow=HEAVY), indirect=True)
def test_train_step_grads_and_bn_stats_fp64(pair, record_property):
    name, tm, jm = pair
    _check_train_step_fp64(name, tm, TRAIN_KWARGS.get(name, {}), _check_hw(jm, 32),
                           record_property)


@pytest.mark.parametrize("pair", _models(slow=GROUPED_SLOW, only=GROUPED), indirect=True)
def test_train_step_fp64_with_the_default_grouped_lowering(pair, record_property):
    """The float64 train step again, traced with the library's default lowering ('auto': in
    float64, jaxconv's kernel for grouped and depthwise convs, matrix products for 1x1 convs)
    for the models that have grouped or depthwise convs."""
    name, tm, jm = pair
    assert config.grouped_lowering == "auto"
    _check_train_step_fp64(name, tm, TRAIN_KWARGS.get(name, {}), _check_hw(jm, 32),
                           record_property, lowering="auto")


@pytest.mark.slow
@pytest.mark.parametrize("pair", _models(), indirect=True)
def test_train_mode_outputs_fp32(pair):
    name, tm, jm = pair
    _check_train_fp32(name, tm, TRAIN_KWARGS.get(name, {}), _check_hw(jm, 64))


@pytest.mark.slow
@pytest.mark.parametrize("pair", _models(only=TRAIN_KWARGS), indirect=True)
def test_train_with_all_heads_at_native_size(pair):
    """The heads TRAIN_KWARGS leave out of the small-input train checks, at the native size."""
    name, tm, _ = pair
    size = input_size(name)
    _check_train_fp32(name, tm, {}, (size, size))
    _check_train_step_fp64(name, tm, {}, (size, size))


@pytest.mark.parametrize("pair", _models(), indirect=True)
def test_state_dict_round_trip_and_param_count(pair):
    """torch -> jaxconv -> torch reproduces the state_dict bit for bit (num_batches_tracked
    aside); parameter counts equal torch_ref's and the torchvision / timm fixture's."""
    name, tm, jm = pair
    back = to_torch(jm)
    expected = {k: v.numpy() for k, v in tm.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    assert set(back) == set(expected), sorted(set(back) ^ set(expected))[:20]
    for key, value in expected.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)

    count = num_params(jm)
    assert count == num_params(tm)
    if reference(name) is not None:
        assert count == reference(name)["num_params"]
