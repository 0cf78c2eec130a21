"""The paper's headline setting: timm's AugReg ViT-B/16 on ImageNet-1k validation.

    python eval.py --config configs/eval_imagenet.py --config.data_dir=/path/to/tfds

Needs the prepared TFDS `imagenet2012` (TFDS cannot download ImageNet) and
network access to fetch the timm weights once.
"""

from tome_jax.configs import eval_cifar10


def get_config():
    config = eval_cifar10.get_config()
    config.model = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    config.r = "0, 8, 13, 16, (16, -1)"
    config.dataset = "imagenet2012"
    config.split = "validation"
    config.batch_size = 250
    config.preprocess = "timm"
    config.workdir = "results/eval_imagenet"
    return config
