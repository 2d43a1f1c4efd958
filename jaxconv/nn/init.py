"""Initialisers with PyTorch's meaning, so models trained from scratch start like their references.

Each returns a flax-style initialiser `init(key, shape, dtype)`. Values are drawn from JAX's
PRNG in fixed-size chunks (chunk i from ``fold_in(key, i)``), so one compiled sampler per
distribution serves every parameter shape: building a model compiles three small programs
instead of one per parameter shape (seconds on a CPU; BENCHMARKS.md, "Model building"). The
same chunks are drawn when the initialiser is traced (jit, eval_shape), so values do not depend
on how the model is built.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 1 << 16


@functools.partial(jax.jit, static_argnums=0)
def _chunk(kind: str, key, lo, hi):
    """CHUNK float32 samples: standard normal, uniform [0, 1), or normal truncated to [lo, hi]."""
    if kind == "normal":
        return jax.random.normal(key, (CHUNK,))
    if kind == "uniform":
        return jax.random.uniform(key, (CHUNK,))
    return jax.random.truncated_normal(key, lo, hi, (CHUNK,))


_fold_in = jax.jit(jax.random.fold_in)


def _sample(kind: str, key, shape, lo=-2.0, hi=2.0):
    """`shape` samples of `kind` as float32, chunk by chunk (see the module docstring)."""
    n = math.prod(shape)
    chunks = [_chunk(kind, _fold_in(key, i), lo, hi) for i in range(-(-n // CHUNK))]
    if isinstance(key, jax.core.Tracer):
        return jnp.concatenate(chunks)[:n].reshape(shape) if n else jnp.zeros(shape)
    return np.concatenate([np.asarray(c) for c in chunks])[:n].reshape(shape) if n else np.zeros(shape)


def _cast(values, dtype):
    return jnp.asarray(values, dtype)


def uniform(bound: float):
    """U(-bound, bound)."""
    def init(key, shape, dtype=jnp.float32):
        return _cast(bound * (2 * _sample("uniform", key, shape) - 1), dtype)
    return init


def torch_default(fan_in: int):
    """nn.Conv2d / nn.Linear default for weight and bias: kaiming_uniform(a=sqrt(5)) == U(±1/sqrt(fan_in))."""
    return uniform(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def normal(std: float):
    """N(0, std^2), untruncated (torch.nn.init.normal_)."""
    def init(key, shape, dtype=jnp.float32):
        return _cast(std * _sample("normal", key, shape), dtype)
    return init


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
    """torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu') for HWIO / (in, out) kernels."""
    fan_out = shape[-1] * math.prod(shape[:-2])
    return normal(math.sqrt(2.0 / fan_out))(key, shape, dtype)


def trunc_normal(std: float, a: float = -2.0, b: float = 2.0):
    """torch.nn.init.trunc_normal_(std=std, a=a, b=b): N(0, std^2) truncated to [a, b] (absolute bounds)."""
    def init(key, shape, dtype=jnp.float32):
        return _cast(std * _sample("truncated", key, shape, a / std, b / std), dtype)
    return init
