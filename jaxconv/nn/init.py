"""Initialisers with PyTorch's meaning, so models trained from scratch start like their references.

Each returns a flax-style initialiser `init(key, shape, dtype)`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def uniform(bound: float):
    """U(-bound, bound)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def torch_default(fan_in: int):
    """nn.Conv2d / nn.Linear default for weight and bias: kaiming_uniform(a=sqrt(5)) == U(±1/sqrt(fan_in))."""
    return uniform(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def normal(std: float):
    """N(0, std^2), untruncated (torch.nn.init.normal_)."""
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)
    return init


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
    """torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu') for HWIO / (in, out) kernels."""
    fan_out = shape[-1] * math.prod(shape[:-2])
    return normal(math.sqrt(2.0 / fan_out))(key, shape, dtype)


def trunc_normal(std: float, a: float = -2.0, b: float = 2.0):
    """torch.nn.init.trunc_normal_(std=std, a=a, b=b): N(0, std^2) truncated to [a, b] (absolute bounds)."""
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, a / std, b / std, shape, dtype)
    return init
