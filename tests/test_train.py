"""The training entry point: CLI, data, the real train_and_evaluate loop, resume, multi-device.

Cheap model: `resnext_tiny` (tests/helpers.py), the real ResNeXt class with one bottleneck
per stage, registered for this module's tests only. Compilations are cached on disk across the
test processes (JAX's persistent compilation cache) so the subprocess tests do not pay them
twice. Slow tier: the digits learning run to >= 90% and resnext50_32x4d on mocked ImageNet.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from tests.helpers import image_folder, registered, resnext_tiny
from train import input_pipeline
from train.config import Config
from train.imagenet import build_parser, main
from train.trainer import NonFiniteLossError, create_model, load_init_weights, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(tempfile.gettempdir(), "jaxconv-test-xla-cache")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
# the small digits run every fast test shares (same shapes: compiled programs are reused)
DIGITS = dict(model="resnext_tiny", dataset="digits", image_size=32, batch_size=32,
              warmup_epochs=0.0, progress=False, log_every_steps=1)


@pytest.fixture(scope="module", autouse=True)
def _tiny_model():
    with registered(resnext_tiny):
        yield


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache():
    old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                               "jax_persistent_cache_min_compile_time_secs",
                                               "jax_persistent_cache_min_entry_size_bytes")}
    jax.config.update("jax_compilation_cache_dir", CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def _cli(args, *, env=None, devices=1, **popen):
    """`python -m train.imagenet ARGS` in a fresh process with resnext_tiny registered."""
    code = ("import sys; from tests.helpers import registered, resnext_tiny; "
            "from train.imagenet import main\nwith registered(resnext_tiny): sys.exit(main(sys.argv[1:]))")
    full_env = {**os.environ, **CACHE_ENV, "PYTHONPATH": ROOT, **(env or {})}
    if devices > 1:
        full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return [sys.executable, "-c", code, *args], full_env, popen


def _run_cli(args, **kw):
    cmd, env, popen = _cli(args, **kw)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          **popen)


def _flags(**cfg) -> list[str]:
    out = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, str(v)]
    return out


def _restore(workdir, like=None, step=None):
    """(step, state) of a run's checkpoint (default: the latest) on this process's first device;
    `like`: a state of the same structure (needed when the run used another device count)."""
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
        step = mngr.latest_step() if step is None else step
        if like is None:
            return step, mngr.restore(step, args=ocp.args.StandardRestore())
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              like)
        return step, mngr.restore(step, args=ocp.args.StandardRestore(target))


def _metrics(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


# ------------------------------------------------------------------------------- the CLI

def test_help_documents_every_option_and_default():
    text = build_parser().format_help()
    for field in Config.__dataclass_fields__.values():
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
        if field.default is not None and not isinstance(field.default, bool):
            assert f"(default: {field.default})" in " ".join(text.split()), field.name
    for dataset in ("imagenet2012", "tfds:NAME", "folder:PATH", "synthetic", "digits"):
        assert dataset in text


def test_derived_defaults():
    c = Config(model="googlenet", batch_size=1024).resolved()
    assert (c.aux_weight, c.image_size, c.learning_rate, c.weight_decay) == (0.3, 224, 0.4, 1e-4)
    c = Config(model="inception_v3", optimizer="adamw").resolved()
    assert (c.aux_weight, c.image_size, c.learning_rate, c.weight_decay) == (0.4, 299, 1e-3, 0.05)
    assert Config(model="resnext50").resolved().model == "resnext50_32x4d"
    assert input_pipeline.eval_resize_size(224) == 256
    assert input_pipeline.eval_resize_size(299) == 342


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["--model", "resnext9000", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnext9000'" in err and "resnext50_32x4d" in err


def test_missing_imagenet_says_which_files_to_put_where(tmp_path, capsys):
    code = main(["--model", "resnext_tiny", "--data-dir", str(tmp_path / "tfds"),
                 "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2
    manual = os.path.join(str(tmp_path / "tfds"), "downloads", "manual")
    for name in input_pipeline.IMAGENET_MANUAL_FILES:
        assert os.path.join(manual, name) in err
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_unprepared_tfds_dataset_and_bad_folder_are_clear_errors(tmp_path):
    with pytest.raises(input_pipeline.DatasetError, match="not prepared.*tfds build mnist"):
        input_pipeline.get_source("tfds:mnist", data_dir=str(tmp_path))
    with pytest.raises(input_pipeline.DatasetError, match="no train/ directory"):
        input_pipeline.get_source(f"folder:{tmp_path}")
    with pytest.raises(input_pipeline.DatasetError, match="expected imagenet2012, tfds:NAME"):
        input_pipeline.get_source("cifar")


def test_batch_not_divisible_by_device_count_is_a_clear_error(tmp_path):
    r = _run_cli(["--model", "resnext_tiny", "--dataset", "digits", "--batch-size", "33",
                  "--workdir", str(tmp_path)], devices=2)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "batch_size: must be a positive multiple of the device count (2 devices" in r.stderr
    assert "got 33" in r.stderr


# ---------------------------------------------------------------------------- input data

def test_digits_pipeline_is_deterministic_and_resumable():
    data = input_pipeline.create_dataset("digits", global_batch_size=64, eval_batch_size=100,
                                         image_size=16, seed=3)
    assert (data.num_classes, data.num_train, data.num_eval) == (10, 1500, 297)
    assert data.steps_per_epoch == 1500 // 64
    it = data.train_batches(0)
    first = [next(it) for _ in range(data.steps_per_epoch + 2)]   # crosses an epoch boundary
    assert first[0]["image"].shape == (64, 16, 16, 3) and first[0]["label"].dtype == np.int32
    resumed = data.train_batches(data.steps_per_epoch - 1)
    for k in (data.steps_per_epoch - 1, data.steps_per_epoch, data.steps_per_epoch + 1):
        b = next(resumed)
        np.testing.assert_array_equal(b["image"], first[k]["image"])
        np.testing.assert_array_equal(b["label"], first[k]["label"])
    # a new permutation each epoch
    assert not np.array_equal(first[0]["label"], first[data.steps_per_epoch]["label"])
    evals = list(data.eval_batches())
    assert len(evals) == data.eval_steps == 3
    assert sum(int(b["mask"].sum()) for b in evals) == 297


def test_imagenet_preprocessing_shapes_and_determinism():
    import tensorflow as tf
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, size=(50, 80, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(img)
    png = tf.io.encode_png(img)
    seed = tf.constant([1, 2], tf.int64)
    a = input_pipeline.preprocess_train(jpeg, seed, 24).numpy()
    b = input_pipeline.preprocess_train(jpeg, seed, 24).numpy()
    c = input_pipeline.preprocess_train(jpeg, tf.constant([1, 3], tf.int64), 24).numpy()
    assert a.shape == (24, 24, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert input_pipeline.preprocess_train(png, seed, 24).shape == (24, 24, 3)
    # eval: the centre crop of the shorter side, ImageNet mean/std normalisation
    e = input_pipeline.preprocess_eval(tf.constant(img), 32).numpy()
    assert e.shape == (32, 32, 3)
    flat = np.full((40, 60, 3), 124, np.uint8)
    np.testing.assert_allclose(input_pipeline.preprocess_eval(tf.io.encode_png(flat), 8).numpy(),
                               np.broadcast_to((124 - np.array(input_pipeline.MEAN_RGB))
                                               / np.array(input_pipeline.STDDEV_RGB), (8, 8, 3)),
                               rtol=1e-5, atol=1e-5)


def test_folder_and_synthetic_datasets(tmp_path):
    image_folder(tmp_path, 3, 2, vary_height=True)
    data = input_pipeline.create_dataset(f"folder:{tmp_path}", global_batch_size=2,
                                         eval_batch_size=4, image_size=8, seed=1)
    assert (data.num_classes, data.num_train, data.num_eval) == (2, 6, 4)
    batches = [next(data.train_batches(0)) for _ in range(2)]
    assert batches[0]["image"].shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(batches[0]["image"], batches[1]["image"])   # deterministic
    labels = np.concatenate([next(data.train_batches(k))["label"] for k in range(3)])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]   # one epoch: every image once
    (evals,) = list(data.eval_batches())
    assert evals["mask"].all() and sorted(evals["label"].tolist()) == [0, 0, 1, 1]

    synth = input_pipeline.create_dataset("synthetic", global_batch_size=4, eval_batch_size=4,
                                          image_size=8, num_classes=5)
    b = next(synth.train_batches(0))
    assert b["image"].shape == (4, 8, 8, 3) and b["label"].max() < 5
    assert synth.num_classes == 5 and synth.num_train == 1_281_167


def test_optimizer_schedule_and_weight_decay_mask():
    """lr = base * batch / 256, linear warmup then cosine to 0; weight decay reaches conv and
    linear kernels only (not BatchNorm scale/bias, not biases), for SGD and AdamW."""
    import jax.numpy as jnp

    from train.trainer import create_optimizer
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones(4),
                                                               "bias": jnp.ones(4)},
              "fc": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones(5)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    for opt, nesterov in (("sgd", False), ("sgd", True), ("adamw", False)):
        cfg = Config(optimizer=opt, nesterov=nesterov, batch_size=512, warmup_epochs=2).resolved()
        tx, schedule = create_optimizer(cfg, total_steps=100, steps_per_epoch=10)
        peak = (0.2 if opt == "sgd" else 2e-3)
        np.testing.assert_allclose([schedule(0), schedule(10), schedule(20), schedule(60),
                                    schedule(100)], [0, peak / 2, peak, peak / 2, 0],
                                   rtol=1e-5, atol=1e-9)
        state = tx.init(params)
        _, state = tx.update(zero, state, params)            # step 0 has lr 0: take one step
        updates, _ = tx.update(zero, state, params)
        decayed = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
        assert decayed == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                           "fc": {"kernel": True, "bias": False}}, (opt, decayed)
        # zero gradients: the second update is the decay alone, through momentum (SGD's trace
        # wd*p, then wd*p*(1+m); Nesterov adds m*trace once more; AdamW decays outside Adam),
        # scaled by the schedule's lr at step 1
        m, wd = cfg.momentum, cfg.weight_decay
        factor = {"sgd": 1 + m * (1 + m) if nesterov else 1 + m, "adamw": 1.0}[opt]
        assert wd > 0 and float(schedule(1)) == pytest.approx(peak / 20)
        np.testing.assert_allclose(updates["conv"]["kernel"],
                                   -float(schedule(1)) * wd * factor * params["conv"]["kernel"],
                                   rtol=1e-5, err_msg=f"{opt} nesterov={nesterov}")


def _log_softmax(logits):
    return logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))


def test_eval_step_counts_top1_top5_and_skips_padding():
    """make_eval_step on fixed logits: labels ranked 1st, 3rd and 6th of 10, and a padded 1st
    (mask 0): top-1 1, top-5 2, count 3, the summed cross-entropy of the three."""
    import jax.numpy as jnp
    from flax import nnx

    from train.trainer import make_eval_step

    class Fixed(nnx.Module):
        def __init__(self, logits):
            self.logits = nnx.Param(jnp.asarray(logits))

        def __call__(self, x):
            return self.logits[...]

    logits = np.tile(np.arange(10, 0, -1, dtype=np.float32), (4, 1))   # class 0 ranks 1st
    labels = np.array([0, 2, 5, 0])
    mask = np.array([1, 1, 1, 0])
    graphdef, params, stats, rest = nnx.split(Fixed(logits), nnx.Param, nnx.BatchStat, ...)
    out = make_eval_step(graphdef, rest, 10)({"params": params, "batch_stats": stats},
                                             {"image": jnp.zeros((4, 1)), "label": labels,
                                              "mask": mask})
    log_p = _log_softmax(logits)
    assert (float(out["top1"]), float(out["top5"]), float(out["count"])) == (1, 2, 3)
    np.testing.assert_allclose(out["loss"], -sum(log_p[i, labels[i]] for i in range(3)), rtol=1e-6)


def test_label_smoothing_is_applied():
    """The training loss with smoothing e: cross-entropy against (1 - e) one-hot + e / K."""
    import jax.numpy as jnp

    from train.trainer import _cross_entropy
    logits = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    labels = np.array([1, 6, 0])
    log_p = _log_softmax(logits)
    target = 0.9 * np.eye(7)[labels] + 0.1 / 7
    np.testing.assert_allclose(_cross_entropy(jnp.asarray(logits), labels, 7, 0.1),
                               -np.sum(target * log_p, -1), rtol=1e-5)
    np.testing.assert_allclose(_cross_entropy(jnp.asarray(logits), labels, 7, 0.0),
                               -log_p[np.arange(3), labels], rtol=1e-5)


# ------------------------------------------------------------------- train_and_evaluate

def _mock_imagenet(tmp_path, model, **overrides):
    import tensorflow_datasets as tfds
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in input_pipeline.IMAGENET_MANUAL_FILES:  # present: the (mocked) build may run
        (manual / name).write_bytes(b"")
    cfg = Config(**{**dict(model=model, dataset="imagenet2012", data_dir=str(tmp_path / "tfds"),
                           manual_dir=str(manual), image_size=32, batch_size=4,
                           num_train_steps=2, progress=False, log_every_steps=1), **overrides})
    with tfds.testing.mock_data(num_examples=8):
        return train_and_evaluate(cfg, str(tmp_path / "work"))


@pytest.mark.parametrize("model", ["resnext_tiny", "googlenet"])
def test_train_and_evaluate_on_mocked_imagenet(tmp_path, model):
    summary = _mock_imagenet(tmp_path, model)
    work = tmp_path / "work"
    assert summary["steps"] == 2 and summary["checkpoint_step"] == 2
    assert 0.0 <= summary["eval_top1"] <= summary["eval_top5"] <= 1.0
    train = _metrics(work)
    assert [r["step"] for r in train] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] >= 0 for r in train)
    # near-zero initial logits over 1000 classes: each cross entropy ~ ln(1000); GoogLeNet adds
    # its two aux losses with weight 0.3 each (its paper) -> (1 + 2 * 0.3) ln(1000)
    expected = (1.6 if model == "googlenet" else 1.0) * np.log(1000)
    assert abs(train[0]["loss"] - expected) < 0.1 * expected, (train[0]["loss"], expected)
    assert [r["step"] for r in _metrics(work, "eval")] == [2]
    assert os.listdir(work / "tensorboard")
    step, state = _restore(str(work))
    assert step == 2 and int(state["step"]) == 2


def _registry():
    """Every registered model; tracing a deep ResNeXt takes up to a minute on 2 cores, so the
    default tier keeps the models with aux heads and the small ResNeXt (registered only while
    a test runs, so not in list_models() here), the rest are slow."""
    from jaxconv.models import list_models
    fast = {"googlenet", "inception_v3"}
    return [(name, "float32") if name in fast
            else pytest.param(name, "float32", marks=pytest.mark.slow)
            for name in sorted(list_models())] + [("resnext_tiny", d) for d in ("float32", "bfloat16")]


@pytest.mark.parametrize("name, dtype", _registry())
def test_every_registered_model_has_a_train_and_eval_step(name, dtype):
    """The real train / eval steps traced (jax.eval_shape: no compilation, no FLOPs) for every
    registered model: output contract, aux heads and their loss, BatchNorm and dropout state,
    optimizer update. Inception-v3's aux head needs 299 px in train mode. bfloat16 computes in
    bf16 and keeps parameters, optimizer state and BatchNorm statistics float32."""
    import jax.numpy as jnp
    from flax import nnx

    from train.trainer import create_optimizer, make_eval_step, make_train_step
    cfg = Config(model=name, image_size=299 if name == "inception_v3" else 64,
                 batch_size=2, dtype=dtype).resolved()
    model = nnx.eval_shape(lambda: create_model(cfg, 7))
    model.train()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    eval_graphdef = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[0]
    tx, schedule = create_optimizer(cfg, 100, 10)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
             "batch_stats": batch_stats, "opt_state": jax.eval_shape(tx.init, params)}
    s = cfg.image_size
    batch = {"image": jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
    rest = jax.tree.map(lambda x: jax.random.key(0) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else jnp.zeros(x.shape, x.dtype), rest)
    new_state, metrics = jax.eval_shape(make_train_step(graphdef, rest, tx, schedule, cfg, 7),
                                        state, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert all(a.shape == b.shape and a.dtype == b.dtype
               for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)))
    assert {x.dtype for x in jax.tree.leaves((params, batch_stats))} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
    out = jax.eval_shape(make_eval_step(eval_graphdef, rest, 7), new_state,
                         {**batch, "mask": jax.ShapeDtypeStruct((2,), jnp.bool_)})
    assert set(out) == {"loss", "top1", "top5", "count"}
    expected_aux = {"googlenet": 0.3, "inception_v3": 0.4}.get(name, 0.0)
    assert cfg.aux_weight == expected_aux


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_real_train_step_updates_the_state_and_computes_in_dtype(dtype):
    """One compiled train step of a tiny ResNeXt: every BatchNorm running statistic and every
    parameter moves, they stay float32, and the activations are bfloat16 exactly when asked."""
    import jax.numpy as jnp
    from flax import nnx

    from train.trainer import create_optimizer, make_train_step
    cfg = Config(model="resnext_tiny", image_size=32, batch_size=4, dtype=dtype,
                 warmup_epochs=0.0).resolved()
    model = create_model(cfg, 10)
    model.train()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx, schedule = create_optimizer(cfg, 100, 10)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
             "opt_state": tx.init(params)}
    batch = {"image": jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)),
                                  jnp.float32), "label": jnp.asarray([1, 2, 3, 4])}
    step = make_train_step(graphdef, rest, tx, schedule, cfg, 10)
    assert ("bf16[" in str(jax.make_jaxpr(step)(state, batch))) == (dtype == "bfloat16")
    new, metrics = jax.jit(step)(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(new["step"]) == 1
    for what in ("batch_stats", "params"):
        old_leaves, new_leaves = jax.tree.leaves(state[what]), jax.tree.leaves(new[what])
        assert len(old_leaves) == len(new_leaves) > 0
        for a, b in zip(old_leaves, new_leaves):
            assert b.dtype == jnp.float32 and np.any(np.asarray(a) != np.asarray(b)), what


@pytest.mark.slow
def test_train_and_evaluate_resnext50_on_mocked_imagenet(tmp_path):
    # batch 4: at 32 px layer4 is 1x1, and BatchNorm over fewer values blows the gradients up
    summary = _mock_imagenet(tmp_path, "resnext50")
    assert summary["model"] == "resnext50_32x4d" and summary["checkpoint_step"] == 2
    assert np.isfinite(summary["eval_loss"])


def test_short_digits_run_learns_and_keeps_the_bookkeeping(tmp_path, capsys):
    # base lr 0.1: at 0.8 the loss first climbs to ~20 and whether it is back below the start
    # after 24 steps depends on the initial draw
    cfg = Config(**DIGITS, num_train_steps=24, base_lr=0.1, checkpoint_every_steps=8,
                 keep_checkpoints=2)
    summary = train_and_evaluate(cfg, str(tmp_path))
    train = _metrics(str(tmp_path))
    losses, accuracy = [r["loss"] for r in train], [r["accuracy"] for r in train]
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses
    assert np.mean(accuracy[-6:]) > 0.3, accuracy   # chance is 0.1 (eval lags: BN statistics)
    assert 0.0 <= summary["eval_top1"] <= 1.0
    out = capsys.readouterr().out
    assert "validation: top-1" in out and "checkpoint: step 24" in out
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["16", "24"]   # keep-N


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = Config(**DIGITS, num_train_steps=6, base_lr=1e12, checkpoint_every_steps=1,
                 label_smoothing=0.0)
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as err:
        train_and_evaluate(cfg, str(tmp_path))
    bad = int(err.value.args[0].split("at step ")[1].split(";")[0])
    good, state = _restore(str(tmp_path))
    assert good == bad - 1 and f"step {good}" in str(err.value)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ------------------------------------------------------------------ resume, multi-device

def _final_state(workdir, like=None):
    return _restore(workdir, like)[1]


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    n = 6  # checkpoint interval; the run is 2n steps, killed during the second interval
    cfg = dict(DIGITS, num_train_steps=2 * n, checkpoint_every_steps=n, base_lr=0.8,
               drop_rate=0.2)
    whole = str(tmp_path / "whole")
    train_and_evaluate(Config(**cfg), whole)

    split = str(tmp_path / "split")
    cmd, env, _ = _cli(_flags(**cfg, workdir=split))
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 500
    metrics = os.path.join(split, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and any(r["step"] >= n + 2 for r in _metrics(split)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted(os.listdir(os.path.join(split, "checkpoints")))
    assert ckpts == [str(n)], ckpts   # killed between the two checkpoints
    # a checkpoint that was being written when the process died is never read
    os.makedirs(os.path.join(split, "checkpoints", f"{2 * n - 1}.orbax-checkpoint-tmp"))

    r = _run_cli(_flags(**cfg, workdir=split))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {os.path.join(split, 'checkpoints')}/{n} (step {n}/{2 * n})" in r.stdout
    # it went on from step n: n steps this run, step 1 logged once (by the killed run)
    assert f"this run {n} steps" in r.stdout
    steps = [rec["step"] for rec in _metrics(split)]
    assert steps.count(1) == 1 and steps[-n:] == list(range(n + 1, 2 * n + 1)), steps
    assert set(os.listdir(os.path.join(split, "checkpoints"))) == {str(n), str(2 * n)}
    a, b = _final_state(whole), _final_state(split)
    assert int(a["step"]) == int(b["step"]) == 2 * n
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


_SAVE_BIG = """
import sys, jax.numpy as jnp, orbax.checkpoint as ocp
from train.trainer import checkpoint_manager
mngr = checkpoint_manager(sys.argv[1], keep=3)
if mngr.latest_step() is None:
    mngr.save(1, args=ocp.args.StandardSave({"w": jnp.arange(10.0)}))
