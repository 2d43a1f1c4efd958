"""Input pipelines: tensorflow-datasets sources, tf.data preprocessing, per-host sharding.

Every dataset is exposed as a `Dataset`: class count, split sizes and two iterator factories
yielding numpy batches of this host's share of the global batch:

- ``train_batches(start_step)``: {"image": (b, s, s, 3), "label": (b,)} forever, starting at global
  step `start_step`. The order is a pure function of (seed, step): epoch e is shuffled with seed
  (seed, e) and example i of an epoch gets augmentation seed (seed, e, i), so a run resumed at
  step k sees exactly the batches an uninterrupted run sees from step k on.
- ``eval_batches()``: {"image", "label", "mask"}; exactly ``eval_steps`` batches on every host
  (the last ones padded, mask 0), so multi-host evaluation never waits on a host with fewer.

Sources (``--dataset``): ``imagenet2012`` (tfds, built from the manual download), ``tfds:NAME``
(any prepared tfds image classification dataset), ``folder:PATH`` (an ImageNet-style folder read
with tfds' ImageFolder), ``synthetic`` (random images, for throughput) and ``digits``
(scikit-learn's 8x8 handwritten digits, upscaled; ships with scikit-learn, no download).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import numpy as np

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
DIGITS_NUM_VAL = 297  # fixed split of sklearn's 1797 digits: 1500 train / 297 validation


class DatasetError(ValueError):
    """The requested dataset is unknown, missing or unusable (the message says what to do)."""


@dataclasses.dataclass
class Dataset:
    name: str
    num_classes: int
    num_train: int
    num_eval: int
    steps_per_epoch: int
    eval_steps: int
    train_batches: Callable[[int], Iterator[dict]]
    eval_batches: Callable[[], Iterator[dict]]


def _tf():
    import tensorflow as tf
    # tf.data only: keep TensorFlow off any accelerator (JAX owns them) and quiet.
    tf.config.set_visible_devices([], "GPU")
    return tf


# ---------------------------------------------------------------------------- preprocessing

def eval_resize_size(image_size: int) -> int:
    """The shorter side before the eval centre crop: 256 for 224, 342 for 299 (ratio 256/224)."""
    return int(round(image_size * 256 / 224))


def _is_encoded(image) -> bool:
    return image.dtype.name == "string"


def _image_shape(tf, image):
    """(height, width) of an encoded (any format) or decoded image."""
    if _is_encoded(image):
        return tf.cond(tf.io.is_jpeg(image),
                       lambda: tf.io.extract_jpeg_shape(image)[:2],
                       lambda: tf.shape(tf.io.decode_image(image, channels=3,
                                                           expand_animations=False))[:2])
    return tf.shape(image)[:2]


def _crop(tf, image, offset_y, offset_x, h, w):
    """The (h, w) window at (offset_y, offset_x) of an image, RGB uint8; JPEGs decode only it."""
    if _is_encoded(image):
        window = tf.stack([offset_y, offset_x, h, w])
        return tf.cond(
            tf.io.is_jpeg(image),
            lambda: tf.io.decode_and_crop_jpeg(image, window, channels=3),
            lambda: tf.image.crop_to_bounding_box(
                tf.io.decode_image(image, channels=3, expand_animations=False),
                offset_y, offset_x, h, w))
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return tf.image.crop_to_bounding_box(image, offset_y, offset_x, h, w)


def _resize(tf, image, size):
    return tf.image.resize(image, size, method="bilinear", antialias=True)


def _normalize(tf, image):
    return (tf.cast(image, tf.float32) - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def preprocess_train(image, seed, image_size: int, *, flip: bool = True,
                     area_range=(0.08, 1.0)):
    """Inception-style random-resized crop (area 8%-100%, aspect 3/4-4/3) + horizontal flip,
    resized to image_size, mean/std normalised. `seed`: a stateless tf seed, shape (2,)."""
    tf = _tf()
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = _image_shape(tf, image)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], 0), tf.constant([0.0, 0.0, 1.0, 1.0], shape=(1, 1, 4)),
        seed=crop_seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=area_range, max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = _crop(tf, image, begin[0], begin[1], size[0], size[1])
    image = _resize(tf, image, (image_size, image_size))
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return _normalize(tf, image)


def preprocess_eval(image, image_size: int):
    """Resize the shorter side to eval_resize_size (256 for 224), centre crop image_size."""
    tf = _tf()
    shape = _image_shape(tf, image)
    resize = eval_resize_size(image_size)
    # the centre window of the original whose resized version is the crop: decode only it
    crop = tf.cast(tf.math.round(tf.cast(tf.reduce_min(shape), tf.float32) * image_size / resize),
                   tf.int32)
    crop = tf.maximum(crop, 1)
    offset_y, offset_x = (shape[0] - crop + 1) // 2, (shape[1] - crop + 1) // 2
    image = _crop(tf, image, offset_y, offset_x, crop, crop)
    image = _resize(tf, image, (image_size, image_size))
    return _normalize(tf, image)


def preprocess_plain(image, image_size: int):
    """Resize the whole (small, decoded) image to image_size: digits, train and eval alike."""
    tf = _tf()
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return _normalize(tf, tf.image.resize(image, (image_size, image_size), method="bilinear"))


# --------------------------------------------------------------------------------- sources

@dataclasses.dataclass
class _Source:
    """Where examples come from: per-host split datasets of {"image", "label"} (encoded bytes
    or decoded uint8 images), before shuffling and preprocessing."""
    name: str
    num_classes: int
    num_train: int
    num_eval: int
    train: Callable[[int], object]      # epoch -> tf.data.Dataset of this host's train share
    eval: Callable[[], object]          # -> tf.data.Dataset of this host's eval share
    shuffled_by_source: bool = False    # train(epoch) already shuffled with an epoch seed
    plain: bool = False                 # small decoded images: resize only (no crop, no flip)
    # folder sources: the file of every example, in train(epoch) / eval() order, and a copy of
    # the source without some files (corrupt ones, --skip-corrupt-images)
    paths: Callable[[str, int | None], object] | None = None
    without: Callable[[frozenset], "_Source"] | None = None


def _process():
    import jax
    return jax.process_index(), jax.process_count()


def _in_memory_source(name, images, labels, val_images, val_labels, num_classes, plain):
    tf = _tf()
    index, count = _process()

    def make(x, y):
        return tf.data.Dataset.from_tensor_slices({"image": x, "label": y}).shard(count, index)

    return _Source(name, num_classes, len(labels), len(val_labels),
                   train=lambda epoch: make(images, labels), eval=lambda: make(val_images, val_labels),
                   plain=plain)


def digits_source() -> _Source:
    """scikit-learn's handwritten digits (1797 8x8 grey images, 10 classes, no download):
    a fixed 1500 / 297 split, pixels 0-16 scaled to uint8, replicated to RGB."""
    from sklearn.datasets import load_digits
    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    images = np.repeat(images, 3, axis=-1)
    labels = data.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(labels))
    tr, va = order[:-DIGITS_NUM_VAL], order[-DIGITS_NUM_VAL:]
    return _in_memory_source("digits", images[tr], labels[tr], images[va], labels[va], 10,
                             plain=True)


def synthetic_source(image_size: int, num_classes: int) -> _Source:
    """Random uint8 images and labels (fixed per host): an ImageNet-sized epoch for throughput
    measurements; learning from it is impossible by construction."""
    tf = _tf()
    index, count = _process()
    rng = np.random.RandomState(1234 + index)
    n = 256
    images = rng.randint(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
    labels = rng.randint(0, num_classes, size=(n,)).astype(np.int64)
    num_train, num_eval = 1_281_167, 1024

    def make(total):
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).repeat()
        return ds.take(total // count)

    return _Source("synthetic", num_classes, num_train, num_eval, train=lambda epoch: make(num_train),
                   eval=lambda: make(num_eval), plain=True)


def _missing_imagenet(data_dir: str, manual_dir: str) -> DatasetError:
    files = "\n".join(f"    {os.path.join(manual_dir, f)}" for f in IMAGENET_MANUAL_FILES)
    return DatasetError(
        "dataset: imagenet2012 is not prepared in tfds data dir "
        f"{data_dir!r} and its manual download files are missing.\n"
        "  Download ILSVRC2012 from https://image-net.org/ (registration required) and put\n"
        f"{files}\n"
        "  (or pass --manual-dir DIR where DIR holds both tars); the first run then builds the\n"
        "  tfds dataset once (hours, ~150 GB), later runs read it directly.")


def tfds_source(name: str, data_dir: str | None, manual_dir: str | None, seed: int) -> _Source:
    """A tfds image classification dataset by name. imagenet2012 is built from the manual
    download when needed; any other dataset must already be prepared (`tfds build NAME`)."""
    import tensorflow_datasets as tfds
    _tf()  # configures TensorFlow (no accelerators) before tfds touches it
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name, bad config
        raise DatasetError(f"dataset: cannot open tfds dataset {name!r} ({type(e).__name__}: {e})") from e
    root = os.fspath(builder.data_dir_root)
    if not builder.is_prepared():
        if builder.name == "imagenet2012":
            manual_dir = manual_dir or os.path.join(root, "downloads", "manual")
            if not all(os.path.isfile(os.path.join(manual_dir, f)) for f in IMAGENET_MANUAL_FILES):
                raise _missing_imagenet(root, manual_dir)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        else:
            raise DatasetError(f"dataset: tfds dataset {name!r} is not prepared in {root!r}; "
                               f"build it first (`tfds build {name}` with network access) or pass "
                               f"--data-dir where it is prepared")
    info = builder.info
    image_key, label_key = info.supervised_keys or ("image", "label")
    if label_key not in info.features or not hasattr(info.features[label_key], "num_classes"):
        raise DatasetError(f"dataset: {name!r} has no class label feature (features: "
                           f"{list(info.features)})")
    num_classes = info.features[label_key].num_classes
    splits = list(info.splits)
    eval_split = next((s for s in ("validation", "val", "test") if s in splits), "validation")
    decoders = {image_key: tfds.decode.SkipDecoding()}

    def load(split, epoch=None):
        read_config = tfds.ReadConfig(shuffle_seed=seed + (epoch or 0), try_autocache=False)
        ds = builder.as_dataset(split=tfds.split_for_jax_process(split), decoders=decoders,
                                shuffle_files=epoch is not None, read_config=read_config)
        return ds.map(lambda ex: {"image": ex[image_key], "label": ex[label_key]})

    def count(split):
        try:
            return builder.info.splits[split].num_examples
        except KeyError:  # split metadata unknown (e.g. a mocked builder): count the records
            n = int(load(split).cardinality())
            _, processes = _process()
            return n * processes if n >= 0 else 0

    return _Source(name, num_classes, count("train"), count(eval_split),
                   train=lambda epoch: load("train", epoch), eval=lambda: load(eval_split))


def folder_source(path: str, seed: int, exclude: frozenset = frozenset()) -> _Source:
    """An ImageNet-style folder, path/{train,val}/CLASS/*.jpg, discovered with tfds' ImageFolder
    (labels: sorted class directory names). Paths are shuffled before any file is read; files in
    `exclude` are left out."""
    import tensorflow_datasets as tfds
    tf = _tf()
    if not os.path.isdir(os.path.join(path, "train")):
        raise DatasetError(f"dataset: folder {path!r} has no train/ directory; expected "
                           f"{path}/train/CLASS/*.jpg and {path}/val/CLASS/*.jpg")
    builder = tfds.folder_dataset.ImageFolder(path)
    splits = list(builder.info.splits)
    eval_split = next((s for s in ("val", "validation", "test") if s in splits), None)
    if eval_split is None:
        raise DatasetError(f"dataset: folder {path!r} has no val/ (or validation/, test/) "
                           f"directory; found splits {splits}")
    label_feature = builder.info.features["label"]
    index, count = _process()

    def files(split):
        examples = [e for e in builder._split_examples[split]  # ImageFolder's discovery
                    if os.fspath(e.image_path) not in exclude]
        paths = np.asarray([os.fspath(e.image_path) for e in examples])
        labels = np.asarray([label_feature.str2int(e.label) for e in examples], np.int64)
        return paths, labels

    def ordered(split, epoch=None):
        paths, labels = files(split)
        ds = tf.data.Dataset.from_tensor_slices((paths, labels))
        if epoch is not None:
            ds = ds.shuffle(len(labels), seed=seed + epoch, reshuffle_each_iteration=False)
        return ds.shard(count, index)

    def load(split, epoch=None):
        return ordered(split, epoch).map(lambda p, y: {"image": tf.io.read_file(p), "label": y},
                                         num_parallel_calls=tf.data.AUTOTUNE)

    return _Source(f"folder:{path}", label_feature.num_classes, len(files("train")[1]),
                   len(files(eval_split)[1]),
                   train=lambda epoch: load("train", epoch), eval=lambda: load(eval_split),
                   shuffled_by_source=True,
                   paths=lambda split, epoch: ordered("train" if split == "train" else eval_split,
                                                      epoch).map(lambda p, y: p),
                   without=lambda more: folder_source(path, seed, exclude | more))


def undecodable(paths) -> list[tuple[str, str]]:
    """[(path, reason)] of the image files among `paths` that TensorFlow cannot decode."""
    tf = _tf()
    bad = []
    for p in paths:
        p = p.decode() if isinstance(p, bytes) else str(p)
        try:
            tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
        except (tf.errors.OpError, ValueError) as e:
            bad.append((p, " ".join(str(getattr(e, "message", e)).split())[:200]))
    return bad


def get_source(dataset: str, *, data_dir=None, manual_dir=None, image_size=224,
               num_classes=None, seed=0) -> _Source:
    if dataset == "digits":
        return digits_source()
    if dataset == "synthetic":
        return synthetic_source(image_size, num_classes or 1000)
    if dataset == "imagenet2012":
        return tfds_source("imagenet2012", data_dir, manual_dir, seed)
    if dataset.startswith("tfds:") and len(dataset) > 5:
        return tfds_source(dataset[5:], data_dir, manual_dir, seed)
    if dataset.startswith("folder:") and len(dataset) > 7:
        return folder_source(os.path.expanduser(dataset[7:]), seed)
    raise DatasetError(f"dataset: expected imagenet2012, tfds:NAME, folder:PATH, synthetic or "
                       f"digits, got {dataset!r}")


# -------------------------------------------------------------------------------- pipeline

def create_dataset(dataset: str, *, global_batch_size: int, eval_batch_size: int,
                   image_size: int, seed: int = 0, data_dir=None, manual_dir=None,
                   num_classes=None, shuffle_buffer: int = 16_384,
                   skip_corrupt_images: bool = False, skipped: list | None = None) -> Dataset:
    """Build the train / eval iterators for this host (see the module docstring).

    An image that cannot be decoded stops the run with a DatasetError naming its file, or,
    with `skip_corrupt_images`, is named in a warning, appended to `skipped` (path, reason) and
    left out of the dataset from then on (files already in `skipped` are left out from the
    start: a resumed run passes the list it recorded)."""
    tf = _tf()
    _, processes = _process()
    for what, b in (("batch_size", global_batch_size), ("eval_batch_size", eval_batch_size)):
        if b % processes:
            raise ValueError(f"{what}: the global batch must divide evenly over {processes} "
                             f"hosts, got {b}")
    src = get_source(dataset, data_dir=data_dir, manual_dir=manual_dir, image_size=image_size,
                     num_classes=num_classes, seed=seed)
    skipped = [] if skipped is None else skipped
    if skipped and src.without is not None:
        src = src.without(frozenset(p for p, _ in skipped))
    if num_classes is not None and num_classes != src.num_classes and dataset != "synthetic":
        raise ValueError(f"num_classes: dataset {src.name} has {src.num_classes} classes, "
                         f"got --num-classes {num_classes}")
    local_batch, local_eval = global_batch_size // processes, eval_batch_size // processes
    steps_per_epoch = src.num_train // global_batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size: {global_batch_size} is larger than the training split "
                         f"({src.num_train} examples) of {src.name}")
    # every host runs the same number of eval steps: enough for the largest host share
    eval_steps = max(1, -(-(-(-src.num_eval // processes)) // local_eval))
    opts = tf.data.Options()
    opts.deterministic = True
    opts.experimental_optimization.map_parallelization = True
    opts.threading.private_threadpool_size = max(4, os.cpu_count() or 1)
    current = {"src": src}

    def train_examples(src, epoch):
        ds = src.train(epoch)
        if not src.shuffled_by_source:
            ds = ds.shuffle(min(shuffle_buffer, max(src.num_train, 1)), seed=seed + epoch,
                            reshuffle_each_iteration=False)
        return ds

    def prep_train(src, i, ex, epoch):
        if src.plain:
            image = preprocess_plain(ex["image"], image_size)
        else:
            example_seed = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + epoch, i])
            image = preprocess_train(ex["image"], example_seed, image_size)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

    def handle(error, split, epoch, first, count):
        """A batch failed to load: name the undecodable files among its examples [first,
        first + count) and stop, or (skipping) leave them out from now on."""
        src = current["src"]
        if src.paths is None:
            raise DatasetError(f"dataset: {src.name} ({split}, epoch {epoch}): cannot read an "
                               f"example of batch at {first}: {_summary(error)}") from error
        paths = list(src.paths(split, epoch).skip(first).take(count).as_numpy_iterator())
        bad = undecodable(paths)
        if not bad:
            raise DatasetError(f"dataset: {src.name}: reading {split} failed "
                               f"({_summary(error)})") from error
        if not skip_corrupt_images:
            raise DatasetError("dataset: cannot decode " + "; ".join(
                f"{p} ({reason})" for p, reason in bad) + "; delete or replace the file, or "
                "pass --skip-corrupt-images to skip such files (each is named and counted)") from error
        for p, reason in bad:
            print(f"warning: skipping corrupt image {p} ({reason})", flush=True)
        skipped.extend(bad)
        current["src"] = src.without(frozenset(p for p, _ in skipped))

    def train_batches(start_step: int = 0) -> Iterator[dict]:
        step = start_step
        while True:
            src = current["src"]
            epoch, offset = divmod(step, steps_per_epoch)
            ds = train_examples(src, epoch).enumerate().skip(offset * local_batch)
            ds = ds.map(lambda i, ex, e=epoch, s=src: prep_train(s, i, ex, e),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = ds.batch(local_batch, drop_remainder=True).take(steps_per_epoch - offset)
            try:
                for batch in ds.with_options(opts).prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
                    yield batch
                    step += 1
            except tf.errors.OpError as e:
                handle(e, "train", epoch, (step % steps_per_epoch) * local_batch, local_batch)
                continue   # skipping: the same step again, without the file
            if step % steps_per_epoch:   # an epoch cut short by a skipped file: next epoch
                step += steps_per_epoch - step % steps_per_epoch

    def prep_eval(src, ex):
        image = (preprocess_plain if src.plain else preprocess_eval)(ex["image"], image_size)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

    def eval_batches() -> Iterator[dict]:
        produced = 0
        while True:
            src = current["src"]
            ds = src.eval().skip(produced * local_eval).map(
                lambda ex, s=src: prep_eval(s, ex), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
            ds = ds.batch(local_eval).with_options(opts).prefetch(tf.data.AUTOTUNE)
            try:
                for batch in ds.as_numpy_iterator():
                    if produced == eval_steps:
                        break
                    yield _pad(batch, local_eval)
                    produced += 1
                break
            except tf.errors.OpError as e:
                handle(e, "eval", None, produced * local_eval, local_eval)
        dummy = {"image": np.zeros((local_eval, image_size, image_size, 3), np.float32),
                 "label": np.zeros((local_eval,), np.int32), "mask": np.zeros((local_eval,), bool)}
        for _ in range(eval_steps - produced):
            yield dummy

    return Dataset(src.name, src.num_classes, src.num_train, src.num_eval, steps_per_epoch,
                   eval_steps, train_batches, eval_batches)


def _summary(error) -> str:
    return " ".join(str(getattr(error, "message", error)).split())[:300]


def _pad(batch: dict, size: int) -> dict:
    n = len(batch["label"])
    mask = np.arange(size) < n
    if n < size:
        batch = {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
                 for k, v in batch.items()}
    return {**batch, "mask": mask}
