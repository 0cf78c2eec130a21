"""MCTF's fine-tuning recipe on the bundled ViT-Ti/4 and CIFAR-10: train with the fusion on.

    python train.py --config configs/train_mctf_cifar10.py --workdir workdirs/mctf_r5
    python eval.py --config.method=mctf --config.params_from=workdirs/mctf_r5 \
        --config.r="[0, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]"

The authors (mlvlab/MCTF) fine-tune DeiT for 30 epochs from its pretrained
weights with MCTF in every layer but the first (r = 16 of DeiT-S's 196 patches
per layer), DeiT's augmentation without mixup (RandAugment m9, random erasing
0.25, label smoothing 0.1, stochastic depth 0.1), AdamW at 5e-4 * batch / 512
scaled by their `lr_times` 0.03, the floor scaled by 0.1, 5 warm-up epochs.
Here the same rules at this batch, r = 5 of 64 patches (the same share), and a
tenth of the epochs (3; the authors' 30 are a tenth of DeiT's 300). Their
token-reduction consistency loss (a second, less reduced pass as teacher) is
not part of train.py.
"""

from tome_jax.configs import train_cifar10


def get_config():
    config = train_cifar10.get_config()
    config.method = "mctf"  # config.mctf: tau_sim 1, tau_info 20, tau_size 40, bidirectional, one-step-ahead
    config.r = str([0] + [5] * 11)
    config.eval_r = config.r
    config.model_overrides.drop_path_rate = 0.1
    config.rand_augment_layers = 2
    config.rand_augment_magnitude = 9.0
    config.random_erasing = 0.25
    config.mixup_alpha = 0.0
    config.cutmix_alpha = 0.0
    config.label_smoothing = 0.1
    config.num_epochs = 3.0
    config.learning_rate = 5e-4 * config.batch_size / 512 * 0.03
    config.min_learning_rate = 1e-5 * 0.1
    config.warmup_steps = 195  # 5 of 30 epochs: a sixth of 3 epochs of 390 steps
    config.weight_decay = 0.05
    config.grad_clip = 0.0  # the authors do not clip
    return config
