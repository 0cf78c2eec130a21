"""DTEM's soft token merge for training (Lee & Hong, NeurIPS 2024), as pure JAX functions.

DTEM learns the merge metric (a small embedding per block) by making the merge
differentiable: instead of ToMe's hard choice of `r` pairs, a soft k-hot
assignment spreads `r` units of "merge mass" over the best candidate pairs, and
merging moves that fraction of each A token's size into B. No token is removed,
so shapes never change: merged-away tokens keep their slot with a size near 0,
are sorted past the `n` tokens that still take part, and fade out of attention
through the `log(size)` bias of proportional attention.

Typical use inside a transformer block, training only (`n` is carried from block
to block, starting at the full token count)::

    out = dtem_soft_merge(x, size, metric, r, n)
    x, size, n = out.x, out.size, out.n

Gradients reach the metric through the soft assignment (the top-`k2` candidate
choice and the final sort are piecewise constant, as in the official code), and
reach `x` and `size` through the size-weighted average. Two steps are deliberately
not differentiated, as in the official code: the factor that caps each
assignment row at 1, and the clip of the A sizes to [0, 1] times their old value
(the forward pass clips, the gradient is that of the unclipped expression).
Detaching the metric layer's input from the ViT is the caller's business.

Where this differs from the official code, on purpose: a row's unchosen share
is summed from the other rows rather than taken as `1 - share` (same value,
accurate float32 gradients, see `_share_of_other_rows`); sorts and top-k break
ties by position, so results do not depend on the backend; a B token whose
size is 0 and receives nothing keeps its features instead of becoming 0/0.

`r`, `n` and `k2` are static Python ints: no shape depends on the data.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tome_jax import merge

# The official floor on a row's remaining share before its log is taken.
_EPS = float(jnp.finfo(jnp.float32).eps)


class SoftMerge(NamedTuple):
    """The result of one soft merge step.

    Attributes:
      x: [batch, tokens, channels] in the input's dtype; same length as the input.
      size: [batch, tokens] float32; merged-away tokens have sizes near or at 0.
      n: static int, the tokens taking part in the next block's merge (`n - r`).
      assign: [batch, num_a, num_b] float32 soft assignment of the A tokens
        (positions 1, 3, .. < n) to the B tokens (2, 4, .. < n); rows sum to <= 1.
    """

    x: jax.Array
    size: jax.Array
    n: int
    assign: jax.Array


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    """Validates a static int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _check_temperature(tau, name: str):
    """Rejects a concrete temperature <= 0; a traced one (annealed) passes unchecked."""
    if isinstance(tau, numbers.Real) and not tau > 0:
        raise ValueError(f"{name} must be > 0, got {tau}")


def _check_selection(k2, tau1, tau2) -> int:
    """Validates the soft selection's settings; returns k2."""
    _check_temperature(tau1, "tau1")
    _check_temperature(tau2, "tau2")
    return _check_int(k2, "k2", 1)


def _check_token_shapes(x: jax.Array, size: jax.Array, metric: jax.Array | None = None):
    """Raises unless x, size (and metric) agree on [batch, tokens]."""
    metric_fits = metric is None or (metric.ndim == 3 and metric.shape[:2] == x.shape[:2])
    if x.ndim != 3 or size.shape != x.shape[:2] or not metric_fits:
        got = f"x {x.shape}, size {size.shape}"
        got += "" if metric is None else f", metric {metric.shape}"
        raise ValueError(
            "x [batch, tokens, channels], size [batch, tokens] and metric [batch, tokens, "
            f"feat] must agree on [batch, tokens]; got {got}"
        )


def num_a_b(n: int) -> tuple[int, int]:
    """How many tokens fall in A (positions 1, 3, .. < n) and in B (2, 4, .. < n)."""
    return len(range(1, n, 2)), len(range(2, n, 2))


def soft_merge_scores(metric: jax.Array, n: int) -> jax.Array:
    """Cosine similarity of every A token to every B token among the first `n`.

    Args:
      metric: [batch, tokens, channels] the learned embedding, any float dtype.
      n: participating tokens, a static int (token 0, the class token, never does).

    Returns:
      [batch, num_a, num_b] float32 (see `num_a_b`).
    """
    _check_int(n, "n", 0, metric.shape[1])
    unit = merge.unit_vectors(metric)
    return merge.cosine_scores(unit[:, 1:n:2], unit[:, 2:n:2])


