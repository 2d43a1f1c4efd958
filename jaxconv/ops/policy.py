"""The one table that decides how a convolution is computed on CPU under ``conv_lowering='auto'``.

A conv is classified by its static shape (``kind``); each (kind, pass) row lists engines in
order of preference, and the first one that is available in this process and can compute the
pass (dtype, shape) is used. Engines:

    onednn   oneDNN's convolution primitives (PyTorch's CPU engine) through the XLA FFI
    kernel   jaxconv's own direct convolution (grouped_cpu.cc) through the XLA FFI
    matmul   1x1 convs without padding: (N*H*W, C_in) x (C_in, C_out) matrix products
    xla      lax.conv_general_dilated (XLA:CPU's Eigen convolution)

Every other backend uses lax's convolution (cuDNN, the TPU compiler); this table is CPU only.
Why each row reads as it does, measured on 2 cores against PyTorch 2.13: BENCHMARKS.md,
"Per pass and engine".
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

PASSES = ("fwd", "bwd_data", "bwd_weights")
KINDS = ("pointwise", "depthwise", "grouped", "grouped_large", "stem", "dense")

# (kind, pass) -> engines in order of preference. Measured on 2 AMD EPYC (AVX2) cores, batch 8,
# every distinct layer of ResNeXt-50 / Xception / MobileNet-v1, median ratio to torch per pass
# (BENCHMARKS.md, "Per pass and engine"; the kernel is tuned for AVX-512 and slower here):
#   pointwise  onednn 1.08 / 1.04 / 0.98   matmul 1.3 / 1.0 / 1.0   xla 1.8 / 1.8 / 8.7
#   depthwise  onednn 1.14 / 0.98 / 0.95   kernel 2.7 / 2.7 / 1.9   xla 43 / 58 / 123
#   grouped    onednn 1.4* / 1.01 / 0.97   kernel 7.0 / 7.3 / 5.5   xla 6.0 / 4.5 / 593
#   stem       onednn 0.65 / 1.04 / 0.93   kernel 7.7 / 29 / 7.7    xla 1.3 / 1.6 / 12
#   dense      onednn 0.85 / 1.04 / 0.95   kernel 7.6 / 23 / 4.7    xla 3.5 / 1.4 / 6.5
# (fwd / bwd_data / bwd_weights; * grouped forward with 4 channels a group as the transposed
# problem's backward data, oneDNN 3.2 having only its gemm forward there on AVX2)
# grouped_large: grouped convs over maps of at least LARGE_HW pixels, on CPUs with AVX-512 (the
# kernel's vector code; on the AVX2 VM above its grouped bwd_weights was 5.5x). On 2 AVX-512
# cores (the ResNeXts' grouped layers, batch 8; BENCHMARKS.md, "The kernel's weight gradient on
# large maps") the kernel's bwd_weights was 0.39-0.56x torch (min ratios; medians 0.36-0.77) on
# every such layer but one (a tie, 0.97 vs 0.96), oneDNN's 0.85-1.07x; on 28x28 and smaller
# maps the kernel was 1.0-2.9x, oneDNN 0.64-1.22x.
ENGINE_ORDER = {
    "pointwise": {"fwd": ("onednn", "matmul", "xla"), "bwd_data": ("onednn", "matmul", "xla"),
                  "bwd_weights": ("onednn", "matmul", "xla")},
    "depthwise": {p: ("onednn", "kernel", "xla") for p in PASSES},
    "grouped": {p: ("onednn", "kernel", "xla") for p in PASSES},
    "grouped_large": {"fwd": ("onednn", "kernel", "xla"), "bwd_data": ("onednn", "kernel", "xla"),
                      "bwd_weights": ("kernel", "onednn", "xla")},
    "stem": {"fwd": ("onednn", "xla"), "bwd_data": ("onednn", "xla"),
             "bwd_weights": ("onednn", "kernel", "xla")},
    "dense": {p: ("onednn", "xla") for p in PASSES},
}
TABLE: dict[tuple[str, str], tuple[str, ...]] = {
    (k, p): engines for k, row in ENGINE_ORDER.items() for p, engines in row.items()}
STEM_MAX_CIN = 32   # dense convs with at most this many input channels are "stem" convs
LARGE_HW = 56 * 56  # grouped convs over input maps of this many pixels or more (with AVX-512)


def kind(kernel, in_channels: int, groups: int, padded: bool, in_hw) -> str:
    """The row a conv of `kernel` taps over `in_channels` in `groups` groups of an `in_hw` input
    map belongs to (`padded`: any non-zero padding); grouped_large only on AVX-512 CPUs."""
    from jaxconv.ops import native
    if groups > 1:
        if groups == in_channels:
            return "depthwise"
        large = in_hw[0] * in_hw[1] >= LARGE_HW and native.avx512()
        return "grouped_large" if large else "grouped"
    if tuple(kernel) == (1, 1) and not padded:
        return "pointwise"
    return "stem" if in_channels <= STEM_MAX_CIN else "dense"


def can_compute(engine: str, dtype, geo) -> bool:
    """Whether `engine` can compute a conv of geometry `geo` in `dtype` at all (which passes it
    should compute is the table's business): oneDNN float32 (and bfloat16 on CPUs with
    AVX512-BF16) with non-negative padding, the kernel float32 / float64, matmul unpadded
    ungrouped 1x1 convs, lax anything."""
    from jaxconv.ops import native
    dtype = np.dtype(dtype)
    if engine == "onednn":
        native_dtype = dtype == np.float32 or (dtype == jnp.bfloat16 and native.bf16())
        return native_dtype and min(p for side in geo.pads for p in side) >= 0
    if engine == "kernel":
        return dtype in (np.float32, np.float64)
    if engine == "matmul":
        return geo.kernel == (1, 1) and geo.groups == 1 and not any(p for s in geo.pads for p in s)
    return True


def first_available(row) -> str:
    """The first engine of `row` that this process has (matmul and xla always are)."""
    from jaxconv.ops import native
    return next(name for name in (*row, "xla") if native.available(name))


def engine(op: str, geo, a_aval, b_aval, lowering: str = "auto", in_hw=None) -> str:
    """The engine that computes pass `op` of conv_p (given its operands' avals, and for
    bwd_data the input's spatial size `in_hw`) on CPU: a forced `lowering` wherever it can
    compute the pass (lax's otherwise: oneDNN has no float64), else the first available engine
    of the table's row that can."""
    from jaxconv.ops import native
    cin = b_aval.shape[2] * geo.groups if op == "bwd_data" else a_aval.shape[3]
    if op == "bwd_data" and in_hw is None:
        raise ValueError("in_hw: bwd_data needs the input's spatial size, got None")
    in_hw = in_hw if op == "bwd_data" else a_aval.shape[1:3]
    dtype = a_aval.dtype
    if lowering != "auto":
        native.load(lowering)   # a clear error if the forced engine cannot be had
        return lowering if can_compute(lowering, dtype, geo) else "xla"
    padded = any(p for side in geo.pads for p in side)
    row = TABLE[(kind(geo.kernel, cin, geo.groups, padded, in_hw), op)]
    return first_available([name for name in row if can_compute(name, dtype, geo)])
