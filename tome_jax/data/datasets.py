"""Datasets on tf.data: TFDS datasets, local image folders, the bundled CIFAR-10.

Datasets are named by one string:
  * a TFDS name, e.g. "imagenet2012", "imagenet_v2", "cifar10" (with `data_dir`);
  * "folder:/path/to/root" for `root/<split>/<class>/<image>` trees (tfds.ImageFolder);
  * "bundled_cifar10", the CIFAR-10 JPEGs shipped in `assets/`, extracted on first use.

Images are decoded inside the pipeline (TFDS decoding is skipped) so that skipping
examples on resume costs no decoding, and JPEGs decode exactly as PIL does them.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tarfile
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tome_jax.data import augment
from tome_jax.data.images import Preprocess, decode_image, preprocess_eval

# The repository around the package: its assets/ hold the bundled model and data.
REPO = pathlib.Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"
BUNDLED_CIFAR10 = ASSETS / "cifar10-jpg.tar.gz"
BUNDLED_CIFAR10_SHA256 = "98d6573b2eb3a94d49785094465846f7dd26b797ddaa64b429b6317e6a74d5bd"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def cache_dir() -> pathlib.Path:
    """Where extracted data lives: $TOME_JAX_CACHE, else ~/.cache/tome_jax."""
    return pathlib.Path(os.environ.get("TOME_JAX_CACHE", "~/.cache/tome_jax")).expanduser()


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_bundled_cifar10(target: pathlib.Path | None = None) -> pathlib.Path:
    """Extracts the bundled CIFAR-10 JPEG tree once and returns its root."""
    root = (target or cache_dir()) / "cifar10-jpg"
    done = root / ".complete"
    if done.exists():
        return root
    if not BUNDLED_CIFAR10.exists():
        raise FileNotFoundError(f"bundled CIFAR-10 archive missing: {BUNDLED_CIFAR10}")
    digest = _sha256(BUNDLED_CIFAR10)
    if digest != BUNDLED_CIFAR10_SHA256:
        raise ValueError(f"{BUNDLED_CIFAR10} is corrupt: sha256 {digest}")
    partial = root.with_name(root.name + f".partial-{os.getpid()}")
    with tarfile.open(BUNDLED_CIFAR10) as archive:
        archive.extractall(partial, filter="data")
    # A rename is atomic, so concurrent first uses never see half a tree.
    try:
        partial.rename(root)
    except OSError:
        if not done.exists():
            raise
    done.touch()
    return root


def builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder behind a dataset name (see the module docstring)."""
    if name == "bundled_cifar10":
        return tfds.ImageFolder(str(extract_bundled_cifar10()))
    if name.startswith("folder:"):
        root = pathlib.Path(name[len("folder:") :]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        return tfds.ImageFolder(str(root))
    return tfds.builder(name, data_dir=data_dir)


def num_examples(data: tfds.core.DatasetBuilder, split: str) -> int:
    return data.info.splits[split].num_examples


def class_names(data: tfds.core.DatasetBuilder) -> list[str]:
    label = data.info.features["label"]
    return list(label.names)


def _raw_examples(
    data: tfds.core.DatasetBuilder, split: str, start: int = 0, stop: int | None = None
) -> tf.data.Dataset:
    """(encoded image bytes, label) pairs of examples [start, stop) of `split`, in its order."""
    if split not in data.info.splits:
        raise ValueError(f"split {split!r} not in {data.name}: {list(data.info.splits)}")
    ds = data.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.skip(start) if stop is None else ds.skip(start).take(stop - start)
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))


