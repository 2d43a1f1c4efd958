"""python -m train.imagenet --model resnext50 [--dataset ...] [--workdir ...] [...]

Train any registered jaxconv model on ImageNet (or another tfds / folder / synthetic / digits
dataset) with SGD + warmup-cosine, label smoothing and weight decay, data parallel over every
device of every host, resuming from the latest complete checkpoint in --workdir.

Multi-host: start the same command on every host (SLURM `srun`, `mpirun`, or with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set); jax.distributed.initialize()
is called when a launcher is detected (--distributed auto; `on` forces it, e.g. on TPU pods) and
each host reads its share of the data. --workdir must be on storage every host can see.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from train.config import Config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.imagenet", description=__doc__.split("\n\n")[1],
        epilog="Datasets: imagenet2012 (tfds; ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
               "in --manual-dir), tfds:NAME (a prepared tfds dataset, e.g. tfds:imagenette), "
               "folder:PATH (PATH/train/CLASS/*.jpg, PATH/val/CLASS/*.jpg), synthetic (random "
               "images: throughput), digits (scikit-learn's handwritten digits, upscaled; no "
               "download). Outputs in --workdir: checkpoints/, metrics.jsonl, tensorboard/, "
               "config.json.")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_ = meta.pop("help")
        if f.default is not None and not isinstance(f.default, bool):
            help_ += f" (default: {f.default})"
        elif isinstance(f.default, bool):
            help_ += f" (default: {'on' if f.default else 'off'})"
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_)
            continue
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
        parser.add_argument(flag, type=base, default=f.default, help=help_,
                            metavar=f.name.upper() if "choices" not in meta else None, **meta)
    parser.add_argument("--list-models", action="store_true",
                        help="print the registered model names and exit")
    return parser


def maybe_initialize_distributed(mode: str) -> None:
    """jax.distributed.initialize() under a cluster launcher (before any other JAX call).

    SLURM, Open MPI and Kubernetes/TPU environments are detected by JAX itself; a manual
    launch sets JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID on every host.
    """
    import jax
    detected = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or any(
        int(os.environ.get(k, "1") or 1) > 1 for k in ("OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"))
    if mode == "on" or (mode == "auto" and detected):
        kwargs = {}
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kwargs)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxconv.models import list_models
    if args.list_models:
        print("\n".join(list_models()))
        return 0
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    from jaxconv.convert import ConversionError
    try:   # the 'train' extra, named in the error when missing
        import optax  # noqa: F401
        import orbax.checkpoint  # noqa: F401
        import tensorflow  # noqa: F401
        import tensorflow_datasets  # noqa: F401
        import tqdm  # noqa: F401

        from train.input_pipeline import DatasetError
        from train.trainer import CheckpointError, NonFiniteLossError, train_and_evaluate
    except ModuleNotFoundError as e:
        print(f"error: training needs the 'train' extra, which is not installed (no module "
              f"{e.name!r}): pip install 'jaxconv[train]'", file=sys.stderr)
        return 2
    try:
        maybe_initialize_distributed(config.distributed)
        config = config.resolved()
        train_and_evaluate(config, config.workdir)
    except (DatasetError, ConversionError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
