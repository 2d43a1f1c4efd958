"""Library-wide switches, read at trace time.

``conv_lowering`` picks how convolutions (``ops.conv2d``, ``ops.conv_transpose2d``, the
``nn`` layers, and ``nnx.Conv`` through ``jaxconv.ops.lowering.conv_general_dilated``) are
computed; see ``jaxconv.ops.lowering``:

    "auto"    lax's convolution on every backend but CPU; on CPU, per conv and pass, the engine
              ``jaxconv.ops.policy``'s table names (oneDNN, jaxconv's kernel, a matrix product
              for 1x1 convs, or lax) (default)
    "xla"     always lax.conv_general_dilated (the reference)
    "onednn"  force oneDNN on CPU (lax where it cannot compute a pass: float64)
    "kernel"  force jaxconv's own C++ kernel on CPU
    "matmul"  force matrix products for 1x1 convs on CPU (lax for every other conv)

The value is read when a function is traced: ``jax.jit`` caches the choice with the trace, so
change it before the first call of a jitted function (or use a fresh ``jax.jit``), e.g.::

    with jaxconv.config.use_conv_lowering("xla"):
        y = jax.jit(model)(x)      # traced, and compiled, with lax's convolutions

The context manager sets a process-wide value (not per thread). ``grouped_lowering``,
``set_grouped_lowering`` and ``use_grouped_lowering`` are the switch's former names.
"""
from __future__ import annotations

import contextlib

CONV_LOWERINGS = ("auto", "xla", "onednn", "kernel", "matmul")

conv_lowering: str = "auto"


def check_conv_lowering(name) -> str:
    if name not in CONV_LOWERINGS:
        raise ValueError(f"conv_lowering: expected one of {CONV_LOWERINGS}, got {name!r}")
    return name


def set_conv_lowering(name: str) -> None:
    """Set ``conv_lowering`` for the functions traced from now on."""
    global conv_lowering
    conv_lowering = check_conv_lowering(name)


@contextlib.contextmanager
def use_conv_lowering(name: str):
    """``conv_lowering = name`` for the functions traced inside the block."""
    global conv_lowering
    previous, conv_lowering = conv_lowering, check_conv_lowering(name)
    try:
        yield
    finally:
        conv_lowering = previous


def __getattr__(name):
    if name == "grouped_lowering":       # the switch's former name
        return conv_lowering
    raise AttributeError(f"module 'jaxconv.config' has no attribute {name!r}")


set_grouped_lowering = set_conv_lowering
use_grouped_lowering = use_conv_lowering
