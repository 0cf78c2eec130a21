"""The families' benchmark rows, tiny: one block at 32 px (2 x 2 patches), one timed round."""

from configs import bench_families


def get_config():
    config = bench_families.get_config()
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
