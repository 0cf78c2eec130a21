"""A tiny benchmark config for the tests: one block over 5 tokens, one timed round."""

from configs import bench_cpu


def get_config():
    config = bench_cpu.get_config()
    config.models = "vit_tiny_patch16_224"
    config.model_overrides.depth = 1
    config.model_overrides.img_size = 32
    config.batch_sizes = "2"
    config.r = "0, 1"
    config.runs = 1
    config.warmup = 0
    config.input_batches = 2
    config.peak_sizes = "32, 64"
    config.out = ""
    return config
