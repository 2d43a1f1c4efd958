"""jaxconv: convolution variants and classic CNNs in JAX/Flax NNX, verified against PyTorch.

``import jaxconv`` configures glibc's heap (see jaxconv.host_memory) and nothing else; the
subpackages (``jaxconv.models``, ``jaxconv.ops``, ...) and timm's entry points
(``jaxconv.create_model``, ``jaxconv.list_models``) load on first access.
"""
import importlib as _importlib

from jaxconv import host_memory

__version__ = "0.1.0"

host_memory.configure()   # before any JAX computation: see jaxconv.host_memory

_SUBMODULES = ("config", "convert", "models", "nn", "ops", "predict", "summary", "verify")
_FROM_MODELS = ("create_model", "list_models", "list_pretrained")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"jaxconv.{name}")
    if name in _FROM_MODELS:
        return getattr(_importlib.import_module("jaxconv.models"), name)
    raise AttributeError(f"module 'jaxconv' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_SUBMODULES, *_FROM_MODELS})
