"""Model summary: parameter and multiply-add totals equal the published numbers."""
import pytest
from flax import nnx

from jaxconv import nn
from jaxconv.models import create_model
from jaxconv.summary import main, summarize


@pytest.mark.parametrize("name, kwargs, params, gmacs", [
    ("resnext50_32x4d", {}, 25_028_904, 4.23),            # torchvision's published numbers
    ("googlenet", {"aux_logits": False}, 6_624_904, 1.50),
])
def test_published_totals(name, kwargs, params, gmacs):
    _, total_params, total_macs = summarize(create_model(name, **kwargs), 224)
    assert total_params == params
    assert round(total_macs / 1e9, 2) == gmacs


def test_rows_by_hand():
    """Each leaf layer's row, counted by hand: a strided conv (MACs per output position), a
    transposed conv (per input position) and a linear layer."""
    class Net(nnx.Module):
        def __init__(self, r):
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, rngs=r)
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, rngs=r)
            self.fc = nn.Linear(4, 5, rngs=r)

        def __call__(self, x):
            return self.fc(self.up(self.conv(x)).mean((1, 2)))

    rows, params, macs = summarize(Net(nnx.Rngs(0)), 16)
    assert rows == [("conv", "Conv2d", (8, 8, 8), 3 * 3 * 3 * 8 + 8, 8 * 8 * 3 * 3 * 3 * 8),
                    ("up", "ConvTranspose2d", (16, 16, 4), 2 * 2 * 8 * 4 + 4, 8 * 8 * 2 * 2 * 8 * 4),
                    ("fc", "Linear", (5,), 4 * 5 + 5, 4 * 5)]
    assert params == 224 + 132 + 25 and macs == 13824 + 8192 + 20


def test_separable_conv_costs_one_over_out_plus_one_over_k_squared():
    """The papers' cost argument on a layer: depthwise separable / standard = 1/C_out + 1/k^2."""
    class Wrap(nnx.Module):
        def __init__(self, layer):
            self.layer = layer

        def __call__(self, x):
            return self.layer(x[..., :1].repeat(64, axis=-1))

    r = nnx.Rngs(0)
    _, _, standard = summarize(Wrap(nn.Conv2d(64, 128, 3, padding=1, rngs=r)), 16)
    _, _, separable = summarize(Wrap(nn.SeparableConv2d(64, 128, 3, padding=1, rngs=r)), 16)
    assert separable / standard == pytest.approx(1 / 128 + 1 / 9)


def test_cli_prints_totals(capsys):
    assert main(["mobilenet_v1", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 4,231,976" in out  # timm mobilenetv1_100's parameter count
    assert main(["no_such_model"]) == 1
