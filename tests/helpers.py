"""What the test files share, defined once: seeded inputs, layout transposes, parameter
randomisation, models built without their initialisers, the torchvision / timm reference
fixture, registry parameterisation and test-only models (registered only inside a test).

Both suites import it (``from tests.helpers import ...``); nothing here reads outside the
repository.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxconv.models import create_model, register_model
from jaxconv.models.registry import deregister_model, resolve
from jaxconv.models.resnext import ResNeXt

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reference_state_dicts.json"
BIG = {"resnext101_32x8d", "resnext101_64x4d", "resnext152_32x4d"}
# compiled checks at real sizes under -m slow only: the big variants and the deformable ResNeXt
# (jaxconv.ops.deform has its own parity tests; its wiring is checked by the small-input tests)
HEAVY = BIG | {"resnext50_32x4d_dcn"}
AUX_PREFIXES = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


# ---------------------------------------------------------------------------------- arrays

def rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(seed)


def rand(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Standard normal numpy array of `shape`, reproducible from `seed`."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def nchw(x, dtype=None):
    """An NHWC numpy array as an NCHW torch tensor (other ranks as they are)."""
    import torch
    a = np.asarray(x)
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2) if a.ndim == 4 else a))
    return t if dtype is None else t.to(dtype)


def nhwc(t) -> np.ndarray:
    """An NCHW torch tensor (or numpy array) as an NHWC numpy array (other ranks as they are)."""
    a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def exported_mlir(fn, *args, platform: str = "cpu") -> str:
    """The StableHLO text of jit(fn)(*args) lowered for `platform` (jaxconv's FFI targets
    allowed), to check which convolutions and custom calls a computation uses."""
    from jaxconv.ops import lowering
    return jax.export.export(jax.jit(fn), platforms=[platform],
                             disabled_checks=lowering.EXPORT_CHECKS)(*args).mlir_module()


def operand_dtypes(closed_jaxpr, primitives) -> set:
    """{(primitive name, operand dtypes)} over every equation of `closed_jaxpr` (nested jaxprs
    included) whose primitive is named in `primitives`: which precision the convolutions and
    matrix products of a traced function compute in."""
    found, todo = set(), [closed_jaxpr.jaxpr]
    while todo:
        for eqn in todo.pop().eqns:
            if eqn.primitive.name in primitives:
                found.add((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars)))
            for p in jax.tree.leaves(eqn.params, is_leaf=lambda v: hasattr(v, "eqns")
                                     or hasattr(v, "jaxpr")):
                if hasattr(p, "eqns"):
                    todo.append(p)
                elif hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                    todo.append(p.jaxpr)
    return found


def heads(out) -> dict:
    """A model's output as {head name: array}: a dict of heads as is, plain logits as 'logits'."""
    return dict(out) if isinstance(out, dict) else {"logits": out}


# ---------------------------------------------------------------------------------- modules

def randomise(module, seed: int = 0) -> None:
    """Random values for every parameter and BN statistic of an NNX module (variances > 0.5)."""
    key = jax.random.key(seed)
    for path, var in nnx.to_flat_state(nnx.state(module, (nnx.Param, nnx.BatchStat))):
        key, sub = jax.random.split(key)
        v = jax.random.normal(sub, var.shape)
        var[...] = jnp.abs(v) + 0.5 if path[-1] == "var" else v


def randomise_torch_bn(module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics of a torch module, so that
    eval mode tests something."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    if t is not None:   # affine=False: no weight, bias
                        t.copy_(torch.randn(t.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def image_folder(root: Path, train_per_class: int, val_per_class: int, vary_height: bool = False):
    """An ImageFolder tree root/{train,val}/{cat,dog}/i.jpg of seeded random JPEGs (20x24, or
    (20+i)x30 with `vary_height`), as `--dataset folder:ROOT` reads it."""
    import tensorflow as tf
    rng = np.random.RandomState(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                size = (20 + i, 30, 3) if vary_height else (20, 24, 3)
                img = rng.randint(0, 256, size=size, dtype=np.uint8)
                (d / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(img).numpy())


def abstract_model(name: str, **kwargs):
    """The model's structure (shapes only), without running its initialisers."""
    return nnx.eval_shape(lambda: create_model(name, **kwargs))


def filled_model(name: str, seed: int = 0, fill: str = "he", **kwargs):
    """The model with values from numpy instead of its initialisers (instant): `fill` 'he'
    gives kernels He-normal over their fan-in, BN scales 1, biases 0, running mean 0 / var 1;
    'constant' 0.5 everywhere, 'zeros' zeros (for conversion tests and checkpoint loads)."""
    graphdef, state = nnx.split(abstract_model(name, **kwargs))
    rng = np.random.default_rng(seed)

    def fill_leaf(path, leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if fill != "he":
            return jnp.full(leaf.shape, 0.5 if fill == "constant" else 0.0, leaf.dtype)
        if path[-1] == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            return jnp.asarray(rng.standard_normal(leaf.shape) * math.sqrt(2 / fan_in), leaf.dtype)
        if path[-1] in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return nnx.merge(graphdef, nnx.map_state(fill_leaf, state))


def num_params(model) -> int:
    """Trainable parameters of an NNX or a torch module."""
    if hasattr(model, "parameters"):
        return sum(p.numel() for p in model.parameters())
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------- the registry

def reference(name: str) -> dict | None:
    """The fixture's entry ({'state_dict': {key: shape}, 'num_params', 'source'}) of the
    torchvision / timm model that registered model `name` mirrors (fixture entries carry timm's
    names, which the registry knows as aliases), or None for models without one."""
    entries = json.loads(FIXTURE.read_text())
    return next((v for k, v in entries.items() if resolve(k) == resolve(name)), None)


def params(names, slow=frozenset(), only=None) -> list:
    """pytest params over `names` (restricted to `only`), those in `slow` marked slow."""
    return [pytest.param(n, id=n, marks=[pytest.mark.slow] if n in slow else [])
            for n in names if only is None or n in only]


def resnext_tiny(**kwargs) -> ResNeXt:
    """The real ResNeXt class with one bottleneck per stage, cardinality 4, width 4 per group:
    what the training tests train (resnext50_32x4d's code at a cost two CPU cores afford)."""
    return ResNeXt((1, 1, 1, 1), 4, 4, **kwargs)


@contextlib.contextmanager
def registered(*entries):
    """Register test-only models for the duration of the block (nothing leaks into other
    tests: parity tests see only the models that have a torch_ref twin)."""
    for fn in entries:
        register_model(fn)
    try:
        yield
    finally:
        for fn in entries:
            deregister_model(fn.__name__)
