"""python -m jaxconv.verify: exit status 0 on agreement, non-zero on any failure."""
import jax
import pytest
import torch
from flax import nnx

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


@pytest.mark.parametrize("wrt", [0, 1, 2], ids=["x", "weight", "bias"])
def test_wrong_gradients_fail(monkeypatch, wrt):
    """An op whose forward is exact but one of whose gradients is 0.1% off fails every float32
    conv2d case that has that gradient: the verdict covers each gradient, not only the output."""
    from jaxconv import ops
    from jaxconv.verify.ops import run_case
    conv2d = ops.conv2d

    def off(*args, **kwargs):
        args = list(args)
        if wrt < len(args):   # value unchanged, its cotangent scaled by 1.001
            args[wrt] = args[wrt] + 1e-3 * (args[wrt] - jax.lax.stop_gradient(args[wrt]))
        return conv2d(*args, **kwargs)
    cases = [c for c in CASES if c.op == "conv2d" and c.dtype == "float32" and c.x[0] > 0
             and (wrt < 2 or c.bias)]
    assert len(cases) >= 5
    base = [run_case(case) for case in cases]
    monkeypatch.setattr(ops, "conv2d", off)
    for case, before in zip(cases, base):
        result = run_case(case)
        assert before.passed and not result.passed and result.forward == before.forward, \
            (case, before, result)


def test_wrong_numbers_fail(monkeypatch, capsys):
    """The CLI fails on numbers, not only on exceptions: conv2d 0.1% off fails every float32
    conv2d case with an output (and nothing else); a jaxconv model with one BatchNorm's eps at
    1e-3 instead of torch's 1e-5 fails --model."""
    from jaxconv import nn, ops
    from jaxconv.models import registry
    conv2d = ops.conv2d
    monkeypatch.setattr(ops, "conv2d", lambda *a, **k: conv2d(*a, **k) * 1.001)
    assert main(["--ops"]) == 1
    out = capsys.readouterr().out
    wrong = sum(c.op == "conv2d" and c.dtype == "float32" and c.x[0] > 0 for c in CASES)
    assert wrong >= 10 and f"{len(CASES) - wrong} passed, {wrong} failed" in out
    monkeypatch.setattr(ops, "conv2d", conv2d)

    create_model = registry.create_model

    def off_by_eps(*args, **kwargs):
        model = create_model(*args, **kwargs)
        next(m for _, m in nnx.iter_modules(model) if isinstance(m, nn.BatchNorm2d)).eps = 1e-3
        return model
    monkeypatch.setattr(registry, "create_model", off_by_eps)
    assert main(["--model", "mobilenet_v1", "--size", "64", "--batch", "2"]) == 1
    assert "FAIL" in capsys.readouterr().out