mngr.save(2, args=ocp.args.StandardSave({f"w{i}": jnp.full((4096, 4096), i, jnp.float32)
                                         for i in range(8)}))   # 512 MiB: a save takes a while
"""


def test_a_checkpoint_killed_mid_save_is_never_read(tmp_path):
    """SIGKILL while orbax is writing checkpoint 2 (its temporary directory exists): the
    directory then holds a partial step 2 that must never be mistaken for a checkpoint."""
    import orbax.checkpoint as ocp

    from train.trainer import checkpoint_manager
    ckpts = str(tmp_path / "checkpoints")
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_BIG, ckpts], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(n.startswith("2.") for n in os.listdir(ckpts)):
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = sorted(os.listdir(ckpts))
    assert leftovers == ["1", "2.orbax-checkpoint-tmp"], leftovers   # killed mid-save
    mngr = checkpoint_manager(ckpts, keep=3)
    assert mngr.latest_step() == 1 and mngr.all_steps() == [1]
    restored = mngr.restore(1, args=ocp.args.StandardRestore())
    np.testing.assert_array_equal(restored["w"], np.arange(10.0))
    mngr.close()
    assert os.listdir(ckpts) == ["1"]   # the half-written step is deleted when a run reopens it


def test_two_devices_match_one(tmp_path):
    """The same run on a 2-device mesh (batch sharded, state replicated) and on 1 device.

    After one step the whole state (params, BatchNorm statistics, momentum) agrees to fp32
    rounding relative to each array's scale, and so do the losses of the first two steps (the
    third to 1e-3: oneDNN's weight gradients sum a half batch per device in another order, and
    two steps amplify it). Later states
    are not compared elementwise: upscaled digits give max-pool windows with (near-)ties, and a
    last-bit difference flips which element receives the gradient.
    """
    cfg = dict(DIGITS, num_train_steps=3, base_lr=0.1, eval_batch_size=64,
               checkpoint_every_steps=1)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train_and_evaluate(Config(**cfg), one)
    r = _run_cli(_flags(**cfg, workdir=two), devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 cpu device(s)" in r.stdout
    a = _restore(one, step=1)[1]
    b = _restore(two, like=a, step=1)[1]
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        scale = float(np.max(np.abs(x))) if np.size(x) else 0.0
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * max(scale, 1e-6),
                                   err_msg=jax.tree_util.keystr(path))
    la, lb = [r["loss"] for r in _metrics(one)], [r["loss"] for r in _metrics(two)]
    np.testing.assert_allclose(la[:2], lb[:2], rtol=1e-5)   # computed from the compared states
    np.testing.assert_allclose(la, lb, rtol=1e-3)
    ea, eb = _metrics(one, "eval")[-1], _metrics(two, "eval")[-1]
    assert abs(ea["loss"] - eb["loss"]) < 1e-2 * ea["loss"] and abs(ea["top1"] - eb["top1"]) < 0.02


@pytest.mark.slow
def test_two_hosts_train_and_resume(tmp_path):
    """Two processes x 1 CPU device through jax.distributed (the multi-host path: each host
    reads its half of the data, arrays span both processes, orbax saves from both)."""
    import socket

    def launch(steps):
        with socket.socket() as sock:
            sock.bind(("localhost", 0))
            port = sock.getsockname()[1]
        procs = []
        for rank in range(2):
            cmd, env, _ = _cli(_flags(**DIGITS, num_train_steps=steps, workdir=str(tmp_path)),
                               env={"JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                    "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank),
                                    "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"})
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
        return outs[0]

    out = launch(2)
    assert "batch 32 on 2 cpu device(s) x 2 host(s)" in out
    out = launch(3)
    assert "resumed from" in out and "(step 2/3)" in out
    assert [r["step"] for r in _metrics(str(tmp_path))] == [1, 2, 3]
    last = _metrics(str(tmp_path), "eval")[-1]
    assert np.isfinite(last["loss"]) and 0.0 <= last["top1"] <= 1.0


# ------------------------------------------------------------------------- --init-from

def test_init_from_torch_and_jaxconv_checkpoints_with_a_new_head(tmp_path):
    from safetensors.numpy import save_file

    from jaxconv.convert import ConversionError, save_weights, to_torch
    src = create_model(Config(model="resnext_tiny", seed=5).resolved(), 1000)
    sd = to_torch(src)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "torch.safetensors"))
    save_weights(src, tmp_path / "jax.safetensors")
    for name in ("torch.safetensors", "jax.safetensors"):   # both layouts: one loader
        cfg = Config(model="resnext_tiny", init_from=str(tmp_path / name)).resolved()
        for classes in (1000, 10):   # same head: everything loads; 10 classes: a fresh fc
            model = create_model(cfg, classes)
            new_head = load_init_weights(model, cfg)
            assert new_head == ([] if classes == 1000 else ["fc.bias", "fc.weight"]), (name, new_head)
            fresh, got = to_torch(create_model(cfg, classes)), to_torch(model)
            for k, v in got.items():
                want = fresh[k] if classes != 1000 and k.startswith("fc.") else sd[k]
                np.testing.assert_array_equal(v, want, err_msg=f"{name} {classes} {k}")
    bad = dict(sd)
    bad.pop("layer1.0.conv1.weight")
    bad["extra.weight"] = np.zeros(3, np.float32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    cfg = Config(model="resnext_tiny", init_from=str(tmp_path / "bad.safetensors")).resolved()
    with pytest.raises(ConversionError, match="(?s)missing in checkpoint: layer1.0.conv1.weight"
                                              ".*unexpected in checkpoint: extra.weight"):
        load_init_weights(create_model(cfg, 10), cfg)


# --------------------------------------------------------------------------- learning

@pytest.mark.slow
def test_small_resnext_learns_digits_to_90_percent(tmp_path):
    cfg = Config(**{**DIGITS, "log_every_steps": 20, "warmup_epochs": 0.5}, num_epochs=4,
                 base_lr=0.4)
    t = time.time()
    summary = train_and_evaluate(cfg, str(tmp_path))
    print(f"resnext_tiny digits 32px: top-1 {summary['eval_top1']:.4f} after "
          f"{summary['steps']} steps, {time.time() - t:.0f} s")
    assert summary["eval_top1"] >= 0.90
