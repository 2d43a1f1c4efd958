"""The records that hold every per-model fact: one `ModelSpec` per registered model (what timm
keeps in ``default_cfgs`` and torchvision in ``Weights.meta``), with its pretrained weights as
`PretrainedCfg` records. Plain data: the registry, the trainer, verify, summary and the tests
read these instead of keeping facts of their own.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
    """One feature level: the module whose output it is (timm's name where timm has the
    model), its channels and its reduction (stride) relative to the input."""
    module: str
    num_chs: int
    reduction: int


@dataclasses.dataclass(frozen=True)
class AuxHead:
    """An auxiliary classifier: the module, the key of its logits in train mode, the weight of
    its loss in training (the paper's / torchvision's) and its final Linear."""
    module: str
    output: str
    loss_weight: float
    classifier: str


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """Published weights for a model, and how to feed it (torchvision's ``Weights.meta`` /
    timm's ``PretrainedCfg``). `sha256` is the hash prefix the file name carries
    (torchvision's convention, checked on download), None where there is none."""
    tag: str                        # "<model>.<weights>", e.g. "resnext50_32x4d.tv2_in1k"
    url: str
    num_classes: int = 1000
    input_size: int = 224           # the eval crop
    resize_size: int = 256          # shorter side before the centre crop
    interpolation: str = "bilinear"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    top1: float | None = None       # ImageNet-1k validation, as published
    top5: float | None = None
    license: str = ""
    source: str = ""                # where the weights and these facts come from
    hf_hub_id: str | None = None    # Hugging Face Hub repository, when there is one
    model_kwargs: tuple = ()        # (name, value) pairs the weights need, e.g. transform_input
    cache_name: str | None = None   # the file's name in the cache when the URL's is generic

    @property
    def file_name(self) -> str:
        return self.cache_name or self.url.rsplit("/", 1)[-1]

    @property
    def sha256(self) -> str | None:
        """torchvision's files carry their sha256 prefix (checked on download); for files of
        other hosts the name's hex part is not known to be one."""
        return hash_prefix(self.file_name) if self.url.startswith(TORCHVISION_URL) else None

    @property
    def crop_size(self) -> int:
        return self.input_size

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size


TORCHVISION_URL = "https://download.pytorch.org/models/"
TORCHVISION_LICENSE = ("BSD-3-Clause (torchvision); the weights' terms may derive from "
                       "ImageNet's (torchvision's README)")


def hash_prefix(file_name: str) -> str | None:
    """The sha256 prefix a file name carries by torchvision's convention (name-<hex>.ext)."""
    match = re.search(r"-([a-f0-9]{6,})\.[^.]+$", file_name)
    return match.group(1) if match else None


def resize_for(crop: int, crop_pct: float) -> int:
    """timm's eval resize: the shorter side is crop / crop_pct (floored)."""
    return int(math.floor(crop / crop_pct))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Every fact about one registered model: its own (name, aliases, what it mirrors, native
    size, published weights) and, through its class, its family's (feature levels, classifier,
    stem conv, aux heads, minimum input)."""
    name: str
    entry: Callable
    cls: type
    mirrors: str = ""               # the torchvision / timm model it mirrors, e.g. "timm legacy_xception"
    aliases: tuple = ()
    input_size: int = 224           # native resolution (square)
    pretrained: tuple = ()          # PretrainedCfg per published weights; the first is default

    @property
    def feature_info(self) -> tuple:
        return self.cls.feature_levels

    @property
    def classifier(self) -> str:
        return self.cls.classifier_name

    @property
    def first_conv(self) -> str:
        return self.cls.first_conv

    @property
    def aux_heads(self) -> tuple:
        return getattr(self.cls, "aux_heads", ())

    @property
    def min_input_size(self) -> int:
        return self.cls.min_input_size

    @property
    def aux_min_input_size(self) -> int:
        """The smallest input the aux heads (train mode) work at."""
        return getattr(self.cls, "aux_min_input_size", 0) if self.aux_heads else 0

    @property
    def classifiers(self) -> tuple[str, ...]:
        """Every Linear whose shape depends on num_classes (the head and the aux heads')."""
        return (self.classifier,) + tuple(a.classifier for a in self.aux_heads)
