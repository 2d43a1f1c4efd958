"""`train_and_evaluate(config, workdir)`: the whole training run as one importable function.

Shape (as flax's examples/imagenet, written for NNX):
- the model is split once into a train-mode and an eval-mode GraphDef and a state pytree
  {step, params, batch_stats, opt_state}; jitted pure functions take and return that pytree, so
  it is what orbax checkpoints and what the sharding rules apply to;
- data parallel through `jax.sharding`: a Mesh over every device of every host with one "data"
  axis; the batch is sharded along it, the state replicated. XLA inserts the gradient
  all-reduce (and computes BatchNorm statistics over the global batch), so 1 CPU and N GPUs on
  M hosts run the same code;
- dropout keys are fold_in(initial key of each layer, step): a pure function of (seed, step),
  like the data order, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train import input_pipeline
from train.config import Config


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""


class ConfigError(ValueError):
    """A configuration that cannot run (the message names the option)."""


# ------------------------------------------------------------------------------- the model

def create_model(config: Config, num_classes: int):
    from jaxconv.models import create_model as _create
    from jaxconv.models.registry import spec
    kwargs = {}
    if spec(config.model).aux_heads:
        kwargs["aux_logits"] = config.aux_weight > 0
    if config.drop_rate is not None:
        kwargs["drop_rate"] = config.drop_rate
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    return _create(config.model, num_classes=num_classes, dtype=dtype,
                   rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1), **kwargs)


def load_init_weights(model, config: Config) -> list[str]:
    """Load --init-from (torch or jaxconv layout) into `model` in place, strictly except for the
    classifier head(s) when the checkpoint was trained for another class count: those keep
    their fresh initialisation (fine-tuning with a new head); returns their keys."""
    from jaxconv.convert import ConversionError
    from jaxconv.convert.io import load_weights_state
    try:
        return load_weights_state(model, config.init_from, new_head=True)
    except ConversionError as e:
        raise ConversionError(f"init_from: {config.init_from} does not fit {config.model}: {e}") from e


# ------------------------------------------------------------------ optimizer and schedule

def decay_mask(params):
    """Weight decay on conv and linear kernels only: not on BatchNorm scale/bias nor biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: Config, total_steps: int, steps_per_epoch: int):
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0)
    if config.optimizer == "sgd":
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                         optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    else:
        tx = optax.adamw(schedule, b1=config.momentum, weight_decay=config.weight_decay,
                         mask=decay_mask)
    return tx, schedule


# ------------------------------------------------------------------------ train/eval steps

def _cross_entropy(logits, labels, num_classes, smoothing):
    targets = jax.nn.one_hot(labels, num_classes)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _step_keys(rest, step):
    """Fold the step into every RNG key (dropout): a pure function of (seed, step)."""
    def fold(x):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(x, step)
        return x
    return jax.tree.map(fold, rest)


def make_train_step(graphdef, rest, tx, schedule, config: Config, num_classes: int):
    aux_weight, smoothing = config.aux_weight, config.label_smoothing

    def train_step(state, batch):
        step = state["step"]

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["batch_stats"], _step_keys(rest, step),
                              copy=True)
            out = model(batch["image"])
            logits, aux = (out["logits"], [v for k, v in out.items() if k != "logits"]) \
                if isinstance(out, dict) else (out, [])
            loss = _cross_entropy(logits, batch["label"], num_classes, smoothing).mean()
            for a in aux:
                loss = loss + aux_weight * _cross_entropy(a, batch["label"], num_classes,
                                                          smoothing).mean()
            return loss, (logits, nnx.state(model, nnx.BatchStat))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss,
                   "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
                   "lr": schedule(step), "grad_norm": grad_norm,
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
        new_state = {"step": step + 1, "params": params, "batch_stats": batch_stats,
                     "opt_state": opt_state}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, rest, num_classes: int):
    def eval_step(state, batch):
        model = nnx.merge(graphdef, state["params"], state["batch_stats"], rest, copy=True)
        logits = model(batch["image"]).astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        loss = _cross_entropy(logits, labels, num_classes, 0.0)
        k = min(5, num_classes)
        topk = jax.lax.top_k(logits, k)[1]
        return {"loss": jnp.sum(loss * mask),
                "top1": jnp.sum((topk[:, 0] == labels) * mask),
                "top5": jnp.sum(jnp.any(topk == labels[:, None], -1) * mask),
                "count": jnp.sum(mask)}
    return eval_step


