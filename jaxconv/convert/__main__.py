"""python -m jaxconv.convert MODEL SRC DST: torch checkpoint -> jaxconv weights (.safetensors),
or with --to-torch the reverse (DST .pth or .safetensors with torch names and layouts)."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from jaxconv.convert import ConversionError, from_torch, load_checkpoint, load_weights, save_weights, to_torch
from jaxconv.models import create_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxconv.convert", description=__doc__)
    p.add_argument("model", help="registered model name, e.g. resnext50_32x4d")
    p.add_argument("src", help="torch checkpoint (.pth/.pt/.safetensors); with --to-torch: jaxconv weights")
    p.add_argument("dst", help="jaxconv weights (.safetensors); with --to-torch: .pth or .safetensors")
    p.add_argument("--to-torch", action="store_true", help="convert jaxconv weights back to a torch state_dict")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000)")
    p.add_argument("--no-aux-logits", action="store_true",
                   help="build googlenet / inception_v3 without aux heads (checkpoint without aux keys)")
    args = p.parse_args(argv)
    kwargs = {"aux_logits": False} if args.no_aux_logits else {}
    try:
        model = create_model(args.model, num_classes=args.num_classes, **kwargs)
        if args.to_torch:
            state = to_torch(load_weights(model, args.src))
            if args.dst.endswith(".safetensors"):
                from safetensors.numpy import save_file
                save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, args.dst)
            else:
                import torch
                torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, args.dst)
        else:
            save_weights(from_torch(model, load_checkpoint(args.src)), args.dst)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({len(to_torch(model))} tensors, {args.model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
