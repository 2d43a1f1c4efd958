"""jaxconv.nn layers and blocks vs torch.nn / torch_ref: weights moved with convert.from_torch,
then forward, input gradient, every parameter gradient and (train mode) BN running statistics."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref.blocks as tblocks
import torch_ref.nn as tnn
from jaxconv import nn
from jaxconv.convert import from_torch, to_torch
from jaxconv.nn import blocks
from parity_tests.tolerances import BN_STATS, OP_FP32
from tests.helpers import nchw, nhwc, rand, randomise_torch_bn, rngs

# (id, jaxconv factory, torch factory, input shape NHWC (or (N, F) for Linear))
LAYERS = [
    ("Conv2d-odd", lambda: nn.Conv2d(4, 6, (3, 2), (2, 1), (1, 0), (2, 1), groups=2, rngs=rngs()),
     lambda: torch.nn.Conv2d(4, 6, (3, 2), (2, 1), (1, 0), (2, 1), groups=2), (3, 9, 7, 4)),
    ("Conv2d-reflect", lambda: nn.Conv2d(4, 6, 3, padding=(1, 2), padding_mode="reflect", rngs=rngs()),
     lambda: torch.nn.Conv2d(4, 6, 3, padding=(1, 2), padding_mode="reflect"), (2, 6, 5, 4)),
    ("Conv2d-same-nobias", lambda: nn.Conv2d(4, 4, 3, padding="same", dilation=2, bias=False, rngs=rngs()),
     lambda: torch.nn.Conv2d(4, 4, 3, padding="same", dilation=2, bias=False), (2, 6, 5, 4)),
    ("ConvTranspose2d", lambda: nn.ConvTranspose2d(4, 6, 3, 2, 1, 1, groups=2, rngs=rngs()),
     lambda: torch.nn.ConvTranspose2d(4, 6, 3, 2, 1, 1, groups=2), (3, 5, 4, 4)),
    ("DepthwiseConv2d-dm2", lambda: nn.DepthwiseConv2d(4, (3, 2), (2, 1), 1, depth_multiplier=2, rngs=rngs()),
     lambda: tnn.DepthwiseConv2d(4, (3, 2), (2, 1), 1, depth_multiplier=2), (3, 9, 7, 4)),
    ("PointwiseConv2d", lambda: nn.PointwiseConv2d(4, 6, rngs=rngs()),
     lambda: tnn.PointwiseConv2d(4, 6), (3, 5, 4, 4)),
    ("SeparableConv2d", lambda: nn.SeparableConv2d(4, 6, 3, padding=1, depth_multiplier=2, rngs=rngs()),
     lambda: tnn.SeparableConv2d(4, 6, 3, padding=1, depth_multiplier=2), (3, 7, 5, 4)),
    ("SeparableConv2d-pointwise-first",
     lambda: nn.SeparableConv2d(4, 6, 3, 2, 1, depth_multiplier=2, bias=False, pointwise_first=True, rngs=rngs()),
     lambda: tnn.SeparableConv2d(4, 6, 3, 2, 1, depth_multiplier=2, bias=False, pointwise_first=True),
     (3, 7, 5, 4)),
    ("BatchNorm2d", lambda: nn.BatchNorm2d(4), lambda: torch.nn.BatchNorm2d(4), (3, 5, 4, 4)),
    ("BatchNorm2d-no-affine", lambda: nn.BatchNorm2d(4, affine=False),
     lambda: torch.nn.BatchNorm2d(4, affine=False), (3, 5, 4, 4)),
    ("BatchNorm2d-eps-momentum", lambda: nn.BatchNorm2d(4, eps=1e-3, momentum=0.3),
     lambda: torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.3), (2, 3, 2, 4)),
    ("MaxPool2d", lambda: nn.MaxPool2d(3, 2, ceil_mode=True), lambda: torch.nn.MaxPool2d(3, 2, ceil_mode=True),
     (3, 9, 7, 4)),
    ("AvgPool2d", lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
     lambda: torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (3, 9, 7, 4)),
    ("AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d((4, 3)), lambda: torch.nn.AdaptiveAvgPool2d((4, 3)),
     (3, 9, 7, 4)),
    ("Linear", lambda: nn.Linear(5, 3, rngs=rngs()), lambda: torch.nn.Linear(5, 3), (4, 5)),
    ("Dropout-p0", lambda: nn.Dropout(0.0, rngs=rngs()), lambda: torch.nn.Dropout(0.0), (3, 5, 4, 4)),
]
BLOCKS = [
    ("InceptionModule", lambda: blocks.InceptionModule(8, 4, 3, 5, 2, 3, 4, rngs=rngs()),
     lambda: tblocks.InceptionModule(8, 4, 3, 5, 2, 3, 4), (2, 7, 6, 8)),
    ("SimplifiedInception", lambda: blocks.SimplifiedInception(8, 3, 4, rngs=rngs()),
     lambda: tblocks.SimplifiedInception(8, 3, 4), (2, 7, 6, 8)),
    ("SegmentedInception", lambda: blocks.SegmentedInception(8, 6, 9, 3, rngs=rngs()),
     lambda: tblocks.SegmentedInception(8, 6, 9, 3), (2, 7, 6, 8)),
    ("ExtremeInception", lambda: blocks.ExtremeInception(8, 6, rngs=rngs()),
     lambda: tblocks.ExtremeInception(8, 6), (2, 7, 6, 8)),
    ("ResNeXtBlockA-stride2", lambda: blocks.ResNeXtBlockA(8, 16, 4, 2, 2, rngs=rngs()),
     lambda: tblocks.ResNeXtBlockA(8, 16, 4, 2, 2), (2, 7, 6, 8)),
    ("ResNeXtBlockB", lambda: blocks.ResNeXtBlockB(16, 16, 4, 2, rngs=rngs()),
     lambda: tblocks.ResNeXtBlockB(16, 16, 4, 2), (2, 5, 4, 16)),
    ("ResNeXtBlockC-stride2", lambda: blocks.ResNeXtBlockC(8, 16, 4, 2, 2, rngs=rngs()),
     lambda: tblocks.ResNeXtBlockC(8, 16, 4, 2, 2), (2, 7, 6, 8)),
]


def _check(jax_factory, torch_factory, shape, train):
    torch.manual_seed(0)
    tmod = torch_factory()
    randomise_torch_bn(tmod)
    jmod = from_torch(jax_factory(), tmod.state_dict())
    t64 = copy.deepcopy(tmod).double()
    tmod.train(train)
    t64.train(train)
    jmod.train() if train else jmod.eval()

    x = rand(shape)
    xt = nchw(x).requires_grad_(True)
    tout = tmod(xt)
    cot = rand(tout.shape, seed=1)
    tout.backward(torch.tensor(cot))
    x64 = nchw(x, torch.float64).requires_grad_(True)
    t64(x64).backward(torch.tensor(cot, dtype=torch.float64))

    def loss(m, x):
        y = m(x)
        return jnp.sum(y * jnp.asarray(nhwc(cot))), y

    (_, y), (gmod, gx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jmod, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), nhwc(tout), **OP_FP32, err_msg="forward")
    np.testing.assert_allclose(np.asarray(gx), nhwc(xt.grad), **OP_FP32, err_msg="grad x")

    grads = nnx.clone(jmod)
    nnx.update(grads, gmod)
    jgrads = to_torch(grads)
    tparams, exact = dict(tmod.named_parameters()), dict(t64.named_parameters())
    assert set(tparams) <= set(jgrads)
    for name, p in tparams.items():
        # against torch in float64: a weight gradient sums N*H*W products (through BatchNorm's
        # backward in train mode), and two float32 summation orders can differ by more than
        # the op tolerance; jaxconv must be within it or within 2x torch float32's own error
        ref = exact[name].grad.numpy()
        own = float(np.max(np.abs(p.grad.numpy() - ref)))
        np.testing.assert_allclose(jgrads[name], ref, rtol=OP_FP32["rtol"],
                                   atol=max(OP_FP32["atol"], 2 * own), err_msg=f"grad {name}")
    if train:  # running statistics after the step
        jstate, tstate = to_torch(jmod), tmod.state_dict()
        for name in tstate:
            if name.endswith(("running_mean", "running_var")):
                np.testing.assert_allclose(jstate[name], tstate[name].numpy(), atol=BN_STATS,
                                           rtol=BN_STATS, err_msg=name)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name, jax_factory, torch_factory, shape", LAYERS + BLOCKS,
                         ids=[c[0] for c in LAYERS + BLOCKS])
def test_layer_matches_torch(name, jax_factory, torch_factory, shape, train):
    _check(jax_factory, torch_factory, shape, train)


@pytest.mark.parametrize("name, jax_factory, torch_factory, shape", LAYERS + BLOCKS,
                         ids=[c[0] for c in LAYERS + BLOCKS])
def test_state_dict_round_trip(name, jax_factory, torch_factory, shape):
    """torch -> jaxconv -> torch reproduces every tensor bit for bit (num_batches_tracked aside)."""
    tmod = torch_factory()
    randomise_torch_bn(tmod)
    back = to_torch(from_torch(jax_factory(), tmod.state_dict()))
    expected = {k: v.numpy() for k, v in tmod.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(back) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(back[k], expected[k], err_msg=k)


def test_batchnorm_statistics_keep_their_dtype():
    """A float64 batch (x64) updates float32 running statistics and leaves them float32 (a
    state carried through lax.scan or nnx.jit keeps its type), with torch's update rule
    computed here in numpy: momentum 0.1, the unbiased batch variance."""
    x = np.random.default_rng(0).standard_normal((3, 5, 4, 4))
    with jax.enable_x64(True):
        bn = nn.BatchNorm2d(4)
        bn(jnp.asarray(x))
        mean, var = bn.mean[...], bn.var[...]
    assert mean.dtype == var.dtype == jnp.float32
    flat = x.reshape(-1, 4)
    np.testing.assert_allclose(mean, 0.1 * flat.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(var, 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-6)


# (id, bfloat16 layer, its call on an (8, 56, 56, C) input): each output has 25,088 or more
# values per channel, so its bias gradient is a long sum
BF16_BIAS_LAYERS = [
    ("Conv2d", lambda: nn.Conv2d(4, 3, 3, padding=1, dtype=jnp.bfloat16, rngs=rngs()),
     lambda m, x: m(x)),
    ("ConvTranspose2d", lambda: nn.ConvTranspose2d(4, 3, 3, padding=1, dtype=jnp.bfloat16, rngs=rngs()),
     lambda m, x: m(x)),
    ("Linear", lambda: nn.Linear(4, 3, dtype=jnp.bfloat16, rngs=rngs()), lambda m, x: m(x)),
    ("DeformConv2d", lambda: nn.DeformConv2d(4, 3, 3, padding=1, dtype=jnp.bfloat16, rngs=rngs()),
     lambda m, x: m(x, jnp.full((*x.shape[:3], 18), 0.25, x.dtype))),
]


@pytest.mark.parametrize("factory, call", [b[1:] for b in BF16_BIAS_LAYERS],
                         ids=[b[0] for b in BF16_BIAS_LAYERS])
def test_bfloat16_bias_gradients_accumulate_in_float32(factory, call):
    """A bfloat16 layer's float32 bias gets the float32 sum of the output's cotangent over
    batch and space (y = ... + bias): here a sum of 25,088 bfloat16 values near 1 per channel,
    which XLA's bfloat16 reduction stalls at 4,416. Oracle: the same sum in float64."""
    m = factory()
    x = jnp.asarray(rand((8, 56, 56, 4)), jnp.bfloat16)
    g = jnp.asarray(1 + 0.5 * rand((8, 56, 56, 3), seed=1), jnp.bfloat16)
    graphdef, params = nnx.split(m, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: jnp.vdot(
        call(nnx.merge(graphdef, p), x).astype(jnp.float32), g.astype(jnp.float32))))(params)
    got = grads["bias"][...]
    assert got.dtype == jnp.float32 and m.bias[...].dtype == jnp.float32
    want = np.asarray(g, np.float64).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-5)
