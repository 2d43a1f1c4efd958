"""Nothing a user does ends in a traceback or a half-written file: empty batches through every
layer, damaged checkpoints (each file kind of an orbax checkpoint), convert CLI outputs, corrupt
images, bad training options and missing extras, each with the one clear message it gets."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxconv import nn
from jaxconv.convert.__main__ import main as convert_main
from jaxconv.convert.files import atomic_write
from jaxconv.nn import blocks
from tests.helpers import image_folder, nchw, nhwc, registered, resnext_tiny, rngs
from train import input_pipeline
from train.config import Config
from train.imagenet import main as train_main
from train.trainer import CheckpointError, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------------------- batch 0

LAYERS = [  # (jaxconv layer, torch twin, input NHWC with batch 0)
    (lambda: nn.Conv2d(4, 6, (3, 2), (2, 1), (1, 0), (2, 1), groups=2, rngs=rngs()),
     lambda: torch.nn.Conv2d(4, 6, (3, 2), (2, 1), (1, 0), (2, 1), groups=2), (0, 9, 7, 4)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, 2, 1, 1, groups=2, rngs=rngs()),
     lambda: torch.nn.ConvTranspose2d(4, 6, 3, 2, 1, 1, groups=2), (0, 5, 4, 4)),
    (lambda: nn.SeparableConv2d(4, 6, 3, padding=1, depth_multiplier=2, rngs=rngs()), None,
     (0, 7, 5, 4)),
    (lambda: nn.BatchNorm2d(4), lambda: torch.nn.BatchNorm2d(4), (0, 5, 4, 4)),
    (lambda: nn.MaxPool2d(3, 2, ceil_mode=True), lambda: torch.nn.MaxPool2d(3, 2, ceil_mode=True),
     (0, 9, 7, 4)),
    (lambda: nn.AvgPool2d(3, 2, 1), lambda: torch.nn.AvgPool2d(3, 2, 1), (0, 9, 7, 4)),
    (lambda: nn.AdaptiveAvgPool2d((4, 3)), lambda: torch.nn.AdaptiveAvgPool2d((4, 3)), (0, 9, 7, 4)),
    (lambda: nn.DeformConv2dPack(4, 6, 3, padding=1, rngs=rngs()), None, (0, 7, 5, 4)),
    (lambda: blocks.InceptionModule(8, 4, 3, 5, 2, 3, 4, rngs=rngs()), None, (0, 7, 6, 8)),
    (lambda: blocks.ResNeXtBlockC(8, 16, 4, 2, 2, rngs=rngs()), None, (0, 7, 6, 8)),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layer, twin, shape", LAYERS, ids=[str(i) for i in range(len(LAYERS))])
def test_every_layer_takes_an_empty_batch(layer, twin, shape, train):
    """An empty batch: the output shape of a batch of two with N = 0, zero gradients, and
    BatchNorm's running statistics untouched (as torch)."""
    m = layer()
    m.train() if train else m.eval()
    x = jnp.zeros(shape)
    want = (0, *jax.eval_shape(lambda x: nnx.clone(m)(x), jnp.zeros((2, *shape[1:]))).shape[1:])
    stats = jax.tree.map(np.asarray, nnx.state(m, nnx.BatchStat))
    y = m(x)
    assert y.shape == want
    jax.tree.map(np.testing.assert_array_equal, nnx.state(m, nnx.BatchStat), stats)
    _, grads = nnx.value_and_grad(lambda m, x: jnp.sum(m(x)), argnums=(0, 1))(m, x)
    assert not np.any(np.asarray(grads[1]))
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads[0]))
    if twin is not None:   # torch gives the same (empty) shape
        assert nhwc(twin().train(train)(nchw(np.zeros(shape, np.float32)))).shape == y.shape


# ---------------------------------------------------------------------- damaged checkpoints

