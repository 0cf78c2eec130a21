"""Datasets on tf.data: TFDS datasets, local image folders, the bundled CIFAR-10.

Datasets are named by one string:
  * a TFDS name, e.g. "imagenet2012", "imagenet_v2", "cifar10" (with `data_dir`),
    downloaded and prepared on first use where TFDS can (`download=False` refuses);
  * "folder:/path/to/root" for an image folder (`ImageFolder`): `root/<split>/<class>/<image>`,
    or `root/<class>/<image>`, read as the one split "all";
  * "bundled_cifar10", the CIFAR-10 JPEGs shipped in `assets/`, extracted on first use.

Images are decoded inside the pipeline (TFDS decoding is skipped) so that skipping
examples on resume costs no decoding, and JPEGs decode exactly as PIL does them.
An image that fails to decode (a truncated or empty file, bytes that are no image)
never ends a run: evaluation counts it out as padding, training puts another example
of the same batch in its place (so batch shapes and the order stay fixed), and both
name it (the file, or the TFDS example's `tfds_id`) through `on_skip`, by default a
logged warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from typing import Callable, Iterator, Union

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tome_jax.data import augment, bundled
from tome_jax.data.images import Preprocess, decode_image, preprocess_eval

# Image files an ImageFolder reads (tfds.ImageFolder's; any case); other files are ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The one split of a `root/<class>/<image>` folder.
FLAT_SPLIT = "all"

log = logging.getLogger(__name__)


def builder(name: str, data_dir: str | None = None, *, download: bool = True) -> Dataset:
    """The dataset behind a name (see the module docstring).

    A TFDS dataset not yet in `data_dir` is downloaded and prepared there, as
    `tfds.load` would; with `download=False` that is an error instead.
    """
    if name == "bundled_cifar10":
        return ImageFolder.scan(bundled.extract_bundled_cifar10())
    if name.startswith("folder:"):
        return ImageFolder.scan(name[len("folder:") :])
    data = tfds.builder(name, data_dir=data_dir)
    if not data.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {data.data_dir}; set data_dir to where it "
                "is, or download=True to download and prepare it there"
            )
        try:
            data.download_and_prepare()
        except AssertionError as error:  # how TFDS asks for files placed by hand (ImageNet)
            raise FileNotFoundError(f"TFDS cannot download {name!r} into {data.data_dir}: {error}") from None
    return data


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFolder:
    """Image files by class: `root/<split>/<class>/<image>`, or `root/<class>/<image>`
    as the one split "all" (`FLAT_SPLIT`).

    Classes are the sorted class folder names (over all splits). Each split's
    examples are in tfds.ImageFolder's order (sorted, then shuffled with the split
    name as seed), so a tree that both read is read the same.
    """

    root: str
    class_names: tuple[str, ...]
    splits: dict[str, tuple[tuple[str, int], ...]]  # split -> (path, label) pairs

    @property
    def name(self) -> str:
        return f"folder:{self.root}"

    @classmethod
    def scan(cls, root) -> ImageFolder:
        """Lists `root`'s images; which layout is told by where the image files are."""
        root = os.path.expanduser(str(root))
        if not tf.io.gfile.isdir(root):
            raise FileNotFoundError(f"image folder {root} does not exist")
        tops = _subfolders(root)
        images = {top: _image_files(os.path.join(root, top)) for top in tops}
        if any(images.values()):  # root/<class>/<image>
            nested = [top for top in tops if not images[top] and _subfolders(os.path.join(root, top))]
            if nested:
                raise ValueError(
                    f"{root} mixes layouts: {nested[0]}/ holds folders, other sub-folders hold images; "
                    "use root/<class>/<image> or root/<split>/<class>/<image>"
                )
            classes = tops
            per_split = {FLAT_SPLIT: [(path, label) for label, top in enumerate(tops) for path in images[top]]}
        else:  # root/<split>/<class>/<image>
            split_classes = {top: _subfolders(os.path.join(root, top)) for top in tops}
            classes = sorted(set().union(*split_classes.values()))
            if not classes:
                raise ValueError(
                    f"{root} holds no class folders with images ({', '.join(IMAGE_SUFFIXES)}): expected "
                    "root/<class>/<image> or root/<split>/<class>/<image>"
                )
            label_of = {name: label for label, name in enumerate(classes)}
            per_split = {
                split: [
                    (path, label_of[name])
                    for name in names
                    for path in _image_files(os.path.join(root, split, name))
                ]
                for split, names in split_classes.items()
            }
        for split, examples in per_split.items():
            random.Random(split).shuffle(examples)
        return cls(root, tuple(classes), {split: tuple(examples) for split, examples in per_split.items()})


def _subfolders(directory: str) -> list[str]:
    return sorted(
        name.rstrip("/") for name in tf.io.gfile.listdir(directory)
        if tf.io.gfile.isdir(os.path.join(directory, name))
    )


def _image_files(directory: str) -> list[str]:
    return sorted(
        os.path.join(directory, name) for name in tf.io.gfile.listdir(directory)
        if name.lower().endswith(IMAGE_SUFFIXES)
    )


