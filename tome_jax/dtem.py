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
from flax import struct

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
        (positions prefix, prefix + 2, .. < n) to the B tokens (prefix + 1, .. < n); rows sum to <= 1.
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


def num_a_b(n: int, prefix: int = 1) -> tuple[int, int]:
    """How many tokens fall in A (positions prefix, prefix + 2, .. < n) and in B (prefix + 1, .. < n)."""
    return len(range(prefix, n, 2)), len(range(prefix + 1, n, 2))


def soft_merge_scores(metric: jax.Array, n: int, prefix: int = 1) -> jax.Array:
    """Cosine similarity of every A token to every B token among the first `n`.

    Args:
      metric: [batch, tokens, channels] the learned embedding, any float dtype.
      n: participating tokens, a static int (the `prefix` tokens never take part).
      prefix: the leading tokens (class, distillation, registers), a static int.

    Returns:
      [batch, num_a, num_b] float32 (see `num_a_b`).
    """
    _check_int(n, "n", 0, metric.shape[1])
    return merge.cosine_scores(*_a_and_b(merge.unit_vectors(metric), n, prefix))


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


_HIGHEST = jax.lax.Precision.HIGHEST


def _per_token(weights: jax.Array, values: jax.Array) -> jax.Array:
    """[batch, t] weights shaped to multiply [batch, t, ...] values."""
    return weights.reshape(weights.shape + (1,) * (values.ndim - 2))


def _a_and_b(values: jax.Array, n: int, prefix: int) -> tuple[jax.Array, jax.Array]:
    """[batch, tokens, ...] -> A (positions prefix, prefix + 2, .. < n) and B (prefix + 1, .. < n)."""
    return values[:, prefix:n:2], values[:, prefix + 1 : n : 2]


