"""Grouped and depthwise convolutions: jaxconv vs PyTorch, side by side, on CPU.

    python -m bench grouped [--layers] [--dense] [--models] [--repeats 7] [--batch 8] [--threads 2]
                            [--lowerings auto,xla] [--only NAME,...] [--passes fwd,fwdbwd]

--layers: every distinct grouped / depthwise layer of ResNeXt-50 (32x4d, layer1-4 conv2),
Xception (the depthwise half of every separable conv, 299x299 input) and MobileNet-v1 (the
depthwise convs, 224x224), batch `batch`, 3x3, fp32: forward, and forward + backward (the
gradients of x and of the kernel under a fixed random cotangent), jaxconv.ops.conv2d under each
lowering vs torch.nn.functional.conv2d on channels_last tensors.

--dense: the dense convs that 'auto' also lowers on CPU (the stems, Xception's 32-channel
conv2: the C++ kernel; 1x1 convs: a matrix product), forward and forward + backward.

--models: resnext50_32x4d, xception, mobilenet_v1 at their native resolution: inference
(eval mode, nnx.jit / torch.no_grad) and a train step (cross-entropy, forward, backward, plain
SGD update; torch.optim.SGD) at batch `--model-batch` (default 8), jaxconv (under each lowering)
vs torch_ref on channels_last.

Every number is a wall time over `repeats` runs after one warm-up run (which compiles),
jax.block_until_ready on jaxconv's side, jaxconv and torch interleaved run by run so that load
changes hit both; torch uses torch.set_num_threads(threads), XLA's CPU client its default (all
cores). ratio = jaxconv / torch (below 1: jaxconv is faster), of the minima and of the medians.
The 1-minute load average before and after is printed; a loaded machine skews both columns.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from jaxconv.summary import conv_layers

# (name, C, H = W of the input, stride, groups); 3x3 kernel, padding 1, C -> C channels: every
# distinct grouped / depthwise layer of the three models at their native size
LAYERS = [(f"{m}.{paths[0]}", layer.in_hwc[2], layer.in_hwc[0], layer.stride[0], layer.groups)
          for m in ("resnext50_32x4d", "xception", "mobilenet_v1")
          for layer, paths in conv_layers(m).items() if layer.groups > 1]
# the dense convs that 'auto' also lowers on CPU: (name, C_in, C_out, kernel, H = W, stride,
# padding); few-channel ones go to the C++ kernel, unpadded 1x1 ones to a matrix product
DENSE = [("resnext50.conv1 (stem)", 3, 64, 7, 224, 2, 3),
         ("mobilenet_v1 stem", 3, 32, 3, 224, 2, 1),
         ("xception.conv1 (stem)", 3, 32, 3, 299, 2, 0),
         ("xception.conv2", 32, 64, 3, 149, 1, 0),
         ("resnext50.layer1 1x1 256->128", 256, 128, 1, 56, 1, 0),
         ("resnext50.layer1 1x1 128->256", 128, 256, 1, 56, 1, 0),
         ("resnext50.layer2 1x1/2 shortcut", 256, 512, 1, 56, 2, 0),
         ("xception.pw728@19", 728, 728, 1, 19, 1, 0),
         ("mobilenet_v1.pw512@14", 512, 512, 1, 14, 1, 0)]
MODELS = ["resnext50_32x4d", "xception", "mobilenet_v1"]


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _interleaved(fns, repeats):
    """{name: (min, median)} seconds; each fn warmed up once, then run round-robin."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def _fmt(t):
    return f"{1e3 * t[0]:.1f} / {1e3 * t[1]:.1f}"


def _ratio(j, t):
    return f"{j[0] / t[0]:.2f} / {j[1] / t[1]:.2f}"


# ------------------------------------------------------------------------------------ layers

