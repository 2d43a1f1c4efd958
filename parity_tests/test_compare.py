"""jaxconv.verify.compare (in jaxconv/verify/layers.py): every registered model against its
torch_ref twin with every layer paired; planted bugs in a user's port found at the exact layer
(and nothing earlier); the report's verdicts (vanished signals are 'not tested', bounds scale
with the output); the CLI for factories defined in a test file; python -m jaxconv.verify
--model as a user of compare."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref
from jaxconv import nn
from jaxconv.models import list_models
from jaxconv.verify import compare
from jaxconv.verify.__main__ import main as verify_main
from tests import ports
from tests.helpers import HEAVY, filled_model, params, rand, randomise_torch_bn

# torch_ref modules with no jaxconv module (parameterless pooling, as functions in jaxconv)
POOLING = {"avgpool", "global_pool", "relu", "maxpool"}


def test_compare_stays_the_function_after_every_verify_module_is_imported():
    import importlib
    import pkgutil

    import jaxconv.verify
    for info in pkgutil.iter_modules(jaxconv.verify.__path__):
        importlib.import_module(f"jaxconv.verify.{info.name}")
    from jaxconv.verify import compare as again
    assert callable(again) and again is compare


@pytest.mark.parametrize("name", params(list_models(), HEAVY))
def test_every_registered_model_passes_with_every_layer_paired(name):
    torch.manual_seed(0)
    tm = torch_ref.create_model(name, num_classes=10)
    randomise_torch_bn(tm)   # BN biases keep a signal where the init's activations vanish
    jm = filled_model(name, num_classes=10, fill="zeros")
    h = max(64, jm.min_input_size)
    report = compare(tm, jm, rand((2, h, h + 8, 3)))
    assert report.passed, str(report)
    assert not report.unpaired_jax, report.unpaired_jax
    assert set(report.unpaired_torch) <= POOLING | {p for p in report.unpaired_torch
                                                   if p.rsplit(".", 1)[-1] in POOLING}
    tested = [r for r in report.layers if r.status == "pass"]
    assert len(tested) >= 0.9 * len(report.layers)       # real signal in nearly every layer


def _report(factory, **kw):
    return compare(ports.torch_net(), factory(), rand((2, 16, 20, 3)), **kw)


def test_a_correct_port_passes_in_eval_train_and_gradients():
    report = _report(ports.jax_net, train=True, grads=True)
    assert report.passed, str(report)
    assert report.first_failure is None and report.bn_stats and report.grads
    assert {r.path for r in report.grads} >= {"stem.weight", "dcn.weight", "dcn.conv_offset.weight",
                                              "fc.bias"}
    assert report.layers[0].path == "stem" and report.layers[-1].path == "fc"


@pytest.mark.parametrize("factory, layer", [
    (ports.padding_off_by_one, "block.conv1"),
    (ports.wrong_eps, "block.bn2"),
    (ports.missing_relu, "block"),
    (ports.swapped_offsets, "dcn"),
], ids=["padding", "bn-eps", "missing-relu", "dcn-dy-dx"])
def test_a_planted_bug_is_the_first_failure(factory, layer):
    """(The padding bug changes a shape, so the port cannot run through: the layers up to
    there are still compared, and the error is reported too.)"""
    report = _report(factory)
    assert not report.passed and report.first_failure == layer, str(report)
    before = report.layers[:[r.path for r in report.layers].index(layer)]
    assert before and all(r.status == "pass" for r in before), str(report)


def test_a_transposed_linear_weight_is_found_at_that_linear():
    """The user loaded the weights themselves and forgot one transpose (a square Linear)."""
    tm, jm = ports.torch_net(), ports.jax_net()
    from jaxconv.convert import from_torch
    from_torch(jm, tm.state_dict())
    jm.head.kernel[...] = jm.head.kernel[...].T
    report = compare(tm, jm, rand((2, 16, 20, 3)), load_weights=False)
    assert report.first_failure == "head", str(report)


def test_vanished_signals_are_not_tested_and_bounds_scale_with_the_output():
    """A layer whose reference is ~0 is 'not tested', never a pass; an output of 1e12 is held
    to a bound relative to its scale (an absolute 1e-4 could never pass in float32)."""
    tmod = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        tmod[0].weight.mul_(1e-20)
        tmod[0].bias.zero_()
        tmod[1].bias.fill_(1e12)
    jmod = nn.Sequential(nn.Linear(4, 4, rngs=_rngs()), nn.Linear(4, 4, rngs=_rngs()))
    report = compare(tmod, jmod, rand((3, 4)))
    assert [r.status for r in report.layers] == ["not tested", "pass"], str(report)
    assert report.layers[1].bound >= 0.99e-4 * 1e12 and report.passed


def test_a_port_far_from_a_vanished_reference_fails():
    """A reference of zeros tests no relative error, but a port that outputs 5 there is wrong."""
    tmod = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        for layer in tmod:
            layer.weight.zero_()
            layer.bias.zero_()
    jmod = nn.Sequential(nn.Linear(4, 4, rngs=_rngs()), nn.Linear(4, 4, rngs=_rngs()))
    jmod[0].kernel[...] = jnp.zeros((4, 4))
    jmod[0].bias[...] = jnp.full((4,), 5.0)
    jmod[1].kernel[...] = jnp.zeros((4, 4))
    jmod[1].bias[...] = jnp.zeros((4,))
    report = compare(tmod, jmod, rand((3, 4)), load_weights=False)
    assert [r.status for r in report.layers] == ["FAIL", "not tested"], str(report)
    assert report.first_failure == "0" and not report.passed


def test_a_port_without_a_parameter_torch_has_fails_its_gradient():
    """With load_weights=False nothing checks the parameters match: a port with no bias (here
    where torch's is zero, so the outputs agree) fails the bias's gradient row."""
    tmod = torch.nn.Sequential(torch.nn.Linear(4, 3))
    jmod = nn.Sequential(nn.Linear(4, 3, bias=False, rngs=_rngs()))
    with torch.no_grad():
        tmod[0].weight.copy_(torch.from_numpy(np.asarray(jmod[0].kernel[...]).T.copy()))
        tmod[0].bias.zero_()
    report = compare(tmod, jmod, rand((3, 4)), load_weights=False, grads=True)
    assert [r.status for r in report.outputs] == ["pass"], str(report)
    assert {r.path: r.status for r in report.grads} == {
        "0.weight": "pass", "0.bias (not a parameter of the port)": "FAIL"}, str(report)
    assert not report.passed


def test_a_port_that_leaves_out_an_output_fails():
    """torch returns (logits, aux); a port returning the logits alone fails, however close."""
    from flax import nnx

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = self.fc(x)
            return y, 2 * y

    class OneHead(nnx.Module):
        def __init__(self):
            self.fc = nn.Linear(4, 3, rngs=_rngs())

        def __call__(self, x):
            return self.fc(x)

    report = compare(TwoHeads(), OneHead(), rand((3, 4)))
    assert [r.status for r in report.layers] == ["pass"], str(report)
    assert not report.passed and any(r.failed and "2 arrays in torch, 1 in the port" in r.path
                                     for r in report.outputs), str(report)


def _rngs():
    from flax import nnx
    return nnx.Rngs(0)


def test_float64_mode_tightens_the_bound():
    report = _report(ports.jax_net, float64=True)
    assert report.passed and "float64" in report.mode
    assert all(r.bound <= 1e-8 * max(1.0, r.max_abs / max(r.max_rel, 1e-300)) for r in report.layers
               if r.status == "pass")
    bad = _report(ports.wrong_eps, float64=True)
    assert bad.first_failure == "block.bn2"


def test_cli_for_a_port_from_a_test_file(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert verify_main(["--torch", "tests.ports:torch_net", "--jax", "tests.ports:jax_net",
                        "--input-shape", "2,3,16,20", "--grads", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "block.conv2" in text
    report = json.loads(out.read_text())
    assert report["passed"] and report["first_failure"] is None and report["grads"]
    assert verify_main(["--torch", "tests.ports:torch_net", "--jax", "tests.ports:missing_relu",
                        "--input-shape", "2,3,16,20"]) == 1
    assert "first failing layer: block" in capsys.readouterr().out
    assert verify_main(["--torch", "tests.ports:nope", "--jax", "tests.ports:jax_net"]) == 1


def test_verify_model_batch_one_and_a_large_output_scale(capsys):
    """--model with batch 1 (the train-mode check takes two samples) on inception_v3's random
    init, whose logits are ~1e12: both pass on bounds that scale."""
    assert verify_main(["--model", "inception_v3", "--batch", "1", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "Mixed_7c" in out
    np.testing.assert_equal("BatchNorm" in out, True)
