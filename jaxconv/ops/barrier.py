"""``fusion_barrier(x)``: the identity, as a value XLA:CPU computes once and stores.

XLA:CPU's fusion pass duplicates cheap elementwise producers into each consumer. In a chain of
residual blocks, y_k = relu(bn(conv(...)) + y_{k-1}), each y_k is read by a convolution (a
custom call, which needs it in memory) and by the next block's add, into which XLA fuses it
again, recursively: block k's add recomputes the whole chain before it, a cost quadratic in the
depth (ResNeXt-152 inference spent 300 of 810 ms on 2 cores there; BENCHMARKS.md, "Residual
chains"). ``lax.optimization_barrier`` does not stop it (XLA:CPU removes it before fusing).

On CPU the barrier is a custom call that does nothing, its result aliasing its operand (no copy
unless XLA needs one). It is linear, so its derivative and transpose are barriers too (gradients
get the same treatment); vmap maps it elementwise. Other platforms, or without a C++ compiler
(jaxconv.ops.native): the identity.
"""
from __future__ import annotations

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxconv.ops import native

fusion_barrier_p = Primitive("jaxconv_fusion_barrier")
fusion_barrier_p.def_impl(lambda x: x)
fusion_barrier_p.def_abstract_eval(lambda x: x)


def fusion_barrier(x):
    """`x`, computed once and read from memory by every consumer (on CPU; see the module)."""
    return fusion_barrier_p.bind(x)


def _cpu_lowering(ctx, x):
    (aval,) = ctx.avals_in
    if aval.size == 0 or not native.available("barrier"):
        return [x]
    call = jax.ffi.ffi_call("jaxconv_fusion_barrier", jax.ShapeDtypeStruct(aval.shape, aval.dtype),
                            input_output_aliases={0: 0})
    return mlir.lower_fun(call, multiple_results=False)(ctx, x)


mlir.register_lowering(fusion_barrier_p, lambda ctx, x: [x])
mlir.register_lowering(fusion_barrier_p, _cpu_lowering, platform="cpu")
ad.deflinear2(fusion_barrier_p, lambda ct, x: [fusion_barrier(ad.instantiate_zeros(ct))])
batching.primitive_batchers[fusion_barrier_p] = lambda args, dims: (fusion_barrier(*args), *dims)
