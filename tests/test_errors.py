"""Bad input raises ValueError naming the argument, what was expected and what was got."""
import jax.numpy as jnp
import pytest

from jaxconv import nn, ops
from tests.helpers import rngs

x = jnp.zeros((2, 9, 7, 4))
w = jnp.zeros((3, 3, 4, 8))
R = rngs()

CASES = [
    ("rank", lambda: ops.conv2d(jnp.zeros((9, 7, 4)), w),
     r"x: expected a rank-4 array \(NHWC\), got shape \(9, 7, 4\)"),
    ("weight rank", lambda: ops.conv2d(x, jnp.zeros((3, 4, 8))), r"weight: expected a rank-4 array"),
    ("NCHW input", lambda: ops.conv2d(jnp.zeros((2, 4, 9, 7)), w),
     r"x: expected 4 channels on the last axis \(NHWC.*got 7 in shape \(2, 4, 9, 7\).*NCHW"),
    ("channels vs groups", lambda: ops.conv2d(x, jnp.zeros((3, 3, 2, 6)), groups=3),
     r"groups: input channels \(4\) and output channels \(6\) must both be divisible by groups=3"),
    ("layer groups", lambda: nn.Conv2d(6, 8, 3, groups=4, rngs=R),
     r"groups: in_channels \(6\) and out_channels \(8\) must both be divisible by groups=4"),
    ("output channels vs groups", lambda: ops.conv2d(jnp.zeros((2, 9, 7, 6)), jnp.zeros((3, 3, 2, 8)), groups=3),
     r"groups: input channels \(6\) and output channels \(8\) must both be divisible by groups=3"),
    ("layer out_channels groups", lambda: nn.Conv2d(8, 6, 3, groups=4, rngs=R),
     r"groups: in_channels \(8\) and out_channels \(6\) must both be divisible by groups=4"),
    ("negative padding", lambda: ops.conv2d(x, w, padding=-1), r"padding: expected non-negative values, got -1"),
    ("reflect padding larger than input", lambda: ops.conv2d(x, w, padding=7, padding_mode="reflect"),
     r"padding: reflect padding of 7 needs an input dimension of at least 8, got size 7"),
    ("kernel larger than input", lambda: ops.conv2d(jnp.zeros((1, 2, 2, 4)), w),
     r"padding: .* gives an empty output"),
    ("transposed padding too large", lambda: ops.conv_transpose2d(jnp.zeros((1, 2, 2, 8)), w, padding=3),
     r"padding: padding=\(3, 3\).* gives an empty output"),
    ("pool padding over half kernel", lambda: ops.max_pool2d(x, 3, padding=2),
     r"padding: expected at most half the kernel size \(3, 3\) \(as torch\), got \(2, 2\)"),
    ("even kernel same", lambda: ops.conv2d(x, jnp.zeros((2, 2, 4, 8)), padding="same"),
     r"padding: 'same' needs an odd effective kernel size .* got kernel_size=\(2, 2\)"),
    ("same with stride", lambda: ops.conv2d(x, w, stride=2, padding="same"), r"padding: 'same' needs stride 1"),
    ("padding string", lambda: ops.conv2d(x, w, padding="full"),
     r"padding: expected an int, a pair, 'same' or 'valid', got 'full'"),
    ("padding_mode", lambda: nn.Conv2d(4, 8, 3, padding_mode="mirror", rngs=R),
     r"padding_mode: expected one of .* got 'mirror'"),
    ("stride zero", lambda: ops.conv2d(x, w, stride=0), r"stride: expected values >= 1, got 0"),
    ("kernel_size triple", lambda: nn.Conv2d(4, 8, (3, 3, 3), rngs=R),
     r"kernel_size: expected an int or a pair of ints, got \(3, 3, 3\)"),
    ("bias shape", lambda: ops.conv2d(x, w, jnp.zeros(4)), r"bias: expected shape \(8,\), got \(4,\)"),
    ("output_padding", lambda: ops.conv_transpose2d(jnp.zeros((1, 3, 3, 8)), w, stride=2, output_padding=2),
     r"output_padding: expected values smaller than stride or dilation"),
    ("BatchNorm channels", lambda: nn.BatchNorm2d(3)(x),
     r"x: expected NHWC input with 3 channels on the last axis, got shape \(2, 9, 7, 4\)"),
    ("BatchNorm one value", lambda: nn.BatchNorm2d(4)(jnp.zeros((1, 1, 1, 4))),
     r"x: training BatchNorm2d needs more than 1 value per channel"),
    ("Linear features", lambda: nn.Linear(5, 3, rngs=R)(jnp.zeros((2, 4))),
     r"x: expected 5 features on the last axis, got shape \(2, 4\)"),
    ("adaptive output", lambda: ops.adaptive_avg_pool2d(x, 0), r"output_size: expected values >= 1, got 0"),
    ("dropout p", lambda: nn.Dropout(1.5), r"p: expected a probability in \[0, 1\], got 1.5"),
    ("momentum", lambda: nn.BatchNorm2d(4, momentum=0.9 + 1), r"momentum: expected a float in \[0, 1\]"),
    ("separable pointwise first", lambda: nn.SeparableConv2d(4, 7, 3, depth_multiplier=2, pointwise_first=True, rngs=R),
     r"out_channels: expected a multiple of depth_multiplier=2 with pointwise_first, got 7"),
]


@pytest.mark.parametrize("name, call, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_value_error(name, call, message):
    with pytest.raises(ValueError, match=message):
        call()
