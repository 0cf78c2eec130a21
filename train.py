"""Train or fine-tune a ViT with token merging, sharded over all devices.

    python train.py --config configs/train_cifar10.py --workdir workdirs/cifar10
    python train.py --config configs/train_cifar10.py --workdir DIR --config.r=13 --config.fsdp=2  # 2+ devices
    python train.py --config configs/train_cifar10.py --step_time_r="0, (8, -1)"   # speed only

Re-running with the same workdir resumes from the latest checkpoint. The same
program is installed as `tome-jax-train` (see tome_jax/cli.py).
"""

from tome_jax import cli

if __name__ == "__main__":
    cli.train_main()
