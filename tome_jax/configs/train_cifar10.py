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
    config.r = "(8, -1)"  # the merge schedule while training: an int, "(r, inflection)" or a per-layer list
    config.eval_r = "(8, -1)"  # the merge schedule while evaluating
    config.trainable = ""  # regex of parameter paths to train; "" trains all
    # How blocks remove tokens, as in eval.py: "tome", or another tome_jax.reduce method
    # with its settings under config.<method> (e.g. --config.method=mctf).
    eval_cifar10.add_methods(config)

    config.dataset = "bundled_cifar10"  # as in eval_cifar10.py
    config.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS's data directory (None: TFDS's default)
    config.download = True  # a TFDS dataset missing from data_dir: download and prepare it
    config.train_split = "train"  # the split to train on
    config.eval_split = "test"  # the split to evaluate on
    config.train_limit = ml_collections.config_dict.placeholder(int)  # train on its first N examples only
    config.eval_limit = ml_collections.config_dict.placeholder(int)  # evaluate on its first N examples only
    config.shuffle_buffer = 50_000  # examples shuffled together (capped at the epoch's)

    add_augmentation(config)

    # Optimisation.
    config.batch_size = 128  # global, over all devices and hosts
    config.eval_batch_size = 500  # global, as batch_size
    config.num_epochs = 1.0  # how long to train, in passes over the train split
    config.num_steps = 0  # > 0 overrides num_epochs
    config.learning_rate = 2e-4  # AdamW's peak, after the linear warm-up
    config.min_learning_rate = 1e-6  # where the cosine decay ends
    config.warmup_steps = 40  # linear warm-up from 0, in optimizer updates
    config.weight_decay = 0.05  # AdamW's (not on norms, biases, tokens and position embeddings)
    config.b1 = 0.9  # AdamW's first-moment decay
    config.b2 = 0.999  # AdamW's second-moment decay
    config.grad_clip = 1.0  # the global gradient norm is clipped to this (0: no clipping)
    config.grad_accum = 1  # steps whose gradients add up to one update

    # Parallelism: a (data, fsdp) mesh over all devices of all processes (hosts).
    config.fsdp = 1
    eval_cifar10.add_distributed(config)

    config.seed = 0  # initialisation, data order and augmentation
    config.log_every = 50  # steps between metric lines (and checks for NaN)
    config.eval_every = 1000  # steps between evaluations
    config.checkpoint_every = 100  # steps between checkpoints
    config.keep_checkpoints = 3  # the latest this many are kept, and the best by eval top-1
    return config


def add_augmentation(config: ml_collections.ConfigDict) -> None:
    """Augmentation: the recipe the checkpoint was trained with (crop + flip)."""
    config.mean = data.CIFAR10_MEAN  # per-channel mean the images are normalised by
    config.std = data.CIFAR10_STD  # per-channel standard deviation
    config.crop = "padded"  # or "random_resized" (ImageNet)
    config.crop_padding = 4  # "padded": pixels of padding before the random crop
    config.crop_scale = (0.08, 1.0)  # "random_resized": the crop's share of the image area, low and high
    config.interpolation = "bicubic"  # the resize's interpolation
    config.eval_crop_pct = 1.0  # evaluation: resize to size / eval_crop_pct, then the central crop
    config.flip = True  # random horizontal flips
    config.rand_augment_layers = 0  # DeiT: 2 layers at magnitude 9 (rand-m9-mstd0.5-inc1)
    config.rand_augment_magnitude = 9.0  # RandAugment's magnitude (of 10)
    config.random_erasing = 0.0  # the chance an image has a random box erased
    config.mixup_alpha = 0.0  # mixup's Beta(alpha, alpha); 0: off
    config.cutmix_alpha = 0.0  # cutmix's Beta(alpha, alpha); 0: off
    config.label_smoothing = 0.1  # the share of each label's mass spread over the classes