def _soft_sums(assign: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A keeps what it does not send (clipped straight through); B adds what it receives."""
    kept = _clip_unit_interval_straight_through(1.0 - assign.sum(axis=-1))
    return a * _per_token(kept, a), b + jnp.einsum("bij,bi...->bj...", assign, a, precision=_HIGHEST)


@struct.dataclass
class SoftPlan:
    """One soft merge step as a plan that any per-token quantity can follow (`tome_jax.tokens`).

    Among the first `n` tokens, each A token (positions prefix, prefix + 2, ..)
    sends the share `assign[a, b]` of itself to each B token (prefix + 1, ..);
    then A and B are put in `order`, by their new sizes, largest first. The
    `prefix` tokens and the tokens from `n` on stay where they are; no token is
    removed.

    Attributes:
      assign: [batch, num_a, num_b] float32, rows summing to <= 1.
      order: [batch, num_a + num_b] the A-then-B index of the token at each place
        after the step (A first, then B, as `num_a_b(n)` counts them).
      n: participating tokens, a static int.
      residue_from: places from here on get sum 0 (`drop_residue`), or None.
      prefix: the leading tokens that never take part, a static int.
    """

    assign: jax.Array
    order: jax.Array
    n: int = struct.field(pytree_node=False)
    residue_from: int | None = struct.field(pytree_node=False, default=None)
    prefix: int = struct.field(pytree_node=False, default=1)

    @classmethod
    def build(
        cls, assign: jax.Array, size: jax.Array, n: int, residue_from: int | None = None, prefix: int = 1
    ) -> SoftPlan:
        """The plan of `assign` for tokens of sizes [batch, tokens] (the order follows the new sizes)."""
        size_a, size_b = _soft_sums(assign, *_a_and_b(size.astype(jnp.float32), n, prefix))
        order = jnp.argsort(jnp.concatenate([size_a, size_b], axis=1), axis=-1, descending=True, stable=True)
        return cls(assign, order, n, residue_from, prefix)

    def _split(self, values: jax.Array) -> tuple[jax.Array, jax.Array]:
        return _a_and_b(values, self.n, self.prefix)

    def _place(self, values: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        """A and B in `order`, between the prefix tokens and the tokens from `n` on (values' dtype)."""
        ordered = merge.gather_tokens(jnp.concatenate([a, b], axis=1), self.order)
        return jnp.concatenate(
            [values[:, : self.prefix], ordered.astype(values.dtype), values[:, self.n :]], axis=1
        )

    def sum(self, values: jax.Array, *, implementation: str | None = None) -> jax.Array:
        """[batch, tokens, ...] -> the same shape: each B token adds the shares it receives.

        (The sizes follow this rule; `implementation` is the hard plans' and unused here.)
        """
        summed = self._place(values, *_soft_sums(self.assign, *self._split(values.astype(jnp.float32))))
        if self.residue_from is None:
            return summed
        return jnp.where(_per_token(jnp.arange(summed.shape[1]) < self.residue_from, summed), summed, 0.0)

    def mean(self, values: jax.Array, weights: jax.Array, *, implementation: str | None = None) -> jax.Array:
        """`(w_b v_b + sum_a assign[a, b] w_a v_a) / (w_b + sum_a assign[a, b] w_a)` for B; A keeps its own.

        A B token of weight 0 that receives nothing gets 0 (no 0/0).
        """
        weights = weights.astype(jnp.float32)
        a, b = self._split(values.astype(jnp.float32))
        weight_a, weight_b = self._split(weights)
        sent = jnp.einsum("bij,bi...->bj...", self.assign, _per_token(weight_a, a) * a, precision=_HIGHEST)
        norm = weight_b + jnp.einsum("bij,bi->bj", self.assign, weight_a, precision=_HIGHEST)
        b = (_per_token(weight_b, b) * b + sent) / _per_token(jnp.where(norm > 0, norm, 1.0), b)
        return self._place(values, a, b)

    def receivers(self, values: jax.Array) -> jax.Array:
        """Every token keeps its own value, in the new order."""
        return self._place(values, *self._split(values))


def merge_assigned(
    x: jax.Array, size: jax.Array, assign: jax.Array, n: int, prefix: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Soft-merges A into B by a given assignment; the merge step of `dtem_soft_merge`.

    Among the first `n` tokens, A (positions prefix, prefix + 2, ..) sends the fraction
    `assign[a, b]` of its size and size-weighted features to B (prefix + 1, ..):
    `x_b <- (s_b x_b + sum_a assign[a, b] s_a x_a) / s_b'`, `s_b' = s_b + sum_a
    assign[a, b] s_a`, and `s_a <- s_a (1 - sum_b assign[a, b])` (see
    `_clip_unit_interval_straight_through`). A and B are then sorted by size, largest
    first. The prefix tokens and the tokens from `n` on are returned untouched. With a one-hot
    assignment this is ToMe's merge, the merged-away tokens left with size 0.
    (`SoftPlan` is this step as a plan.)

    Args:
      x: [batch, tokens, channels], any float dtype (accumulated in float32).
      size: [batch, tokens] sizes, >= 0.
      assign: [batch, num_a, num_b] (see `num_a_b`), rows summing to <= 1.
      n: participating tokens, a static int in [0, tokens].
      prefix: the leading tokens that never take part (the official code: 1, a class token).

    Returns:
      x: [batch, tokens, channels] in x's dtype; size: [batch, tokens] float32.
      With rows summing to <= 1, total size and the size-weighted sum of
      features are conserved.
    """
    _check_token_shapes(x, size)
    n = _check_int(n, "n", 0, x.shape[1])
    if assign.shape != (x.shape[0], *num_a_b(n, prefix)):
        raise ValueError(
            f"assign has shape {assign.shape}, expected {(x.shape[0], *num_a_b(n, prefix))} for n={n}"
        )
    plan = SoftPlan.build(assign, size, n, prefix=prefix)
    return plan.mean(x, size), plan.sum(size.astype(jnp.float32))


def soft_merge_plan(
    size: jax.Array,
    metric: jax.Array,
    r: int,
    n: int,
    *,
    k2: int = 3,
    tau1=0.1,
    tau2=0.1,
    drop_residue: bool = False,
    prefix: int = 1,
) -> SoftPlan:
    """The plan of one DTEM training merge step (see `dtem_soft_merge`); `r` already clamped, > 0."""
    assign = soft_khot(soft_merge_scores(metric, n, prefix), r, k2=k2, tau1=tau1, tau2=tau2)
    return SoftPlan.build(assign, size, n, residue_from=n - r if drop_residue else None, prefix=prefix)


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
    prefix: int = 1,
) -> SoftMerge:
    """One DTEM training merge step: soft k-hot selection, then soft merge.

    `r` is clamped to `(n - prefix) // 2`, the B tokens among the first `n`, as in the
    official code, so a schedule written for long sequences still runs; after the
    clamp `r == 0` returns the inputs unchanged (sizes cast to float32).
    `schedules.tokens_per_layer(tokens, schedule, protected=prefix)` gives every block's `n`.

    Args:
      x: [batch, tokens, channels] features, any float dtype.
      size: [batch, tokens] float32 sizes (ones before the first merge).
      metric: [batch, tokens, feat] the learned merge embedding (any float dtype;
        a zero vector is safe).
      r: merges to make, a static int >= 0.
      n: tokens taking part, a static int in [0, tokens]; the `prefix` tokens and
        the tokens from `n` on are never merged.
      k2, tau1, tau2: see `soft_khot` (the official defaults).
      drop_residue: give the tokens sorted behind the new `n` size 0, so attention
        no longer sees them. Not in the official code, where an A token merged
        only in part keeps part of its size there for good, which leaves the soft
        merge far more accurate than the hard merge it stands in for, and so
        little for training to lower (docs/training.md, DTEM results).
        Total size is then not conserved.
      prefix: the leading tokens that never take part, a static int: 1 (a class
        token) in the official code; with registers or a distillation token, all
        of them, A and B then alternating from the first token after them.

    Returns:
      `SoftMerge(x, size, n - r, assign)`, shapes as the inputs'.
    """
    _check_token_shapes(x, size, metric)
    n = _check_int(n, "n", 0, x.shape[1])
    r = merge.clamp_r(r, n, protected=prefix)
    if r == 0:
        _check_selection(k2, tau1, tau2)
        no_merge = jnp.zeros((x.shape[0], *num_a_b(n, prefix)), jnp.float32)
        return SoftMerge(x, size.astype(jnp.float32), n, no_merge)
    plan = soft_merge_plan(
        size, metric, r, n, k2=k2, tau1=tau1, tau2=tau2, drop_residue=drop_residue, prefix=prefix
    )
    return SoftMerge(plan.mean(x, size), plan.sum(size.astype(jnp.float32)), n - r, plan.assign)
