"""Checkpoint files: torch checkpoints (.pth / .pt / .bin, read without torch, or .safetensors)
and jaxconv weights (.safetensors keyed by NNX path, jaxconv layouts), and `load_weights`, the
one strict loader for both (create_model(pretrained=...), train --init-from and users).
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np
from flax import nnx

from jaxconv.convert import pth
from jaxconv.convert.state import RULES, ConversionError, _numpy, load_state, torch_items

# containers that training scripts wrap a state_dict in, in the order they are looked for
# (timm's EMA weights last: a file with both gives the raw ones, as timm's load_checkpoint)
_CONTAINERS = ("state_dict", "model_state_dict", "model", "model_state", "module", "net",
               "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "model.", "_orig_mod.")
_JAXCONV_LEAVES = ("kernel", "scale", "mean", "var")


def _unwrap(obj) -> dict:
    """The state_dict inside the usual training containers ({'state_dict': ...},
    {'model_state_dict': ...}, timm's {'state_dict_ema': ...}, ...) with DataParallel / compile
    prefixes ('module.', '_orig_mod.') stripped."""
    while isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ConversionError(f"checkpoint: no state_dict found; top-level keys: {sorted(obj)[:10]} "
                                  f"(looked for {', '.join(_CONTAINERS)})")
        obj = inner
    if not isinstance(obj, Mapping):
        raise ConversionError(f"checkpoint: expected a state_dict (a mapping of tensors), got {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def layout(state: Mapping) -> str:
    """'jaxconv' for NNX-path keys (kernel / scale / mean / var leaves), else 'torch'."""
    leaves = {k.rsplit(".", 1)[-1] for k in state}
    return "jaxconv" if leaves & set(_JAXCONV_LEAVES) and "weight" not in leaves else "torch"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """(state as {key: numpy array}, its layout 'torch' or 'jaxconv') of a checkpoint file:
    .safetensors, or a torch .pth / .pt / .bin (read without torch; hostile pickles refused).
    A missing, truncated or foreign file raises ConversionError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"path: no checkpoint file at {path!r}")
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        if head.startswith(b"PK") or not path.endswith(".safetensors") and head[:1] == b"\x80":
            raw = pth.load(path)
        else:
            from safetensors.numpy import load_file
            raw = load_file(path)
    except ConversionError:
        raise
    except Exception as e:  # truncated zip, bad header: one clear error
        kind = "safetensors" if path.endswith(".safetensors") else "torch"
        raise ConversionError(f"path: cannot read {kind} checkpoint {path!r} "
                              f"({type(e).__name__}: {e})") from e
    state = {k: _numpy(v) for k, v in _unwrap(raw).items()}
    return state, layout(state)


def load_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch checkpoint (torch keys and layouts) as {key: numpy array}, without torch;
    wrappers unwrapped. A jaxconv-layout file is refused with a pointer to load_weights."""
    state, kind = read_checkpoint(path)
    if kind == "jaxconv":
        raise ConversionError(f"path: {os.fspath(path)!r} is a jaxconv-layout file (NNX paths, "
                              f"HWIO kernels); load it with jaxconv.convert.load_weights(model, "
                              f"path), which reads both layouts")
    return state


def _leaves(model) -> dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v
            for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


def as_torch_layout(model, state: Mapping) -> dict[str, np.ndarray]:
    """A jaxconv-layout state ({NNX path: array}) in torch keys and layouts for `model` (keys
    the model does not have are kept as they are, so that they are reported)."""
    by_path = {".".join(map(str, path)): key for key, (path, _) in torch_items(model).items()}
    flat_inputs = getattr(model, "torch_flatten_inputs", {})
    out = {}
    for k, v in state.items():
        if k not in by_path:
            out[k] = v
            continue
        key, leaf = by_path[k], k.rsplit(".", 1)[-1]
        v = RULES[leaf][2](np.asarray(v))
        prefix = key.rsplit(".", 1)[0]
        if leaf == "kernel" and prefix in flat_inputs and v.ndim == 2:
            c, h, w = flat_inputs[prefix]
            v = v.reshape(-1, h, w, c).transpose(0, 3, 1, 2).reshape(v.shape[0], -1)
        out[key] = v
    return out


def load_weights(model, source, *, strict: bool = True, new_head=False):
    """Load weights into `model` in place, strictly, all or nothing, and return the model.
    `source`: a file (torch .pth / .pt / .bin / .safetensors or jaxconv .safetensors) or a state
    dict in either layout. `new_head`: True lets the classifier head(s) (the model's classifier
    and aux classifiers) differ in shape from the checkpoint's (another class count): those keep
    their initialisation and are logged; or an explicit tuple of module paths."""
    load_weights_state(model, source, strict=strict, new_head=new_head)
    return model


def load_weights_state(model, source, *, strict: bool = True, new_head=False) -> list[str]:
    """`load_weights`, returning the keys `new_head` left as they were."""
    if isinstance(source, Mapping):
        state = {k: _numpy(v) for k, v in _unwrap(source).items()}
        kind = layout(state)
    else:
        state, kind = read_checkpoint(source)
    if kind == "jaxconv":
        state = as_torch_layout(model, state)
    return load_state(model, state, strict=strict, new_head=new_head)


def save_weights(model, path: str | os.PathLike) -> None:
    """Write `model`'s parameters and batch statistics to a .safetensors file (NNX paths,
    jaxconv layouts), atomically (a temporary file in the same folder, renamed when complete)."""
    from safetensors.numpy import save_file

    from jaxconv.convert.files import atomic_write
    arrays = {k: np.ascontiguousarray(v[...]) for k, v in _leaves(model).items()}
    with atomic_write(path) as tmp:
        save_file(arrays, tmp)