Dataset = Union[tfds.core.DatasetBuilder, ImageFolder]


def split_names(data: Dataset) -> list[str]:
    return list(data.splits if isinstance(data, ImageFolder) else data.info.splits)


def num_examples(data: Dataset, split: str, limit: int | None = None) -> int:
    """Examples in `split`, at most `limit` (None: all)."""
    if split not in split_names(data):
        layout = " (a root/<class>/<image> folder is the one split 'all')" if isinstance(data, ImageFolder) else ""
        raise ValueError(f"split {split!r} not in {data.name}: it has {split_names(data)}{layout}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int (None: every example), got {limit!r}")
    if isinstance(data, ImageFolder):
        total = len(data.splits[split])
    else:
        total = data.info.splits[split].num_examples
    return total if limit is None else min(limit, total)


def class_names(data: Dataset) -> list[str]:
    if isinstance(data, ImageFolder):
        return list(data.class_names)
    return list(data.info.features["label"].names)


def check_batch_size(batch_size, what: str = "batch_size") -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{what} must be a positive int, got {batch_size!r}")
    return int(batch_size)


def _raw_examples(
    data: Dataset, split: str, start: int = 0, stop: int | None = None
) -> tuple[tf.data.Dataset, Callable[[tf.Tensor], tf.Tensor]]:
    """Examples [start, stop) of `split`, in its order, as (source, label, name)
    string/int32/string triples, and `load(source) -> encoded image bytes`.

    A folder's source is the file's path (read when decoded, so shuffling and
    skipping move paths only), a TFDS dataset's the encoded bytes; the name is the
    path, or the example's `tfds_id`.
    """
    num_examples(data, split)  # a clear error for a missing split
    if isinstance(data, ImageFolder):
        paths, labels = zip(*data.splits[split][start:stop]) if data.splits[split][start:stop] else ((), ())
        ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
        return ds.map(lambda path, label: (path, label, path)), tf.io.read_file
    ds = data.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True),
    )
    ds = ds.skip(start) if stop is None else ds.skip(start).take(stop - start)
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32), ex["tfds_id"])), tf.identity


