"""Accuracy, images/s and GFLOPs of a ViT with token merging, over a sweep of r.

    python eval.py                                        # bundled CIFAR-10 default
    python eval.py --config configs/eval_imagenet.py --config.data_dir=/data/tfds
    python eval.py --config.r="0, 8, (16, -1)" --config.limit=1000

The same program is installed as `tome-jax-eval` (see tome_jax/cli.py).
"""

from tome_jax import cli

if __name__ == "__main__":
    cli.eval_main()
