"""Pieces shared by the model files: the input check every model's forward starts with."""
from __future__ import annotations

import jax.numpy as jnp


def check_input(x, min_size: int, model: str) -> None:
    """Raise ValueError unless `x` is an (N, H, W, 3) floating array with H, W >= `min_size`.

    The NHWC twin of torch_ref.models.check_input; `model` prefixes the message.
    """
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"{model}: x must be an array (N, H, W, 3), got {type(x).__name__}")
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (NCHW? jaxconv models take NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"{model}: x must have shape (N, H, W, 3), got {tuple(shape)}{hint}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{model}: x must be a floating array, got dtype {dtype}")
    if min(shape[1], shape[2]) < min_size:
        raise ValueError(f"{model}: x spatial size must be at least {min_size}x{min_size}, "
                         f"got {shape[1]}x{shape[2]}")
