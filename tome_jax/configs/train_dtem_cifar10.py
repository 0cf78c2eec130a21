"""Modular DTEM on the bundled ViT-Ti/4 and CIFAR-10: only the metric layers learn.

    python train.py --config configs/train_dtem_cifar10.py --workdir workdirs/dtem_r8
    python eval.py --config.method=dtem --config.params_from=workdirs/dtem_r8 \
        --config.r="(7, -1), (8, -1), (9, -1)"

The ViT stays frozen (optax masks every parameter but `blocks_i/metric`), the
metric layers read a detached input, and training merges with DTEM's soft merge
at the schedule `r` (`reduce.DTEM`); evaluation merges hard, as ToMe, on the
learned metric.
The metric layers alone are written to WORKDIR/metric_layers.safetensors.
"""

from tome_jax.configs import train_cifar10


def get_config():
    config = train_cifar10.get_config()
    config.method = "dtem"
    config.trainable = "metric"  # modular: a regex over parameter paths
    config.r = "(8, -1)"
    config.eval_r = "(8, -1)"
    # Tokens an A row merged only in part stop counting (not in the official code;
    # see dtem.dtem_soft_merge): the soft merge then costs what the hard one does.
    config.dtem.drop_residue = True
    config.num_steps = 260  # two thirds of an epoch of 128-image batches
    # The metric layers start as ToMe's (the keys' head mean, a small kernel): small steps.
    config.learning_rate = 1e-4
    config.warmup_steps = 50
    config.weight_decay = 0.0
    config.eval_every = 130
    return config
