"""The PyTorch reference model zoo: plain torch models whose state_dict keys and shapes equal
torchvision 0.28 / timm 1.0, so real checkpoints load with ``strict=True``.

Registry
--------
``create_model(name, *, num_classes=1000, **kwargs)`` builds a registered model,
``list_models()`` lists the canonical names, ``register_model`` adds an entry point (a function
named after the model that takes ``num_classes`` and keyword arguments and returns the module).

Canonical names and their aliases::

    resnext50_32x4d   (resnext50)        torchvision
    resnext101_32x8d                     torchvision
    resnext101_64x4d                     torchvision
    resnext152_32x4d  (resnext152)       torchvision ResNet layout, layers [3, 8, 36, 3]
    googlenet                            torchvision
    inception_v3                         torchvision
    xception          (legacy_xception)  timm 1.0 legacy_xception
    mobilenet_v1      (mobilenetv1_100)  timm 1.0 mobilenetv1_100

Contract shared by every model (jaxconv mirrors it):

- constructor keywords ``num_classes`` and ``drop_rate`` (dropout before the classifier), and
  ``aux_logits`` for googlenet / inception_v3;
- ``model(x)`` takes NCHW float input with 3 channels. In eval mode it returns the logits
  tensor (N, num_classes). In train mode googlenet and inception_v3 built with
  ``aux_logits=True`` return a dict of logits by head name (googlenet: ``logits``, ``aux1``,
  ``aux2``; inception_v3: ``logits``, ``aux``); every other model returns logits in train mode too;
- ``model.feature_maps(x)`` returns an ordered ``dict[str, Tensor]`` of per-stage feature maps,
  named in each model's docstring (and in ``model.feature_info``: name -> (channels, stride));
- input that is not (N, 3, H, W) with H, W at least ``model.min_input_size`` raises ValueError.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["create_model", "list_models", "register_model", "check_input"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}

# alias -> canonical name
_ALIASES: dict[str, str] = {
    "resnext50": "resnext50_32x4d",
    "resnext152": "resnext152_32x4d",
    "legacy_xception": "xception",
    "mobilenetv1_100": "mobilenet_v1",
}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register an entry point under its function name (decorator)."""
    name = fn.__name__
    if name in _MODELS or name in _ALIASES:
        raise ValueError(f"register_model: model name {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Canonical names of all registered models, sorted (aliases are not listed)."""
    return sorted(_MODELS)


def create_model(name: str, *, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` (or an alias of it) with ``num_classes`` outputs.

    Extra keywords go to the model's constructor (``drop_rate``, ``aux_logits``, ...).
    """
    canonical = _ALIASES.get(name, name) if isinstance(name, str) else name
    if canonical not in _MODELS:
        known = ", ".join(list_models())
        aliases = ", ".join(f"{a} -> {c}" for a, c in sorted(_ALIASES.items()))
        raise ValueError(f"create_model: unknown model name {name!r}; known models: {known} "
                         f"(aliases: {aliases})")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"create_model: num_classes must be a positive int, got {num_classes!r}")
    return _MODELS[canonical](num_classes=num_classes, **kwargs)


def check_input(x: torch.Tensor, min_size: int, model: str) -> None:
    """Raise ValueError unless ``x`` is an (N, 3, H, W) floating tensor with H, W >= min_size."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{model}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{model}: x must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{model}: x must be a floating tensor, got dtype {x.dtype}")
    if min(x.shape[2], x.shape[3]) < min_size:
        raise ValueError(f"{model}: x spatial size must be at least {min_size}x{min_size}, "
                         f"got {x.shape[2]}x{x.shape[3]}")


# Importing the family modules registers their entry points (after the registry exists).
from torch_ref.models import googlenet, inception_v3, mobilenet, resnext, xception  # noqa: E402,F401
