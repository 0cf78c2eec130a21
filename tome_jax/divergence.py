"""Divergence: training that turned NaN or infinite is stopped, never saved."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(FloatingPointError):
    """Training diverged: a NaN or infinite loss, gradient or parameter."""


DIVERGED_HINT = (
    "Every checkpoint saved holds finite values; resume from the latest with a lower "
    "learning_rate or a grad_clip, or start afresh in another workdir."
)


def check_finite_metrics(metrics: dict[str, Any], step: int, every: int) -> None:
    """Raises NonFiniteError when the fetched loss or gradient norm is NaN or infinite."""
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        raise NonFiniteError(
            f"step {step}: loss {float(metrics['loss']):.4g}, gradient norm {float(metrics['grad_norm']):.4g} "
            f"(checked every log_every={every} steps); training stopped. {DIVERGED_HINT}"
        )


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every float in `tree` is finite: checked on device before a save."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))
