"""torch_ref.models: state_dict keys/shapes/param counts equal torchvision 0.28 / timm 1.0
(fixture), the registry, the output contract, feature maps and input checks.

Key/shape tests build the models on the meta device (no memory, no init cost); forward tests use
small inputs and num_classes=10 so the file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re

import pytest
import torch
from torch import nn

from tests.helpers import AUX_PREFIXES, FIXTURE, num_params
from torch_ref import create_model, list_models, register_model
from torch_ref.models import googlenet as googlenet_mod

REFERENCE = json.loads(FIXTURE.read_text())

CANONICAL = ["googlenet", "inception_v3", "mobilenet_v1", "resnext101_32x8d", "resnext101_64x4d",
             "resnext152_32x4d", "resnext50_32x4d", "resnext50_32x4d_dcn", "xception"]
# one model per family, for the forward tests that need not see every depth variant
PER_FAMILY = ["resnext50_32x4d", "googlenet", "inception_v3", "xception", "mobilenet_v1"]
# a small valid (non-square) input per family
SMALL_HW = {"resnext": (64, 96), "googlenet": (64, 96), "inception_v3": (75, 107),
            "xception": (71, 87), "mobilenet_v1": (64, 96)}
NUM_CLASSES = 10


def _family(name: str) -> str:
    return "resnext" if name.startswith("resnext") else name


def _meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _model(name: str, aux_logits: bool = True) -> nn.Module:
    """A real model with 10 classes, built once per configuration; tests set train/eval
    themselves and restore any attribute they change."""
    return _cached_model(name, aux_logits)


@functools.lru_cache(maxsize=None)
def _cached_model(name: str, aux_logits: bool) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {} if aux_logits else {"aux_logits": False}
    return create_model(name, num_classes=NUM_CLASSES, **kwargs)


@contextlib.contextmanager
def _patched(obj, **attrs):
    """Temporarily set attributes (e.g. a cached model's transform_input or dropout.p)."""
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield obj
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def _input(name: str, batch: int = 3) -> torch.Tensor:
    h, w = SMALL_HW[_family(name)]
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _assert_same_state_dict(got: dict[str, list[int]], want: dict[str, list[int]]) -> None:
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    assert not missing and not unexpected, (
        f"missing keys ({len(missing)}): {missing[:20]}; unexpected keys ({len(unexpected)}): "
        f"{unexpected[:20]}")
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"shape mismatches (got, want): {wrong}"


# ------------------------------------------------------------------ state dicts vs fixture

@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_state_dict_matches_reference(name):
    ref = REFERENCE[name]
    model = _meta_model(name)
    _assert_same_state_dict(_shapes(model), ref["state_dict"])
    assert num_params(model) == ref["num_params"]


def _resnext_param_count(layers, groups, width_per_group, num_classes=1000) -> int:
    """Independent count for torchvision's ResNet with bottlenecks, from the paper's table."""
    n = 3 * 64 * 7 * 7 + 2 * 64                                  # stem conv + BN
    in_chs = 64
    for planes, depth in zip((64, 128, 256, 512), layers):
        width = planes * width_per_group // 64 * groups
        out = planes * 4
        for j in range(depth):
            n += in_chs * width + 2 * width                      # 1x1 reduce + BN
            n += width * (width // groups) * 9 + 2 * width       # 3x3 grouped + BN
            n += width * out + 2 * out                           # 1x1 expand + BN
            if j == 0:
                n += in_chs * out + 2 * out                      # downsample conv + BN
            in_chs = out
    return n + in_chs * num_classes + num_classes               # fc


@pytest.mark.parametrize("name, layers, groups, wpg", [
    ("resnext50_32x4d", [3, 4, 6, 3], 32, 4),
    ("resnext101_32x8d", [3, 4, 23, 3], 32, 8),
    ("resnext101_64x4d", [3, 4, 23, 3], 64, 4),
])
def test_resnext_param_formula_reproduces_fixture(name, layers, groups, wpg):
    # validates the formula used for resnext152_32x4d, which has no fixture
    assert _resnext_param_count(layers, groups, wpg) == REFERENCE[name]["num_params"]


def test_resnext152_params_and_keys():
    model = _meta_model("resnext152_32x4d")
    # torchvision publishes no number for this config: independent formula count (the formula
    # reproduces the three torchvision fixtures above); it agrees with the 59.95M that
    # mmpretrain's model zoo lists for ResNeXt-32x4d-152 (same layout, stride on the 3x3).
    assert num_params(model) == _resnext_param_count([3, 8, 36, 3], 32, 4) == 59_951_400
    # keys: resnext50's, with layer2 / layer3 blocks repeated up to 8 / 36 (same shapes)
    r50 = REFERENCE["resnext50_32x4d"]["state_dict"]
    depth = {"layer1": 3, "layer2": 8, "layer3": 36, "layer4": 3}
    want = {}
    for key, shape in r50.items():
        m = re.match(r"(layer\d)\.(\d+)\.(.*)", key)
        if m is None:
            want[key] = shape
        elif m.group(2) == "1":                                  # template for blocks 1..n-1
            for i in range(1, depth[m.group(1)]):
                want[f"{m.group(1)}.{i}.{m.group(3)}"] = shape
        elif m.group(2) == "0":
            want[key] = shape
    _assert_same_state_dict(_shapes(model), want)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_aux_logits_false_removes_aux_keys(name):
    aux_prefixes = AUX_PREFIXES[name]
    full = REFERENCE[name]["state_dict"]
    assert any(k.startswith(aux_prefixes) for k in full)
    want = {k: v for k, v in full.items() if not k.startswith(aux_prefixes)}
    _assert_same_state_dict(_shapes(_meta_model(name, aux_logits=False)), want)


# ------------------------------------------------------------------------------- registry

def test_list_models_and_aliases():
    assert list_models() == CANONICAL
    for alias, canonical in [("resnext50", "resnext50_32x4d"), ("resnext152", "resnext152_32x4d"),
                             ("legacy_xception", "xception"), ("mobilenetv1_100", "mobilenet_v1")]:
        a, c = _meta_model(alias), _meta_model(canonical)
        assert type(a) is type(c)
        assert _shapes(a) == _shapes(c)
    # the fixture's timm names are accepted as they are
    assert set(REFERENCE) - set(CANONICAL) == {"legacy_xception", "mobilenetv1_100"}


def test_unknown_model_raises_listing_known_names():
    with pytest.raises(ValueError, match="unknown model name 'resnet50'") as info:
        create_model("resnet50")
    for name in CANONICAL:
        assert name in str(info.value)


def test_bad_num_classes_raises():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mobilenet_v1", num_classes=0)


def test_register_model_rejects_duplicates():
    def googlenet(**kwargs):  # same name as a registered model
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="already registered"):
        register_model(googlenet)
    assert list_models() == CANONICAL


def test_num_classes_and_default_drop_rates():
    model = _meta_model("googlenet", num_classes=7)
    assert model.fc.weight.shape == (7, 1024)
    assert model.aux1.fc2.weight.shape == (7, 1024) and model.aux2.fc2.weight.shape == (7, 1024)
    assert _meta_model("inception_v3", num_classes=7).AuxLogits.fc.weight.shape == (7, 768)
    defaults = {"googlenet": 0.2, "inception_v3": 0.5, "resnext50_32x4d": 0.0,
                "xception": 0.0, "mobilenet_v1": 0.0}
    for name, p in defaults.items():
        assert _meta_model(name).dropout.p == p, name
        assert _meta_model(name, drop_rate=0.3).dropout.p == 0.3, name
    for name in ("googlenet", "inception_v3"):
        assert _meta_model(name).transform_input is False
        assert _meta_model(name, transform_input=True).transform_input is True


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("name", list_models())
def test_eval_forward_gives_finite_logits(name):
    model = _model(name).eval()
    with torch.no_grad():
        out = model(_input(name, batch=2))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnext50_32x4d", "xception", "mobilenet_v1"])
def test_train_forward_without_aux_heads_gives_logits(name):
    model = _model(name).train()
    try:
        with torch.no_grad():
            out = model(_input(name, batch=2))
    finally:
        model.eval()
    assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_CLASSES)


