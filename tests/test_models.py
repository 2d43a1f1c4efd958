"""Every registered jaxconv model, without torch: forward / backward, jit == eager, feature maps,
bfloat16, strict conversion errors, input checks, parameter keys and counts against the
torchvision / timm fixture, and the initialisers of ResNeXt, MobileNet-v1 and Xception.

Parameterised over the registry, so a newly registered model is covered without edits here.
Models are built once per model and xdist worker and shared; tests that change one work on a
copy. Only the initialiser tests run the real initialisers (on 2 CPU cores they compile a
sampler per parameter shape, ~20 s for resnext50); the other tests fill an nnx.eval_shape'd
model with He-normal kernels, unit BN scales and zero biases from numpy, which is instant.
Big variants (resnext101_32x8d, resnext101_64x4d, resnext152_32x4d) run the compiled checks
and conversion / input checks only under ``-m slow`` (their keys and counts by default);
resnext50_32x4d_dcn runs its compiled checks under ``-m slow``. Compiles, not arithmetic,
dominate: one float32 eval, one bf16 eval and one train forward per model.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxconv import config, nn
from jaxconv.convert import ConversionError, from_torch, to_torch
from jaxconv.convert.state import torch_items
from jaxconv.models import create_model, list_models
from jaxconv.models.mobilenet import MobileNetV1
from jaxconv.models.registry import aliases
from jaxconv.models.resnext import ResNeXt
from jaxconv.models.xception import Xception
from tests.helpers import BIG, HEAVY, abstract_model, filled_model, heads, operand_dtypes, params, reference

MODELS = list_models()
NUM_CLASSES = 10
# Keywords for models whose heads need more than a small input in train mode: inception_v3's aux
# head needs a 17x17 Mixed_6e map (a 299 input); parity_tests checks it at 299 under -m slow.
SMALL_INPUT_KWARGS = {"inception_v3": {"aux_logits": False}}


def _models(slow=frozenset(), only=None):
    return params(MODELS, slow, only)


def _input(model, batch: int = 4, size: int = 32, seed: int = 0) -> jax.Array:
    """A small non-square NHWC input the model accepts (its minimum size if larger)."""
    h = max(size, model.min_input_size)
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, h, h + h // 4, 3)),
                       jnp.float32)


def _values(model) -> dict:
    return {k: np.array(v[...]) for k, (_, v) in torch_items(model).items()}


@pytest.fixture(scope="module")
def model(request):
    """(name, filled model with NUM_CLASSES classes in eval mode); tests that change it copy it."""
    name = request.param
    m = filled_model(name, num_classes=NUM_CLASSES, **SMALL_INPUT_KWARGS.get(name, {}))
    m.eval()
    yield name, m
    jax.clear_caches()  # this model's executables


# ------------------------------------------------------------------------------ jitted steps
# Traced with lax's convolutions: these tests are about the models (shapes, heads, modes), not
# the lowering; parity_tests/test_models.py and test_grouped.py run the default lowering.
LOWERING = "xla"


@nnx.jit
def _eval_all(model, x):
    return model(x), model.feature_maps(x)


@nnx.jit
def _train_forward(model, x):
    return heads(model(x))


def _eval_once(name, m, x, cache={}):  # noqa: B006 (a per-process cache, on purpose)
    """(logits, feature maps) of the shared model `m` on `x`, computed once per model."""
    if name not in cache:
        with config.use_grouped_lowering(LOWERING):
            cache.clear()
            cache[name] = jax.device_get(_eval_all(m, x))
    return cache[name]


# ------------------------------------------------------------------------ compiled checks

@pytest.mark.parametrize("model", _models(slow=HEAVY), indirect=True)
def test_eval_forward_is_finite_with_named_feature_maps(model):
    name, m = model
    x = _input(m)
    logits, feats = _eval_once(name, m, x)
    assert logits.shape == (x.shape[0], NUM_CLASSES) and logits.dtype == np.float32
    assert np.isfinite(logits).all(), f"{name}: non-finite logits"
    assert list(feats) == m.feature_info.module_name(), f"{name}: feature names / order"
    for k, channels, stride in zip(feats, m.feature_info.channels(), m.feature_info.reduction()):
        f = feats[k]
        assert f.ndim == 4 and f.shape[0] == x.shape[0] and f.shape[-1] == channels, (name, k)
        # nominal stride: padded convs give ceil(size / stride), valid ones a little less
        assert 0 < f.shape[1] <= -(-x.shape[1] // stride), (name, k, f.shape)
        assert 0 < f.shape[2] <= -(-x.shape[2] // stride), (name, k, f.shape)
        assert np.isfinite(f).all(), (name, k)


@pytest.mark.parametrize("model", _models(slow=HEAVY), indirect=True)
def test_jit_matches_eager(model):
    name, m = model
    x = _input(m)
    logits, _ = _eval_once(name, m, x)
    with config.use_grouped_lowering(LOWERING):
        eager = np.asarray(nnx.clone(m)(x))
    # same function, different fusion: float32 rounding only (measured <= 2e-5 of the scale)
    np.testing.assert_allclose(logits, eager, rtol=0, atol=1e-4 * max(1.0, np.abs(eager).max()),
                               err_msg=name)


@pytest.mark.parametrize("model", _models(slow=HEAVY), indirect=True)
def test_train_forward_with_dropout_is_finite_and_updates_bn_stats(model):
    """Train mode with dropout 0.5 everywhere: finite outputs of the right shape (every head),
    BN running statistics updated, and a second step draws new dropout masks. (Every
    parameter's gradient is compared with torch, and checked finite and non-zero, in
    parity_tests/test_models.py.)"""
    name, m = model
    m = nnx.clone(m)
    m.train()
    m.set_attributes(nnx.Dropout, rate=0.5)
    x = _input(m)
    before = _values(m)
    with config.use_grouped_lowering(LOWERING):
        outs = _train_forward(m, x)
        after = _values(m)
        again = _train_forward(m, x)
    for k, v in outs.items():
        assert v.shape == (x.shape[0], NUM_CLASSES) and v.dtype == jnp.float32, (name, k)
        assert np.isfinite(np.asarray(v)).all(), f"{name} {k}: non-finite output"
    assert not np.allclose(np.asarray(again["logits"]), np.asarray(outs["logits"])), \
        f"{name}: dropout drew the same masks twice"
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not np.array_equal(after[k], before[k]) for k in stats), \
        f"{name}: train mode left BN running statistics unchanged"
    params = [k for k in before if k not in stats]
    assert all(np.array_equal(after[k], before[k]) for k in params)


@pytest.mark.parametrize("model", _models(slow=HEAVY), indirect=True)
def test_bfloat16_forward_agrees_with_float32(model):
    """dtype=bfloat16 computes in bf16 (every conv and matrix product has bf16 operands) with
    float32 parameters and BN statistics; its eval logits are finite and pick the same class as
    float32 for each image of the batch."""
    name, m = model
    abstract16 = abstract_model(name, num_classes=NUM_CLASSES, dtype=jnp.bfloat16,
                                **SMALL_INPUT_KWARGS.get(name, {}))
    for _, v in nnx.to_flat_state(nnx.state(abstract16, (nnx.Param, nnx.BatchStat))):
        assert v.dtype == jnp.float32
    graphdef16, _ = nnx.split(abstract16)
    m16 = nnx.merge(graphdef16, nnx.state(nnx.clone(m)))
    m16.eval()
    x = _input(m)
    with config.use_grouped_lowering(LOWERING):
        ops_ = operand_dtypes(jax.make_jaxpr(m16)(x), ("conv_general_dilated", "dot_general"))
    assert {op for op, _ in ops_} == {"conv_general_dilated", "dot_general"}, ops_
    assert {dtypes for _, dtypes in ops_} == {("bfloat16", "bfloat16")}, (name, ops_)
    y32, _ = _eval_once(name, m, x)
    with config.use_grouped_lowering(LOWERING):
        y16, feats16 = _eval_all(m16, x)
    assert y16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(y16, np.float32)).all()
    assert all(f.dtype == jnp.bfloat16 for f in feats16.values())
    np.testing.assert_array_equal(np.asarray(y16, np.float32).argmax(-1), y32.argmax(-1),
                                  err_msg=name)


# ------------------------------------------------------------- conversion and input errors

def _other_family(name: str) -> str:
    """A registered model of another family (different keys), for wrong-checkpoint tests."""
    family = name.split("_")[0].rstrip("0123456789")
    return next(n for n in MODELS if not n.startswith(family))


@pytest.mark.parametrize("name", _models(slow=BIG))
def test_wrong_model_checkpoint_raises_and_leaves_model_untouched(name):
    target = filled_model(name, fill="constant")
    checkpoint = to_torch(filled_model(_other_family(name), fill="zeros"))
    before = _values(target)
    with pytest.raises(ConversionError) as err:
        from_torch(target, checkpoint)
    msg = str(err.value)
    missing = sorted(set(before) - set(checkpoint))
    unexpected = sorted(set(checkpoint) - set(before))
    assert missing and unexpected
    for k in missing[:3] + missing[-3:]:
        assert f"missing in checkpoint: {k}\n" in msg + "\n", (k, msg[:500])
    for k in unexpected[:3] + unexpected[-3:]:
        assert f"unexpected in checkpoint: {k}\n" in msg + "\n", (k, msg[:500])
    after = _values(target)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@pytest.mark.parametrize("name", _models(slow=BIG))
def test_wrong_num_classes_checkpoint_names_the_head(name):
    target = filled_model(name, fill="constant")  # 1000 classes
    checkpoint = to_torch(filled_model(name, fill="zeros", num_classes=7))
    head = sorted(k for k, v in to_torch(target).items() if v.shape != checkpoint[k].shape)
    assert head and any(k.endswith(".weight") for k in head), head
    before = _values(target)
    with pytest.raises(ConversionError) as err:
        from_torch(target, checkpoint)
    for k in head:
        assert f"shape mismatch: {k}" in str(err.value), str(err.value)[:500]
    after = _values(target)
    assert all(np.array_equal(after[k], before[k]) for k in before)


MIN_INPUT_SIZE = {"googlenet": 15, "inception_v3": 75, "xception": 7}   # the others: 1


@pytest.mark.parametrize("name", _models(slow=BIG))
def test_bad_input_raises_value_error(name):
    m = abstract_model(name)
    size = max(m.min_input_size, 8)
    cases = [np.zeros((1, 3, size, size + 1), np.float32),  # NCHW
             np.zeros((size, size, 3), np.float32),  # no batch axis
             np.zeros((1, size, size, 3), np.int32)]  # not floating
    if m.min_input_size > 1:
        cases.append(np.zeros((1, m.min_input_size - 1, size, 3), np.float32))
    cases.append(np.zeros((1, 0, size, 3), np.float32))
    for x in cases:
        for call in (m, m.feature_maps):
            with pytest.raises(ValueError) as err:
                call(x)
            msg = str(err.value)
            assert "x" in msg and "got" in msg, msg
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\).*\(1, 3, "):
        m(cases[0])
    with pytest.raises(ValueError, match=f"at least {m.min_input_size}"):
        m(cases[-1])
    # the smallest input is the architecture's (a 6x6 Xception map empties at its second conv)
    assert m.min_input_size == MIN_INPUT_SIZE.get(name, 1)
    m.eval()
    smallest = jax.ShapeDtypeStruct((1, m.min_input_size, m.min_input_size, 3), jnp.float32)
    assert nnx.eval_shape(lambda m, x: m(x), m, smallest).shape == (1, 1000)


# ------------------------------------------------------- structure, registry, initialisers

def _torch_shape(name: str, shape: tuple) -> list[int]:
    if name == "kernel" and len(shape) == 4:
        return [shape[3], shape[2], shape[0], shape[1]]
    return list(reversed(shape)) if name == "kernel" else list(shape)


@pytest.mark.parametrize("name", [n for n in MODELS if reference(n) is not None])
def test_keys_shapes_and_param_count_match_fixture(name):
    """Parameter paths / shapes are the torchvision / timm state_dict (num_batches_tracked aside)
    and the parameter count is theirs."""
    ref = reference(name)
    m = abstract_model(name)
    got = {k: _torch_shape(path[-1], v.shape) for k, (path, v) in torch_items(m).items()}
    want = {k: list(s) for k, s in ref["state_dict"].items()
            if not k.endswith("num_batches_tracked")}
    assert sorted(set(got) ^ set(want)) == []
    assert {k: s for k, s in got.items() if s != want[k]} == {}
    count = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count == ref["num_params"]


ALIASES = aliases()


def test_aliases_are_timm_and_torchvision_names():
    assert ALIASES == {"resnext50": "resnext50_32x4d", "resnext152": "resnext152_32x4d",
                       "legacy_xception": "xception", "mobilenetv1_100": "mobilenet_v1"}



@pytest.mark.parametrize("alias", [pytest.param(a, marks=[pytest.mark.slow] if ALIASES[a] in BIG
                                                else []) for a in sorted(ALIASES)])
def test_aliases_build_their_canonical_model(alias):
    a, c = abstract_model(alias), abstract_model(ALIASES[alias])
    assert type(a) is type(c)
    assert set(torch_items(a)) == set(torch_items(c))


@pytest.mark.parametrize("name", _models(slow=BIG))
def test_num_classes_and_drop_rate_reach_the_head(name):
    m = abstract_model(name, num_classes=7, drop_rate=0.3)
    assert m.dropout.rate == 0.3
    outs = [k for k, (_, v) in torch_items(m).items() if k.endswith("bias") and v.shape == (7,)]
    assert outs, f"{name}: no 7-class head"


# Initialisers of the families in this file's care: (module class, conv kernel std).
def _kaiming_fan_out_std(conv) -> float:
    kh, kw = conv.kernel_size
    return math.sqrt(2.0 / (kh * kw * conv.out_channels))


def _tf_fan_out_std(conv) -> float:
    kh, kw = conv.kernel_size
    return math.sqrt(2.0 / (kh * kw * conv.out_channels // conv.groups))


INIT = {ResNeXt: _kaiming_fan_out_std, MobileNetV1: _tf_fan_out_std, Xception: _kaiming_fan_out_std}


@pytest.fixture(scope="module")
def initialised(request):
    """Really initialised models (slow to build); a small ResNeXt with zero_init_residual stands
    in for its family."""
    if request.param == "resnext":
        return ResNeXt((1, 2, 1, 1), 4, 8, num_classes=NUM_CLASSES, zero_init_residual=True,
                       rngs=nnx.Rngs(0))
    return create_model(request.param, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("initialised", ["resnext", "mobilenet_v1", "xception"], indirect=True)
def test_initialisers_follow_the_reference(initialised):
    """Conv kernels N(0, std) untruncated with the reference's fan-out, BN weight 1 / bias 0
    (ResNeXt's zero_init_residual: each block's bn3 weight 0), the classifier as the reference
    (torch default; MobileNet: U(+-1/sqrt(classes)), bias 0)."""
    m = initialised
    std_of = INIT[type(m)]
    zeroed = ({id(b.bn3) for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer}
              if isinstance(m, ResNeXt) else set())
    assert len(zeroed) == (5 if isinstance(m, ResNeXt) else 0)
    big_tail = False
    for path, mod in nnx.iter_modules(m):
        where = ".".join(map(str, path))
        if isinstance(mod, nn.Conv2d):
            w = np.asarray(mod.kernel[...])
            std = std_of(mod)
            assert mod.bias is None, where
            if w.size >= 8192:   # mean within 0.05 std: ~4.5 standard errors
                assert abs(w.std() / std - 1) < 0.05, (where, w.std(), std)
                assert abs(w.mean()) < 0.05 * std, where
                big_tail |= np.abs(w).max() > 3.5 * std  # a 2-sigma truncation never does
        elif isinstance(mod, nn.BatchNorm2d):
            scale = 0 if id(mod) in zeroed else 1
            assert (np.asarray(mod.scale[...]) == scale).all(), where
            assert (np.asarray(mod.bias[...]) == 0).all(), where
            assert (np.asarray(mod.mean[...]) == 0).all() and (np.asarray(mod.var[...]) == 1).all()
    assert big_tail, "conv kernels look truncated"
    head = m.classifier if isinstance(m, MobileNetV1) else m.fc
    w, b = np.asarray(head.kernel[...]), np.asarray(head.bias[...])
    if isinstance(m, MobileNetV1):
        bound = 1 / math.sqrt(NUM_CLASSES)
        assert (b == 0).all()
    else:
        bound = 1 / math.sqrt(head.in_features)
        assert 0 < np.abs(b).max() <= bound
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.05
