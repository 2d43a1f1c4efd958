"""Evaluation preprocessing from a weights' record, and ImageNet's class names.

`transforms(tag)` gives what torchvision's ``weights.transforms()`` / timm's eval transform do:
resize the shorter side to ``resize_size`` (antialiased, the record's interpolation), take the
centre ``crop_size`` crop, scale to [0, 1] and normalise with the record's mean and std; as an
NHWC float32 array. PIL images are resized with PIL itself (torchvision's path for PIL images,
Pillow needed); arrays with jax.image's antialiased resize (within 1/255 of PIL on photos).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from jaxconv.models.spec import PretrainedCfg

CLASSES_FILE = Path(__file__).with_name("imagenet_classes.tsv")


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side, centre crop, normalise: image(s) -> (N, crop, crop, 3) float32."""
    resize_size: int
    crop_size: int
    interpolation: str = "bilinear"
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def __call__(self, images) -> np.ndarray:
        """A PIL image, an (H, W, 3) / (N, H, W, 3) uint8 array (0-255) or float array (0-1),
        or a list of those."""
        if isinstance(images, (list, tuple)):
            return np.concatenate([self(i) for i in images])
        if hasattr(images, "convert"):          # a PIL image
            array = self._resize_pil(images)
        else:
            array = np.asarray(images)
            if array.ndim == 3:
                array = array[None]
            if array.ndim != 4 or array.shape[-1] != 3:
                raise ValueError(f"images: expected (H, W, 3) or (N, H, W, 3) RGB, got shape "
                                 f"{array.shape}")
            array = self._resize_array(array.astype(np.float32) / (255.0 if array.dtype == np.uint8
                                                                   else 1.0))
        array = self._crop(array)
        return ((array - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)

    def _size(self, h: int, w: int) -> tuple[int, int]:
        """torchvision's Resize(int): the shorter side to resize_size, the longer floored."""
        if h <= w:
            return self.resize_size, int(self.resize_size * w / h)
        return int(self.resize_size * h / w), self.resize_size

    def _resize_pil(self, image) -> np.ndarray:
        from PIL import Image
        image = image.convert("RGB")
        h, w = self._size(image.height, image.width)
        method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[self.interpolation]
        return np.asarray(image.resize((w, h), method), np.float32)[None] / 255.0

    def _resize_array(self, array: np.ndarray) -> np.ndarray:
        import jax
        n, h, w, c = array.shape
        size = self._size(h, w)
        method = {"bilinear": "linear", "bicubic": "cubic"}[self.interpolation]
        out = jax.image.resize(array, (n, *size, c), method, antialias=True)
        return np.clip(np.asarray(out), 0.0, 1.0)

    def _crop(self, array: np.ndarray) -> np.ndarray:
        h, w = array.shape[1:3]
        c = self.crop_size
        if h < c or w < c:
            raise ValueError(f"images: resized to {h}x{w}, smaller than the {c}x{c} crop")
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        return array[:, top:top + c, left:left + c]


def transforms(weights: str | PretrainedCfg) -> EvalTransform:
    """The eval transform of pretrained weights (a tag or their record)."""
    from jaxconv.models.registry import pretrained_cfg
    cfg = weights if isinstance(weights, PretrainedCfg) else pretrained_cfg(weights)
    return EvalTransform(cfg.resize_size, cfg.crop_size, cfg.interpolation, cfg.mean, cfg.std)


@functools.cache
def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (first WordNet lemma of each
    synset, e.g. 'tench'); from timm's data files (see imagenet_classes.tsv)."""
    rows = [line.split("\t") for line in CLASSES_FILE.read_text().splitlines()
            if line and not line.startswith("#")]
    return [lemmas.split(",")[0] for _, lemmas in rows]
