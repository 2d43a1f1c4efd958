"""Checkpoint files: torch checkpoints in (.pth / .pt / .bin / .safetensors), jaxconv weights in
and out (.safetensors keyed by NNX path, jaxconv layouts).

torch is imported only to read .pth files; .safetensors needs the `safetensors` package only.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxconv.convert.state import ConversionError, _numpy

_CONTAINERS = ("state_dict", "model", "model_state", "module", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def _unwrap(obj) -> dict:
    """The state_dict inside the usual training containers ({'state_dict': ...}, {'model': ...})
    with DataParallel / compile prefixes ('module.', '_orig_mod.') stripped."""
    while isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ConversionError(f"checkpoint: no state_dict found; top-level keys: {sorted(obj)[:10]}")
        obj = inner
    if not isinstance(obj, Mapping):
        raise ConversionError(f"checkpoint: expected a state_dict (a mapping of tensors), got {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch checkpoint as {torch key: numpy array}.

    .pth / .pt / .bin are read with torch.load(weights_only=True) (no code runs from the file);
    .safetensors without torch. A truncated or foreign file raises ConversionError.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"path: no checkpoint file at {path!r}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            raw = load_file(path)
        else:
            import torch
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as e:  # truncated zip, foreign pickle, bad header: one clear error
        raise ConversionError(f"path: cannot read checkpoint {path!r} ({type(e).__name__}: {e})") from e
    return {k: _numpy(v) for k, v in _unwrap(raw).items()}


def _leaves(model) -> dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v
            for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


def save_weights(model, path: str | os.PathLike) -> None:
    """Write `model`'s parameters and batch statistics to a .safetensors file (NNX paths,
    jaxconv layouts)."""
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v[...]) for k, v in _leaves(model).items()}, os.fspath(path))


def load_weights(model, path: str | os.PathLike):
    """Load a file written by save_weights into `model` (strict, all-or-nothing) and return it."""
    from safetensors.numpy import load_file
    path = os.fspath(path)
    try:
        given = load_file(path)
    except Exception as e:
        raise ConversionError(f"path: cannot read jaxconv weights {path!r} ({type(e).__name__}: {e})") from e
    leaves = _leaves(model)
    problems = [f"missing in file: {k}" for k in sorted(set(leaves) - set(given))]
    problems += [f"unexpected in file: {k}" for k in sorted(set(given) - set(leaves))]
    problems += [f"shape mismatch: {k}: file {given[k].shape} vs model {tuple(v.shape)}"
                 for k, v in leaves.items() if k in given and given[k].shape != tuple(v.shape)]
    if problems:
        raise ConversionError(f"{path} does not fit {type(model).__name__} ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))
    for k, v in leaves.items():
        v.set_value(jnp.asarray(given[k], v.dtype))
    return model


__all__ = ["load_checkpoint", "save_weights", "load_weights"]
