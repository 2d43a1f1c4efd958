"""What every model file shares: the input check, and `Classifier`, the model contract timm users
expect (forward_features / forward_head / num_features / reset_classifier / feature maps /
features_only / gradient checkpointing), written once for every family.

A family subclasses `Classifier`, sets its facts as class attributes (``feature_levels``,
``classifier_name``, ``first_conv``, ``min_input_size``, optionally ``aux_heads``), builds its
body, then calls `_head(...)`, and lists its body as `stages()`: one function per feature
level, in order, each ``fn(model, x, with_aux) -> (x, feature, aux)`` (the feature is usually
x itself; aux holds the auxiliary logits computed inside the stage in train mode).
"""
from __future__ import annotations

import collections

import jax.numpy as jnp
from flax import nnx

from jaxconv.nn import Dropout, Linear


def check_input(x, min_size: int, model: str, in_chans: int = 3) -> None:
    """Raise ValueError unless `x` is an (N, H, W, in_chans) floating array with H, W >=
    `min_size`. The NHWC twin of torch_ref.models.check_input; `model` prefixes the message."""
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"{model}: x must be an array (N, H, W, {in_chans}), got {type(x).__name__}")
    if len(shape) != 4 or shape[-1] != in_chans:
        hint = (" (NCHW? jaxconv models take NHWC)" if len(shape) == 4 and shape[1] == in_chans
                else "")
        raise ValueError(f"{model}: x must have shape (N, H, W, {in_chans}), got {tuple(shape)}{hint}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{model}: x must be a floating array, got dtype {dtype}")
    if min(shape[1], shape[2]) < min_size:
        raise ValueError(f"{model}: x spatial size must be at least {min_size}x{min_size}, "
                         f"got {shape[1]}x{shape[2]}")


class FeatureInfoList(tuple):
    """A model's feature levels (timm's ``model.feature_info``): FeatureInfo records with
    timm's accessors over the selected levels (`out_indices`; all by default)."""

    def __new__(cls, infos, out_indices=None):
        self = super().__new__(cls, infos)
        self.out_indices = tuple(range(len(infos)) if out_indices is None else out_indices)
        return self

    def _get(self, field, idx):
        idx = self.out_indices if idx is None else idx
        if isinstance(idx, (list, tuple)):
            return [getattr(self[i], field) for i in idx]
        return getattr(self[idx], field)

    def channels(self, idx=None):
        return self._get("num_chs", idx)

    def reduction(self, idx=None):
        return self._get("reduction", idx)

    def module_name(self, idx=None):
        return self._get("module", idx)


def _select(path: str, root):
    """The module at dotted `path` of `root` (its parent and attribute name)."""
    *parents, name = path.split(".")
    for p in parents:
        root = getattr(root, p)
    return root, name


