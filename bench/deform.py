"""Deformable convolution: jaxconv.ops.deform_conv2d vs torch_ref.deform.deform_conv2d, side by side.

    python -m bench deform [--repeats 5] [--no-mask] [--batch 8] [--threads N] [--shapes 0,1,...]
                           [--device cuda]

For DCN layer shapes (3x3, padding 1, batch 8; the last six are resnext50_32x4d_dcn's grouped
ones): forward, and forward + backward (gradients with respect to x, offset, mask, weight and
bias), min and median wall time over `repeats` runs after one warm-up run, the two libraries
interleaved run by run. jaxconv is jitted and timed with jax.block_until_ready; torch runs
eagerly with torch.set_num_threads(threads) (default: all cores, what XLA's CPU client uses), on
the CPU or with `--device cuda` on the GPU (synchronised before each time is read).
ratio = jaxconv / torch_ref (below 1: jaxconv is faster). The 1-minute load average before and
after is printed: other processes on the machine skew both columns.
"""
from __future__ import annotations

import argparse
import os
import platform

import numpy as np

from bench.conv import _interleaved

SHAPES = [  # (C_in, C_out, H = W of the input, stride, groups)
    (64, 256, 56, 1, 1),
    (256, 256, 28, 1, 1),
    (512, 512, 14, 1, 1),
    # the deformable 3x3s of resnext50_32x4d_dcn (stages 2-4: first block strided)
    (256, 256, 56, 2, 32),
    (256, 256, 28, 1, 32),
    (512, 512, 28, 2, 32),
    (512, 512, 14, 1, 32),
    (1024, 1024, 14, 2, 32),
    (1024, 1024, 7, 1, 32),
]


def _jax_fns(x, offset, weight, bias, mask, stride):
    import jax
    import jax.numpy as jnp

    from jaxconv.ops.deform import deform_conv2d

    args = tuple(jnp.asarray(a) for a in (x, offset, weight, bias))
    mask = None if mask is None else jnp.asarray(mask)
    fwd = jax.jit(lambda x, o, w, b, m: deform_conv2d(x, o, w, b, stride=stride, padding=1, mask=m))
    g_out = jnp.ones(jax.eval_shape(fwd, *args, mask).shape, jnp.float32)
    argnums = (0, 1, 2, 3) if mask is None else (0, 1, 2, 3, 4)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fwd(*a) * g_out), argnums=argnums))
    return (lambda: jax.block_until_ready(fwd(*args, mask)),
            lambda: jax.block_until_ready(grad(*args, mask)))


def _torch_fns(x, offset, weight, bias, mask, stride, device="cpu"):
    import torch

    from torch_ref.deform import deform_conv2d

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2)).to(device)  # noqa: E731
    ts = [nchw(x), nchw(offset), torch.tensor(weight.transpose(3, 2, 0, 1)).to(device),
          torch.tensor(bias).to(device), None if mask is None else nchw(mask)]

    def fwd():
        with torch.no_grad():
            deform_conv2d(ts[0], ts[1], ts[2], ts[3], stride, 1, 1, ts[4])
        sync()

    leaves = [t.clone().requires_grad_() for t in ts if t is not None]
    g_out = None

    def fwd_bwd():
        nonlocal g_out
        for t in leaves:
            t.grad = None
        a = leaves + [None] * (5 - len(leaves))
        out = deform_conv2d(a[0], a[1], a[2], a[3], stride, 1, 1, a[4])
        g_out = torch.ones_like(out) if g_out is None else g_out
        out.backward(g_out)
        sync()

    return fwd, fwd_bwd


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench deform", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-mask", action="store_true", help="DCNv1 (no modulation mask)")
    p.add_argument("--shapes", default=",".join(map(str, range(len(SHAPES)))),
                   help="indices into " + str(SHAPES))
    p.add_argument("--device", default="cpu", help="torch's device (cpu, cuda)")
    args = p.parse_args(argv)

    import jax
    import torch

    torch.set_num_threads(args.threads)
    print(f"# deform_conv2d {'DCNv1' if args.no_mask else 'DCNv2 (mask)'}, batch {args.batch}, "
          f"3x3, padding 1, float32, {args.repeats} repeats")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, {args.device}); load before {os.getloadavg()[0]:.2f}")
    header = ("| C_in->C_out, HxW, stride, groups | jaxconv fwd ms (min / med) | torch_ref fwd ms | fwd ratio "
              "| jaxconv fwd+bwd ms | torch_ref fwd+bwd ms | fwd+bwd ratio |")
    print(header)
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for i in map(int, args.shapes.split(",")):
        cin, cout, hw, stride, groups = SHAPES[i]
        n, k, ho = args.batch, 9, (hw - 1) // stride + 1
        x = rng.standard_normal((n, hw, hw, cin), np.float32)
        offset = (2 * rng.standard_normal((n, ho, ho, 2 * k))).astype(np.float32)
        weight = (rng.standard_normal((3, 3, cin // groups, cout))
                  / np.sqrt(9 * cin / groups)).astype(np.float32)
        bias = rng.standard_normal(cout).astype(np.float32)
        mask = None if args.no_mask else rng.uniform(0, 1, (n, ho, ho, k)).astype(np.float32)
        jf, jb = _jax_fns(x, offset, weight, bias, mask, stride)
        tf, tb = _torch_fns(x, offset, weight, bias, mask, stride, args.device)
        row = []
        for jfn, tfn in ((jf, tf), (jb, tb)):
            r = _interleaved({"jax": jfn, "torch": tfn}, args.repeats)
            (jmin, jmed), (tmin, tmed) = r["jax"], r["torch"]
            row += [f"{1e3 * jmin:.2f} / {1e3 * jmed:.2f}", f"{1e3 * tmin:.2f} / {1e3 * tmed:.2f}",
                    f"{jmin / tmin:.2f}"]
        print(f"| {cin}->{cout}, {hw}x{hw}, {stride}, {groups} | " + " | ".join(row) + " |",
              flush=True)
    print(f"# load after {os.getloadavg()[0]:.2f}; ratio = jaxconv min / torch_ref min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
