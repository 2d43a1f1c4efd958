"""Training-mode BatchNorm + ReLU, forward and forward+backward: jaxconv's BatchNorm2d (its
tangent primitive), JAX autodiff of the same formula, and torch channels_last, interleaved.

    python -m bench norm [--repeats 15] [--shapes 8x56x56x256,...]
"""
from __future__ import annotations

import argparse

import numpy as np

from bench.conv import _fmt, _interleaved, _ratio

SHAPES = ("8x112x112x64", "8x56x56x256", "8x28x28x512", "8x14x14x1024")


def _fns(shape):
    import jax
    import jax.numpy as jnp
    import torch

    from jaxconv.ops import batch_norm_train

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[-1]
    scale, bias = jnp.full((c,), 1.5), jnp.full((c,), 0.1)

    def autodiff(x, scale, bias):
        mean = x.mean((0, 1, 2))
        var = jnp.square(x - mean).mean((0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias

    def jaxconv(x, scale, bias):
        return batch_norm_train(x, scale, bias, 1e-5)[0]

    fns = {}
    jx, jdy = jnp.asarray(x), jnp.asarray(dy)
    for name, bn in (("jaxconv", jaxconv), ("autodiff", autodiff)):
        def f(x, s, b, bn=bn):
            return jax.nn.relu(bn(x, s, b))
        fwd = jax.jit(f)
        fwdbwd = jax.jit(lambda x, s, b, dy, f=f: jax.vjp(f, x, s, b)[1](dy))
        fns[(name, "fwd")] = lambda fwd=fwd: jax.block_until_ready(fwd(jx, scale, bias))
        fns[(name, "fwdbwd")] = lambda g=fwdbwd: jax.block_until_ready(g(jx, scale, bias, jdy))

    cl = torch.channels_last
    tx = torch.tensor(x).permute(0, 3, 1, 2).contiguous(memory_format=cl).requires_grad_()
    tdy = torch.tensor(dy).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    tbn = torch.nn.BatchNorm2d(c).train()

    def t_fwd():
        with torch.no_grad():
            torch.relu(tbn(tx))

    def t_fwdbwd():
        tx.grad = None
        torch.relu(tbn(tx)).backward(tdy)

    fns[("torch", "fwd")], fns[("torch", "fwdbwd")] = t_fwd, t_fwdbwd
    return fns


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench norm", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="NxHxWxC,...")
    args = parser.parse_args(argv)
    print("| shape NHWC | pass | torch ms (min / med) | jaxconv ms | jaxconv / torch "
          "| autodiff ms | autodiff / torch |")
    print("|---|---|---|---|---|---|---|")
    for s in args.shapes.split(","):
        shape = tuple(int(v) for v in s.split("x"))
        fns = _fns(shape)
        for p in ("fwd", "fwdbwd"):
            r = _interleaved({k: v for k, v in fns.items() if k[1] == p}, args.repeats)
            t = r[("torch", p)]
            print(f"| {s} | {p} | {_fmt(t)} | {_fmt(r[('jaxconv', p)])} | {_ratio(r[('jaxconv', p)], t)} "
                  f"| {_fmt(r[('autodiff', p)])} | {_ratio(r[('autodiff', p)], t)} |", flush=True)