def _share_of_other_rows(row_share: jax.Array) -> jax.Array:
    """[batch, num_a] -> [batch, num_a]: for each row, the sum of the other rows.

    Equal to the official `1 - row_share` (the shares sum to 1) but summed from
    positive terms: where a row holds nearly everything, `1 - row_share` loses
    all its digits in float32, and its log's gradient (up to 1/eps) is then noise.
    """
    others = 1.0 - jnp.eye(row_share.shape[-1], dtype=row_share.dtype)
    return jnp.einsum("bj,ji->bi", row_share, others, precision=jax.lax.Precision.HIGHEST)


def _soft_khot_iterations(logits: jax.Array, r: int, tau2) -> jax.Array:
    """[batch, num_a, k] candidate logits -> [batch, num_a, k] soft k-hot, total mass r.

    Each of the `r` rounds is a softmax over all candidates of an example; a row
    then drops by the log of its unchosen share, so the next rounds favour other
    A tokens: with a low `tau2` this picks `r` distinct rows, each at its best.
    """
    batch = logits.shape[0]

    def one_round(_, carry):
        logits, khot = carry
        choice = jax.nn.softmax(logits.reshape(batch, -1) / tau2, axis=-1).reshape(logits.shape)
        unchosen = jnp.maximum(_share_of_other_rows(choice.sum(axis=-1)), _EPS)
        return logits + jnp.log(unchosen)[..., None], khot + choice

    _, khot = jax.lax.fori_loop(0, r, one_round, (logits, jnp.zeros_like(logits)))
    return khot


def _cap_rows_at_one(khot: jax.Array) -> jax.Array:
    """[batch, num_a, k] rows scaled down to sum to at most 1, the scale not differentiated."""
    row_sum = jax.lax.stop_gradient(khot.sum(axis=-1, keepdims=True))
    return khot / jnp.maximum(row_sum, 1.0)


def _scatter_candidates(weights: jax.Array, columns: jax.Array, num_b: int) -> jax.Array:
    """[batch, num_a, k] weights at [batch, num_a, k] distinct columns -> [batch, num_a, num_b].

    A one-hot product rather than a scatter: exact, and fast on every backend.
    """
    return (weights[..., None] * jax.nn.one_hot(columns, num_b, dtype=weights.dtype)).sum(-2)


def soft_khot(scores: jax.Array, r: int, *, k2: int = 3, tau1=0.1, tau2=0.1) -> jax.Array:
    """DTEM's soft selection of `r` merges over each A row's top-`k2` B candidates.

    The candidates' scores are divided by `tau1`; `r` rounds of a softmax at
    temperature `tau2` over all candidates of an example accumulate a soft k-hot
    (see `_soft_khot_iterations`); rows summing over 1 are scaled back to 1.
    `r` is not clamped here (`dtem_soft_merge` clamps it).

    Args:
      scores: [batch, num_a, num_b] similarities of A tokens to B tokens.
      r: rounds, i.e. the total merge mass, a static int >= 0.
      k2: candidates per A row, a static int >= 1 (at most `num_b` are used).
      tau1, tau2: temperatures > 0 (floats, or traced scalars for annealing).

    Returns:
      [batch, num_a, num_b] float32, non-negative, each row summing to <= 1.
    """
    r = _check_int(r, "r", 0)
    k = min(_check_selection(k2, tau1, tau2), scores.shape[-1])
    scores = scores.astype(jnp.float32)
    if r == 0 or k == 0:
        return jnp.zeros_like(scores)
    top_scores, columns = jax.lax.top_k(scores, k)  # ties: the lower column first
    khot = _soft_khot_iterations(top_scores / tau1, r, tau2)
    return _scatter_candidates(_cap_rows_at_one(khot), columns, scores.shape[-1])


def _clip_unit_interval_straight_through(value: jax.Array) -> jax.Array:
    """Clipped to [0, 1] in the forward pass, identity in the backward pass.

    A row of the assignment can sum slightly over 1 in floating point; clipping
    keeps sizes non-negative without cutting the metric's gradient.
    """
    return value + jax.lax.stop_gradient(jnp.clip(value, 0.0, 1.0) - value)


