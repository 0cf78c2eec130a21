"""Accuracy, images/s and GFLOPs of a ViT with token merging, over a sweep of r.

    python eval.py                                        # bundled CIFAR-10 default
    python eval.py --config configs/eval_imagenet.py --config.data_dir=/data/tfds
    python eval.py --config.r="0, 8, (16, -1)" --config.limit=1000
"""

import os

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "eval_cifar10.py"),
    "Evaluation config (an ml_collections file).",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not app.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and tfds log every step at INFO
    from tome_jax import evaluate

    evaluate.run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