def _decoded_batches(
    examples: tf.data.Dataset,
    decode: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    batch_size: int,
    *,
    drop_remainder: bool,
) -> tf.data.Dataset:
    """Batches of (position, source, label, name) examples, decoded by
    `decode(position, source) -> image` of a fixed shape; an example whose decoding
    fails is left out of its batch instead of ending the pipeline.

    Yields dicts: `images` [kept, ...] and `labels` [kept] of the examples that
    decoded, in order; `names` [batch] of all the batch's examples and `ok` [batch]
    marking the kept ones. Errors are caught per batch (one small dataset per
    batch, not per example), so a clean run costs what a plain map costs.
    """

    def decode_batch(positions, sources, labels, names):
        decoded = (
            tf.data.Dataset.from_tensor_slices((positions, sources, labels))
            .map(
                lambda position, source, label: (position, decode(position, source), label),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            .ignore_errors()
            .batch(batch_size)
        )
        # A batch where nothing decodes still yields one (empty) element.
        nothing = tuple(tf.zeros([0, *spec.shape[1:]], spec.dtype) for spec in decoded.element_spec)

        def named(kept_positions, images, kept_labels):
            ok = tf.reduce_any(positions[:, None] == kept_positions[None, :], axis=1)
            return {"images": images, "labels": kept_labels, "names": names, "ok": ok}

        return decoded.concatenate(tf.data.Dataset.from_tensors(nothing)).take(1).map(named)

    batches = examples.batch(batch_size, drop_remainder=drop_remainder)
    # Two batches in flight, each decoding its examples in parallel; one element
    # per batch keeps the order.
    return batches.interleave(decode_batch, cycle_length=2, num_parallel_calls=2, deterministic=True)


def _report_skipped(batch: dict[str, np.ndarray], on_skip: Callable[[list[str]], None] | None) -> None:
    skipped = [name.decode() for name in batch["names"][~batch["ok"]]]
    if not skipped:
        return
    if on_skip is None:
        log.warning("skipped %d undecodable image(s): %s", len(skipped), ", ".join(skipped))
    else:
        on_skip(skipped)


class SkippedExamples:
    """An `on_skip` that keeps the names of skipped examples and logs each one once
    (an evaluation repeated per `r`, an epoch repeated, name them once).

    `report(new_names)`, if given, is called with the names not seen before.
    """

    def __init__(self, report: Callable[[list[str]], None] | None = None):
        self.names: list[str] = []
        self._seen: set[str] = set()
        self._report = report

    def __call__(self, names: list[str]) -> None:
        new = [name for name in names if name not in self._seen]
        if not new:
            return
        self._seen.update(new)
        self.names.extend(new)
        log.warning("skipped %d undecodable image(s): %s", len(new), ", ".join(new))
        if self._report is not None:
            self._report(new)


def eval_batches(
    data: Dataset,
    split: str,
    preprocess: Preprocess,
    batch_size: int,
    *,
    limit: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    on_skip: Callable[[list[str]], None] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches over `split` (this process's share), the last one padded.

    Yields dicts of `images` [batch, h, w, 3] float32, `labels` [batch] int32 and
    `mask` [batch] bool (False on padding), so one compiled program sees them all.
    A process's share is a contiguous run of the first `limit` examples. An image
    that fails to decode becomes padding, and `on_skip(names)` hears of it. Every
    process yields the same number of batches (all-padding ones if its share runs
    out first), since each batch is one collective step across processes.
    """
    batch_size = check_batch_size(batch_size)
    total = num_examples(data, split, limit)
    per_process = -(-total // process_count)
    start = min(process_index * per_process, total)
    raw, load = _raw_examples(data, split, start, min(start + per_process, total))
    examples = raw.enumerate().map(lambda position, example: (position, *example))
    batches = _decoded_batches(
        examples,
        lambda _, source: preprocess_eval(decode_image(load(source)), preprocess),
        batch_size,
        drop_remainder=False,
    )
    yielded = 0
    for batch in batches.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        _report_skipped(batch, on_skip)
        yielded += 1
        yield pad_batch({"images": batch["images"], "labels": batch["labels"]}, batch_size)
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
    data: Dataset, split: str, count: int, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images of `split` as uint8 [count, h, w, 3], with labels."""
    raw, load = _raw_examples(data, split, offset, offset + count)
    images, labels = zip(*[(decode_image(load(s)).numpy(), l) for s, l, _ in raw.as_numpy_iterator()])
    return np.stack(images), np.asarray(labels)


def steps_per_epoch(data: Dataset, split: str, global_batch_size: int, limit: int | None = None) -> int:
    """Full global batches per epoch (the remainder of each epoch is dropped)."""
    global_batch_size = check_batch_size(global_batch_size, "the global batch size")
    total = num_examples(data, split, limit)
    if total < global_batch_size:
        raise ValueError(f"{total} examples in {split!r} cannot fill a global batch of {global_batch_size}")
    return total // global_batch_size


def _fill_skipped(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A full training batch from the kept examples: each skipped row takes a kept
    example of the same batch (chosen by position, so resuming repeats it)."""
    ok = batch["ok"]
    kept = int(ok.sum())
    if kept == len(ok):
        return {"images": batch["images"], "labels": batch["labels"]}
    if kept == 0:
        names = ", ".join(name.decode() for name in batch["names"])
        raise ValueError(f"no image of a training batch decodes ({names}); the data is broken")
    rows = np.where(ok, np.cumsum(ok) - 1, np.arange(len(ok)) % kept)
    return {"images": batch["images"][rows], "labels": batch["labels"][rows]}


def train_batches(
    data: Dataset,
    split: str,
    augmentation: augment.TrainAugment,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    limit: int | None = None,
    shuffle_buffer: int = 50_000,
    rows: tuple[int, int] | None = None,
    on_skip: Callable[[list[str]], None] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches, resumable at any step, alike on any number of hosts.

    The order depends only on (`seed`, epoch) and the augmentation only on (`seed`,
    epoch, position), so restarting at `start_step` yields exactly the batches an
    uninterrupted run would have seen from that step on; skipping happens before
    any reading or decoding. An image that fails to decode is replaced by another
    example of its batch, and `on_skip(names)` hears of it as its batch is yielded.

    `rows` = (start, stop): this process's rows of every global batch (all by
    default). Every process reads the whole split in the same order and keeps
    its rows before decoding (a folder's files are not even read), so N processes
    together see exactly the global batches one process sees; an undecodable
    image is replaced from the same process's rows.

    Yields `images` [stop - start, h, w, 3] float32 and `labels` [same] int32.
    """
    start, stop = rows or (0, global_batch_size)
    if not 0 <= start < stop <= global_batch_size:
        raise ValueError(f"rows {rows} are not a part of a global batch of {global_batch_size}")
    steps = steps_per_epoch(data, split, global_batch_size, limit)
    epoch_examples = steps * global_batch_size
    raw, load = _raw_examples(data, split, 0, epoch_examples)
    epoch, step_in_epoch = divmod(start_step, steps)
    while True:
        epoch_seed = (seed * 1_000_003 + epoch) % (2**31 - 1)
        ds = raw.shuffle(min(shuffle_buffer, epoch_examples), seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.enumerate().skip(step_in_epoch * global_batch_size)
        if (start, stop) != (0, global_batch_size):
            ds = ds.filter(lambda position, _: tf.math.logical_and(
                position % global_batch_size >= start, position % global_batch_size < stop
            ))  # fmt: skip
        ds = ds.map(lambda position, example: (position, *example))
        seed_of = lambda position: tf.stack([tf.constant(epoch_seed, tf.int64), position])  # noqa: E731
        batches = _decoded_batches(
            ds,
            lambda position, source: augment.augment_train(load(source), seed_of(position), augmentation),
            stop - start,
            drop_remainder=True,
        )
        for batch in batches.prefetch(2).as_numpy_iterator():
            _report_skipped(batch, on_skip)
            yield _fill_skipped(batch)
        epoch, step_in_epoch = epoch + 1, 0
