"""timm's model contract for every registered model (timm's tests/test_models.py is the model):
forward_features / forward_head consistency, pre_logits, num_classes=0 and global_pool='',
reset_classifier, features_only channels / reductions / module names (timm's own for the models
timm has), gradient checkpointing (same outputs and gradients), every parameter reached by the
gradient, and batch 0 through every model, forward and backward, eval and train.

Models are filled from numpy (no initialisers), inputs small, the big variants and the
deformable ResNeXt under -m slow; each model's checks share one compiled function."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxconv import config
from jaxconv.models import create_model, list_models
from jaxconv.models.registry import spec
from tests.helpers import HEAVY, abstract_model, filled_model, heads, params

MODELS = list_models()
NUM_CLASSES = 7
# timm 1.0's feature_info module names, channels and reductions (timm/models/resnet.py,
# xception.py, efficientnet.py (mobilenetv1_100), inception_v3.py); GoogLeNet (not in timm):
# torchvision's module names at the same five strides
RESNEXT_FEATURES = [("act1", 64, 2), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16),
                    ("layer4", 2048, 32)]
FEATURES = {
    **{n: RESNEXT_FEATURES for n in ("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                                     "resnext152_32x4d", "resnext50_32x4d_dcn")},
    "googlenet": [("conv1", 64, 2), ("conv3", 192, 4), ("inception3b", 480, 8),
                  ("inception4e", 832, 16), ("inception5b", 1024, 32)],
    "xception": [("act2", 64, 2), ("block2.rep.0", 128, 4), ("block3.rep.0", 256, 8),
                 ("block12.rep.0", 728, 16), ("act4", 2048, 32)],
    "mobilenet_v1": [("blocks.0", 64, 2), ("blocks.1", 128, 4), ("blocks.2", 256, 8),
                     ("blocks.3", 512, 16), ("blocks.4", 1024, 32)],
    "inception_v3": [("Conv2d_2b_3x3", 64, 2), ("Conv2d_4a_3x3", 192, 4), ("Mixed_5d", 288, 8),
                     ("Mixed_6e", 768, 16), ("Mixed_7c", 2048, 32)],
}


def _input(name, batch=2):
    h = max(40, spec(name).min_input_size)
    return jnp.asarray(np.random.default_rng(0).standard_normal((batch, h, h + 8, 3)), jnp.float32)


@pytest.fixture(scope="module")
def model(request):
    name = request.param
    m = filled_model(name, num_classes=NUM_CLASSES, drop_rate=0.0,
                     **({"aux_logits": False} if spec(name).aux_heads else {}))
    m.eval()
    yield name, m
    jax.clear_caches()


@nnx.jit
def _contract(m, x):
    feats = m.forward_features(x)
    return {"logits": m(x), "via_head": m.forward_head(feats), "features": feats,
            "pre_logits": m.forward_head(feats, pre_logits=True), "maps": m.feature_maps(x)}


@pytest.mark.parametrize("model", params(MODELS, HEAVY), indirect=True)
def test_forward_features_head_and_feature_info(model):
    name, m = model
    x = _input(name)
    with config.use_conv_lowering("xla"):
        out = _contract(m, x)
    n = x.shape[0]
    np.testing.assert_allclose(out["via_head"], out["logits"], rtol=1e-6, atol=1e-6)
    assert out["logits"].shape == (n, NUM_CLASSES) and m.num_classes == NUM_CLASSES
    assert out["features"].shape[-1] == m.num_features and out["features"].ndim == 4
    assert out["pre_logits"].shape == (n, m.num_features)
    info = m.feature_info
    assert list(out["maps"]) == info.module_name() and len(info) == len(spec(name).feature_info)
    for f, c, r in zip(out["maps"].values(), info.channels(), info.reduction()):
        assert f.shape[-1] == c and 0 < f.shape[1] <= -(-x.shape[1] // r), (name, f.shape, c, r)
    np.testing.assert_array_equal(list(out["maps"].values())[-1], out["features"])
    assert list(zip(info.module_name(), info.channels(), info.reduction())) == FEATURES[name]


def test_every_model_has_its_expected_feature_levels():
    assert set(FEATURES) == set(MODELS)


@pytest.mark.parametrize("name", params(MODELS, HEAVY))
def test_num_classes_zero_global_pool_and_reset_classifier(name):
    """num_classes=0: pooled features; global_pool='': the unpooled map; reset_classifier to
    another count and back to none (timm's semantics), all without running initialisers but
    the new head's."""
    x = _input(name, batch=1)
    m = filled_model(name, num_classes=0)
    m.eval()
    fn = jax.eval_shape   # shapes are the contract; values are checked above
    assert getattr(m, spec(name).classifier) is None
    assert fn(lambda x: m(x), x).shape == (1, m.num_features)
    m.reset_classifier(0, global_pool="")
    assert fn(lambda x: m(x), x).shape[-1] == m.num_features and fn(lambda x: m(x), x).ndim == 4
    m.reset_classifier(5)
    assert fn(lambda x: m(x), x).shape == (1, 5) and m.num_classes == 5
    with pytest.raises(ValueError, match="global_pool: expected 'avg' or ''"):
        m.reset_classifier(5, global_pool="max")


@pytest.mark.parametrize("name", MODELS)   # abstract: cheap for the big models too
def test_features_only(name):
    x = _input(name, batch=1)
    m = nnx.eval_shape(lambda: create_model(name, features_only=True, out_indices=(1, -1)))
    m.eval()
    levels = spec(name).feature_info
    assert m.feature_info.channels() == [levels[1].num_chs, levels[-1].num_chs]
    assert m.feature_info.reduction() == [levels[1].reduction, levels[-1].reduction]
    assert m.feature_info.module_name() == [levels[1].module, levels[-1].module]
    assert getattr(m, spec(name).classifier) is None and m.num_classes == 0
    graphdef, state = nnx.split(m)
    maps = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert [f.shape[-1] for f in maps] == m.feature_info.channels()
    with pytest.raises(ValueError, match="out_indices: expected indices into the 5 feature levels"):
        nnx.eval_shape(lambda: create_model(name, features_only=True, out_indices=(5,)))


@pytest.mark.parametrize("name", ["resnext50_32x4d", "mobilenet_v1", "googlenet"])
def test_grad_checkpointing_changes_nothing_and_every_parameter_gets_a_gradient(name):
    x = _input(name, batch=2)
    m = filled_model(name, num_classes=NUM_CLASSES, drop_rate=0.0, seed=1)
    m.train()

    def loss(m, x):
        return sum(jnp.sum(jnp.sin(v)) for v in heads(m(x)).values())

    def jaxpr(m):   # of the gradient: a remat shows up as `remat2` (jax.checkpoint)
        graph, state = nnx.split(m)
        return str(jax.make_jaxpr(lambda s: nnx.value_and_grad(loss)(nnx.merge(graph, s), x))(state))

    with config.use_conv_lowering("xla"):
        plain = nnx.jit(nnx.value_and_grad(loss))(nnx.clone(m), x)
        assert "remat" not in jaxpr(m)
        m.set_grad_checkpointing(True)
        assert "remat" in jaxpr(m)
        remat = nnx.jit(nnx.value_and_grad(loss))(nnx.clone(m), x)
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
    flat_p = nnx.to_flat_state(plain[1])
    flat_r = dict(nnx.to_flat_state(remat[1]))
    for path, g in flat_p:
        # float32 rounding of the recomputed forward, relative to this gradient's own scale
        # (BatchNorm bias gradients are sums over every pixel, some cancelling to ~0)
        scale = float(np.max(np.abs(np.asarray(g[...]))))
        np.testing.assert_allclose(flat_r[path][...], g[...], rtol=1e-5, atol=1e-6 + 1e-5 * scale,
                                   err_msg=".".join(map(str, path)))
        if path[-1] in ("kernel", "scale"):
            assert np.any(np.asarray(g[...]) != 0), f"{name}: no gradient reaches {path}"


@pytest.mark.parametrize("model", params(MODELS, HEAVY), indirect=True)
def test_batch_zero_forward_and_backward(model):
    """An empty batch gives empty outputs of the right shape and zero gradients, in eval and
    train mode, through the default lowering (torch's behaviour: BatchNorm leaves its
    statistics alone)."""
    name, m = model
    x = _input(name, batch=0)
    for train in (False, True):
        mm = nnx.clone(m)
        mm.train() if train else mm.eval()
        graphdef, params_state, rest = nnx.split(mm, nnx.Param, ...)
        before = nnx.state(mm, nnx.BatchStat)

        def loss(p, x):
            model = nnx.merge(graphdef, p, rest)
            outs = heads(model(x))
            return sum(jnp.sum(v) for v in outs.values()), (outs, nnx.state(model, nnx.BatchStat))

        (_, (outs, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params_state, x)
        for k, v in outs.items():
            assert v.shape == (0, NUM_CLASSES), (name, train, k, v.shape)
        assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves(grads)), name
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(before), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list_models())
def test_param_dtype_sets_every_parameter(name):
    """Every model takes param_dtype (as Flax layers do): all parameters, aux heads and the
    classifiers made by reset_classifier included, are stored in it; BN statistics stay float32."""
    model = abstract_model(name, num_classes=10, param_dtype=jnp.bfloat16)
    params = nnx.state(model, nnx.Param)
    assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}, name
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))} == {jnp.dtype(jnp.float32)}
    model.reset_classifier(7)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


def test_top_level_access_as_in_timm():
    """`import jaxconv` alone gives timm's entry points and every subpackage (loaded on first
    access, in a fresh interpreter where nothing else imported them); a wrong name is an
    AttributeError naming it."""
    import os
    import subprocess
    import sys
    code = ("import sys, jaxconv\n"
            "names = ('config', 'ops', 'nn', 'models', 'convert', 'predict', 'summary', 'verify')\n"
            "assert not [n for n in names if 'jaxconv.' + n in sys.modules]\n"
            "for name in names:\n"
            "    assert getattr(jaxconv, name).__name__ == 'jaxconv.' + name\n"
            "assert jaxconv.create_model is jaxconv.models.create_model\n"
            "assert 'resnext50_32x4d' in jaxconv.list_models()\n"
            "assert 'create_model' in dir(jaxconv)\n"
            "try:\n"
            "    jaxconv.nope\n"
            "except AttributeError as e:\n"
            "    assert \"'nope'\" in str(e)\n"
            "else:\n"
            "    raise SystemExit('no AttributeError')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
