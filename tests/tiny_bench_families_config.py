"""The families' benchmark rows, tiny: the tiny benchmark's settings over the families' models."""

import tiny_bench_config
from configs import bench_families


def get_config():
    config = tiny_bench_config.get_config()
    config.models = bench_families.get_config().models
    return config
