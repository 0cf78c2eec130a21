"""Train the bundled ViT-Ti/4's rotary sibling from scratch on the bundled CIFAR-10, offline.

    python train.py --config configs/train_rope_cifar10.py --workdir runs/rope_cifar10
    python eval.py --config.model=vit_tiny_patch4_dinov3_32 --config.pretrained=False \
        --config.params_from=runs/rope_cifar10 --config.params_step=latest

`vit_tiny_patch4_dinov3_32` is DINOv3-like: no absolute position embedding, so positions
come from the rotary embedding alone (`dinov3` kind), and 4 registers. The recipe is the
bundled model's (AdamW at 1e-3, weight decay 0.05, batch 128, cosine, crop and flip, label
smoothing 0.1), trained without merging (r = 0); `--config.model_overrides.rope_position`
and `rope_metric` choose how it merges when evaluated.
"""

from tome_jax.configs import train_cifar10


def get_config():
    config = train_cifar10.get_config()
    config.model = "vit_tiny_patch4_dinov3_32"
    config.pretrained = False  # from scratch
    config.r = "0"
    config.eval_r = "0"
    config.num_epochs = 2.0  # 780 steps: about 40 minutes on two CPU cores
    config.learning_rate = 1e-3
    config.min_learning_rate = 1e-5
    config.warmup_steps = 100
    config.eval_every = 390
    config.checkpoint_every = 100
    return config
