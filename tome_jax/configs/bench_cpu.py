"""The side-by-side speed benchmark on CPU (docs/benchmarks.md, Speed beside PyTorch ToMe).

    tome-jax-bench --config configs/bench_cpu.py
    tome-jax-bench --config configs/bench_cpu.py --config.models=vit_small_patch16_224 \
        --config.r="0, 16" --config.runs=5
"""

import ml_collections

from tome_jax.configs import eval_cifar10


def get_config():
    config = ml_collections.ConfigDict()
    # Names both timm and tome_jax know; random weights, the same in both frameworks.
    config.models = "vit_small_patch16_224, vit_base_patch16_224"
    # Architecture changes for both frameworks, under the names timm and tome_jax.ViT
    # share (depth, img_size, patch_size, num_heads, num_classes); e.g. a small test model.
    config.model_overrides = eval_cifar10.model_overrides()
    config.batch_sizes = "16"  # one row group per batch size
    config.dtypes = "float32"  # "float32, bfloat16": bfloat16 compute too (parameters stay float32)
    # One row per entry: ints, (r, inflection) pairs, per-layer lists.
    config.r = "0, 8, 13, 16"
    # Also a row for the schedule tome_jax.choose_r picks for at most this many GFLOPs per image.
    config.target_gflops = ml_collections.config_dict.placeholder(float)
    # Also a row for the schedule tome_jax.choose_r picks for at least this speed-up over r = 0.
    config.target_speedup = ml_collections.config_dict.placeholder(float)

    config.runs = 10  # timed rounds; every call of a group runs once a round
    config.warmup = 1  # untimed rounds first
    config.input_batches = 3  # different random batches, rotated call by call
    # Square matmuls timed beside the models; the fastest is the reachable GFLOP/s
    # (on a GPU sizes that fill it: --config.peak_sizes="4096, 8192").
    config.peak_sizes = "1024, 2048"

    config.torch = True  # timm and PyTorch ToMe side by side (skipped where torch has no device)
    config.threads = 0  # torch threads; 0: every core, as XLA uses
    config.merge_implementation = ""  # "": the backend's default (see tome_jax.merge)
    config.attn_implementation = ""  # "": the backend's default (see tome_jax.attention)
    config.out = "results/bench_cpu.json"  # the results as JSON ("": none written)
    return config
