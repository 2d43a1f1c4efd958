"""Argument checks shared by the ops (torch-style ints or pairs, errors that name the argument)
and the accumulation dtype rule."""
from __future__ import annotations

import numbers
from typing import Sequence

import jax.numpy as jnp


def pair(value: int | Sequence[int], name: str, *, minimum: int | None = None) -> tuple[int, int]:
    """Return `value` as an (h, w) pair of ints, as torch accepts `3` or `(3, 2)`."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        out = (int(value), int(value))
    elif (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        out = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if minimum is not None and min(out) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return out


def check_rank(x, rank: int, name: str, layout: str) -> None:
    """Raise unless `x` has `rank` dimensions (`layout` names them, e.g. 'NHWC')."""
    if x.ndim != rank:
        raise ValueError(f"{name}: expected a rank-{rank} array ({layout}), got shape {tuple(x.shape)}")


def accumulation(dtype):
    """The dtype 16-bit floats accumulate in (float32, as cuDNN and torch autocast do); None
    for wider types (their own)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None
