"""A tiny from-scratch training config for the tests (also used by train.py subprocesses).

`--config=tests/tiny_train_config.py:eval` gives eval.py the same model instead.
"""

from configs import eval_cifar10, train_cifar10

TINY = {"width": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "num_classes": 10}


def get_config(program: str = "train"):
    if program == "eval":
        return eval_config()
    config = train_cifar10.get_config()
    config.model = "vit_tiny_patch4_32"
    config.pretrained = False
    config.model_overrides = dict(TINY)
    config.r = "2"
    config.eval_r = "2"
    config.batch_size = 16
    config.eval_batch_size = 40
    config.num_steps = 12
    config.warmup_steps = 2
    config.learning_rate = 1e-3
    config.log_every = 1
    config.eval_every = 6
    config.checkpoint_every = 4
    config.shuffle_buffer = 1000
    return config


def eval_config():
    """eval.py on the tiny model, for parameters a test trained (`params_from`)."""
    config = eval_cifar10.get_config()
    config.model = "vit_tiny_patch4_32"
    config.pretrained = False
    config.model_overrides = dict(TINY)
    config.r = "2"
    config.batch_size = 40
    config.timing_runs = 1
    return config
