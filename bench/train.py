"""Training throughput: a jaxconv train step vs the same model trained with torch_ref + torch.optim.

    python -m bench train [--model resnext50_32x4d[,googlenet,...]] [--batch 32]
                          [--image-size 224] [--steps 5] [--threads N] [--dtype bfloat16]
                          [--device cuda]

Both sides run one full SGD step on the same synthetic batch (random images and labels, 1000
classes): forward in train mode (BatchNorm batch statistics, dropout, aux heads), label-smoothed
cross entropy (aux losses weighted as in training), backward, SGD momentum 0.9 with weight decay
1e-4 on conv/linear weights only. jaxconv is the real trainer's step (train.trainer: jitted,
sharded over the local devices, state donated); torch_ref runs eagerly with
torch.optim.SGD and torch.set_num_threads(threads) (default: all cores, what XLA's CPU client
uses). The first `--warmup` steps (compilation for jax) are excluded; min and median over
`--steps` steps are reported, and ratio = jaxconv / torch_ref step time (below 1: jaxconv is
faster). The 1-minute load average before and after is printed: other processes on the machine
skew both columns. `--dtype bfloat16`: jaxconv computes in bf16 (float32 parameters), torch
under autocast(bfloat16); `--device cuda`: torch on the GPU in channels_last (jax uses its
default backend).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def _times(step, steps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def jax_step(name: str, images: np.ndarray, labels: np.ndarray, dtype: str = "float32"):
    """A closure running one jaxconv training step (train.trainer's step, sharded)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from train.config import Config
    from train.trainer import create_model, create_optimizer, make_train_step

    config = Config(model=name, batch_size=len(labels), warmup_epochs=0.0, dtype=dtype).resolved()
    model = create_model(config, 1000)
    model.train()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx, schedule = create_optimizer(config, total_steps=10_000, steps_per_epoch=1000)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params,
                            "batch_stats": batch_stats, "opt_state": tx.init(params)}, replicated)
    batch = jax.device_put({"image": jnp.asarray(images), "label": jnp.asarray(labels)}, sharded)
    step = jax.jit(make_train_step(graphdef, jax.device_put(rest, replicated), tx, schedule,
                                   config, 1000),
                   in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics["loss"])
    return run


def torch_step(name: str, images: np.ndarray, labels: np.ndarray, threads: int,
               dtype: str = "float32", device: str = "cpu"):
    """A closure running one eager torch_ref + torch.optim.SGD training step."""
    import contextlib

    import torch

    from jaxconv.models.registry import spec
    from torch_ref.models import create_model
    from train.config import Config

    torch.set_num_threads(threads)
    config = Config(model=name, batch_size=len(labels)).resolved()
    kwargs = {"aux_logits": True} if spec(name).aux_heads else {}
    model = create_model(config.model, num_classes=1000, **kwargs).train()
    model = model.to(device, memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=config.learning_rate, momentum=config.momentum)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    x = torch.tensor(images.transpose(0, 3, 1, 2).copy()).to(device).contiguous(
        memory_format=torch.channels_last)
    y = torch.tensor(labels.astype(np.int64)).to(device)
    amp = (torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16"
           else contextlib.nullcontext())

    def run():
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(x)
            if isinstance(out, dict):
                loss = loss_fn(out["logits"], y) + sum(config.aux_weight * loss_fn(v, y)
                                                       for k, v in out.items() if k != "logits")
            else:
                loss = loss_fn(out, y)
        loss.backward()
        opt.step()
        loss.item()
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench train", description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", default="resnext50_32x4d",
                        help="registered model name(s), comma-separated (default: resnext50_32x4d)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--image-size", type=int, default=224, help="square input (default: 224)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (default: 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads (default: all cores)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu", help="torch's device (cpu, cuda)")
    args = parser.parse_args(argv)

    import jax
    rng = np.random.RandomState(0)
    images = rng.standard_normal((args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    labels = rng.randint(0, 1000, size=(args.batch,)).astype(np.int32)
    print(f"# {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), torch threads "
          f"{args.threads}, {args.device}; batch {args.batch}, {args.image_size}x{args.image_size}, "
          f"{args.dtype}, "
          f"{args.steps} steps after {args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}")
    print("| model | jaxconv ms/step (min / med) | torch_ref ms/step (min / med) | jaxconv img/s "
          "| torch_ref img/s | ratio jaxconv/torch |")
    print("|---|---|---|---|---|---|")
    for name in args.model.split(","):
        j = _times(jax_step(name, images, labels, args.dtype), args.steps, args.warmup)
        t = _times(torch_step(name, images, labels, args.threads, args.dtype, args.device),
                   args.steps, args.warmup)
        print(f"| {name} | {j[0] * 1e3:.0f} / {j[1] * 1e3:.0f} | {t[0] * 1e3:.0f} / "
              f"{t[1] * 1e3:.0f} | {args.batch / j[0]:.1f} | {args.batch / t[0]:.1f} | "
              f"{j[0] / t[0]:.2f} |", flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    return 0
