"""Max and average pooling forward+backward, jaxconv vs torch channels_last, interleaved, on the
pools of the registered models.

    python -m bench pool [--repeats 15]
"""
from __future__ import annotations

import argparse

import numpy as np

from bench.conv import _fmt, _interleaved, _ratio

# (where, NHWC shape, kernel, stride, padding, ceil_mode); "avg" in `where`: avg_pool2d
POOLS = (("googlenet maxpool1", (8, 112, 112, 64), 3, 2, 0, True),
         ("googlenet inception3a pool branch", (8, 28, 28, 192), 3, 1, 1, True),
         ("inception_v3 maxpool1", (8, 147, 147, 64), 3, 2, 0, False),
         ("xception block2 pool", (8, 147, 147, 128), 3, 2, 1, False),
         ("resnext50 maxpool", (8, 112, 112, 64), 3, 2, 1, False),
         ("inception_v3 Mixed_5d avg pool branch", (8, 35, 35, 288), 3, 1, 1, False),
         ("inception_v3 Mixed_6b avg pool branch", (8, 17, 17, 768), 3, 1, 1, False),
         ("inception_v3 Mixed_7c avg pool branch", (8, 8, 8, 2048), 3, 1, 1, False),
         ("inception_v3 AuxLogits avg pool", (8, 17, 17, 768), 5, 3, 0, False))


def _fns(where, shape, k, s, p, ceil):
    import jax
    import jax.numpy as jnp
    import torch

    from jaxconv import ops

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    jx = jnp.asarray(x)
    ours, theirs = ((ops.avg_pool2d, torch.nn.functional.avg_pool2d) if "avg" in where
                    else (ops.max_pool2d, torch.nn.functional.max_pool2d))
    dy = jnp.asarray(rng.standard_normal(ours(jx, k, s, p, ceil_mode=ceil).shape), jnp.float32)
    step = jax.jit(lambda x, dy: jax.vjp(lambda x: ours(x, k, s, p, ceil_mode=ceil), x)[1](dy))
    cl = torch.channels_last
    tx = torch.tensor(x).permute(0, 3, 1, 2).contiguous(memory_format=cl).requires_grad_()
    tdy = torch.tensor(np.asarray(dy)).permute(0, 3, 1, 2).contiguous(memory_format=cl)

    def t_step():
        tx.grad = None
        theirs(tx, k, s, p, ceil_mode=ceil).backward(tdy)

    return {"jaxconv": lambda: jax.block_until_ready(step(jx, dy)), "torch": t_step}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench pool", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    print("| pool | NHWC, k / s / p, ceil | torch ms (min / med) | jaxconv ms | jaxconv / torch |")
    print("|---|---|---|---|---|")
    for where, shape, k, s, p, ceil in POOLS:
        r = _interleaved(_fns(where, shape, k, s, p, ceil), args.repeats)
        print(f"| {where} | {'x'.join(map(str, shape))}, {k} / {s} / {p}, {ceil} | {_fmt(r['torch'])} "
              f"| {_fmt(r['jaxconv'])} | {_ratio(r['jaxconv'], r['torch'])} |", flush=True)