def test_googlenet_train_returns_named_heads():
    model = _model("googlenet").train()
    try:
        with torch.no_grad():
            out = model(_input("googlenet", batch=2))
    finally:
        model.eval()
    assert isinstance(out, dict) and list(out) == ["logits", "aux1", "aux2"]
    for v in out.values():
        assert v.shape == (2, NUM_CLASSES) and torch.isfinite(v).all()


def test_inception_v3_train_returns_named_heads_at_299():
    model = _model("inception_v3").train()
    try:
        with torch.no_grad():
            out = model(torch.randn(2, 3, 299, 299))
            with pytest.raises(ValueError, match="aux head"):
                model(_input("inception_v3", batch=2))     # aux needs >= 299
    finally:
        model.eval()
    assert isinstance(out, dict) and list(out) == ["logits", "aux"]
    for v in out.values():
        assert v.shape == (2, NUM_CLASSES) and torch.isfinite(v).all()


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_without_aux_logits_loads_trimmed_checkpoint_and_returns_tensor(name):
    full, model = _model(name), _model(name, aux_logits=False)
    # what torchvision users do: a checkpoint minus its aux heads loads strictly ...
    trimmed = {k: v for k, v in full.state_dict().items()
               if not k.startswith(AUX_PREFIXES[name])}
    model.load_state_dict(trimmed, strict=True)
    x = _input(name, batch=2)
    with torch.no_grad():
        # ... and gives the same eval logits (aux heads never touch the main path)
        torch.testing.assert_close(model.eval()(x), full.eval()(x), rtol=1e-6, atol=0)
        try:
            out = model.train()(x)
        finally:
            model.eval()
    assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", PER_FAMILY)
