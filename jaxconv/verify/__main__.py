"""python -m jaxconv.verify --ops: jaxconv vs PyTorch on the op grid, as a table; exit 1 on any FAIL."""
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
    parser = argparse.ArgumentParser(prog="python -m jaxconv.verify", description=__doc__)
    parser.add_argument("--ops", action="store_true", help="verify every op of the op grid")
    args = parser.parse_args(argv)
    if not args.ops:
        parser.error("nothing to verify: pass --ops")
    jax.config.update("jax_default_matmul_precision", "highest")
    return 0 if verify_ops() else 1


if __name__ == "__main__":
    sys.exit(main())
