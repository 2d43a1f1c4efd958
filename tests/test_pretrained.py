"""Pretrained weights: the torch-free .pth reader, the cache and verified downloads (against a
loopback HTTP server started here: 127.0.0.1 only, stopped with the test module or after two
minutes), create_model(pretrained=...) with new heads and in_chans, the weights' records, the
eval transforms against PIL on real photos, and python -m jaxconv.predict."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref
from jaxconv.convert import ConversionError, UnsafeCheckpointError, load_checkpoint, load_weights, pth
from jaxconv.models import create_model, imagenet_classes, list_models, list_pretrained, pretrained_cfg, transforms
from jaxconv.models.registry import spec
from jaxconv.predict import main as predict_main
from tests.helpers import nchw, rand

SMALL = "mobilenet_v1"   # the cheapest model to build and run


# ------------------------------------------------------------------ the torch-free reader

@pytest.mark.parametrize("name", list_models())
def test_pth_reader_equals_torch_load_bit_for_bit(tmp_path, name):
    with torch.device("meta"):
        shapes = torch_ref.create_model(name).state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point()
              else torch.zeros(v.shape, dtype=v.dtype)) for k, v in shapes.items()}
    for legacy in (False, True):
        path = tmp_path / f"{name}-{legacy}.pth"
        torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
        ours, ref = pth.load(path), torch.load(path, weights_only=True)
        assert list(ours) == list(ref)
        for k, v in ref.items():
            assert ours[k].dtype == v.numpy().dtype and np.array_equal(ours[k], v.numpy()), k


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pth_reader_dtypes_views_parameters_and_wrappers(tmp_path, legacy):
    base = torch.randn(20)   # tensors that share one storage, at offsets into it
    sd = {"bf16": torch.randn(3, 4).bfloat16(), "view": torch.randn(5, 3).t(),
          "param": torch.nn.Parameter(torch.randn(2)), "scalar": torch.tensor(7),
          "half": torch.randn(2, 2).half(), "head": base[:4], "offset": base[6:12].view(2, 3),
          "offset_t": base[8:14].view(2, 3).t(), "offset_scalar": base[17]}
    torch.save({"model_state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt",
               _use_new_zipfile_serialization=not legacy)
    got = pth.load(tmp_path / "ckpt.pt")["model_state_dict"]
    for k, v in sd.items():
        want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        assert got[k].shape == want.shape and np.array_equal(np.asarray(got[k], want.dtype), want), k
    assert got["bf16"].dtype.name == "bfloat16"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload", [_Evil(), torch.nn.Linear(2, 2), {"f": print}],
                         ids=["os.system", "module", "builtin"])
def test_hostile_pickles_are_refused(tmp_path, payload):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": payload}, path)
    with pytest.raises(UnsafeCheckpointError, match="a weights-only load does not allow"):
        pth.load(path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)


def test_wrappers_and_layouts(tmp_path):
    """{'model_state_dict': ...} and timm's {'state_dict_ema': ...} load; a jaxconv-layout file
    handed to the torch loader says so; load_weights reads both layouts."""
    tm = torch_ref.create_model(SMALL, num_classes=10)
    sd = tm.state_dict()
    for wrapper in ("model_state_dict", "state_dict_ema"):
        torch.save({wrapper: sd, "epoch": 1}, tmp_path / f"{wrapper}.pth")
        assert set(load_checkpoint(tmp_path / f"{wrapper}.pth")) == set(sd)
    from jaxconv.convert import save_weights, to_torch

    def same_as_sd(model):
        got = to_torch(model)
        assert set(got) == {k for k in sd if not k.endswith("num_batches_tracked")}
        for k, v in got.items():
            np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)

    m = create_model(SMALL, pretrained=str(tmp_path / "state_dict_ema.pth"))
    assert m.num_classes == 10
    same_as_sd(m)
    save_weights(m, tmp_path / "jax.safetensors")
    with pytest.raises(ConversionError, match="is a jaxconv-layout file .* use load_weights|load it with"):
        load_checkpoint(tmp_path / "jax.safetensors")
    for source in ("jax.safetensors", "model_state_dict.pth"):
        fresh = create_model(SMALL, num_classes=10, rngs=None)
        load_weights(fresh, tmp_path / source)
        same_as_sd(fresh)


# ----------------------------------------------------------------- the loopback server

class _Server:
    """Serves {path: bytes} on 127.0.0.1; '/cut/...' paths send half the body and close."""

    def __init__(self, files):
        files = dict(files)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = files.get(self.path.replace("/cut/", "/"))
                if body is None:
                    self.send_error(404, "no such file")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path.startswith("/cut/") else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.stopper = threading.Timer(120, self.stop)   # bounded even if a test hangs
        self.stopper.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.stopper.cancel()


def _checkpoint_bytes(name, seed=0, **kw):
    torch.manual_seed(seed)
    tm = torch_ref.create_model(name, **kw).eval()
    buf = io.BytesIO()
    torch.save(tm.state_dict(), buf)
    return tm, buf.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCONV_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("JAXCONV_OFFLINE", raising=False)
    return tmp_path / "home" / "weights"


def test_download_verify_cache_and_failures(cache, capsys):
    tm, data = _checkpoint_bytes(SMALL, num_classes=10)
    good = f"mobilenet-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    server = _Server({f"/{good}": data, "/mobilenet-deadbeef.pth": data})
    try:
        model = create_model(SMALL, pretrained=f"{server.url}/{good}")
        model.eval()
        x = rand((2, 48, 40, 3))
        with torch.no_grad():
            ref = tm(nchw(x)).numpy()
        np.testing.assert_allclose(np.asarray(jax.jit(lambda x: model(x))(x)), ref, atol=1e-5)
        assert sorted(p.name for p in cache.iterdir()) == [good]
        # wrong hash prefix, truncated transfer, 404: clear errors, nothing left in the cache
        for url, pattern in ((f"{server.url}/mobilenet-deadbeef.pth",
                              r"failed verification: expected a sha256 starting deadbeef, got [0-9a-f]{64}"),
                             (f"{server.url}/cut/mobilenet-deadbeef.pth",
                              r"incomplete: expected \d+ bytes, got \d+|broke off"),
                             (f"{server.url}/missing-12345678.pth", "answered HTTP 404")):
            with pytest.raises(ConversionError, match=pattern) as e:
                create_model(SMALL, pretrained=url)
            assert url in str(e.value)
            assert sorted(p.name for p in cache.iterdir()) == [good], url
    finally:
        server.stop()
    # the server is gone: the cached file still serves, without the network
    again = create_model(SMALL, pretrained=f"{server.url}/{good}")
    assert again.num_classes == 10


def test_download_without_tqdm(cache, monkeypatch):
    """tqdm comes with the 'image' extra; without it downloads still work, with no bar."""
    from jaxconv.convert.hub import download
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)   # import tqdm -> ImportError
    data = b"weights" * 1000
    name = f"w-{hashlib.sha256(data).hexdigest()[:8]}.bin"
    server = _Server({f"/{name}": data})
    try:
        got = download(f"{server.url}/{name}", cache / name, sha256=name[2:10])
    finally:
        server.stop()
    assert got.read_bytes() == data


def test_offline_names_the_file_url_and_folder(cache, monkeypatch):
    monkeypatch.setenv("JAXCONV_OFFLINE", "1")
    cfg = pretrained_cfg("resnext50_32x4d.tv2_in1k")
    with pytest.raises(ConversionError) as e:
        create_model("resnext50_32x4d", pretrained=True)
    msg = str(e.value)
    assert cfg.file_name in msg and cfg.url in msg and str(cache) in msg


def test_official_file_in_the_cache_loads_with_pretrained_true(cache):
    """An air-gapped machine: the file copied into the cache under torchvision's name."""
    tm, data = _checkpoint_bytes("googlenet", transform_input=True)
    cfg = pretrained_cfg("googlenet")
    cache.mkdir(parents=True)
    (cache / cfg.file_name).write_bytes(data)
    model = create_model("googlenet", pretrained=True)
    assert model.transform_input and model.aux_logits       # what the weights need / hold
    model.eval()
    x = rand((1, 64, 64, 3))
    with torch.no_grad():
        ref = tm(nchw(x)).numpy()
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: model(x))(x)), ref, atol=1e-4)
    aux_free = create_model("googlenet", pretrained="tv_in1k", aux_logits=False)
    assert aux_free.aux1 is None


