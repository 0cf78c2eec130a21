"""The training optimizer: AdamW with warmup and cosine decay, and the masks it needs."""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax

NO_DECAY = ("pos_embed", "cls_token", "dist_token")


def decay_mask(params) -> Any:
    """True where weight decay applies: matrices and kernels, not norms, biases,
    LayerScale, position embeddings or prefix tokens (timm's rule)."""
    def decays(path, leaf):
        name = jax.tree_util.keystr(path)
        return leaf.ndim >= 2 and not any(n in name for n in NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


def trainable_mask(params, pattern: str | None) -> Any:
    """True for parameters whose path matches `pattern` (a regex); all when None."""
    regex = re.compile(pattern) if pattern else None

    def trains(path, _):
        return regex is None or bool(regex.search(jax.tree_util.keystr(path)))

    mask = jax.tree_util.tree_map_with_path(trains, params)
    if not any(jax.tree_util.tree_leaves(mask)):
        raise ValueError(f"no parameter matches trainable pattern {pattern!r}")
    return mask


def make_optimizer(config, params, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with warmup + cosine, clipping, decay mask, freezing and accumulation.

    Returns the transformation and the learning-rate schedule (for logging), in
    optimizer updates (train steps / `grad_accum`).
    """
    updates = max(total_steps // config.grad_accum, 1)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, updates - 1),
        decay_steps=updates,
        end_value=config.min_learning_rate,
    )
    tx = optax.adamw(
        schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask(params)
    )
    if config.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    trainable = trainable_mask(params, config.get("trainable") or None)
    if not all(jax.tree_util.tree_leaves(trainable)):
        # Frozen parameters get no update and no optimizer state; since nothing
        # reads their gradients, XLA drops the weight-gradient computations.
        labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    if config.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum)
    return tx, schedule
