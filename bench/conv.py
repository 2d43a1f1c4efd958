"""Convolutions and whole models: jaxconv vs PyTorch, side by side, on CPU.

    python -m bench conv [--layers] [--models] [--names resnext50_32x4d,...] [--engines auto,onednn]
                         [--passes fwd,bwd_data,bwd_weights,fwdbwd] [--kinds grouped,dense]
                         [--batch 8] [--repeats 7] [--model-repeats 5] [--model-warmup 4]
                         [--only SUBSTRING,...]

--layers: every distinct Conv2d of the chosen models (jaxconv.summary.conv_layers, native input
size), batch `batch`, float32. Per pass: fwd (the output), bwd_data (input gradient),
bwd_weights (kernel gradient), fwdbwd (all three, what a train step does); jaxconv under each
engine (jaxconv.config.conv_lowering forced, or 'auto' = the policy table) vs torch 2.13
(oneDNN) on channels_last tensors: torch.nn.functional.conv2d and
torch.ops.aten.convolution_backward with the same output mask.

--models: every registered model (or --names) at its native size: inference (eval mode, jax.jit
of the split model / torch.no_grad) and a train step (cross-entropy, forward, backward, SGD
momentum update; torch.optim.SGD) at batch `--model-batch`, jaxconv vs torch_ref on
channels_last. Each framework runs in a process of its own, as in real use; sharing one process,
each slowed the other: torch's tensors took the heap memory XLA:CPU frees between calls
(jaxconv's next train step faulted up to 70k pages in anew), and torch ran up to 2x slower after
jaxconv's calls (MobileNet-v1 inference 71 vs 35 ms; BENCHMARKS.md, "Whole models").

--bn-fold: what folding eval BatchNorms (and ReLUs, as oneDNN post-ops) into the convs could
save at most: each model's inference with every BatchNorm2d, then also every ReLU, replaced by
the identity, against the same model as is (one process, interleaved).

Every number is a wall time over `repeats` runs after warm-up runs (one for layers; for
models `--model-warmup`, the compiling call among them: a jaxconv train step's first few calls
grow glibc's heap until XLA's temporary buffer fits, ~220k page faults each for ResNeXt-50;
README.md "Host memory"), jax.block_until_ready on jaxconv's side, jaxconv and torch
interleaved run by run so that load changes hit both; torch uses
torch.set_num_threads(threads), XLA's CPU client its default (all cores). ratio = jaxconv /
torch (below 1: jaxconv is faster), of the minima and of the medians. The 1-minute load
average before and after is printed; a loaded machine skews both columns.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import os
import platform
import statistics
import time

import numpy as np

from jaxconv.summary import conv_layers

PASSES = ("fwd", "bwd_data", "bwd_weights", "fwdbwd")
LAYER_MODELS = ("resnext50_32x4d", "xception", "mobilenet_v1", "googlenet", "inception_v3")


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class _Worker:
    """A process of its own for one framework: ``fns(factory, *args)`` builds `factory`'s dict
    of name -> fn there (replacing the last one) and returns {name: timer}; a timer runs its fn
    there and returns its wall time in seconds."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()

    def fns(self, factory, *args):
        self.conn.send((factory, args))
        return {name: self._timer(name) for name in self.conn.recv()}

    def _timer(self, name):
        def run():
            self.conn.send(name)
            return self.conn.recv()
        return run

    def close(self):
        self.conn.send(None)
        self.proc.join()


def _serve(conn):
    fns = {}
    for msg in iter(conn.recv, None):
        if isinstance(msg, tuple) and callable(msg[0]):
            fns = msg[0](*msg[1])
            conn.send(list(fns))
        else:
            conn.send(_timed(fns[msg]))


@contextlib.contextmanager
def _workers():
    """(jaxconv's worker, torch's worker), both closed on the way out."""
    jax_worker, torch_worker = _Worker(), _Worker()
    try:
        yield jax_worker, torch_worker
    finally:
        jax_worker.close()
        torch_worker.close()