def test_new_head_and_in_chans(tmp_path, caplog):
    tm, data = _checkpoint_bytes(SMALL)
    path = tmp_path / "w.pth"
    path.write_bytes(data)
    with caplog.at_level(logging.INFO, logger="jaxconv"):
        m10 = create_model(SMALL, pretrained=str(path), num_classes=10)
    assert "classifier.weight" in caplog.text and "new head" in caplog.text
    m = create_model(SMALL, pretrained=str(path))
    assert m10.classifier.kernel.shape == (1024, 10)
    assert not np.allclose(np.asarray(m10.classifier.kernel[...][:, :1]),
                           np.asarray(m.classifier.kernel[...][:, :1]))
    np.testing.assert_array_equal(m10.blocks[2][1].conv_pw.kernel[...], m.blocks[2][1].conv_pw.kernel[...])
    w = tm.conv_stem.weight.detach().numpy()          # (32, 3, 3, 3) OIHW
    grey = create_model(SMALL, pretrained=str(path), in_chans=1)
    np.testing.assert_allclose(grey.conv_stem.kernel[...][..., 0, :], w.sum(1).transpose(1, 2, 0), rtol=1e-6)
    five = create_model(SMALL, pretrained=str(path), in_chans=5)
    five.eval()
    want = np.tile(w, (1, 2, 1, 1))[:, :5] * 3 / 5
    np.testing.assert_allclose(five.conv_stem.kernel[...], want.transpose(2, 3, 1, 0), rtol=1e-6)
    assert five(jnp.ones((1, 32, 32, 5))).shape == (1, 1000)