def test_drop_rate_is_dropout_right_before_classifier(name):
    # p=1 zeroes the pooled features in train mode: the logits are the classifier bias
    # (drop_rate -> model.dropout.p is checked in test_num_classes_and_default_drop_rates)
    model = _model(name, aux_logits=name != "inception_v3").train()   # v3 aux needs 299
    try:
        with torch.no_grad(), _patched(model.dropout, p=1.0):
            out = model(_input(name, batch=2))
    finally:
        model.eval()
    if isinstance(out, dict):
        out = out["logits"]
    head = model.classifier if name == "mobilenet_v1" else model.fc
    torch.testing.assert_close(out, head.bias.expand(2, -1), rtol=0, atol=0)


# ------------------------------------------------------------------------ feature maps

# name -> [(feature name, channels, (H, W) for the family's SMALL_HW input)]
FEATURES = {   # timm's feature levels (googlenet, not in timm: its stages' ends)
    "resnext50_32x4d": [("act1", 64, (32, 48)), ("layer1", 256, (16, 24)),
                        ("layer2", 512, (8, 12)), ("layer3", 1024, (4, 6)),
                        ("layer4", 2048, (2, 3))],
    "googlenet": [("conv1", 64, (32, 48)), ("conv3", 192, (16, 24)),
                  ("inception3b", 480, (8, 12)), ("inception4e", 832, (4, 6)),
                  ("inception5b", 1024, (2, 3))],
    # unpadded stem: 75x107 -> 37x53 -> 35x51 -> 17x25 -> 15x23 | 7x11 | 3x5 | 1x2
    "inception_v3": [("Conv2d_2b_3x3", 64, (35, 51)), ("Conv2d_4a_3x3", 192, (15, 23)),
                     ("Mixed_5d", 288, (7, 11)), ("Mixed_6e", 768, (3, 5)),
                     ("Mixed_7c", 2048, (1, 2))],
    # unpadded stem: 71x87 -> 35x43 -> 33x41, then pad-1 stride-2 max pools; blockN.rep.0 is
    # the ReLU of block N-1's output
    "xception": [("act2", 64, (33, 41)), ("block2.rep.0", 128, (17, 21)),
                 ("block3.rep.0", 256, (9, 11)), ("block12.rep.0", 728, (5, 6)),
                 ("act4", 2048, (3, 3))],
    "mobilenet_v1": [("blocks.0", 64, (32, 48)), ("blocks.1", 128, (16, 24)),
                     ("blocks.2", 256, (8, 12)), ("blocks.3", 512, (4, 6)),
                     ("blocks.4", 1024, (2, 3))],
}


@pytest.mark.parametrize("name", PER_FAMILY)
def test_feature_maps_names_channels_sizes(name):
    model = _model(name).eval()
    x = _input(name, batch=1)
    with torch.no_grad():
        feats = model.feature_maps(x)
        logits = model(x)
    want = FEATURES[name]
    assert list(feats) == [n for n, _, _ in want]
    for fname, chs, hw in want:
        assert feats[fname].shape == (1, chs, *hw), fname
    # feature_info documents the same names and channels, and strides that fit the sizes
    assert [(n, c) for n, (c, _) in model.feature_info.items()] == [(n, c) for n, c, _ in want]
    assert [s for _, s in model.feature_info.values()] == [2, 4, 8, 16, 32]
    for fname, (_, stride) in model.feature_info.items():
        h, w = feats[fname].shape[2:]
        for got, size in ((h, x.shape[2]), (w, x.shape[3])):
            assert size / stride - 4 <= got <= math.ceil(size / stride), fname
    # the last map is what the head pools
    assert torch.isfinite(feats[want[-1][0]]).all() and logits.shape == (1, NUM_CLASSES)


