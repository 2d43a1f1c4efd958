"""The model registry: `register_model` entry points with their `ModelSpec`, `create_model`,
`list_models`, and the pretrained-weights records (`list_pretrained`, `pretrained_cfg`).

Names follow torchvision / timm and equal torch_ref's, so a model and its reference are built
with the same string; timm's names are aliases where ours differ (``legacy_xception`` ->
``xception``). Every per-model fact lives in the model's spec (jaxconv.models.spec).
"""
from __future__ import annotations

import typing
from typing import Callable

import jax.numpy as jnp
from flax import nnx

from jaxconv.models.spec import ModelSpec, PretrainedCfg

_SPECS: dict[str, ModelSpec] = {}


def register_model(fn: Callable | None = None, **facts):
    """Register an entry point under its function name, as a decorator (bare or with the
    model's facts: mirrors, aliases, input_size, pretrained; see ModelSpec). The model class
    (its family's facts: feature info, classifier, aux heads, minimum input) is the entry
    point's return annotation, or ``cls=``."""
    def register(fn):
        cls = facts.pop("cls", None) or typing.get_type_hints(fn).get("return")
        if cls is None:
            raise ValueError(f"register_model: {fn.__name__} needs a return annotation (the "
                             f"model class) or cls=")
        spec = ModelSpec(fn.__name__, fn, cls, **facts)
        taken = {n for s in _SPECS.values() for n in (s.name, *s.aliases)}
        for name in (spec.name, *spec.aliases):
            if name in taken:
                raise ValueError(f"register_model: model name {name!r} is already registered")
        _SPECS[spec.name] = spec
        return fn
    return register(fn) if fn is not None else register


def deregister_model(name: str) -> None:
    """Remove a model registered with `register_model` (e.g. one registered for a test)."""
    if name not in _SPECS:
        raise ValueError(f"deregister_model: no model registered as {name!r}")
    del _SPECS[name]


def list_models() -> list[str]:
    """Canonical names of every registered model, sorted (aliases not listed)."""
    return sorted(_SPECS)


def aliases() -> dict[str, str]:
    """{alias: canonical name} of every registered model."""
    return {a: s.name for s in _SPECS.values() for a in s.aliases}


def resolve(name: str) -> str:
    """The canonical name of `name` or its alias; ValueError listing the known names otherwise."""
    canonical = aliases().get(name, name)
    if canonical not in _SPECS:
        known = ", ".join(f"{a} -> {c}" for a, c in sorted(aliases().items()))
        raise ValueError(f"name: unknown model {name!r}; known models: {', '.join(list_models())} "
                         f"(aliases: {known})")
    return canonical


def spec(name: str) -> ModelSpec:
    """The registered model's spec (by name or alias)."""
    return _SPECS[resolve(name)]


def input_size(name: str) -> int:
    """The resolution a model was designed and pretrained at (square)."""
    return spec(name).input_size


# ------------------------------------------------------------------------- pretrained weights

def list_pretrained(filter: str = "") -> list[str]:
    """Every pretrained tag ("model.weights", e.g. "resnext50_32x4d.tv2_in1k") containing
    `filter`, sorted; each model's default weights are its first."""
    return sorted(c.tag for s in _SPECS.values() for c in s.pretrained if filter in c.tag)


def pretrained_cfg(tag: str, model: str | None = None) -> PretrainedCfg:
    """The record of pretrained weights `tag`: "model.weights" (the model part may be a timm
    alias, "legacy_xception.tf_in1k"), or just "weights" of `model`, or "model" alone for its
    default weights."""
    name, _, weights = tag.partition(".") if model is None else (model, "", tag)
    s = spec(name)
    if not s.pretrained:
        raise ValueError(f"pretrained: {s.name} has no published weights")
    if not weights:
        return s.pretrained[0]
    for cfg in s.pretrained:
        if cfg.tag == f"{s.name}.{weights}":
            return cfg
    raise ValueError(f"pretrained: unknown weights {weights!r} for {s.name}; known: "
                     f"{', '.join(c.tag for c in s.pretrained)}")


# ------------------------------------------------------------------------------- building

def create_model(name: str, *, pretrained=False, num_classes: int | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None, features_only: bool = False,
                 out_indices=None, **kwargs) -> nnx.Module:
    """Build the model registered as `name` (or an alias), as timm's create_model does.

    `pretrained`: False; True (the model's default weights); a tag ("resnext50_32x4d.tv2_in1k"
    or "tv2_in1k"); a local file (.pth/.pt/.bin/.safetensors, torch or jaxconv layout); or an
    http(s):// / file:// URL. Weights are downloaded once into $JAXCONV_HOME/weights. With
    weights the model is built from shapes alone (no random initialisation is run), and a
    `num_classes` other than the weights' leaves the classifier head(s) freshly initialised.
    `num_classes` (default 1000, or the weights'): 0 drops the classifier (the model returns
    pooled features). `dtype` is the compute dtype (parameters stay float32), `rngs` seeds the
    initialisation (default nnx.Rngs(0)); `features_only=True` returns the NHWC feature maps of
    `out_indices` (default all levels of ``model.feature_info``); other keywords (drop_rate,
    aux_logits, global_pool, in_chans, ...) go to the model.
    """
    s = spec(name)
    if isinstance(num_classes, bool) or num_classes is not None and (
            not isinstance(num_classes, int) or num_classes < 0):
        raise ValueError(f"num_classes: expected a non-negative int, got {num_classes!r}")
    if features_only:
        num_classes = 0
    kwargs["dtype"] = dtype
    if pretrained is not False and pretrained is not None:
        from jaxconv.convert import hub  # (convert sits above models; only weights need it)
        model = hub.build_pretrained(s, pretrained, num_classes, kwargs, rngs)
    else:
        model = s.entry(rngs=rngs if rngs is not None else nnx.Rngs(0),
                        num_classes=1000 if num_classes is None else num_classes, **kwargs)
    if features_only:
        model.set_features_only(out_indices)
    return model