DIGITS = dict(model="resnext_tiny", dataset="digits", image_size=32, batch_size=32,
              warmup_epochs=0.0, progress=False, log_every_steps=1, checkpoint_every_steps=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with checkpoints after steps 1 and 2."""
    workdir = tmp_path_factory.mktemp("run")
    with registered(resnext_tiny):
        train_and_evaluate(Config(**DIGITS, num_train_steps=2), str(workdir))
    return workdir


def _damage(step_dir, kind):
    data = sorted((step_dir / "default" / "ocdbt.process_0" / "d").iterdir())
    if kind == "truncated data file":
        biggest = max(data, key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    elif kind == "deleted data file":
        for p in data:
            p.unlink()
    elif kind == "missing _METADATA":
        (step_dir / "default" / "_METADATA").unlink()
    elif kind == "missing manifest.ocdbt":
        for p in step_dir.rglob("manifest.ocdbt"):
            p.unlink()


# orbax leaves the coroutines of a failed restore unawaited (a warning at garbage collection)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["truncated data file", "deleted data file", "missing _METADATA",
                                  "missing manifest.ocdbt"])
def test_a_damaged_checkpoint_is_named_moved_aside_and_the_previous_one_used(trained, tmp_path,
                                                                               capsys, kind):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    _damage(workdir / "checkpoints" / "2", kind)
    with registered(resnext_tiny):
        summary = train_and_evaluate(Config(**DIGITS, num_train_steps=3), str(workdir))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "cannot be restored" in line]
    assert len(lines) == 1 and "checkpoint: step 2 in" in lines[0], out
    assert "resumed from" in out and "/1 (step 1/3)" in out
    assert (workdir / "checkpoints-damaged" / "2").is_dir()     # kept for inspection
    assert summary["steps_this_run"] == 2 and summary["checkpoint_step"] == 3


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_checkpoint_restores_is_one_clear_error(trained, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    for step in ("1", "2"):
        _damage(workdir / "checkpoints" / step, "missing manifest.ocdbt")
    with registered(resnext_tiny), pytest.raises(CheckpointError) as e:
        train_and_evaluate(Config(**DIGITS, num_train_steps=3), str(workdir))
    assert "no checkpoint in" in str(e.value) and str(workdir / "checkpoints") in str(e.value)
    assert "tried steps 2, 1" in str(e.value)


# ------------------------------------------------------------------------- convert outputs

def test_convert_checks_the_output_before_any_work(tmp_path, capsys):
    src = tmp_path / "src.pth"
    src.write_bytes(b"")    # never read: the output is refused first
    for dst, args, message in (
            (tmp_path / "no" / "dir" / "out.safetensors", [], "does not exist"),
            (tmp_path / "out.pth", [], "expected a file name ending in .safetensors"),
            (tmp_path / "out.npz", ["--to-torch"], "ending in .pth or .pt or .safetensors")):
        assert convert_main(["mobilenet_v1", str(src), str(dst), *args]) == 1
        err = capsys.readouterr().err
        assert message in err and not dst.exists(), err
    assert "a torch .pth output needs --to-torch" in \
        (convert_main(["mobilenet_v1", str(src), str(tmp_path / "o.pth")]), capsys.readouterr().err)[1]


_KILLED_WRITE = """
import os, signal, sys
from jaxconv.convert.files import atomic_write
with atomic_write(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"partial")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_outputs_are_atomic_and_get_normal_modes(tmp_path):
    dst = tmp_path / "out.pth"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(dst)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()                       # killed mid-write: no file under the name
    assert [p.name.startswith(".out.pth.") for p in tmp_path.iterdir()] == [True]  # a hidden temp
    with atomic_write(dst) as tmp:
        open(tmp, "wb").write(b"ok")
    mask = os.umask(0)
    os.umask(mask)
    assert dst.read_bytes() == b"ok" and (dst.stat().st_mode & 0o777) == 0o666 & ~mask
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "failed.pth") as tmp:
        open(tmp, "wb").write(b"half")
        raise RuntimeError("the conversion failed")
    assert not (tmp_path / "failed.pth").exists() and len(list(tmp_path.iterdir())) == 2


# ---------------------------------------------------------------------------- corrupt images

def _folder(tmp_path, corrupt: bool):
    image_folder(tmp_path, 4, 2)
    bad = tmp_path / "train" / "dog" / "1.jpg"
    if corrupt:
        bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return bad


def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path, capsys):
    bad = _folder(tmp_path, corrupt=True)
    data = input_pipeline.create_dataset(f"folder:{tmp_path}", global_batch_size=8,
                                         eval_batch_size=4, image_size=8, seed=1)
    with pytest.raises(input_pipeline.DatasetError, match=f"cannot decode {bad}.*--skip-corrupt-images"):
        next(data.train_batches(0))
    skipped = []
    data = input_pipeline.create_dataset(f"folder:{tmp_path}", global_batch_size=4,
                                         eval_batch_size=4, image_size=8, seed=1,
                                         skip_corrupt_images=True, skipped=skipped)
    batches = data.train_batches(0)
    for _ in range(3):   # more than an epoch: every file is read once
        assert next(batches)["image"].shape == (4, 8, 8, 3)
    assert [p for p, _ in skipped] == [str(bad)]
    assert f"warning: skipping corrupt image {bad}" in capsys.readouterr().out


def test_training_stops_naming_the_corrupt_image(tmp_path, capsys):
    bad = _folder(tmp_path / "data", corrupt=True)
    workdir = tmp_path / "run"
    args = ["--model", "mobilenet_v1", "--dataset", f"folder:{tmp_path / 'data'}", "--image-size",
            "16", "--batch-size", "8", "--num-train-steps", "1", "--no-progress",
            "--workdir", str(workdir)]
    assert train_main(args) == 2
    assert f"cannot decode {bad}" in capsys.readouterr().err
    assert not workdir.exists()        # failed before its first step: nothing left behind


# -------------------------------------------------------------------- options and extras

@pytest.mark.parametrize("args, message", [
    (["--image-size", "0"], "image_size: mobilenet_v1 needs at least 1 px, got --image-size 0"),
    (["--model", "inception_v3", "--image-size", "128"],
     "inception_v3's aux head needs 299 px, got --image-size 128; pass --aux-weight 0"),
], ids=["zero", "inception-aux"])
def test_bad_image_size_is_one_message_and_leaves_no_workdir(tmp_path, capsys, args, message):
    workdir = tmp_path / "run"
    base = ["--model", "mobilenet_v1", "--dataset", "digits", "--workdir", str(workdir)]
    assert train_main(base + args) == 2
    assert message in capsys.readouterr().err and not workdir.exists()


def test_missing_train_extra_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['tensorflow'] = None; from train.imagenet import main; "
            "sys.exit(main(['--dataset', 'digits', '--workdir', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pip install 'jaxconv[train]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