def test_resnext_depth_variants_share_feature_channels():
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = _model("resnext101_64x4d").eval().feature_maps(x)
    assert [(k, v.shape[1:]) for k, v in feats.items()] == \
        [(n, (c, 32 // s, 32 // s)) for n, c, s in
         [("act1", 64, 2), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16),
          ("layer4", 2048, 32)]]


# --------------------------------------------------------------------- transform_input

@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_transform_input_renormalises_channels(name):
    model = _model(name).eval()
    x = _input(name, batch=1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model((x * std + mean - 0.5) / 0.5)
        with _patched(model, transform_input=True):
            got = model(x)
            got_feats = model.feature_maps(x)
        want_feats = model.feature_maps((x * std + mean - 0.5) / 0.5)
    # inception_v3's torchvision init (std 0.1 everywhere) gives logits ~1e4: compare relatively
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    last = list(want_feats)[-1]
    torch.testing.assert_close(got_feats[last], want_feats[last], rtol=1e-4,
                               atol=1e-5 * want_feats[last].abs().max().item())
    assert googlenet_mod.transform_input(x).shape == x.shape


# ------------------------------------------------------------------------------- init

def test_init_schemes():
    g = _model("googlenet")
    assert abs(g.inception4a.branch2[1].conv.weight.std().item() - 0.01) < 1e-3
    assert abs(g.fc.weight.std().item() - 0.01) < 2e-3
    inc = _model("inception_v3")
    assert abs(inc.Mixed_6b.branch7x7_2.conv.weight.std().item() - 0.1) < 5e-3
    assert abs(inc.AuxLogits.fc.weight.std().item() - 0.001) < 2e-4
    mob = _model("mobilenet_v1")
    assert abs(mob.blocks[3][0].conv_dw.weight.std().item() - math.sqrt(2 / 9)) < 0.03
    assert 0.9 / math.sqrt(NUM_CLASSES) < mob.classifier.weight.abs().max() <= 1 / math.sqrt(NUM_CLASSES)
    assert (mob.classifier.bias == 0).all()
    r = _model("resnext50_32x4d")
    w = r.layer3[0].conv2.weight                                 # fan_out = 512 * 9
    assert abs(w.std().item() - math.sqrt(2 / (w.shape[0] * 9))) < 2e-3
    x = _model("xception")
    w = x.conv4.pointwise.weight                                 # fan_out = 2048 * 1 * 1
    assert abs(w.std().item() / math.sqrt(2 / w.shape[0]) - 1) < 0.02
    for m in (g, inc, mob, r, x):
        for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
            assert (bn.weight == 1).all() and (bn.bias == 0).all()
    eps = {"googlenet": 1e-3, "inception_v3": 1e-3, "resnext50_32x4d": 1e-5,
           "xception": 1e-5, "mobilenet_v1": 1e-5}
    for name, e in eps.items():
        assert {mod.eps for mod in _meta_model(name).modules()
                if isinstance(mod, nn.BatchNorm2d)} == {e}, name


def test_zero_init_residual():
    model = create_model("resnext50_32x4d", num_classes=NUM_CLASSES, zero_init_residual=True)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
              for b in layer]
    assert all((b.bn3.weight == 0).all() and (b.bn2.weight == 1).all() for b in blocks)


# ------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name, shape, match", [
    ("resnext50_32x4d", (3, 32, 32), r"\(N, 3, H, W\)"),
    ("mobilenet_v1", (1, 1, 32, 32), r"\(N, 3, H, W\)"),
    ("googlenet", (1, 3, 14, 64), "at least 15x15"),
    ("inception_v3", (1, 3, 75, 74), "at least 75x75"),
    ("xception", (1, 3, 6, 6), "at least 7x7"),
])
def test_bad_input_raises_value_error(name, shape, match):
    with pytest.raises(ValueError, match=match):
        _model(name).eval()(torch.zeros(shape))


@pytest.mark.parametrize("name, hw", [("googlenet", (15, 15)), ("inception_v3", (75, 75)),
                                      ("xception", (7, 7)), ("mobilenet_v1", (1, 1))])
def test_minimum_input_size_works(name, hw):
    with torch.no_grad():
        assert _model(name).eval()(torch.randn(1, 3, *hw)).shape == (1, NUM_CLASSES)


def test_resnext50_dcn_is_resnext50_plus_offset_convs():
    """The DCN variant keeps every torchvision key and shape and adds, for each of the 13 blocks
    of layer2-layer4, the conv_offset (3 x 3x3 taps = 27 channels) of a modulated deform conv."""
    dcn = _shapes(_meta_model("resnext50_32x4d_dcn"))
    extra = {k: v for k, v in dcn.items() if k not in REFERENCE["resnext50_32x4d"]["state_dict"]}
    _assert_same_state_dict({k: v for k, v in dcn.items() if k not in extra},
                            REFERENCE["resnext50_32x4d"]["state_dict"])
    expected = {}
    for layer, (blocks, width) in {"layer2": (4, 256), "layer3": (6, 512), "layer4": (3, 1024)}.items():
        for b in range(blocks):
            expected[f"{layer}.{b}.conv2.conv_offset.weight"] = [27, width, 3, 3]
            expected[f"{layer}.{b}.conv2.conv_offset.bias"] = [27]
    assert extra == expected
    model = create_model("resnext50_32x4d_dcn")
    assert all(not m.conv_offset.weight.detach().any() for m in model.modules()
               if hasattr(m, "conv_offset"))
    assert num_params(model) == REFERENCE["resnext50_32x4d"]["num_params"] + sum(
        math.prod(s) for s in expected.values())
