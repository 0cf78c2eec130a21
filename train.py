"""Train or fine-tune a ViT with token merging, sharded over all devices.

    python train.py --config configs/train_cifar10.py --workdir workdirs/cifar10
    python train.py --config configs/train_cifar10.py --workdir DIR --config.r=13 --config.fsdp=2

Re-running with the same workdir resumes from the latest checkpoint.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "train_cifar10.py"),
    "Training config (an ml_collections file).",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not app.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and tfds log every step at INFO
    from tome_jax import train_lib

    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
