"""Max and average pooling forward+backward, jaxconv vs torch channels_last, interleaved, on the
pools of the registered models.

    python -m bench pool [--repeats 15] [--threads N]

Each framework runs in a process of its own (bench.conv._workers).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from bench.conv import _fmt, _interleaved, _ratio, _torch, _workers

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


def _inputs(shape, out_shape):
    """x and the output gradient dy of one pool: NHWC float32, the same in both workers."""
    rng = np.random.default_rng(0)
    return rng.standard_normal(shape, np.float32), rng.standard_normal(out_shape, np.float32)


def _jax_fns(where, shape, k, s, p, ceil):
    import jax
    import jax.numpy as jnp

    from jaxconv import ops

    pool = ops.avg_pool2d if "avg" in where else ops.max_pool2d
    fwd = lambda x: pool(x, k, s, p, ceil_mode=ceil)  # noqa: E731
    x, dy = map(jnp.asarray, _inputs(shape, jax.eval_shape(fwd, jax.ShapeDtypeStruct(shape, jnp.float32)).shape))
    step = jax.jit(lambda x, dy: jax.vjp(fwd, x)[1](dy))
    return {"jaxconv": lambda: jax.block_until_ready(step(x, dy))}


def _torch_fns(where, shape, k, s, p, ceil, threads):
    torch = _torch(threads)
    pool = torch.nn.functional.avg_pool2d if "avg" in where else torch.nn.functional.max_pool2d
    n, c, h, w = pool(torch.empty(shape[0], shape[3], *shape[1:3]), k, s, p, ceil_mode=ceil).shape
    x, dy = (torch.tensor(a).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
             for a in _inputs(shape, (n, h, w, c)))
    x.requires_grad_()

    def step():
        x.grad = None
        pool(x, k, s, p, ceil_mode=ceil).backward(dy)

    return {"torch": step}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench pool", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = parser.parse_args(argv)
    print("| pool | NHWC, k / s / p, ceil | torch ms (min / med) | jaxconv ms | jaxconv / torch |")
    print("|---|---|---|---|---|")
    with _workers() as (jax_worker, torch_worker):
        for pool in POOLS:
            fns = {**jax_worker.fns(_jax_fns, *pool), **torch_worker.fns(_torch_fns, *pool, args.threads)}
            r = _interleaved(fns, args.repeats)
            where, shape, k, s, p, ceil = pool
            print(f"| {where} | {'x'.join(map(str, shape))}, {k} / {s} / {p}, {ceil} | {_fmt(r['torch'])} "
                  f"| {_fmt(r['jaxconv'])} | {_ratio(r['jaxconv'], r['torch'])} |", flush=True)
