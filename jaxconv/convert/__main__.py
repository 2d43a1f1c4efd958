"""python -m jaxconv.convert MODEL SRC DST: a checkpoint (torch .pth/.pt/.bin/.safetensors, or
jaxconv .safetensors) -> jaxconv weights (.safetensors, NNX paths); with --to-torch a torch
state_dict (.pth, or .safetensors with torch names and layouts). torch is needed only to write
a .pth. Strict: every key must fit MODEL (built for the checkpoint's class count unless
--num-classes says otherwise). DST is checked before any work and written atomically."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from jaxconv.convert import ConversionError, hub, to_torch
from jaxconv.convert.files import atomic_write, check_output
from jaxconv.convert.io import save_weights
from jaxconv.models.registry import spec


def _save_torch(state: dict, dst: str) -> None:
    if dst.endswith(".safetensors"):
        from safetensors.numpy import save_file
        with atomic_write(dst) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp)
        return
    try:
        import torch
    except ImportError as e:
        raise ConversionError("dst: writing a .pth needs torch (pip install 'jaxconv[torch]'); "
                              "or write torch names to a .safetensors file") from e
    with atomic_write(dst) as tmp:
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxconv.convert", description=__doc__)
    p.add_argument("model", help="registered model name, e.g. resnext50_32x4d")
    p.add_argument("src", help="checkpoint: torch .pth/.pt/.bin/.safetensors or jaxconv .safetensors")
    p.add_argument("dst", help="jaxconv weights (.safetensors); with --to-torch: .pth or .safetensors")
    p.add_argument("--to-torch", action="store_true", help="write a torch state_dict instead")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the checkpoint's)")
    p.add_argument("--no-aux-logits", action="store_true",
                   help="build googlenet / inception_v3 without aux heads (checkpoint without aux keys)")
    args = p.parse_args(argv)
    kwargs = {"aux_logits": False} if args.no_aux_logits else {}
    try:
        exts = (".pth", ".pt", ".safetensors") if args.to_torch else (".safetensors",)
        dst = check_output(args.dst, exts, "dst")
        s = spec(args.model)
        model = hub.build_pretrained(s, args.src, args.num_classes, kwargs, None, new_head=False)
        if args.to_torch:
            _save_torch(to_torch(model), dst)
        else:
            save_weights(model, dst)
    except ConversionError as e:
        hint = ("" if args.to_torch or not args.dst.endswith((".pth", ".pt")) else
                " (a torch .pth output needs --to-torch)")
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dst} ({len(to_torch(model))} tensors, {s.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