# -------------------------------------------------------------------------- the records

def test_every_published_weight_has_a_complete_record():
    tags = list_pretrained()
    assert {"resnext50_32x4d.tv_in1k", "resnext50_32x4d.tv2_in1k", "resnext101_32x8d.tv_in1k",
            "resnext101_32x8d.tv2_in1k", "resnext101_64x4d.tv_in1k", "googlenet.tv_in1k",
            "inception_v3.tv_in1k", "xception.tf_in1k", "mobilenet_v1.ra4_e3600_r224_in1k"} <= set(tags)
    for tag in tags:
        cfg = pretrained_cfg(tag)
        assert cfg.url.startswith("https://") and cfg.file_name and cfg.license and cfg.source
        assert 60 < cfg.top1 < 90 and cfg.top1 < cfg.top5 < 100, tag
        assert cfg.crop_size <= cfg.resize_size and cfg.interpolation in ("bilinear", "bicubic")
        assert cfg.crop_size == spec(tag.split(".")[0]).input_size, tag
        if "download.pytorch.org" in cfg.url:
            assert cfg.sha256 and cfg.file_name.endswith(f"-{cfg.sha256}.pth"), tag
    assert pretrained_cfg("resnext50_32x4d").tag == "resnext50_32x4d.tv2_in1k"     # default: V2
    assert pretrained_cfg("legacy_xception.tf_in1k").tag == "xception.tf_in1k"      # timm's name
    assert pretrained_cfg("resnext50_32x4d.tv2_in1k").resize_size == 232
    with pytest.raises(ValueError, match="unknown weights 'v9' for resnext50_32x4d"):
        pretrained_cfg("resnext50_32x4d.v9")
    with pytest.raises(ValueError, match="resnext152_32x4d has no published weights"):
        pretrained_cfg("resnext152_32x4d")
    with pytest.raises(ValueError, match="are weights of googlenet, not of resnext50_32x4d"):
        create_model("resnext50_32x4d", pretrained="googlenet.tv_in1k")
    assert len(imagenet_classes()) == 1000 and imagenet_classes()[:2] == ["tench", "goldfish"]


# ---------------------------------------------------------------------- the transforms

def _photos():
    import sklearn.datasets
    from PIL import Image
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [Image.open(os.path.join(folder, f)) for f in ("china.jpg", "flower.jpg")]


def _pil_reference(image, resize, crop, mean, std):
    """torchvision's ImageClassification on a PIL image, written out: PIL bilinear resize of the
    shorter side, centre crop (rounded offsets), [0, 1], normalise."""
    from PIL import Image
    w, h = image.size
    size = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    img = np.asarray(image.convert("RGB").resize(size[::-1], Image.BILINEAR), np.float32) / 255
    top, left = int(round((size[0] - crop) / 2)), int(round((size[1] - crop) / 2))
    return (img[top:top + crop, left:left + crop] - mean) / std


@pytest.mark.parametrize("tag", ["resnext50_32x4d.tv2_in1k", "inception_v3.tv_in1k"])
def test_transforms_match_a_pil_reference_on_photos(tag):
    t = transforms(tag)
    for image in _photos():
        want = _pil_reference(image, t.resize_size, t.crop_size, np.float32(t.mean), np.float32(t.std))
        from_pil, from_array = t(image)[0], t(np.asarray(image.convert("RGB")))[0]
        assert from_pil.shape == want.shape == (t.crop_size, t.crop_size, 3)
        np.testing.assert_allclose(from_pil, want, atol=1e-6)
        assert np.max(np.abs(from_array - want) * np.float32(t.std)) <= 1 / 255


def test_predict_cli(tmp_path, capsys):
    _, data = _checkpoint_bytes(SMALL)
    (tmp_path / "w.pth").write_bytes(data)
    import sklearn.datasets
    photo = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "china.jpg")
    assert predict_main([photo, "--model", SMALL, "--pretrained", str(tmp_path / "w.pth"),
                         "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["image"] == photo and len(rows[0]["top"]) == 5
    assert all(r["name"] == imagenet_classes()[r["class"]] for r in rows[0]["top"])
    assert abs(sum(r["probability"] for r in rows[0]["top"])) <= 1 + 1e-6
    # the five most probable classes, most probable first: softmax of the model's logits here
    from PIL import Image

    from jaxconv.models.transforms import EvalTransform
    model = create_model(SMALL, pretrained=str(tmp_path / "w.pth"))
    model.eval()
    size = spec(SMALL).input_size
    logits = np.asarray(model(EvalTransform(round(size * 256 / 224), size)(
        [Image.open(photo)]))[0], np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    want = np.argsort(-p)[:5]
    assert [r["class"] for r in rows[0]["top"]] == want.tolist()
    np.testing.assert_allclose([r["probability"] for r in rows[0]["top"]], p[want], rtol=1e-5)
    assert predict_main([photo, "--model", "nope"]) == 2