def _interleaved(fns, repeats, warmup=1):
    """{name: (min, median)} seconds; each fn run `warmup` times, then round-robin. A fn that
    returns a number (a _Worker timer) has timed itself."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            own = fn()
            times[k].append(own if isinstance(own, float) else time.perf_counter() - t)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def _fmt(t):
    return f"{1e3 * t[0]:.2f} / {1e3 * t[1]:.2f}"


def _ratio(j, t):
    return f"{j[0] / t[0]:.2f} / {j[1] / t[1]:.2f}"


# ------------------------------------------------------------------------------------ layers

def distinct_layers(names, kinds=None):
    """[(name, ConvLayer)] over `names`, each distinct conv once (first model that has it)."""
    seen, out = set(), []
    for m in names:
        for layer, paths in conv_layers(m).items():
            if layer in seen or (kinds and layer.kind not in kinds):
                continue
            seen.add(layer)
            out.append((f"{m}.{paths[0]}" + (f" (x{len(paths)})" if len(paths) > 1 else ""), layer))
    return out


def _layer_arrays(layer, batch):
    """x (NHWC), w (HWIO), gy (NHWC) for `layer`, the same in every process."""
    import jax

    from jaxconv import ops

    h, w_, c = layer.in_hwc
    g = layer.groups
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, h, w_, c)).astype(np.float32)
    w = (rng.standard_normal((*layer.kernel_size, c // g, layer.out_channels))
         / np.sqrt(np.prod(layer.kernel_size) * c / g)).astype(np.float32)
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=g)
    y = jax.eval_shape(lambda x, w: ops.conv2d(x, w, **kw), x, w).shape
    return x, w, rng.standard_normal(tuple(y)).astype(np.float32), kw


def _jax_layer_fns(layer, batch, engines, passes):
    """{(engine, pass): fn} for `layer`, each pass compiled under each conv_lowering."""
    import jax
    import jax.numpy as jnp

    from jaxconv import config, ops

    x, w, gy, kw = _layer_arrays(layer, batch)
    xj, wj, gj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(gy)

    def jax_pass(p):
        """A fresh function per engine: jax.jit caches traces by function, and the engine is
        read when tracing."""
        f = lambda x, w: ops.conv2d(x, w, **kw)  # noqa: E731
        return {"fwd": lambda x, w, g: f(x, w),
                "bwd_data": lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g),
                "bwd_weights": lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g),
                "fwdbwd": lambda x, w, g: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, x, w))}[p]

    fns = {}
    for name in engines:
        with config.use_conv_lowering(name):
            for p in passes:
                compiled = jax.jit(jax_pass(p)).lower(xj, wj, gj).compile()
                fns[(name, p)] = lambda c=compiled: jax.block_until_ready(c(xj, wj, gj))
    return fns


def _torch(threads):
    """torch in this (worker) process on `threads` threads whose idle OpenMP threads spin briefly
    (~0.5 ms) before they sleep: with libgomp's default (~300k spins) they held a core into the
    other process's next run (1.2-2x on GoogLeNet's layers of ~1 ms); sleeping at once
    (OMP_WAIT_POLICY=passive, as jaxconv's oneDNN does) cost torch 10-20% on whole models."""
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    import torch

    torch.set_num_threads(threads)
    return torch


def _torch_layer_fns(layer, batch, passes, threads):
    """{("torch", pass): fn} for `layer`: F.conv2d and aten.convolution_backward."""
    torch = _torch(threads)   # before anything imports torch
    import torch.nn.functional as F

    x, w, gy, _ = _layer_arrays(layer, batch)
    g = layer.groups
    cl = torch.channels_last
    tx = torch.tensor(x.transpose(0, 3, 1, 2)).contiguous(memory_format=cl)
    tw = torch.tensor(w.transpose(3, 2, 0, 1)).contiguous(memory_format=cl)
    tg = torch.tensor(gy.transpose(0, 3, 1, 2)).contiguous(memory_format=cl)
    pad = layer.padding if not isinstance(layer.padding, str) else layer.padding
    targs = (layer.stride, pad, layer.dilation, g)

    def back(mask):
        return lambda: torch.ops.aten.convolution_backward(
            tg, tx, tw, None, list(layer.stride), list(_pair(pad)), list(layer.dilation), False,
            [0, 0], g, mask)

    def t_fwd():
        with torch.no_grad():
            F.conv2d(tx, tw, None, *targs)

    torch_passes = {"fwd": t_fwd, "bwd_data": back([True, False, False]),
                    "bwd_weights": back([False, True, False])}

    def t_fwdbwd():
        t_fwd()
        back([True, True, False])()

    torch_passes["fwdbwd"] = t_fwdbwd
    return {("torch", p): torch_passes[p] for p in passes}


def _pair(p):
    return (p, p) if isinstance(p, int) else tuple(p)


def bench_layers(args):
    layers = [(n, layer) for n, layer in distinct_layers(args.names or LAYER_MODELS, args.kinds)
              if not args.only or any(o in n for o in args.only)]
    head = ["layer", "kind", "C_in->C_out, k, HxW, stride, pad, groups"]
    for p in args.passes:
        head += ["torch " + p + " ms"] + [f"{p} {e} / torch" for e in args.engines]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    with _workers() as (jax_worker, torch_worker):
        for name, layer in layers:
            fns = {**jax_worker.fns(_jax_layer_fns, layer, args.batch, args.engines, args.passes),
                   **torch_worker.fns(_torch_layer_fns, layer, args.batch, args.passes, args.threads)}
            res = _interleaved(fns, args.repeats)
            h, w, c = layer.in_hwc
            row = [name, layer.kind, f"{c}->{layer.out_channels}, {layer.kernel_size[0]}x"
                   f"{layer.kernel_size[1]}, {h}x{w}, {layer.stride[0]}, {layer.padding}, {layer.groups}"]
            for p in args.passes:
                row += [_fmt(res[("torch", p)])] + [_ratio(res[(e, p)], res[("torch", p)])
                                                    for e in args.engines]
            print("| " + " | ".join(row) + " |", flush=True)
            rows.append((name, layer, res))
    return rows


# ------------------------------------------------------------------------------------ models

def _jax_model_fns(name, batch, size, engines):
    """{(engine, "inference" | "train step"): fn} of jaxconv's `name` under each lowering."""
    return {(e, p): fn for e in engines for p, fn in _jax_model_engine(name, batch, size, e).items()}


def _jax_model_engine(name, batch, size, engine):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxconv import config
    from jaxconv.models import create_model

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 1000, batch))
    # as train.trainer runs a model: nnx.split once, jax.jit of a pure function of the state
    # (the train step's donated); nnx.jit on the modules walks their graph in Python on every
    # call (GoogLeNet inference +14 ms, ResNeXt-152 +40 ms on 2 cores)
    model = create_model(name)
    model.eval()
    infer_def, infer_state = nnx.split(model)
    infer = jax.jit(lambda state, x: nnx.merge(infer_def, state)(x))

    train_model = create_model(name, aux_logits=False) if name in ("googlenet", "inception_v3") \
        else create_model(name)
    train_model.train()
    opt = nnx.Optimizer(train_model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)
    step_def, state = nnx.split((train_model, opt))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        model, opt = nnx.merge(step_def, state)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    box = [state]

    def train_step():
        box[0], loss = step(box[0], x, y)
        jax.block_until_ready((box[0], loss))

    with config.use_conv_lowering(engine):  # the lowering is read when traced: now
        jax.block_until_ready(infer(infer_state, x))
        train_step()
    return {"inference": lambda: jax.block_until_ready(infer(infer_state, x)),
            "train step": train_step}