def _largest_first(x: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[batch, t, channels], [batch, t] sorted by size, descending; ties keep their order."""
    order = jnp.argsort(size, axis=-1, descending=True, stable=True)
    return merge.gather_tokens(x, order), merge.gather_tokens(size, order)


def merge_assigned(
    x: jax.Array, size: jax.Array, assign: jax.Array, n: int
) -> tuple[jax.Array, jax.Array]:
    """Soft-merges A into B by a given assignment; the merge step of `dtem_soft_merge`.

    Among the first `n` tokens, A (positions 1, 3, ..) sends the fraction
    `assign[a, b]` of its size and size-weighted features to B (2, 4, ..):
    `x_b <- (s_b x_b + sum_a assign[a, b] s_a x_a) / s_b'`, `s_b' = s_b + sum_a
    assign[a, b] s_a`, and `s_a <- s_a (1 - sum_b assign[a, b])` (see
    `_clip_unit_interval_straight_through`). A and B are then sorted by size, largest
    first. Token 0 and the tokens from `n` on are returned untouched. With a one-hot
    assignment this is ToMe's merge, the merged-away tokens left with size 0.

    Args:
      x: [batch, tokens, channels], any float dtype (accumulated in float32).
      size: [batch, tokens] sizes, >= 0.
      assign: [batch, num_a, num_b] (see `num_a_b`), rows summing to <= 1.
      n: participating tokens, a static int in [0, tokens].

    Returns:
      x: [batch, tokens, channels] in x's dtype; size: [batch, tokens] float32.
      With rows summing to <= 1, total size and the size-weighted sum of
      features are conserved.
    """
    _check_token_shapes(x, size)
    n = _check_int(n, "n", 0, x.shape[1])
    if assign.shape != (x.shape[0], *num_a_b(n)):
        raise ValueError(
            f"assign has shape {assign.shape}, expected {(x.shape[0], *num_a_b(n))} for n={n}"
        )
    size = size.astype(jnp.float32)
    x_a, x_b = x[:, 1:n:2].astype(jnp.float32), x[:, 2:n:2].astype(jnp.float32)
    size_a, size_b = size[:, 1:n:2], size[:, 2:n:2]
    highest = jax.lax.Precision.HIGHEST
    sent = jnp.einsum("bij,bic->bjc", assign, size_a[..., None] * x_a, precision=highest)
    size_b_new = size_b + jnp.einsum("bij,bi->bj", assign, size_a, precision=highest)
    # A B token of size 0 that receives nothing keeps its features (no 0/0).
    x_b = (size_b[..., None] * x_b + sent) / jnp.where(size_b_new > 0, size_b_new, 1.0)[..., None]
    size_a = size_a * _clip_unit_interval_straight_through(1.0 - assign.sum(axis=-1))
    x_ab, size_ab = _largest_first(
        jnp.concatenate([x_a, x_b], axis=1), jnp.concatenate([size_a, size_b_new], axis=1)
    )
    x_out = jnp.concatenate([x[:, :1], x_ab.astype(x.dtype), x[:, n:]], axis=1)
    return x_out, jnp.concatenate([size[:, :1], size_ab, size[:, n:]], axis=1)


def dtem_soft_merge(
    x: jax.Array,
    size: jax.Array,
    metric: jax.Array,
    r: int,
    n: int,
    *,
    k2: int = 3,
    tau1=0.1,
    tau2=0.1,
    drop_residue: bool = False,
) -> SoftMerge:
    """One DTEM training merge step: soft k-hot selection, then soft merge.

    `r` is clamped to `(n - 1) // 2`, the B tokens among the first `n`, as in the
    official code, so a schedule written for long sequences still runs; after the
    clamp `r == 0` returns the inputs unchanged (sizes cast to float32).
    `schedules.tokens_per_layer(tokens, schedule, protected=1)` gives every block's `n`.

    Args:
      x: [batch, tokens, channels] features, any float dtype.
      size: [batch, tokens] float32 sizes (ones before the first merge).
      metric: [batch, tokens, feat] the learned merge embedding (any float dtype;
        a zero vector is safe).
      r: merges to make, a static int >= 0.
      n: tokens taking part, a static int in [0, tokens]; the class token (index 0)
        and the tokens from `n` on are never merged.
      k2, tau1, tau2: see `soft_khot` (the official defaults).
      drop_residue: give the tokens sorted behind the new `n` size 0, so attention
        no longer sees them. Not in the official code, where an A token merged
        only in part keeps part of its size there for good, which leaves the soft
        merge far more accurate than the hard merge it stands in for, and so
        little for training to lower (measured in the README's DTEM results).
        Total size is then not conserved.

    Returns:
      `SoftMerge(x, size, n - r, assign)`, shapes as the inputs'.
    """
    _check_token_shapes(x, size, metric)
    n = _check_int(n, "n", 0, x.shape[1])
    r = merge.clamp_r(r, n, protected=1)
    if r == 0:
        _check_selection(k2, tau1, tau2)
        no_merge = jnp.zeros((x.shape[0], *num_a_b(n)), jnp.float32)
        return SoftMerge(x, size.astype(jnp.float32), n, no_merge)
    assign = soft_khot(soft_merge_scores(metric, n), r, k2=k2, tau1=tau1, tau2=tau2)
    x, size = merge_assigned(x, size, assign, n)
    if drop_residue:
        size = jnp.where(jnp.arange(size.shape[1]) < n - r, size, 0.0)
    return SoftMerge(x, size, n - r, assign)
