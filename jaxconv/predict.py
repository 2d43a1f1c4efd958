"""python -m jaxconv.predict IMAGE... --model NAME [--pretrained TAG|PATH|URL]: ImageNet top-k.

Each image is preprocessed as its weights' record says (jaxconv.models.transforms: resize,
centre crop, normalise) and classified by the pretrained model; the top-k classes are printed
with their names (ImageNet-1k's, for 1000-class weights) and probabilities, or as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np


def predict(images, model_name: str, pretrained=True, top: int = 5):
    """[[(class index, name, probability)] * top] per image (PIL images or paths)."""
    from PIL import Image

    from jaxconv.convert import hub
    from jaxconv.models import create_model, imagenet_classes
    from jaxconv.models.registry import spec
    from jaxconv.models.transforms import EvalTransform, transforms

    cfg, _ = hub.resolve(spec(model_name), pretrained)
    model = create_model(model_name, pretrained=pretrained)
    model.eval()
    if cfg is not None:
        transform = transforms(cfg)
    else:   # a file of our own: the model's native size, ImageNet's statistics
        size = spec(model_name).input_size
        transform = EvalTransform(round(size * 256 / 224), size)
    pil = [Image.open(i) if isinstance(i, (str, bytes)) or hasattr(i, "__fspath__") else i
           for i in images]
    x = transform(pil)
    logits = np.asarray(jax.jit(lambda x: model(x))(x), np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    names = imagenet_classes() if probs.shape[-1] == 1000 else None
    out = []
    for p in probs:
        idx = np.argsort(-p)[:top]
        out.append([(int(i), names[i] if names else str(i), float(p[i])) for i in idx])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxconv.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
    p.add_argument("--model", default="resnext50_32x4d", help="registered model (default: %(default)s)")
    p.add_argument("--pretrained", default=None,
                   help="weights: a tag (resnext50_32x4d.tv2_in1k or tv2_in1k), a file or a URL "
                        "(default: the model's default weights)")
    p.add_argument("--top", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    try:
        results = predict(args.images, args.model, args.pretrained or True, args.top)
    except (ValueError, OSError) as e:   # unknown model, missing weights, unreadable image
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"image": i, "top": [{"class": c, "name": n, "probability": p}
                                               for c, n, p in r]}
                          for i, r in zip(args.images, results)], indent=1))
        return 0
    for image, rows in zip(args.images, results):
        print(image)
        for c, name, prob in rows:
            print(f"  {prob:7.2%}  {c:4d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