class Classifier(nnx.Module):
    """timm's model contract for NHWC models: ``model(x)`` = ``forward_head(forward_features(x))``,
    ``feature_maps(x)``, ``num_features``, ``num_classes``, ``reset_classifier``,
    ``set_grad_checkpointing``, ``features_only`` (``set_features_only``)."""

    min_input_size = 1
    aux_heads: tuple = ()

    # ---------------------------------------------------------------------------- the head

    def _head(self, num_features: int, num_classes: int, drop_rate: float, global_pool: str,
              *, rngs: nnx.Rngs):
        """Global pooling, dropout and the classifier (None when num_classes is 0); called
        last in a family's __init__."""
        self.num_features = num_features
        self.grad_checkpointing = False
        self.feature_indices = None         # features_only: the levels __call__ returns
        self.use_running_average = False    # set by model.train() / model.eval()
        self.dropout = Dropout(drop_rate, rngs=rngs)
        self._set_classifier(num_classes, global_pool, rngs)

    def _set_classifier(self, num_classes: int, global_pool: str, rngs: nnx.Rngs):
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool: expected 'avg' or '' (no pooling), got {global_pool!r}")
        self.num_classes, self.global_pool = num_classes, global_pool
        # nnx.data: the attribute holds a module now or later (reset_classifier), never static
        setattr(self, self.classifier_name,
                nnx.data(self._classifier(num_classes, rngs) if num_classes else None))

    def _classifier(self, num_classes: int, rngs: nnx.Rngs):
        """The classifier Linear for `num_classes` (families with their own init override it)."""
        return Linear(self.num_features, num_classes, dtype=self.dtype,
                      param_dtype=self.param_dtype, rngs=rngs)

    @property
    def training(self) -> bool:
        """True after ``model.train()`` (BatchNorm uses batch statistics), as torch's flag."""
        return not self.use_running_average

    def reset_classifier(self, num_classes: int, global_pool: str = "avg", *,
                         rngs: nnx.Rngs | None = None) -> None:
        """A fresh classifier for `num_classes` (0: none, the model returns pooled features;
        global_pool '': unpooled), the aux heads' classifiers too (removed for 0)."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self._set_classifier(num_classes, global_pool, rngs)
        for aux in self.aux_heads:
            if getattr(self, aux.module, None) is None:
                continue
            if num_classes:
                parent, name = _select(aux.classifier, self)
                old = getattr(parent, name)
                setattr(parent, name, nnx.data(self._aux_classifier(aux, old.in_features,
                                                                    num_classes, rngs)))
            else:
                setattr(self, aux.module, nnx.data(None))

    def _aux_classifier(self, aux, in_features: int, num_classes: int, rngs: nnx.Rngs):
        raise NotImplementedError

    def forward_head(self, x, pre_logits: bool = False):
        """Pool (global average unless global_pool=''), dropout, classifier: logits, or with
        `pre_logits` the pooled features the classifier reads."""
        if self.global_pool == "avg":
            x = jnp.mean(x, axis=(1, 2))
        x = self.dropout(x)
        head = getattr(self, self.classifier_name)
        return x if pre_logits or head is None else head(x)

    # ------------------------------------------------------------------------------ the body

    def stages(self):
        """[(FeatureInfo, fn)]: see the module docstring."""
        raise NotImplementedError

    def _prepare(self, x):
        """What the model does to its input first (check it; some also renormalise)."""
        check_input(x, self.min_input_size, type(self).__name__, self.in_chans)
        return x

    def _run(self, x, with_aux: bool, last: int | None = None):
        """(final x, [feature per level], aux logits) through the stages up to index `last`."""
        x = self._prepare(x)
        feats, aux = [], {}
        for i, (_, fn) in enumerate(self.stages()):
            if self.grad_checkpointing:
                fn = nnx.remat(fn, static_argnums=(2,))
            x, feat, stage_aux = fn(self, x, with_aux)
            feats.append(feat)
            aux.update(stage_aux)
            if last is not None and i == last:
                break
        return x, feats, aux

    def forward_features(self, x):
        """The last feature map, unpooled (N, H', W', num_features)."""
        return self._run(x, with_aux=False)[0]

    def feature_maps(self, x) -> collections.OrderedDict:
        """{feature module name: NHWC map} for every level of ``feature_info``, in order."""
        _, feats, _ = self._run(x, with_aux=False)
        # OrderedDict: jax keeps its key order through jit (a plain dict comes back sorted)
        return collections.OrderedDict(zip((f.module for f in self.feature_levels), feats))

    def _with_aux(self) -> bool:
        return self.training and any(getattr(self, a.module, None) is not None
                                     for a in self.aux_heads)

    def __call__(self, x):
        if self.feature_indices is not None:
            _, feats, _ = self._run(x, with_aux=False, last=max(self.feature_indices))
            return [feats[i] for i in self.feature_indices]
        with_aux = self._with_aux()
        x, _, aux = self._run(x, with_aux)
        logits = self.forward_head(x)
        if with_aux:
            return collections.OrderedDict(logits=logits, **aux)
        return logits

    # ------------------------------------------------------------------------------ switches

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward pass instead of storing its activations
        (nnx.remat per stage): the same outputs and gradients for less memory."""
        self.grad_checkpointing = bool(enable)

    @property
    def feature_info(self) -> FeatureInfoList:
        """The feature levels (timm's ``model.feature_info``: ``.channels()``,
        ``.reduction()``, ``.module_name()``), the selected ones under features_only."""
        return FeatureInfoList(self.feature_levels, self.feature_indices)

    def set_features_only(self, out_indices=None) -> None:
        """Make ``model(x)`` return the list of NHWC feature maps at `out_indices` (default all
        levels; negative indices count from the end) and drop the heads, as timm's
        ``features_only=True``."""
        n = len(self.feature_levels)
        idx = tuple(range(n)) if out_indices is None else tuple(out_indices)
        if not idx or any(not isinstance(i, int) or not -n <= i < n for i in idx):
            raise ValueError(f"out_indices: expected indices into the {n} feature levels "
                             f"{[f.module for f in self.feature_levels]}, got {out_indices!r}")
        self.reset_classifier(0)
        self.feature_indices = tuple(i % n for i in idx)
