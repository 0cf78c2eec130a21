"""The benchmark's rotary rows on CPU: DINOv3-S/16 and EVA02-S/14, beside timm and the PyTorch reference.

    tome-jax-bench --config configs/bench_rotary.py
    tome-jax-bench --config configs/bench_rotary.py --config.models=vit_small_patch16_dinov3

At 224 px: DINOv3-S/16 (196 patches, 4 registers, rotary positions only) and EVA02-S/14
(256 patches, absolute and rotary positions), each at r = 0, 8 and (8, -1), merged
positions by the default rule (docs/models.md, Rotary ViTs).
"""

from tome_jax.configs import bench_cpu


def get_config():
    config = bench_cpu.get_config()
    config.models = "vit_small_patch16_dinov3, eva02_small_patch14_224"
    config.model_overrides.img_size = 224
    config.r = "0, 8, (8, -1)"
    config.out = "results/bench_rotary.json"
    return config
