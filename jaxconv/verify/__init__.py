"""Cross-framework verification: jaxconv against PyTorch (`python -m jaxconv.verify`), and
`compare(torch_module, nnx_module, *inputs)` for any port, layer by layer.

Holds DESIGN.md's tolerance table (the parity suite reads it from here) and the comparison used
by the op grid, the parity tests and the CLI. torch is imported lazily, inside the functions.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# DESIGN.md tolerances: one table, used by the CLI and the parity suite.
OP_FP32 = dict(atol=1e-5, rtol=1e-5)  # op forward and op gradients, fp32
OP_BF16_RTOL = 2e-2  # op forward in bf16: max |error| / max |reference|
DEFORM_FP64 = 1e-10  # deformable conv vs the float64 loop oracle
MODEL_LOGITS_ATOL = 1e-4  # model eval logits vs torch_ref
BN_STATS = 1e-5  # BatchNorm running statistics after a train step, abs + rel (running
#                  variances reach 1e2 and more, where fp32 resolves only ~1e-5 absolute)


def nchw(a):
    """NHWC -> NCHW (numpy or torch)."""
    return a.transpose(0, 3, 1, 2) if isinstance(a, np.ndarray) else a.permute(0, 3, 1, 2)


def oihw(w):
    """HWIO -> OIHW (numpy)."""
    return w.transpose(3, 2, 0, 1)


def excess(actual, expected, atol: float, rtol: float) -> float:
    """max(|a - e| - rtol * |e|) / atol: <= 1 exactly when np.allclose(a, e, rtol, atol) holds."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: jaxconv {actual.shape} vs torch {expected.shape}")
    if actual.size == 0:
        return 0.0
    return float(np.max(np.abs(actual - expected) - rtol * np.abs(expected)) / atol)


@dataclasses.dataclass
class Result:
    """Largest absolute errors of forward and gradients, and whether all are within tolerance."""
    forward: float
    grads: dict[str, float]
    passed: bool

    @property
    def grad(self) -> float:
        return max(self.grads.values(), default=0.0)


def compare(torch_module, nnx_module, *inputs, **kwargs):
    """Layer-by-layer comparison of a port: see jaxconv.verify.layers."""
    from jaxconv.verify.layers import compare as run
    return run(torch_module, nnx_module, *inputs, **kwargs)
