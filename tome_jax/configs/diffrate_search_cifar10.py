"""DiffRate's search on the bundled ViT-Ti/4 and CIFAR-10: per-block prune and merge counts for a FLOPs target.

    python train.py --config configs/diffrate_search_cifar10.py --workdir workdirs/diffrate_0.25
    python train.py --config configs/diffrate_search_cifar10.py --workdir DIR \
        --config.diffrate_search.target_gflops=0.2

The ViT stays frozen; only the blocks' rate logits learn, as in the authors'
search: AdamW at 0.01 falling to 0.001 by a cosine, no weight decay, against the
classification loss plus `flops_weight * (GMACs - target_gflops)^2`, GMACs in
the authors' count (`diffrate.schedule_flops`, multiply-adds: the unreduced model has 0.365; eval.py's
XLA GFLOPs are about twice, 0.74).
The schedule found is written to WORKDIR/diffrate_schedule.json, with the
eval.py command that runs it (`--config.method=diffrate --config.r=...
--config.diffrate.prune=...`). The evaluations during the search run the masked
search model at the counts reached so far.
"""

from tome_jax.configs import train_cifar10


def get_config():
    config = train_cifar10.get_config()
    config.method = "diffrate_search"
    config.diffrate_search.target_gflops = 0.25
    # The authors' weight is 5 on DeiT-S (4.6 GFLOPs); the penalty is quadratic in
    # GFLOPs, so on this 0.37-GFLOP model it scales by (4.6 / 0.37) ** 2.
    config.diffrate_search.flops_weight = 800.0
    config.diffrate_search.granularity = 2  # 32 candidate counts over 64 patches (the authors: 4 over 196)
    config.trainable = "diffrate"  # the rate logits: a regex over parameter paths
    config.r = "0"  # the search keeps every token: r is not used
    config.eval_r = "0"
    config.num_epochs = 1.0  # the authors search 3 ImageNet epochs
    config.learning_rate = 0.01
    config.min_learning_rate = 0.001
    config.warmup_steps = 0
    config.weight_decay = 0.0
    config.grad_clip = 0.0
    config.eval_every = 130
    config.eval_limit = 2000
    return config