def _torch_model_fns(name, batch, size, threads):
    """{("torch", "inference" | "train step"): fn} of torch_ref's `name` on `threads` threads."""
    torch = _torch(threads)   # before anything imports torch
    import torch.nn.functional as F

    import torch_ref.models as tm

    rng = np.random.default_rng(0)
    cl = torch.channels_last
    x = torch.tensor(rng.standard_normal((batch, 3, size, size)), dtype=torch.float32)
    x = x.contiguous(memory_format=cl)
    y = torch.tensor(rng.integers(0, 1000, batch))
    model = tm.create_model(name).to(memory_format=cl).eval()
    kwargs = {"aux_logits": False} if name in ("googlenet", "inception_v3") else {}
    train_model = tm.create_model(name, **kwargs).to(memory_format=cl).train()
    opt = torch.optim.SGD(train_model.parameters(), lr=0.01, momentum=0.9)

    def infer():
        with torch.no_grad():
            model(x)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(train_model(x), y).backward()
        opt.step()

    return {("torch", "inference"): infer, ("torch", "train step"): step}


def bench_models(args):
    from jaxconv.models import input_size, list_models

    names = [m for m in (args.names or list_models()) if not args.only or any(o in m for o in args.only)]
    print("| model, batch x size | pass | torch_ref ms (min / med) | " + " | ".join(
        f"jaxconv {n} ms | {n} / torch" for n in args.engines) + " |")
    print("|---|---|---|" + "---|---|" * len(args.engines))
    with _workers() as (jax_worker, torch_worker):
        for name in names:
            size = input_size(name)
            fns = {**jax_worker.fns(_jax_model_fns, name, args.model_batch, size, args.engines),
                   **torch_worker.fns(_torch_model_fns, name, args.model_batch, size, args.threads)}
            for p in ("inference", "train step"):
                res = _interleaved({k: v for k, v in fns.items() if k[1] == p}, args.model_repeats,
                                   args.model_warmup)
                cells = []
                for n in args.engines:
                    cells += [_fmt(res[(n, p)]), _ratio(res[(n, p)], res[("torch", p)])]
                print(f"| {name}, {args.model_batch} x {size} | {p} | {_fmt(res[('torch', p)])} | "
                      + " | ".join(cells) + " |", flush=True)


