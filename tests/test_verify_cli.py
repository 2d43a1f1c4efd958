"""python -m jaxconv.verify: exit status 0 on agreement, non-zero on any failure."""
import torch

import torch_ref
from jaxconv.verify.__main__ import main
from jaxconv.verify.ops import CASES


def test_ops_table_passes(capsys):
    assert main(["--ops"]) == 0
    out = capsys.readouterr().out
    assert len(CASES) == 42 and f"{len(CASES)} passed, 0 failed" in out and "FAIL" not in out.replace("0 failed", "")


def test_model_with_checkpoint_passes(tmp_path, capsys):
    torch.manual_seed(1)
    torch.save({"state_dict": torch_ref.create_model("mobilenet_v1").state_dict()}, tmp_path / "m.pth")
    assert main(["--model", "mobilenet_v1", "--checkpoint", str(tmp_path / "m.pth"),
                 "--size", "64", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "blocks.4" in out and "top-1 agreement 2/2" in out and "PASS" in out


def test_wrong_checkpoint_and_unknown_model_fail(tmp_path, capsys):
    torch.save(torch_ref.create_model("mobilenet_v1", num_classes=10).state_dict(), tmp_path / "m.pth")
    assert main(["--model", "mobilenet_v1", "--checkpoint", str(tmp_path / "m.pth"), "--size", "64"]) == 1
    assert "classifier.weight" in capsys.readouterr().err
    assert main(["--model", "resnet50"]) == 1
    assert "unknown model 'resnet50'" in capsys.readouterr().err
