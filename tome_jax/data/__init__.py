"""Input data on tf.data: datasets and their batches, image preprocessing, augmentation.

    tome_jax.data.images    decoding and evaluation preprocessing of one image
    tome_jax.data.augment   training augmentation, per example (tf.data)
    tome_jax.data.datasets  datasets by name, evaluation and training batches
    tome_jax.data.mixing    Mixup/CutMix and label smoothing, per batch (JAX)

The names most callers need are here too.
"""

from tome_jax.data.datasets import (
    ASSETS,
    BUNDLED_CIFAR10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    FLAT_SPLIT,
    REPO,
    Dataset,
    ImageFolder,
    SkippedExamples,
    builder,
    check_batch_size,
    class_names,
    eval_batches,
    images_for_display,
    num_examples,
    pad_batch,
    split_names,
    steps_per_epoch,
    train_batches,
)
from tome_jax.data.images import Preprocess, decode_image, preprocess_eval, preprocess_from_config
