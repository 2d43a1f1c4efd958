"""The model registry: `register_model` entry points, `create_model`, `list_models`.

Names follow torchvision / timm and equal torch_ref's, so a model and its reference are built
with the same string.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import nnx

_MODELS: dict[str, Callable[..., nnx.Module]] = {}
ALIASES: dict[str, str] = {
    "resnext50": "resnext50_32x4d",
    "resnext152": "resnext152_32x4d",
    "legacy_xception": "xception",
    "mobilenetv1_100": "mobilenet_v1",
}

# Native input resolution of the models that are not 224 x 224 (torchvision / timm defaults).
_INPUT_SIZE = {"inception_v3": 299, "xception": 299}


def input_size(name: str) -> int:
    """The resolution a model was designed and pretrained at (square)."""
    return _INPUT_SIZE.get(resolve(name), 224)


def register_model(fn: Callable[..., nnx.Module]) -> Callable[..., nnx.Module]:
    """Register an entry point under its function name (decorator)."""
    if fn.__name__ in _MODELS or fn.__name__ in ALIASES:
        raise ValueError(f"register_model: model name {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def deregister_model(name: str) -> None:
    """Remove a model registered with `register_model` (e.g. one registered for a test)."""
    if name not in _MODELS:
        raise ValueError(f"deregister_model: no model registered as {name!r}")
    del _MODELS[name]


def list_models() -> list[str]:
    """Canonical names of every registered model, sorted (aliases not listed)."""
    return sorted(_MODELS)


def resolve(name: str) -> str:
    """The canonical name of `name` or its alias; ValueError listing the known names otherwise."""
    canonical = ALIASES.get(name, name)
    if canonical not in _MODELS:
        aliases = ", ".join(f"{a} -> {c}" for a, c in sorted(ALIASES.items()))
        raise ValueError(f"name: unknown model {name!r}; known models: {', '.join(list_models())} "
                         f"(aliases: {aliases})")
    return canonical


def create_model(name: str, *, num_classes: int = 1000, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, **kwargs) -> nnx.Module:
    """Build the model registered as `name` (or an alias).

    `dtype` is the compute dtype (parameters stay float32), `rngs` seeds the initialisation
    (default nnx.Rngs(0)); other keywords (drop_rate, aux_logits, ...) go to the model.
    """
    canonical = resolve(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    return _MODELS[canonical](num_classes=num_classes, dtype=dtype,
                              rngs=rngs if rngs is not None else nnx.Rngs(0), **kwargs)
