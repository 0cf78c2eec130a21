"""Train or fine-tune a ViT with token merging, sharded over all devices.

    python train.py --config configs/train_cifar10.py --workdir workdirs/cifar10
    python train.py --config configs/train_cifar10.py --workdir DIR --config.r=13 --config.fsdp=2
    python train.py --config configs/train_cifar10.py --step_time_r="0, (8, -1)"   # speed only

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
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
_STEP_TIME_R = flags.DEFINE_string(
    "step_time_r", None,
    'Instead of training, time one train step at each of these r (e.g. "0, (8, -1)"), side by side.',
)
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Timed rounds for --step_time_r.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not app.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and tfds log every step at INFO
    from tome_jax import evaluate, train_lib

    if _STEP_TIME_R.value:
        r_values = [evaluate.r_label(r) for r in evaluate.parse_r_values(_STEP_TIME_R.value)]
        rows = train_lib.compare_step_times(_CONFIG.value, r_values, _ROUNDS.value)
        print("| r | step time (s) | images/s | speed-up over the first r |\n|---|---|---|---|")
        for row in rows:
            print(f"| {row['r']} | {row['step_time_s']:.3f} | {row['images_per_s']:.1f} | {row['speedup']:.2f}x |")
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required for training")
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
