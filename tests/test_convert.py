"""Checkpoint IO and strict conversion: containers, truncated files, wrong models, all-or-nothing."""
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref.blocks as tblocks
from jaxconv.convert import ConversionError, from_torch, load_checkpoint, load_weights, save_weights, to_torch
from jaxconv.convert.__main__ import main as convert_main
from jaxconv.nn import blocks
from tests.helpers import randomise_torch_bn


def _pair():
    torch.manual_seed(0)
    return tblocks.ResNeXtBlockC(8, 16, 4, 2, 2), blocks.ResNeXtBlockC(8, 16, 4, 2, 2, rngs=nnx.Rngs(1))


def _snapshot(model):
    return {k: v.copy() for k, v in to_torch(model).items()}


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": {"module." + k: v for k, v in sd.items()}, "optimizer": {}},
    lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
], ids=["plain", "state_dict", "model+module.", "compiled"])
def test_load_checkpoint_unwraps_containers(tmp_path, wrap):
    tmod, jmod = _pair()
    torch.save(wrap(tmod.state_dict()), tmp_path / "ckpt.pth")
    sd = load_checkpoint(tmp_path / "ckpt.pth")
    assert set(sd) == set(tmod.state_dict())
    from_torch(jmod, sd)
    np.testing.assert_array_equal(to_torch(jmod)["conv2.weight"], tmod.conv2.weight.detach().numpy())


def test_load_checkpoint_safetensors_without_torch(tmp_path):
    from safetensors.numpy import save_file
    tmod, _ = _pair()
    save_file({k: v.numpy() for k, v in tmod.state_dict().items()}, tmp_path / "w.safetensors")
    assert set(load_checkpoint(tmp_path / "w.safetensors")) == set(tmod.state_dict())


def test_truncated_and_missing_files_raise(tmp_path):
    tmod, _ = _pair()
    torch.save(tmod.state_dict(), tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:300])
    with pytest.raises(ConversionError, match=r"path: cannot read torch checkpoint .*cut.pth"):
        load_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(ConversionError, match=r"path: no checkpoint file at .*nothere.pth"):
        load_checkpoint(tmp_path / "nothere.pth")
    # torch's legacy format, cut inside its last storage: the bytes past the end are not read
    torch.save(tmod.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "legacy_cut.pth").write_bytes((tmp_path / "legacy.pth").read_bytes()[:-10])
    with pytest.raises(ConversionError, match=r"legacy_cut.pth' is truncated \(storage"):
        load_checkpoint(tmp_path / "legacy_cut.pth")


def test_wrong_model_reports_every_key_and_leaves_model_untouched():
    _, jmod = _pair()
    before = _snapshot(jmod)
    other = tblocks.ResNeXtBlockC(16, 16, 4, 2).state_dict()  # no downsample, conv1 16 in
    other["bn1.extra"] = torch.zeros(1)
    with pytest.raises(ConversionError) as e:
        from_torch(jmod, other)
    msg = str(e.value)
    assert "missing in checkpoint: downsample.0.weight" in msg
    assert "unexpected in checkpoint: bn1.extra" in msg
    assert "shape mismatch: conv1.weight: checkpoint (8, 16, 1, 1) vs model (8, 8, 1, 1)" in msg
    after = _snapshot(jmod)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_non_strict_tolerates_missing_keys_not_shapes():
    tmod, jmod = _pair()
    sd = {k: v for k, v in tmod.state_dict().items() if not k.startswith("downsample")}
    from_torch(jmod, sd, strict=False)
    np.testing.assert_array_equal(to_torch(jmod)["conv1.weight"], tmod.conv1.weight.detach().numpy())
    sd["conv1.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(ConversionError, match="shape mismatch: conv1.weight"):
        from_torch(jmod, sd, strict=False)


def test_jaxconv_weights_round_trip_and_mismatch(tmp_path):
    tmod, jmod = _pair()
    from_torch(jmod, tmod.state_dict())
    save_weights(jmod, tmp_path / "w.safetensors")
    fresh = load_weights(blocks.ResNeXtBlockC(8, 16, 4, 2, 2, rngs=nnx.Rngs(7)), tmp_path / "w.safetensors")
    a, b = to_torch(jmod), to_torch(fresh)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    wrong = blocks.ResNeXtBlockC(16, 16, 4, 2, rngs=nnx.Rngs(7))
    before = _snapshot(wrong)
    with pytest.raises(ConversionError, match="unexpected in checkpoint: downsample.0.kernel"):
        load_weights(wrong, tmp_path / "w.safetensors")
    after = _snapshot(wrong)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_convert_cli_round_trip_is_lossless(tmp_path):
    """torch .pth -> jaxconv .safetensors -> torch .pth through the CLI, bit for bit."""
    import torch_ref
    tmodel = torch_ref.create_model("mobilenet_v1", num_classes=10)
    randomise_torch_bn(tmodel)
    torch.save({"state_dict": tmodel.state_dict()}, tmp_path / "src.pth")
    assert convert_main(["mobilenet_v1", str(tmp_path / "src.pth"), str(tmp_path / "jax.safetensors"),
                         "--num-classes", "10"]) == 0
    from safetensors.numpy import load_file
    mid = load_file(tmp_path / "jax.safetensors")   # jaxconv's layout: HWIO, (in, out), names
    assert "conv_stem.weight" not in mid and "classifier.weight" not in mid
    np.testing.assert_array_equal(mid["conv_stem.kernel"],
                                  tmodel.conv_stem.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(mid["classifier.kernel"],
                                  tmodel.classifier.weight.detach().numpy().T)
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                         ("var", "running_var")):
        np.testing.assert_array_equal(mid[f"bn1.{ours}"], getattr(tmodel.bn1, theirs).detach().numpy())
    assert convert_main(["mobilenet_v1", str(tmp_path / "jax.safetensors"), str(tmp_path / "back.pth"),
                         "--to-torch", "--num-classes", "10"]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    expected = {k: v for k, v in tmodel.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    torch_ref.create_model("mobilenet_v1", num_classes=10).load_state_dict(back, strict=True)


def test_convert_cli_wrong_head_fails_naming_the_key(tmp_path, capsys):
    import torch_ref
    torch.save(torch_ref.create_model("mobilenet_v1", num_classes=10).state_dict(), tmp_path / "src.pth")
    assert convert_main(["mobilenet_v1", str(tmp_path / "src.pth"), str(tmp_path / "out.safetensors"),
                         "--num-classes", "1000"]) == 1
    err = capsys.readouterr().err
    assert "shape mismatch: classifier.weight: checkpoint (10, 1024) vs model (1000, 1024)" in err
    assert not (tmp_path / "out.safetensors").exists()
