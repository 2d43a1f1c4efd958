"""What jaxconv.ops's primitives share: the formula-backed ones (ops.norm, ops.pool), conv_p."""
from __future__ import annotations

import functools

import jax
from jax.extend.core import Primitive
from jax.interpreters import mlir


def formula_primitive(name: str, formula, multiple_results: bool = False) -> Primitive:
    """A primitive whose shapes, eager evaluation (jitted, one compile per parameter set) and
    lowering on every platform without one of its own come from `formula`; the caller adds its
    batching and differentiation rules and its CPU lowering."""
    p = Primitive(name)
    p.multiple_results = multiple_results

    @functools.lru_cache(maxsize=4096)   # tracing the formula for every call is slow
    def abstract(*avals, **params):
        out = jax.eval_shape(functools.partial(formula, **params), *avals)
        return jax.tree.map(lambda o: jax.core.ShapedArray(o.shape, o.dtype), out)

    p.def_abstract_eval(abstract)
    def_jitted_impl(p)
    mlir.register_lowering(p, mlir.lower_fun(formula, multiple_results=multiple_results))
    return p


def def_jitted_impl(p: Primitive) -> None:
    """Eager evaluation of `p` as its own jitted bind, compiled once per parameter set (so that
    eager calls lower like traced ones: the CPU engines are lowerings, not Python)."""
    compiled = functools.cache(lambda **params: jax.jit(functools.partial(p.bind, **params)))
    p.def_impl(lambda *args, **params: compiled(**params)(*args))
