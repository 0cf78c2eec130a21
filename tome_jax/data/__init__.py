"""Input data on tf.data: datasets and their batches, image preprocessing, augmentation.

    tome_jax.data.bundled   the model and data the package ships, CIFAR-10's normalisation
    tome_jax.data.images    decoding and evaluation preprocessing of one image
    tome_jax.data.augment   training augmentation, per example (tf.data)
    tome_jax.data.datasets  datasets by name, evaluation and training batches
    tome_jax.data.mixing    Mixup/CutMix and label smoothing, per batch (JAX)

The names most callers need are here too. Those of `bundled` come with the package;
the others import TensorFlow, so each loads on its first use. The configs read
CIFAR-10's normalisation without TensorFlow, and a command loads its model before
its data: triton (under torch and timm) loaded after TensorFlow ends the process
with a segfault, both registering the same LLVM options.
"""

import importlib

from tome_jax.data.bundled import ASSETS, BUNDLED_CIFAR10, CIFAR10_MEAN, CIFAR10_STD, find_shipped

# Each name -> the module that holds it, imported when the name is first used.
ON_FIRST_USE = {
    **dict.fromkeys(
        (
            "FLAT_SPLIT", "Dataset", "ImageFolder", "SkippedExamples", "builder", "check_batch_size",
            "class_names", "eval_batches", "images_for_display", "num_examples", "pad_batch",
            "split_names", "steps_per_epoch", "train_batches",
        ),
        "tome_jax.data.datasets",
    ),
    **dict.fromkeys(("Preprocess", "decode_image", "preprocess_eval", "preprocess_from_config"), "tome_jax.data.images"),
    "TrainAugment": "tome_jax.data.augment",
}  # fmt: skip


def __getattr__(name: str):
    if name not in ON_FIRST_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(ON_FIRST_USE[name]), name)
    globals()[name] = value  # later uses find it without this function
    return value
