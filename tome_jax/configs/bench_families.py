"""The benchmark's CLIP, SigLIP and DINOv2 rows on CPU (docs/benchmarks.md, CLIP, SigLIP and DINOv2 towers).

    tome-jax-bench --config configs/bench_families.py
    tome-jax-bench --config configs/bench_families.py --config.models=vit_base_patch16_siglip_224

One row group per family at 224 px: an OpenCLIP ViT-B/16, a SigLIP ViT-B/16
(attention pooling, no class token) and a DINOv2 ViT-S/14 with 4 registers (256
patches, as its 518 px native size would give 1369).
"""

from tome_jax.configs import bench_cpu


def get_config():
    config = bench_cpu.get_config()
    config.models = "vit_base_patch16_clip_224, vit_base_patch16_siglip_224, vit_small_patch14_reg4_dinov2"
    config.model_overrides.img_size = 224
    config.r = "0, 8, (8, -1)"
    config.out = "results/bench_families.json"
    return config