def _layer_fns(c, hw, stride, groups, batch, lowerings, passes, cout=None, k=3, pad=1):
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from jaxconv import config, ops

    rng = np.random.default_rng(0)
    cout = c if cout is None else cout
    x = rng.standard_normal((batch, hw, hw, c)).astype(np.float32)
    w = (rng.standard_normal((k, k, c // groups, cout)) / np.sqrt(k * k * c / groups)
         ).astype(np.float32)
    ho = (hw + 2 * pad - k) // stride + 1
    g = rng.standard_normal((batch, ho, ho, cout)).astype(np.float32)
    fns = {}
    xj, wj, gj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)
    for name in lowerings:
        with config.use_grouped_lowering(name):
            f = lambda x, w: ops.conv2d(x, w, stride=stride, padding=pad, groups=groups)  # noqa: E731
            fwd = jax.jit(f).lower(xj, wj).compile()
            fwdbwd = jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g)).lower(xj, wj, gj).compile()
        if "fwd" in passes:
            fns[(name, "fwd")] = lambda fwd=fwd: jax.block_until_ready(fwd(xj, wj))
        if "fwdbwd" in passes and (name != "xla" or groups == 1):
            fns[(name, "fwdbwd")] = lambda fb=fwdbwd: jax.block_until_ready(fb(xj, wj, gj))

    cl = torch.channels_last
    tx = torch.tensor(x.transpose(0, 3, 1, 2)).contiguous(memory_format=cl)
    tw = torch.tensor(w.transpose(3, 2, 0, 1)).contiguous(memory_format=cl)
    tg = torch.tensor(g.transpose(0, 3, 1, 2)).contiguous(memory_format=cl)

    def t_fwd():
        with torch.no_grad():
            F.conv2d(tx, tw, None, stride, pad, 1, groups)

    txg, twg = tx.clone().requires_grad_(), tw.clone().requires_grad_()

    def t_fwdbwd():
        txg.grad = twg.grad = None
        F.conv2d(txg, twg, None, stride, pad, 1, groups).backward(tg)

    if "fwd" in passes:
        fns[("torch", "fwd")] = t_fwd
    if "fwdbwd" in passes:
        fns[("torch", "fwdbwd")] = t_fwdbwd
    return fns


