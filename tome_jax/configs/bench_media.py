"""The benchmark's video and audio rows on CPU (docs/benchmarks.md, Video and audio towers).

    tome-jax-bench --config configs/bench_media.py
    tome-jax-bench --config configs/bench_media.py --config.models=transformers:ASTForAudioClassification

VideoMAE-B (16 frames of 224 x 224, 1568 space-time tokens) and AST (1024 time frames
x 128 mel bins, 1212 overlapping patches and two prefix tokens), each the transformers
class at its config's defaults with random weights, beside tome_jax reading it
(`from_hf`). The r values: the ToMe paper's for video (65, on MAE-ST ViT-L) and for
audio (100, on AST); every model runs every r.
"""

import ml_collections

from tome_jax.configs import bench_cpu


def get_config():
    config = bench_cpu.get_config()
    config.models = "transformers:VideoMAEForVideoClassification, transformers:ASTForAudioClassification"
    # Each class's config on top of its defaults (Kinetics-400's and AudioSet's classes).
    config.hf_overrides = ml_collections.ConfigDict(
        {"VideoMAEForVideoClassification": {"num_labels": 400}, "ASTForAudioClassification": {"num_labels": 527}}
    )
    config.batch_sizes = "1"
    config.r = "0, 65, 100"
    config.runs = 3
    config.out = "results/bench_media.json"
    return config
