"""Library-wide switches, read at trace time.

``grouped_lowering`` picks how grouped and depthwise convolutions (``groups > 1`` in
``ops.conv2d`` / ``nn.Conv2d``, ``feature_group_count > 1`` through
``jaxconv.ops.grouped.conv_general_dilated``) are lowered, and whether dense convs with few
input channels and unpadded 1x1 convs get CPU lowerings too; see ``jaxconv.ops.grouped``:

    "auto"   per backend and shape, the fastest numerically equal formulation (default);
             lax's own convolution on every backend but CPU; on CPU the C++ kernel for
             grouped / depthwise / few-channel dense convs and a matrix product for 1x1 convs
    "xla"    always lax.conv_general_dilated(feature_group_count=groups) (the old behaviour)
    "kernel" force the C++ kernel (CPU only; grouped and dense convs)
    "fma", "split", "dense"
             force one pure-JAX formulation of grouped convs (on every backend; for
             comparisons and tests)

The value is read when a function is traced: ``jax.jit`` caches the choice with the trace, so
change it before the first call of a jitted function (or use a fresh ``jax.jit``), e.g.::

    with jaxconv.config.use_grouped_lowering("xla"):
        y = jax.jit(model)(x)      # traced, and compiled, with lax's lowering

The context manager sets a process-wide value (not per thread).
"""
from __future__ import annotations

import contextlib

GROUPED_LOWERINGS = ("auto", "xla", "kernel", "fma", "split", "dense")

grouped_lowering: str = "auto"


def check_grouped_lowering(name) -> str:
    if name not in GROUPED_LOWERINGS:
        raise ValueError(f"grouped_lowering: expected one of {GROUPED_LOWERINGS}, got {name!r}")
    return name


def set_grouped_lowering(name: str) -> None:
    """Set ``grouped_lowering`` for the functions traced from now on."""
    global grouped_lowering
    grouped_lowering = check_grouped_lowering(name)


@contextlib.contextmanager
def use_grouped_lowering(name: str):
    """``grouped_lowering = name`` for the functions traced inside the block."""
    global grouped_lowering
    previous, grouped_lowering = grouped_lowering, check_grouped_lowering(name)
    try:
        yield
    finally:
        grouped_lowering = previous