def eval_batches(
    data: tfds.core.DatasetBuilder,
    split: str,
    preprocess: Preprocess,
    batch_size: int,
    *,
    limit: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches over `split` (this process's share), the last one padded.

    Yields dicts of `images` [batch, h, w, 3] float32, `labels` [batch] int32 and
    `mask` [batch] bool (False on padding), so one compiled program sees them all.
    A process's share is a contiguous run of the first `limit` examples. Every
    process yields the same number of batches (all-padding ones if its share runs
    out first), since each batch is one collective step across processes.
    """
    total = min(limit, num_examples(data, split)) if limit else num_examples(data, split)
    per_process = -(-total // process_count)
    start = min(process_index * per_process, total)
    ds = _raw_examples(data, split, start, min(start + per_process, total))
    ds = ds.map(
        lambda encoded, label: (preprocess_eval(decode_image(encoded), preprocess), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    yielded = 0
    for images, labels in ds.as_numpy_iterator():
        yielded += 1
        yield pad_batch({"images": images, "labels": labels}, batch_size)
    empty = {"images": np.zeros((0, *preprocess.size, 3), np.float32), "labels": np.zeros((0,), np.int32)}
    for _ in range(yielded, -(-per_process // batch_size)):
        yield pad_batch(empty, batch_size)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads every array to `batch_size` rows with zeros and adds a validity `mask`."""
    n = len(batch["labels"])
    padded = {k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
    padded["mask"] = np.arange(batch_size) < n
    return padded


def images_for_display(
    data: tfds.core.DatasetBuilder, split: str, count: int, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images of `split` as uint8 [count, h, w, 3], with labels."""
    ds = _raw_examples(data, split, offset, offset + count)
    images, labels = zip(*[(decode_image(e).numpy(), l) for e, l in ds.as_numpy_iterator()])
    return np.stack(images), np.asarray(labels)


def steps_per_epoch(
    data: tfds.core.DatasetBuilder, split: str, global_batch_size: int, limit: int | None = None
) -> int:
    """Full global batches per epoch (the remainder of each epoch is dropped)."""
    total = min(limit, num_examples(data, split)) if limit else num_examples(data, split)
    if total < global_batch_size:
        raise ValueError(f"{total} examples in {split!r} cannot fill a global batch of {global_batch_size}")
    return total // global_batch_size


def train_batches(
    data: tfds.core.DatasetBuilder,
    split: str,
    augmentation: augment.TrainAugment,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    limit: int | None = None,
    shuffle_buffer: int = 50_000,
    rows: tuple[int, int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches, resumable at any step, alike on any number of hosts.

    The order depends only on (`seed`, epoch) and the augmentation only on (`seed`,
    epoch, position), so restarting at `start_step` yields exactly the batches an
    uninterrupted run would have seen from that step on; skipping happens on the
    encoded bytes, before any decoding.

    `rows` = (start, stop): this process's rows of every global batch (all by
    default). Every process reads the whole split in the same order and keeps
    its rows before decoding, so N processes together see exactly the global
    batches one process sees.

    Yields `images` [stop - start, h, w, 3] float32 and `labels` [same] int32.
    """
    start, stop = rows or (0, global_batch_size)
    if not 0 <= start < stop <= global_batch_size:
        raise ValueError(f"rows {rows} are not a part of a global batch of {global_batch_size}")
    steps = steps_per_epoch(data, split, global_batch_size, limit)
    epoch_examples = steps * global_batch_size
    raw = _raw_examples(data, split, 0, epoch_examples)
    epoch, step_in_epoch = divmod(start_step, steps)
    while True:
        epoch_seed = (seed * 1_000_003 + epoch) % (2**31 - 1)
        ds = raw.shuffle(min(shuffle_buffer, epoch_examples), seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.enumerate().skip(step_in_epoch * global_batch_size)
        if (start, stop) != (0, global_batch_size):
            ds = ds.filter(lambda position, _: tf.math.logical_and(
                position % global_batch_size >= start, position % global_batch_size < stop
            ))  # fmt: skip
        ds = ds.map(
            lambda position, example: (
                augment.augment_train(
                    example[0], tf.stack([tf.constant(epoch_seed, tf.int64), position]), augmentation
                ),
                example[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        for images, labels in ds.batch(stop - start, drop_remainder=True).prefetch(2).as_numpy_iterator():
            yield {"images": images, "labels": labels}
        epoch, step_in_epoch = epoch + 1, 0
