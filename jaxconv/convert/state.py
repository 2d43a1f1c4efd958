"""torch state_dict <-> NNX state through one rule table.

An NNX parameter path is the torch key with its last name renamed (DESIGN.md), so conversion
needs no per-model code: each NNX leaf name maps to one torch name and one layout rule.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


def _to_hwio(w: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO (transposed convs too: torch (in, out/g, kh, kw) -> (kh, kw, out/g, in));
    Linear (out, in) -> (in, out)."""
    return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T if w.ndim == 2 else w


def _from_hwio(w: np.ndarray) -> np.ndarray:
    return w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T if w.ndim == 2 else w


def _same(w: np.ndarray) -> np.ndarray:
    return w


# NNX leaf name -> (torch name, torch -> jax, jax -> torch)
RULES: dict[str, tuple[str, Callable, Callable]] = {
    "kernel": ("weight", _to_hwio, _from_hwio),
    "scale": ("weight", _same, _same),
    "bias": ("bias", _same, _same),
    "mean": ("running_mean", _same, _same),
    "var": ("running_var", _same, _same),
}
DROPPED = ("num_batches_tracked",)
_log = logging.getLogger("jaxconv")  # torch-only bookkeeping, no NNX counterpart


class ConversionError(ValueError):
    """A state_dict that does not fit the model; lists every offending key."""


def _numpy(value) -> np.ndarray:
    """A torch tensor (any device or dtype, bfloat16 included) or array-like as numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _flatten_reorder(model) -> Mapping[str, tuple[int, int, int]]:
    """Linears whose input is a flattened feature map: torch flattens NCHW (C, H, W), jaxconv NHWC."""
    return getattr(model, "torch_flatten_inputs", {})


def torch_items(model) -> dict[str, tuple[tuple, nnx.Variable]]:
    """{torch key: (NNX path, variable)} for every parameter and batch statistic of `model`."""
    items = {}
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        name = path[-1]
        if name not in RULES:
            raise ConversionError(f"model: no conversion rule for parameter {'.'.join(map(str, path))}")
        items[".".join(map(str, (*path[:-1], RULES[name][0])))] = (path, var)
    return items


def _torch_shape(name: str, shape: tuple) -> tuple:
    """The torch shape of an NNX leaf `name` of `shape` (the inverse layout rule, on shapes)."""
    if name == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape)) if name == "kernel" else tuple(shape)


def _heads(model, new_head) -> tuple[str, ...]:
    """Module paths of the classifier head(s) `new_head` lets differ: the model's own (its
    classifier and aux classifiers) for True, an explicit tuple, or none."""
    if new_head is True:
        aux = getattr(model, "aux_heads", ())
        return tuple(p for p in (getattr(model, "classifier_name", None),
                                 *(a.classifier for a in aux)) if p)
    return tuple(new_head or ())


def adapt_input_conv(weight: np.ndarray, in_chans: int) -> np.ndarray:
    """An RGB stem kernel (O, 3, kh, kw) for `in_chans` inputs, as timm adapts it: summed over
    RGB for 1 channel; for more, RGB repeated and scaled by 3 / in_chans (same response to a
    grey input)."""
    if in_chans == 1:
        return weight.sum(axis=1, keepdims=True)
    reps = -(-in_chans // 3)
    return (np.tile(weight, (1, reps, 1, 1))[:, :in_chans] * (3 / in_chans)).astype(weight.dtype)


def from_torch(model, state_dict: Mapping, strict: bool = True, new_head=False):
    """Load a torch state_dict (tensors or arrays) into `model` in place, all or nothing, and
    return the model (`load_state` returns the keys left as they were instead).

    Missing keys, unexpected keys and shape mismatches are all reported in one ConversionError
    and nothing is loaded unless everything fits. strict=False tolerates missing and unexpected
    keys (as torch's load_state_dict), never a shape mismatch. `new_head` (True: the model's
    classifier head(s); or module paths) lets those keys differ in shape: they keep their values
    (fine-tuning for another class count). A 3-channel stem kernel loads into a model built for
    other `in_chans` (the model's ``first_conv``) adapted as timm does.
    """
    load_state(model, state_dict, strict, new_head)
    return model


def load_state(model, state_dict: Mapping, strict: bool = True, new_head=False) -> list[str]:
    """`from_torch`, returning the keys `new_head` left as they were (logged too)."""
    items = torch_items(model)
    flat_inputs = _flatten_reorder(model)
    given = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in DROPPED}
    heads = _heads(model, new_head)
    problems, kept = [], []
    updates = []
    for key in sorted(set(items) & set(given)):
        path, var = items[key]
        value, expected = _numpy(given[key]), _torch_shape(path[-1], var.shape)
        prefix = key.rsplit(".", 1)[0]
        if (value.shape != expected and prefix == getattr(model, "first_conv", None)
                and value.ndim == 4 and value.shape[1] == 3 and value.shape[0] == expected[0]):
            value = adapt_input_conv(value, expected[1])
            _log.info("converted input conv %s pretrained weights from 3 to %d channel(s)",
                      prefix, expected[1])
        if value.shape != expected:
            if prefix in heads:
                kept.append(key)
                continue
            problems.append(f"shape mismatch: {key}: checkpoint {value.shape} vs model {expected}")
            continue
        if path[-1] == "kernel" and prefix in flat_inputs:
            c, h, w = flat_inputs[prefix]  # (out, C*H*W) in CHW order -> HWC order
            value = value.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(value.shape[0], -1)
        updates.append((var, RULES[path[-1]][1](value).astype(var.dtype)))
    if strict:
        problems += [f"missing in checkpoint: {k}" for k in sorted(set(items) - set(given))]
        problems += [f"unexpected in checkpoint: {k}" for k in sorted(set(given) - set(items))]
    if problems:
        raise ConversionError(f"state_dict does not fit {type(model).__name__} "
                              f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    for var, value in updates:
        var.set_value(jnp.asarray(value))  # `var[...] =` would compile an update per shape
    if kept:
        _log.info("new head (shape differs from the checkpoint's, left as initialised): %s",
                  ", ".join(kept))
    return kept


def to_torch(model) -> dict[str, np.ndarray]:
    """The torch-named state_dict of `model` as numpy arrays (torch layouts)."""
    flat_inputs = _flatten_reorder(model)
    out = {}
    for key, (path, var) in torch_items(model).items():
        value = RULES[path[-1]][2](np.asarray(var[...]))
        prefix = key.rsplit(".", 1)[0]
        if path[-1] == "kernel" and prefix in flat_inputs:
            c, h, w = flat_inputs[prefix]
            value = value.reshape(-1, h, w, c).transpose(0, 3, 1, 2).reshape(value.shape[0], -1)
        out[key] = value
    return out
