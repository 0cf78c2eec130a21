"""Fine-tune the bundled ViT-Ti/4 on the bundled CIFAR-10 with ToMe on, offline.

    python train.py --config configs/train_cifar10.py --workdir workdirs/cifar10_r8
    python train.py --config configs/train_cifar10.py --workdir DIR --config.r="(6, -1)"

Off the shelf the merge schedule (8, -1) costs this model accuracy; one epoch
of training with the merge on teaches the model to live with it (the figures:
docs/training.md, Fine-tuning with merging on).
"""

import ml_collections

from tome_jax import data
from tome_jax.configs import eval_cifar10


def get_config():
    config = ml_collections.ConfigDict()
    # Model: a timm checkpoint/name loaded through from_timm (pretrained=True), or
    # a registry name initialised from scratch (pretrained=False).
    config.model = "assets/vit_tiny_p4_cifar10.safetensors"
    config.pretrained = True
    # ViT attributes. dtype "bfloat16": bfloat16 compute, float32 parameters and loss.
    config.model_overrides = eval_cifar10.model_overrides(drop_path_rate=0.0, dtype="float32")
    # Merge schedules (int, "(r, inflection)" or per-layer list), as strings.
    config.r = "(8, -1)"  # while training
    config.eval_r = "(8, -1)"  # while evaluating
    config.trainable = ""  # regex of parameter paths to train; "" trains all
    # How blocks remove tokens, as in eval.py: "tome", or another tome_jax.reduce method
    # with its settings under config.<method> (e.g. --config.method=mctf).
    eval_cifar10.add_methods(config)

    config.dataset = "bundled_cifar10"  # as in eval_cifar10.py
    config.data_dir = ml_collections.config_dict.placeholder(str)
    config.download = True  # a TFDS dataset missing from data_dir: download and prepare it
    config.train_split = "train"
    config.eval_split = "test"
    config.train_limit = ml_collections.config_dict.placeholder(int)
    config.eval_limit = ml_collections.config_dict.placeholder(int)
    config.shuffle_buffer = 50_000

    add_augmentation(config)

    # Optimisation.
    config.batch_size = 128  # global, over all devices and hosts
    config.eval_batch_size = 500
    config.num_epochs = 1.0
    config.num_steps = 0  # > 0 overrides num_epochs
    config.learning_rate = 2e-4
    config.min_learning_rate = 1e-6
    config.warmup_steps = 40
    config.weight_decay = 0.05
    config.b1 = 0.9
    config.b2 = 0.999
    config.grad_clip = 1.0
    config.grad_accum = 1

    # Parallelism: a (data, fsdp) mesh over all devices of all processes (hosts).
    config.fsdp = 1
    eval_cifar10.add_distributed(config)

    config.seed = 0
    config.log_every = 50
    config.eval_every = 1000
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    return config


def add_augmentation(config: ml_collections.ConfigDict) -> None:
    """Augmentation: the recipe the checkpoint was trained with (crop + flip)."""
    config.mean = data.CIFAR10_MEAN
    config.std = data.CIFAR10_STD
    config.crop = "padded"  # or "random_resized" (ImageNet)
    config.crop_padding = 4
    config.crop_scale = (0.08, 1.0)
    config.interpolation = "bicubic"
    config.eval_crop_pct = 1.0
    config.flip = True
    config.rand_augment_layers = 0  # DeiT: 2 layers at magnitude 9 (rand-m9-mstd0.5-inc1)
    config.rand_augment_magnitude = 9.0
    config.random_erasing = 0.0
    config.mixup_alpha = 0.0
    config.cutmix_alpha = 0.0
    config.label_smoothing = 0.1
