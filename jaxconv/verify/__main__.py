"""python -m jaxconv.verify: jaxconv against PyTorch.

--ops                the op grid (every op and odd configuration, forward and gradients)
--model NAME         one model: torch_ref (random init or --checkpoint) converted to jaxconv
--all                every registered model
Exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import sys

import jax


def verify_ops() -> bool:
    from jaxconv.verify import OP_BF16_RTOL, OP_FP32
    from jaxconv.verify.ops import CASES, run_case

    width = max(len(c.id) for c in CASES)
    print(f"jaxconv.ops vs torch.nn.functional on {jax.default_backend()}: max abs error; fp32 "
          f"bound {OP_FP32['atol']:g} abs + {OP_FP32['rtol']:g} rel, bf16 forward "
          f"{OP_BF16_RTOL:g} of the output's max\n")
    print(f"{'op and configuration':<{width}}  {'forward':>9}  {'grads':>9}  result")
    failures = 0
    for case in CASES:
        r = run_case(case)
        grads = f"{r.grad:9.2e}" if r.grads else f"{'-':>9}"
        print(f"{case.id:<{width}}  {r.forward:9.2e}  {grads}  {'PASS' if r.passed else 'FAIL'}")
        failures += not r.passed
    print(f"\n{len(CASES) - failures} passed, {failures} failed")
    return failures == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxconv.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", action="store_true", help="verify every op of the op grid")
    parser.add_argument("--model", help="verify one registered model, e.g. resnext50_32x4d")
    parser.add_argument("--all", action="store_true", help="verify every registered model")
    parser.add_argument("--checkpoint", help="torch checkpoint for --model (default: seeded random init)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="jaxconv compute dtype (default: float32)")
    parser.add_argument("--size", type=int, help="input resolution (default: the model's native size)")
    parser.add_argument("--batch", type=int, default=4, help="images per check (default: 4)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000)")
    args = parser.parse_args(argv)
    if not (args.ops or args.model or args.all):
        parser.error("nothing to verify: pass --ops, --model NAME or --all")
    if args.checkpoint and not args.model:
        parser.error("--checkpoint needs --model")
    jax.config.update("jax_default_matmul_precision", "highest")
    import torch
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    ok = verify_ops() if args.ops else True
    if args.model or args.all:
        from jaxconv.models import list_models
        from jaxconv.verify.models import verify_model
        for name in list_models() if args.all else [args.model]:
            try:
                ok &= verify_model(name, checkpoint=args.checkpoint, dtype=args.dtype,
                                   size=args.size, batch=args.batch, num_classes=args.num_classes)
            except (ValueError, RuntimeError) as e:  # unknown name, checkpoint that does not fit
                print(f"FAIL {name}: {e}", file=sys.stderr)
                ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
