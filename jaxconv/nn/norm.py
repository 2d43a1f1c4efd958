"""BatchNorm2d with torch's defaults and statistics, on NHWC input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxconv.ops.norm import batch_norm_train


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d over the last (channel) axis.

    Parameters `scale`, `bias`; running statistics `mean`, `var` (torch: weight, bias,
    running_mean, running_var). `momentum` keeps torch's meaning: running = (1 - m) * running
    + m * batch, i.e. nnx.BatchNorm(momentum=1 - m); the running variance takes the unbiased
    batch variance while normalisation uses the biased one, as in torch. Statistics are computed
    in float32 whatever the compute dtype. `model.eval()` switches to the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected a float in [0, 1] (torch's meaning), got {momentum!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.dtype = dtype
        # from numpy: device transfers, not one compiled fill per channel count
        ones, zeros = np.ones(num_features), np.zeros(num_features)
        self.scale = nnx.Param(jnp.asarray(ones, param_dtype)) if affine else None
        self.bias = nnx.Param(jnp.asarray(zeros, param_dtype)) if affine else None
        self.mean = nnx.BatchStat(jnp.asarray(zeros, jnp.float32)) if track_running_stats else None
        self.var = nnx.BatchStat(jnp.asarray(ones, jnp.float32)) if track_running_stats else None
        self.use_running_average = False

    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != self.num_features:
            raise ValueError(f"x: expected NHWC input with {self.num_features} channels on the last "
                             f"axis, got shape {tuple(x.shape)}")
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        if self.use_running_average and self.mean is not None:
            xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            y = (xf - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.eps)
            if scale is not None:
                y = y * scale + bias
            return y.astype(self.dtype or x.dtype)
        n = x.shape[0] * x.shape[1] * x.shape[2]
        if n == 0:   # an empty batch (as torch): empty output, statistics unchanged
            return x.astype(self.dtype or x.dtype)
        if n < 2:
            raise ValueError(f"x: training BatchNorm2d needs more than 1 value per channel "
                             f"(as torch), got shape {tuple(x.shape)}")
        y, mean, var = batch_norm_train(x, scale, bias, self.eps)
        if self.mean is not None:
            m = self.momentum
            batch_mean, batch_var = jax.lax.stop_gradient((mean, var * (n / (n - 1))))
            # set_value, not `[...] =` (flax's full-replace check reads a tracer's `sharding`,
            # whose error message walks the whole trace: 0.3 s of ResNeXt-50's 1.6 s trace);
            # it stores what it is given, so cast to the statistics' own dtype
            for stat, batch in ((self.mean, batch_mean), (self.var, batch_var)):
                old = stat[...]
                stat.set_value(((1 - m) * old + m * batch).astype(old.dtype))
        return y.astype(self.dtype or x.dtype)
