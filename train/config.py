"""Training configuration: one dataclass whose fields are the command-line options.

`python -m train.imagenet --help` documents every field (the help strings live here, next to
the defaults, so the CLI and the code cannot disagree). ``None`` means "derived": see
`Config.resolved()`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Optional

BASE_LR = {"sgd": 0.1, "adamw": 1e-3}
WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class Config:
    # model
    model: str = _f("resnext50_32x4d", "registered model name or alias (see --list-models)")
    num_classes: Optional[int] = _f(None, "classes of the head; default: the dataset's "
                                    "(synthetic: 1000)")
    image_size: Optional[int] = _f(None, "training crop / eval crop size; default: the model's "
                                   "native size (299 for inception_v3 and xception, else 224)")
    dtype: str = _f("float32", "compute dtype; bfloat16 = mixed precision (parameters, "
                    "optimizer state and BatchNorm statistics stay float32)",
                    choices=("float32", "bfloat16"))
    drop_rate: Optional[float] = _f(None, "dropout before the classifier; default: the model's")
    aux_weight: Optional[float] = _f(None, "weight of each auxiliary-classifier loss; default: "
                                     "the model's (googlenet 0.3, its paper; inception_v3 0.4, "
                                     "torchvision's fine-tuning guide); 0 builds no aux heads")
    init_from: Optional[str] = _f(None, "start from weights: a torch checkpoint (.pth/.pt/.bin/"
                                  ".safetensors, torchvision/timm keys) or a jaxconv .safetensors; "
                                  "a head of another class count is left freshly initialised")
    # data
    dataset: str = _f("imagenet2012", "imagenet2012 | tfds:NAME | folder:PATH | synthetic | digits")
    data_dir: Optional[str] = _f(None, "tfds data dir; default: $TFDS_DATA_DIR or "
                                 "~/tensorflow_datasets")
    manual_dir: Optional[str] = _f(None, "where the ImageNet tars are; default: "
                                   "DATA_DIR/downloads/manual")
    shuffle_buffer: int = _f(16_384, "examples in the tf.data shuffle buffer")
    skip_corrupt_images: bool = _f(False, "skip images that cannot be decoded (each named in a "
                                   "warning, counted in the summary, listed in "
                                   "WORKDIR/skipped_images.tsv) instead of stopping the run "
                                   "with the file's name")
    # optimisation
    batch_size: int = _f(256, "global batch size (all devices and hosts together)")
    eval_batch_size: Optional[int] = _f(None, "global eval batch size; default: --batch-size")
    num_epochs: float = _f(90.0, "training length in epochs")
    num_train_steps: Optional[int] = _f(None, "training length in steps (overrides --num-epochs)")
    optimizer: str = _f("sgd", "sgd (momentum) or adamw", choices=("sgd", "adamw"))
    base_lr: Optional[float] = _f(None, "learning rate per 256 images; lr = base_lr * batch/256; "
                                  "default 0.1 (sgd) / 1e-3 (adamw)")
    momentum: float = _f(0.9, "SGD momentum (adamw: b1)")
    nesterov: bool = _f(False, "Nesterov momentum for sgd")
    weight_decay: Optional[float] = _f(None, "weight decay, not applied to BatchNorm parameters "
                                       "and biases; default 1e-4 (sgd, coupled as torch's SGD) "
                                       "/ 0.05 (adamw, decoupled)")
    warmup_epochs: float = _f(5.0, "linear warmup from 0, then cosine decay to 0")
    label_smoothing: float = _f(0.1, "label smoothing of the training loss")
    seed: int = _f(0, "seed of the initialisation, data order, augmentation and dropout")
    # bookkeeping
    workdir: Optional[str] = _f(None, "checkpoints, metrics.jsonl and TensorBoard logs; a run "
                                "resumes from the latest complete checkpoint here; default: "
                                "runs/MODEL-DATASET")
    checkpoint_every_steps: Optional[int] = _f(None, "save every N steps (and at the end); "
                                               "default: once per epoch")
    keep_checkpoints: int = _f(3, "checkpoints kept (older ones deleted)")
    log_every_steps: int = _f(50, "train metrics to metrics.jsonl / TensorBoard every N steps")
    eval_every_epochs: float = _f(1.0, "evaluate every N epochs (and at the end)")
    compilation_cache: Optional[str] = _f(
        "~/.cache/jaxconv/xla", "JAX persistent compilation cache: a restarted or repeated run "
        "skips compiling; '' disables; $JAX_COMPILATION_CACHE_DIR, when set, wins")
    progress: bool = _f(True, "show a progress bar (loss, lr, images/s)")
    distributed: str = _f("auto", "jax.distributed.initialize(): auto (when a cluster launcher "
                          "is detected: SLURM, Open MPI, JAX_COORDINATOR_ADDRESS), on, off",
                          choices=("auto", "on", "off"))

    def resolved(self) -> "Config":
        """A copy with every derived default filled in (from the model name and optimizer)."""
        from jaxconv.models.registry import spec
        s = spec(self.model)
        c = dataclasses.replace(self, model=s.name)
        if c.image_size is None:
            c.image_size = s.input_size
        if c.aux_weight is None:
            c.aux_weight = max((a.loss_weight for a in s.aux_heads), default=0.0)
        if not isinstance(c.image_size, int) or c.image_size < max(1, s.min_input_size):
            raise ValueError(f"image_size: {s.name} needs at least {max(1, s.min_input_size)} px, "
                             f"got --image-size {c.image_size}")
        if c.aux_weight > 0 and c.image_size < s.aux_min_input_size:
            raise ValueError(f"image_size: {s.name}'s aux head needs {s.aux_min_input_size} px, "
                             f"got --image-size {c.image_size}; pass --aux-weight 0 to train "
                             f"without it at this size")
        if c.base_lr is None:
            c.base_lr = BASE_LR[c.optimizer]
        if c.weight_decay is None:
            c.weight_decay = WEIGHT_DECAY[c.optimizer]
        if c.eval_batch_size is None:
            c.eval_batch_size = c.batch_size
        if c.workdir is None:
            c.workdir = f"runs/{s.name}-{c.dataset.replace(':', '_').replace('/', '_')}"
        return c

    @property
    def learning_rate(self) -> float:
        return self.base_lr * self.batch_size / 256
