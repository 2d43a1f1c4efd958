"""Linear, Dropout and Sequential shaped like torch.nn."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxconv.nn import init as initializers
from jaxconv.ops._args import accumulation
from jaxconv.ops.conv import add_bias


class Linear(nnx.Module):
    """torch.nn.Linear; `kernel` is (in_features, out_features), torch's weight transposed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=None,
                 param_dtype=jnp.float32, kernel_init=None, bias_init=None, rngs: nnx.Rngs):
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        default = initializers.torch_default(in_features)
        self.kernel = nnx.Param((kernel_init or default)(rngs.params(), (in_features, out_features),
                                                         param_dtype))
        self.bias = (nnx.Param((bias_init or default)(rngs.params(), (out_features,), param_dtype))
                     if bias else None)

    def __call__(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected {self.in_features} features on the last axis, "
                             f"got shape {tuple(x.shape)}")
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        y = jnp.matmul(x.astype(dtype), kernel.astype(dtype),
                       preferred_element_type=accumulation(dtype)).astype(dtype)
        return add_bias(y, None if self.bias is None else self.bias[...], self.out_features)


class Dropout(nnx.Dropout):
    """torch.nn.Dropout(p): zeroes with probability p and scales by 1/(1-p) in train mode."""

    def __init__(self, p: float = 0.5, *, rngs: nnx.Rngs | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
        super().__init__(rate=p, rngs=rngs)


class Sequential(nnx.List):
    """torch.nn.Sequential: children at integer paths (`features.0.kernel` ~ `features.0.weight`)."""

    def __init__(self, *layers):
        super().__init__(layers)

    def __call__(self, x):
        for layer in self:
            x = layer(x)
        return x