# ------------------------------------------------------------------------------- metrics

class MetricWriter:
    """Scalars to workdir/metrics.jsonl (one JSON object a line) and TensorBoard (process 0)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.active:
            import tensorflow as tf
            self.tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, scalars: dict) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2
        # what tensorboard's tf.summary.scalar writes, without needing the tensorboard package
        meta = summary_pb2.SummaryMetadata()
        meta.plugin_data.plugin_name = "scalars"
        meta.data_class = summary_pb2.DATA_CLASS_SCALAR
        with self.tb.as_default(step=step):
            for k, v in scalars.items():
                tf.summary.write(f"{split}/{k}", tf.constant(v, tf.float32), metadata=meta)
        self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not enabled, smoothing=0.1)


# ----------------------------------------------------------------------------- the run

def replicate(tree, sharding):
    """Host values (the same on every host) as global arrays with `sharding` (replicated over
    every device of every host; jax.device_put only reaches this host's devices)."""
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.tree.map(one, tree)


def _check_divisible(config: Config) -> None:
    n = jax.device_count()
    for what, b in (("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size)):
        if b < 1 or b % n:
            raise ConfigError(f"{what}: must be a positive multiple of the device count "
                              f"({n} devices over {jax.process_count()} hosts), got {b}")


def _run_record(config: Config) -> dict:
    keep = ("model", "dataset", "num_classes", "image_size", "batch_size", "optimizer", "seed")
    return {k: getattr(config, k) for k in keep}


def _check_workdir(workdir: str, config: Config) -> None:
    """Refuse to resume a run of another model / dataset / batch from the same workdir."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        mine = _run_record(config)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ConfigError(f"workdir: {workdir} holds a run with other settings "
                              f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                              f"use another --workdir")
    elif jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump({**_run_record(config), "config": dataclasses.asdict(config)}, f, indent=1)


def checkpoint_manager(directory: str, keep: int):
    """orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp` and renames it to
    `<step>` when complete, so a kill at any moment leaves only complete checkpoints visible to
    latest_step(); leftovers are removed when the next run opens the directory. Saving is
    synchronous: once per epoch it costs little, and nothing else touches files meanwhile."""
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=False))


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir can be restored (the message names the folder)."""


@contextlib.contextmanager
def _quiet():
    """Silence Python logging (orbax, absl) while a possibly damaged checkpoint is tried: its
    errors are summarised in one line instead."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


def restore_latest(ckpt, abstract, damaged_dir: str, lead: bool):
    """(state, step) of the newest checkpoint that restores. A checkpoint that does not is
    named with the reason in one line and moved to `damaged_dir` (nothing is deleted), and the
    previous one is tried; if none restores, CheckpointError names the folder."""
    import orbax.checkpoint as ocp
    tried = []
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            with _quiet():
                return ckpt.restore(step, args=ocp.args.StandardRestore(abstract)), step
        except Exception as e:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
            tried.append(step)
            dest = os.path.join(damaged_dir, str(step))
            if lead:
                os.makedirs(damaged_dir, exist_ok=True)
                while os.path.exists(dest):
                    dest += "+"
                shutil.move(os.path.join(ckpt.directory, str(step)), dest)
                print(f"checkpoint: step {step} in {ckpt.directory} cannot be restored "
                      f"({_one_line(e)}); moved it to {dest}; trying the previous one",
                      flush=True)
            ckpt.reload()
    raise CheckpointError(
        f"workdir: no checkpoint in {ckpt.directory} can be restored (tried steps "
        f"{', '.join(map(str, tried))}, now in {damaged_dir}); start a fresh run with another "
        f"--workdir, or move a good checkpoint back")


def _compilation_cache(path: str | None) -> None:
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
    """Train `config.model` on `config.dataset`, evaluating every epoch; resume from the latest
    checkpoint in `workdir` that restores, if there is one. Returns the final summary (also
    printed)."""
    config = config.resolved()
    _compilation_cache(config.compilation_cache)
    _check_divisible(config)
    workdir = os.path.abspath(workdir)
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        return _train_and_evaluate(config, workdir)
    except BaseException:
        # a run that failed before writing anything leaves no workdir behind
        if created and jax.process_index() == 0 and not _has_progress(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def _read_skipped(path: str) -> list[tuple[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(line.rstrip("\n").split("\t", 1)) for line in f if "\t" in line]


def _write_skipped(path: str, skipped: list, lead: bool) -> None:
    if lead and skipped:
        with open(path, "w") as f:
            f.writelines(f"{p}\t{reason}\n" for p, reason in skipped)


def _has_progress(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "metrics.jsonl")) or bool(
        os.path.isdir(os.path.join(workdir, "checkpoints"))
        and os.listdir(os.path.join(workdir, "checkpoints")))


def _train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
    import orbax.checkpoint as ocp
    lead = jax.process_index() == 0

    skipped_file = os.path.join(workdir, "skipped_images.tsv")
    skipped = _read_skipped(skipped_file)
    data = input_pipeline.create_dataset(
        config.dataset, global_batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        image_size=config.image_size, seed=config.seed, data_dir=config.data_dir,
        manual_dir=config.manual_dir, num_classes=config.num_classes,
        shuffle_buffer=config.shuffle_buffer, skip_corrupt_images=config.skip_corrupt_images,
        skipped=skipped)
    num_classes = config.num_classes or data.num_classes
    config = dataclasses.replace(config, num_classes=num_classes)
    _check_workdir(workdir, config)
    steps_per_epoch = data.steps_per_epoch
    total_steps = config.num_train_steps or int(math.ceil(config.num_epochs * steps_per_epoch))
    eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
    ckpt_every = config.checkpoint_every_steps or steps_per_epoch

    ckpt = checkpoint_manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    resume = ckpt.latest_step()
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    # model, optimizer, state. A resumed run restores every array, so it only traces the model
    # (no initialisation) and takes the dropout keys from a jitted build (XLA drops the rest).
    build = lambda: create_model(config, num_classes)  # noqa: E731
    model = nnx.eval_shape(build) if resume is not None else build()
    if config.init_from and resume is None:
        new_head = load_init_weights(model, config)
        if lead:
            print(f"init: loaded {config.init_from}"
                  + (f"; new head ({num_classes} classes): {', '.join(new_head)}" if new_head else ""))
    model.train()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    eval_graphdef = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[0]
    tx, schedule = create_optimizer(config, total_steps, steps_per_epoch)
    if resume is None:
        state = replicate({"step": jnp.zeros((), jnp.int32), "params": params,
                           "batch_stats": batch_stats, "opt_state": tx.init(params)}, replicated)
        start_step = 0
    else:
        rest = jax.jit(lambda: nnx.split(build(), nnx.Param, nnx.BatchStat, ...)[3])()
        abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                    "batch_stats": batch_stats, "opt_state": jax.eval_shape(tx.init, params)}
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
        state, _ = restore_latest(ckpt, abstract, os.path.join(workdir, "checkpoints-damaged"),
                                  lead)
        start_step = int(state["step"])
        if lead:
            print(f"resumed from {ckpt.directory}/{start_step} (step {start_step}/{total_steps})")
    rest = replicate(rest, replicated)

    train_step = jax.jit(make_train_step(graphdef, rest, tx, schedule, config, num_classes),
                         in_shardings=(replicated, batch_sharding),
                         out_shardings=(replicated, replicated), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(eval_graphdef, rest, num_classes),
                        in_shardings=(replicated, batch_sharding), out_shardings=replicated)

    def to_global(batch):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v)
                for k, v in batch.items()}

    def evaluate(state) -> dict:
        sums = None
        for batch in data.eval_batches():
            out = eval_step(state, to_global(batch))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        sums = jax.device_get(sums)
        n = max(float(sums["count"]), 1.0)
        return {"loss": sums["loss"] / n, "top1": sums["top1"] / n, "top5": sums["top5"] / n}

    writer = MetricWriter(workdir)
    if lead:
        print(f"{config.model} on {data.name}: {data.num_train} train / {data.num_eval} eval "
              f"images, {num_classes} classes, {config.image_size}px, batch {config.batch_size} "
              f"on {jax.device_count()} {jax.devices()[0].platform} device(s) x "
              f"{jax.process_count()} host(s), {steps_per_epoch} steps/epoch, {total_steps} "
              f"steps, lr {config.learning_rate:g} ({config.optimizer}), dtype {config.dtype}")

    t_start = time.time()
    last_eval: dict = {}
    best_top1 = 0.0
    window = []                       # host metrics of the steps since the last log line
    pending = None                    # (step, device metrics) of the step in flight
    done_times = collections.deque(maxlen=21)  # completion times of the last steps: images/s
    rates = []
    bar = _progress(total_steps, start_step, config.progress and lead)
    batches = data.train_batches(start_step)
    latest_good = ckpt.latest_step()

    def check(step, metrics) -> None:
        """Fetch one step's metrics (waits for it); stop on a non-finite loss or gradient."""
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not host["finite"]:
            raise NonFiniteLossError(
                f"non-finite loss ({host['loss']}) or gradient norm ({host['grad_norm']}) at "
                f"step {step + 1}; stopped without saving. Last good checkpoint: "
                + (f"step {latest_good} in {ckpt.directory}" if latest_good is not None else "none"))
        window.append(host)
        done_times.append(time.time())
        if len(done_times) > 1:
            rate = (len(done_times) - 1) * config.batch_size / (done_times[-1] - done_times[0])
            rates.append(rate)
            bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host['lr']:.4g}",
                            img_s=f"{rate:.1f}", refresh=False)

    try:
        step = start_step
        while step < total_steps:
            batch = to_global(next(batches))
            state, metrics = train_step(state, batch)
            if pending is not None:   # the previous step has (nearly) finished: check it now
                check(*pending)
            pending = (step, metrics)
            step += 1
            is_last = step == total_steps
            log, save = step % config.log_every_steps == 0 or is_last, step % ckpt_every == 0 or is_last
            run_eval = step % eval_every == 0 or is_last
            if log or save or run_eval:   # everything up to this step must be known good
                check(*pending)
                pending = None
            bar.update(1)
            if log and window:
                avg = {k: float(np.mean([w[k] for w in window]))
                       for k in ("loss", "accuracy", "grad_norm")}
                writer.write(step, "train", {**avg, "lr": window[-1]["lr"],
                                             "images_per_s": rates[-1] if rates else 0.0})
                window = []
            if save:
                ckpt.save(step, args=ocp.args.StandardSave(state))
                latest_good = step
                _write_skipped(skipped_file, skipped, lead)
            if run_eval:
                last_eval = evaluate(state)
                best_top1 = max(best_top1, last_eval["top1"])
                writer.write(step, "eval", {**last_eval, "epoch": step / steps_per_epoch})
                if lead:
                    bar.write(f"step {step} (epoch {step / steps_per_epoch:.2f}): validation "
                              f"top-1 {last_eval['top1']:.4f}  top-5 {last_eval['top5']:.4f}  "
                              f"loss {last_eval['loss']:.4f}")
        if not last_eval:  # resumed at the very end: evaluate the final state anyway
            last_eval = evaluate(state)
            best_top1 = max(best_top1, last_eval["top1"])
    finally:
        bar.close()
        ckpt.wait_until_finished()
        ckpt.close()
        writer.close()
        _write_skipped(skipped_file, skipped, lead)

    wall = time.time() - t_start
    summary = {"model": config.model, "dataset": data.name, "steps": total_steps,
               "epochs": total_steps / steps_per_epoch, "steps_this_run": total_steps - start_step,
               "wall_s": wall, "train_images_per_s": float(np.median(rates)) if rates else 0.0,
               "eval_top1": float(last_eval["top1"]), "eval_top5": float(last_eval["top5"]),
               "eval_loss": float(last_eval["loss"]), "best_top1": float(best_top1),
               "checkpoint_step": latest_good, "workdir": workdir,
               "skipped_images": len(skipped)}
    if lead:
        print(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    return "\n".join([
        f"== {s['model']} on {s['dataset']}: {s['steps']} steps ({s['epochs']:.2f} epochs); "
        f"this run {s['steps_this_run']} steps in {s['wall_s']:.1f} s (incl. compile and eval), "
        f"{s['train_images_per_s']:.1f} train images/s",
        f"   validation: top-1 {s['eval_top1']:.4f}  top-5 {s['eval_top5']:.4f}  "
        f"loss {s['eval_loss']:.4f}  (best top-1 {s['best_top1']:.4f})",
        f"   checkpoint: step {s['checkpoint_step']} in {s['workdir']}/checkpoints"]
        + ([f"   skipped {s['skipped_images']} corrupt image(s): {s['workdir']}/skipped_images.tsv"]
           if s.get("skipped_images") else []))
