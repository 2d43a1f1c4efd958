"""jaxconv.ops vs torch.nn.functional: the op grid (forward and gradients), plus the transposed
conv as the adjoint of conv2d and the connectivity of grouped convs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import ops
from jaxconv.verify.ops import CASES, run_case
from parity_tests.tolerances import OP_FP32


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_torch(case):
    r = run_case(case)
    assert r.passed, f"{case.id}: forward max abs error {r.forward:.3g}, gradients {r.grads}"


@pytest.mark.parametrize("kw", [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2),
    dict(stride=3, padding=2, dilation=1, groups=4),
])
def test_conv_transpose_is_adjoint_of_conv(kw):
    """The Jacobian of conv_transpose2d is the transpose of conv2d's, for the same kernel."""
    rng = np.random.default_rng(1)
    cin, cout = 8, 2 * kw["groups"]  # conv2d: cin -> cout channels
    kernel = jnp.asarray(rng.standard_normal((3, 2, cin // kw["groups"], cout)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 7, 6, cin)), jnp.float32)
    y = ops.conv2d(x, kernel, **kw)
    # output_padding recovers the rows/cols a strided conv drops, so shapes round-trip
    out_pad = tuple((n + 2 * p - d * (k - 1) - 1) % s for n, p, d, k, s in zip(
        x.shape[1:3], np.broadcast_to(kw["padding"], 2), np.broadcast_to(kw["dilation"], 2),
        kernel.shape[:2], np.broadcast_to(kw["stride"], 2)))
    conv = lambda v: ops.conv2d(v, kernel, **kw)  # noqa: E731
    tconv = lambda v: ops.conv_transpose2d(v, kernel, output_padding=out_pad, **kw)  # noqa: E731
    assert tconv(y).shape == x.shape
    jac_conv = jax.jacobian(conv)(x).reshape(y.size, x.size)
    jac_tconv = jax.jacobian(tconv)(y).reshape(x.size, y.size)
    np.testing.assert_allclose(jac_tconv, jac_conv.T, **OP_FP32)


@pytest.mark.parametrize("groups, cin, cout", [(2, 4, 6), (4, 8, 8), (4, 4, 8)])
def test_grouped_conv_connectivity(groups, cin, cout):
    """A one-hot input channel reaches exactly the output channels of its own group."""
    kernel = jnp.ones((3, 3, cin // groups, cout))
    for c in range(cin):
        x = jnp.zeros((1, 5, 5, cin)).at[0, 2, 2, c].set(1.0)
        touched = np.flatnonzero(np.abs(np.asarray(ops.conv2d(x, kernel, padding=1, groups=groups))).sum((0, 1, 2)))
        g = c // (cin // groups)
        np.testing.assert_array_equal(touched, np.arange(g * cout // groups, (g + 1) * cout // groups))
