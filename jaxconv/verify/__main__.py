"""python -m jaxconv.verify: jaxconv against PyTorch.

--ops                the op grid (every op and odd configuration, forward and gradients)
--model NAME         one model: torch_ref (random init or --checkpoint) converted to jaxconv
--all                every registered model
--torch A:F --jax B:G  any port: the modules the factories (importable callables) return,
                     layer by layer (jaxconv.verify.compare), on a random input of --input-shape
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


def _factory(spec: str):
    """The object at 'package.module:attribute' (a factory to call)."""
    import importlib
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"expected package.module:factory, got {spec!r}")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def verify_port(args) -> bool:
    """--torch / --jax: compare the two modules the factories build, print (or write) the report."""
    import numpy as np
    import torch

    from jaxconv.convert import load_checkpoint
    from jaxconv.verify import compare
    tmodule, jmodule = _factory(args.torch)(), _factory(args.jax)()
    if args.checkpoint:
        state = {k: torch.from_numpy(np.array(v)) for k, v in load_checkpoint(args.checkpoint).items()}
        tmodule.load_state_dict(state, strict=True)
    shape = tuple(int(v) for v in args.input_shape.split(","))
    x = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    x = torch.from_numpy(x)   # NCHW as given: transposed for the jaxconv side
    report = compare(tmodule, jmodule, x, train=args.train, grads=args.grads, float64=args.float64)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    return report.passed


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
    parser.add_argument("--torch", help="any port: package.module:factory returning the torch module")
    parser.add_argument("--jax", help="any port: package.module:factory returning the NNX module")
    parser.add_argument("--input-shape", default="2,3,224,224",
                        help="any port: the torch input shape, NCHW (default: %(default)s)")
    parser.add_argument("--train", action="store_true", help="any port: compare in train mode "
                        "(and the BatchNorm running statistics after the step)")
    parser.add_argument("--grads", action="store_true", help="any port: every parameter gradient too")
    parser.add_argument("--float64", action="store_true",
                        help="both sides in float64 (separates bugs from float32 rounding)")
    parser.add_argument("--json", help="any port: also write the report as JSON to this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input")
    args = parser.parse_args(argv)
    if not (args.ops or args.model or args.all or args.torch or args.jax):
        parser.error("nothing to verify: pass --ops, --model NAME, --all or --torch/--jax")
    if bool(args.torch) != bool(args.jax):
        parser.error("--torch and --jax go together")
    if args.checkpoint and not (args.model or args.torch):
        parser.error("--checkpoint needs --model or --torch")
    jax.config.update("jax_default_matmul_precision", "highest")
    import torch
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    ok = verify_ops() if args.ops else True
    if args.torch:
        try:
            ok &= verify_port(args)
        except (ValueError, ImportError, AttributeError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if args.model or args.all:
        from jaxconv.models import list_models
        from jaxconv.verify.models import verify_model
        for name in list_models() if args.all else [args.model]:
            try:
                ok &= verify_model(name, checkpoint=args.checkpoint, dtype=args.dtype,
                                   size=args.size, batch=args.batch, num_classes=args.num_classes,
                                   float64=args.float64)
            except (ValueError, RuntimeError) as e:  # unknown name, checkpoint that does not fit
                print(f"FAIL {name}: {e}", file=sys.stderr)
                ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