def bench_layers(args, lowerings, passes, dense=False):
    table = ([l + (1,) for l in DENSE] if dense else      # groups 1
             [(n, c, c, 3, hw, s, 1, g) for n, c, hw, s, g in LAYERS])
    layers = [l for l in table if not args.only or any(o in l[0] for o in args.only)]
    cols = [(p, n) for p in passes for n in lowerings
            if not (p == "fwdbwd" and n == "xla" and not dense)]
    head = ["layer", "C_in->C_out, k, HxW, stride, pad" if dense else "C, HxW, stride, groups"]
    for p, n in cols:
        head += [f"{p} {n} ms (min / med)"]
        head += [f"{p} torch ms"] if n == cols[[c[0] for c in cols].index(p)][1] else []
        head += [f"{p} {n} / torch"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    for name, c, cout, k, hw, stride, pad, groups in layers:
        fns = _layer_fns(c, hw, stride, groups, args.batch, lowerings, passes, cout, k, pad)
        res = _interleaved({k: v for k, v in fns.items()}, args.repeats)
        row = [name, f"{c}->{cout}, {k}x{k}, {hw}x{hw}, {stride}, {pad}" if dense
               else f"{c}, {hw}x{hw}, {stride}, {groups}"]
        for p, n in cols:
            row += [_fmt(res[(n, p)])]
            if n == cols[[c_[0] for c_ in cols].index(p)][1]:
                row += [_fmt(res[("torch", p)])]
            row += [_ratio(res[(n, p)], res[("torch", p)])]
        print("| " + " | ".join(row) + " |", flush=True)
        rows.append((name, res))
    return rows


# ------------------------------------------------------------------------------------ models

def _jax_model_fns(name, batch, size, lowering):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxconv import config
    from jaxconv.models import create_model

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 1000, batch))
    model = create_model(name)
    model.eval()

    @nnx.jit
    def infer(model, x):
        return model(x)

    train_model = create_model(name)
    train_model.train()
    opt = nnx.Optimizer(train_model, optax.sgd(0.01), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    with config.use_grouped_lowering(lowering):  # the lowering is read when traced: now
        jax.block_until_ready(infer(model, x))
        jax.block_until_ready(step(train_model, opt, x, y))
    return (lambda: jax.block_until_ready(infer(model, x)),
            lambda: jax.block_until_ready(step(train_model, opt, x, y)))


def _torch_model_fns(name, batch, size):
    import torch
    import torch.nn.functional as F

    import torch_ref.models as tm

    rng = np.random.default_rng(0)
    cl = torch.channels_last
    x = torch.tensor(rng.standard_normal((batch, 3, size, size)), dtype=torch.float32)
    x = x.contiguous(memory_format=cl)
    y = torch.tensor(rng.integers(0, 1000, batch))
    model = tm.create_model(name).to(memory_format=cl).eval()
    train_model = tm.create_model(name).to(memory_format=cl).train()
    opt = torch.optim.SGD(train_model.parameters(), lr=0.01)

    def infer():
        with torch.no_grad():
            model(x)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(train_model(x), y).backward()
        opt.step()

    return infer, step


def bench_models(args, lowerings):
    from jaxconv.models import input_size

    print("| model, batch x size | pass | " + " | ".join(
        f"jaxconv {n} ms (min / med) | {n} / torch" for n in lowerings) + " | torch_ref ms |")
    print("|---|---|" + "---|---|" * len(lowerings) + "---|")
    for name in [m for m in MODELS if not args.only or any(o in m for o in args.only)]:
        size = input_size(name)
        fns = {}
        for n in lowerings:
            fns[(n, "inference")], fns[(n, "train step")] = _jax_model_fns(
                name, args.model_batch, size, n)
        fns[("torch", "inference")], fns[("torch", "train step")] = _torch_model_fns(
            name, args.model_batch, size)
        for p in ("inference", "train step"):
            if p not in args.model_passes:
                continue
            res = _interleaved({k: v for k, v in fns.items() if k[1] == p}, args.model_repeats)
            cells = []
            for n in lowerings:
                cells += [_fmt(res[(n, p)]), _ratio(res[(n, p)], res[("torch", p)])]
            print(f"| {name}, {args.model_batch} x {size} | {p} | " + " | ".join(cells)
                  + f" | {_fmt(res[('torch', p)])} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench grouped", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", action="store_true", help="per-layer benchmarks")
    p.add_argument("--models", action="store_true", help="whole-model benchmarks")
    p.add_argument("--dense", action="store_true",
                   help="the dense convs 'auto' lowers on CPU too (stems, 1x1)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model-repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--lowerings", default="auto,xla",
                   help="comma-separated jaxconv.config grouped lowerings to time")
    p.add_argument("--passes", default="fwd,fwdbwd", help="layer passes: fwd, fwdbwd")
    p.add_argument("--model-passes", default="inference,train step")
    p.add_argument("--only", default="", help="comma-separated substrings of layer/model names")
    args = p.parse_args(argv)
    args.only = [o for o in args.only.split(",") if o]
    args.model_passes = args.model_passes.split(",")
    if not (args.layers or args.models or args.dense):
        args.layers = args.models = True
    lowerings = args.lowerings.split(",")
    passes = args.passes.split(",")

    import jax
    import torch

    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, channels_last); load before "
          f"{os.getloadavg()[0]:.2f}")
    if args.layers:
        print(f"\n## layers: batch {args.batch}, 3x3, padding 1, float32, {args.repeats} repeats"
              " (fwd+bwd under 'xla' is not timed: lax's weight gradient of a grouped conv runs"
              " for seconds to minutes on CPU)\n")
        bench_layers(args, lowerings, passes)
    if args.dense:
        print(f"\n## dense layers: batch {args.batch}, float32, {args.repeats} repeats\n")
        bench_layers(args, lowerings, passes, dense=True)
    if args.models:
        print(f"\n## models: batch {args.model_batch}, float32, {args.model_repeats} repeats\n")
        bench_models(args, lowerings)
    print(f"\n# load after {os.getloadavg()[0]:.2f}; ratio = jaxconv / torch of the minima and "
          "of the medians")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