def bench_bn_fold(args):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxconv.models import create_model, input_size, list_models
    from jaxconv.nn import BatchNorm2d

    print("| model, batch x size | as is ms (min / med) | BatchNorm as identity ms | saving "
          "(medians) | BatchNorm and ReLU as identity ms | saving (medians) |")
    print("|---|---|---|---|---|---|")
    for name in args.names or list_models():
        size = input_size(name)
        model = create_model(name)
        model.eval()
        x = jnp.asarray(np.random.default_rng(0).standard_normal((args.model_batch, size, size, 3)),
                        jnp.float32)
        graphdef, state = nnx.split(model)

        def compiled(identity_bn, identity_relu):
            """The model's inference traced now with BatchNorm / ReLU patched to the identity."""
            bn_call, relu, relu6 = BatchNorm2d.__call__, jax.nn.relu, jax.nn.relu6
            if identity_bn:
                BatchNorm2d.__call__ = lambda self, x: x
            if identity_relu:   # the models call jax.nn.relu (MobileNet-v1: relu6)
                jax.nn.relu = jax.nn.relu6 = lambda x: x
            try:
                return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
            finally:
                BatchNorm2d.__call__, jax.nn.relu, jax.nn.relu6 = bn_call, relu, relu6

        fns = {k: compiled(*k) for k in ((False, False), (True, False), (True, True))}
        res = _interleaved({k: (lambda c=c: jax.block_until_ready(c(state, x)))
                            for k, c in fns.items()}, args.model_repeats, args.model_warmup)
        base = res[(False, False)]
        cells = [f"{_fmt(res[k])} | {100 * (1 - res[k][1] / base[1]):.1f}%"
                 for k in ((True, False), (True, True))]
        print(f"| {name}, {args.model_batch} x {size} | {_fmt(base)} | " + " | ".join(cells) + " |",
              flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench conv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", action="store_true", help="per-layer benchmarks")
    p.add_argument("--models", action="store_true", help="whole-model benchmarks")
    p.add_argument("--bn-fold", action="store_true",
                   help="inference with BatchNorm (and ReLU) as the identity: what folding could save")
    p.add_argument("--names", default="", help="comma-separated model names (default: all)")
    p.add_argument("--kinds", default="", help="layer kinds: pointwise, depthwise, grouped, dense")
    p.add_argument("--engines", default="auto", help="comma-separated conv_lowering values")
    p.add_argument("--passes", default="fwd,fwdbwd", help=f"layer passes: {','.join(PASSES)}")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model-repeats", type=int, default=5)
    p.add_argument("--model-warmup", type=int, default=4, help="untimed runs of each model pass")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--only", default="", help="comma-separated substrings of layer/model names")
    args = p.parse_args(argv)
    split = lambda s: [o for o in s.split(",") if o]  # noqa: E731
    args.only, args.names, args.kinds = split(args.only), split(args.names), split(args.kinds)
    args.engines, args.passes = split(args.engines), split(args.passes)
    if not (args.layers or args.models or args.bn_fold):
        args.layers = args.models = True

    import jax
    import torch

    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, channels_last); load before "
          f"{os.getloadavg()[0]:.2f}")
    if args.layers:
        print(f"\n## layers: batch {args.batch}, float32, {args.repeats} repeats, ms min / median"
              f" and jaxconv / torch ratios of the minima / medians\n")
        bench_layers(args)
    if args.models:
        print(f"\n## models: batch {args.model_batch}, float32, {args.model_repeats} repeats\n")
        bench_models(args)
    if args.bn_fold:
        print(f"\n## BatchNorm folding bound: batch {args.model_batch}, {args.model_repeats} repeats\n")
        bench_bn_fold(args)
    print(f"\n# load after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
