"""Token merging as pure JAX functions.

A merge step is planned once from a merge metric (the attention keys in ToMe, a
learned embedding in DTEM) and the plan is then applied to every per-token array
that must follow the tokens: features, sizes, sources. `r` is a static Python
int, so every shape is known at trace time and one compilation serves every batch.

Typical use inside a transformer block::

    plan = bipartite_soft_merge(metric, r, num_prefix_tokens=1)  # a class token
    x, size = merge_wavg(plan, x, size)

Shapes: `batch` examples, `tokens` tokens in, `tokens - r` tokens out.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class MergePlan(NamedTuple):
    """Where every token goes in one merge step (a pytree of int32 arrays).

    Attributes:
      dest: [batch, tokens_in] the output slot each input token ends up in, or
        `DROPPED` for a token the step removes without merging it (pruning).
      kept: [batch, tokens_out] the input token each output slot starts from.
      merged: [batch, r] the input tokens added into another token's slot.
    """

    dest: jax.Array
    kept: jax.Array
    merged: jax.Array

    @property
    def tokens_in(self) -> int:
        return self.dest.shape[-1]

    @property
    def tokens_out(self) -> int:
        return self.kept.shape[-1]

    # The rules by which per-token quantities follow the plan (`tome_jax.tokens`).
    def sum(self, values: jax.Array, *, implementation: str | None = None) -> jax.Array:
        """`merge_sum`: [batch, tokens_in, ...] -> [batch, tokens_out, ...]."""
        return merge_sum(self, values, implementation=implementation)

    def mean(self, values: jax.Array, weights: jax.Array, *, implementation: str | None = None) -> jax.Array:
        """`merge_mean` weighted by [batch, tokens_in] `weights`."""
        return merge_mean(self, values, weights, implementation=implementation)

    def receivers(self, values: jax.Array) -> jax.Array:
        """Each slot's value from the token it starts from (the one the others merge into)."""
        return gather_tokens(values, self.kept)


# `MergePlan.dest` of a pruned token, and the source of a patch no token holds any more.
DROPPED = -1


def max_r(tokens: int, protected: int = 0) -> int:
    """The most tokens one bipartite step can remove: half the unprotected ones."""
    return max(tokens - protected, 0) // 2


def clamp_r(r: int, tokens: int, protected: int = 0, most: int | None = None) -> int:
    """Validates `r` and clamps it to `most` (default `max_r(tokens, protected)`), at trace time.

    Clamping rather than failing is the official behaviour: a schedule written for
    a long sequence keeps working on a short one, merging as much as it can.
    """
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be a Python int, got {r!r} ({type(r).__name__})")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    return min(int(r), max_r(tokens, protected) if most is None else most)


def identity_plan(batch: int, tokens: int) -> MergePlan:
    """The plan that keeps every token where it is (r = 0)."""
    order = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
    return MergePlan(dest=order, kept=order, merged=jnp.zeros((batch, 0), jnp.int32))


def unit_vectors(metric: jax.Array) -> jax.Array:
    """[..., channels] scaled to unit length; a zero vector stays zero (no NaN).

    Safe to differentiate (DTEM learns its metric through this): the norm's
    derivative is infinite at zero, so a vector too short to normalise passes
    through unscaled, with a finite gradient, rather than giving NaN.
    """
    metric = metric.astype(jnp.float32)
    squared = jnp.sum(metric * metric, axis=-1, keepdims=True)
    normalisable = squared > jnp.finfo(jnp.float32).tiny
    return metric / jnp.sqrt(jnp.where(normalisable, squared, 1.0))


def cosine_scores(a: jax.Array, b: jax.Array) -> jax.Array:
    """[batch, ta, c] x [batch, tb, c] -> [batch, ta, tb], full fp32 precision."""
    return jnp.einsum("bic,bjc->bij", a, b, precision=jax.lax.Precision.HIGHEST)


def _plan_from_kept(kept, merged, merged_into, tokens):
    """One example's plan from its kept tokens and its merges (per-example arrays).

    kept: [tokens_out] input tokens that own a slot, in output order.
    merged: [r] input tokens folded away; merged_into: [r] the input token each joins.
    """
    slots = jnp.arange(kept.shape[0], dtype=jnp.int32)
    dest = jnp.zeros((tokens,), jnp.int32).at[kept].set(slots)
    dest = dest.at[merged].set(dest[merged_into])
    return MergePlan(dest=dest, kept=kept.astype(jnp.int32), merged=merged.astype(jnp.int32))


def descending_rank(score: jax.Array) -> jax.Array:
    """[batch, n] -> [batch, n] int32: each entry's place in a stable descending sort.

    Counted (the entries ahead: higher, or equal and earlier) rather than sorted,
    like the other plan helpers: n is half a sequence, so the [batch, n, n]
    comparison is cheap, and it compiles to far fewer XLA kernels than a sort
    and scatters, which made merging models slower to compile.
    """
    n = score.shape[-1]
    earlier = np.arange(n)[:, None] < np.arange(n)[None, :]  # [i, j]: i precedes j
    ahead = (score[:, :, None] > score[:, None, :]) | (
        (score[:, :, None] == score[:, None, :]) & earlier
    )
    return jnp.sum(ahead, axis=1, dtype=jnp.int32)


def count_before(mask: jax.Array) -> jax.Array:
    """[batch, n] bool -> [batch, n] int32: the True entries before each one."""
    n = mask.shape[-1]
    earlier = np.arange(n)[:, None] < np.arange(n)[None, :]
    return jnp.sum(mask[:, :, None] & earlier, axis=1, dtype=jnp.int32)


def position_of(values: jax.Array, targets: jax.Array) -> jax.Array:
    """[batch, n] values, [m] targets each present once per row -> [batch, m] positions."""
    return jnp.argmax(values[:, None, :] == targets[:, None], axis=-1).astype(jnp.int32)


def plan_from_dest(dest: jax.Array, tokens_out: int, num_merged: int) -> MergePlan:
    """The plan of a step given where each input token goes.

    For steps whose matching is easier said as destinations (pruning, fusing,
    PiToMe's and MCTF's matchings): each output slot starts from its first input
    token; every later token of the slot is merged into it.

    Args:
      dest: [batch, tokens_in] the output slot of each input token, or `DROPPED`;
        every slot in [0, tokens_out) must hold at least one token.
      tokens_out: output slots, a static int.
      num_merged: tokens that join another's slot (tokens_in - dropped -
        tokens_out), a static int.
    """
    dest = dest.astype(jnp.int32)
    tokens_in = dest.shape[-1]
    earlier = np.arange(tokens_in)[:, None] < np.arange(tokens_in)[None, :]
    joins_earlier = jnp.any((dest[:, :, None] == dest[:, None, :]) & earlier, axis=1)
    is_merged = (dest != DROPPED) & joins_earlier
    slot_starts = jnp.argmax(dest[:, None, :] == jnp.arange(tokens_out, dtype=jnp.int32)[:, None], axis=-1)
    merged_order = jnp.where(is_merged, count_before(is_merged), -1)
    return MergePlan(
        dest=dest,
        kept=slot_starts.astype(jnp.int32),
        merged=position_of(merged_order, jnp.arange(num_merged, dtype=jnp.int32)),
    )


def interleave(even: jax.Array, odd: jax.Array, tokens: int) -> jax.Array:
    """[batch, ceil(tokens / 2)] at even positions, [batch, tokens // 2] at odd -> [batch, tokens]."""
    odd = jnp.pad(odd, ((0, 0), (0, even.shape[1] - odd.shape[1])))
    return jnp.stack([even, odd], axis=-1).reshape(even.shape[0], -1)[:, :tokens]


def bipartite_soft_merge(metric: jax.Array, r: int, *, num_prefix_tokens: int = 0) -> MergePlan:
    """ToMe's bipartite soft matching: plans the merge of the `r` most similar pairs.

    Tokens alternate into set A (even positions) and B (odd positions) over the
    whole sequence; each A token picks its most similar B token by cosine
    similarity; the `r` A tokens with the best matches are merged into their
    partners. The first `num_prefix_tokens` tokens (class, distillation, register
    tokens) never merge: those in A get a -inf row, those in B a -inf column.

    Output order, which the next block's alternating split depends on: the prefix
    tokens in their order, then the unmerged A tokens, then the other B tokens.
    The unmerged A tokens keep their sequence order when there is a prefix token;
    without one they are ordered by best score, descending, as the official code
    leaves them. For a class token alone (`num_prefix_tokens=1`), or class and
    distillation tokens (2), this is exactly the official order.

    Ties are broken by position, so equal scores give one plan on every backend.
    The matching is not differentiated; gradients flow through the merged values.

    Args:
      metric: [batch, tokens, channels] similarity features (keys' head-mean).
      r: tokens to remove, a static int; clamped to `max_r(tokens, num_prefix_tokens)`.
      num_prefix_tokens: the leading tokens that never merge and stay first.

    Returns:
      A plan mapping `tokens` inputs to `tokens - r` outputs.
    """
    batch, tokens = _metric_shape(metric)
    prefix = _check_prefix(num_prefix_tokens, tokens)
    r = clamp_r(r, tokens, prefix)
    if r == 0:
        return identity_plan(batch, tokens)

    metric = unit_vectors(jax.lax.stop_gradient(metric))
    scores = cosine_scores(metric[:, ::2], metric[:, 1::2])
    num_a, num_b = scores.shape[1:]
    a = jnp.arange(num_a, dtype=jnp.int32)
    b = jnp.arange(num_b, dtype=jnp.int32)
    prefix_a, prefix_b = (prefix + 1) // 2, prefix // 2  # prefix tokens at 0, 2, .. and 1, 3, ..
    scores = jnp.where((a[:, None] < prefix_a) | (b[None, :] < prefix_b), -jnp.inf, scores)
    best_partner = scores.argmax(axis=-1).astype(jnp.int32)  # [batch, num_a]
    rank = descending_rank(scores.max(axis=-1))  # prefix rows (-inf) rank last
    is_merged = rank < r

    # Slots: prefix tokens where they are, the kept A tokens, then the other B tokens.
    kept_a = num_a - prefix_a - r
    b_slot = jnp.where(b < prefix_b, 2 * b + 1, prefix + kept_a + b - prefix_b)
    if prefix:  # kept A tokens in sequence order
        a_slot = prefix + a - prefix_a - count_before(is_merged)
    else:  # by score
        a_slot = rank - r
    a_slot = jnp.where(a < prefix_a, 2 * a, a_slot)
    dest_a = jnp.where(is_merged, b_slot[best_partner], a_slot)
    dest_b = jnp.broadcast_to(b_slot, (batch, num_b))
    owner = interleave(jnp.where(is_merged, -1, dest_a), dest_b, tokens)  # -1: merged away
    return MergePlan(
        dest=interleave(dest_a, dest_b, tokens),
        kept=position_of(owner, jnp.arange(tokens - r, dtype=jnp.int32)),
        merged=2 * position_of(rank, jnp.arange(r, dtype=jnp.int32)),
    )


def _metric_shape(metric: jax.Array) -> tuple[int, int]:
    """(batch, tokens) of a [batch, tokens, channels] metric, or a ValueError naming the shape."""
    if np.ndim(metric) != 3:
        raise ValueError(
            f"the metric must be [batch, tokens, channels], got shape {np.shape(metric)}; "
            "for one example add a batch axis (metric[None])"
        )
    return metric.shape[0], metric.shape[1]


def _check_prefix(num_prefix_tokens: int, tokens: int) -> int:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral):
        raise TypeError(f"num_prefix_tokens must be a Python int, got {num_prefix_tokens!r}")
    if not 0 <= num_prefix_tokens <= tokens:
        raise ValueError(
            f"num_prefix_tokens must be in [0, {tokens}] for {tokens} tokens, got {num_prefix_tokens}"
        )
    return int(num_prefix_tokens)


def _merge_set_into(metric, a_idx, b_idx, prefix):
    """One example: every token of `a_idx` joins its most similar token of `b_idx`.

    metric: [tokens, c] unit vectors; a_idx: [na]; b_idx: [nb] in sequence order.
    Output order: the `prefix` leading tokens, then `b_idx`.
    """
    scores = metric[a_idx] @ metric[b_idx].T
    into = b_idx[scores.argmax(axis=-1)]
    kept = jnp.concatenate([jnp.arange(prefix), b_idx])
    return _plan_from_kept(kept, a_idx, into, metric.shape[0])


def kth_bipartite_merge(metric: jax.Array, k: int, *, num_prefix_tokens: int = 0) -> MergePlan:
    """The "kth" matcher: B is every k-th token, every other token merges into B.

    Leaves about `tokens / k` tokens. Unlike the official version, which drops the
    tokens past the last full group of k, those tokens merge into B as well, so the
    total size is conserved. The prefix tokens stay first and never merge; B
    counts from the first token after them.

    Args:
      metric: [batch, tokens, channels].
      k: the stride of set B; `k <= 1` merges nothing.
      num_prefix_tokens: the leading tokens that never merge and stay first.
    """
    batch, tokens = _metric_shape(metric)
    prefix = _check_prefix(num_prefix_tokens, tokens)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be a Python int, got {k!r}")
    if k <= 1:
        return identity_plan(batch, tokens)
    positions = np.arange(prefix, tokens)
    if len(positions) < k:
        raise ValueError(f"k={k} exceeds the {len(positions)} mergeable tokens")
    in_b = (positions - prefix) % k == k - 1
    a_idx, b_idx = jnp.asarray(positions[~in_b]), jnp.asarray(positions[in_b])
    plan_one = lambda m: _merge_set_into(m, a_idx, b_idx, prefix)  # noqa: E731
    return jax.vmap(plan_one)(unit_vectors(jax.lax.stop_gradient(metric)))


def random_bipartite_merge(
    metric: jax.Array, r: int, rng: jax.Array, *, num_prefix_tokens: int = 0
) -> MergePlan:
    """The "random" matcher: `r` random tokens merge into their best other token.

    Set A is `r` tokens drawn per example (never a prefix token); the prefix tokens
    stay first, and the rest, B, keep their sequence order (the official version
    leaves them shuffled, which would scramble the next block's alternating split).

    Args:
      metric: [batch, tokens, channels].
      r: tokens to remove, clamped like `bipartite_soft_merge`.
      rng: a PRNG key; one draw per example.
      num_prefix_tokens: the leading tokens that never merge and stay first.
    """
    batch, tokens = _metric_shape(metric)
    prefix = _check_prefix(num_prefix_tokens, tokens)
    r = clamp_r(r, tokens, prefix)
    if r == 0:
        return identity_plan(batch, tokens)
    shuffled = prefix + jnp.argsort(jax.random.uniform(rng, (batch, tokens - prefix)))

    def plan_one(m, order):
        return _merge_set_into(m, order[:r], jnp.sort(order[r:]), prefix)

    return jax.vmap(plan_one)(unit_vectors(jax.lax.stop_gradient(metric)), shuffled)


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: [batch, tokens, ...], idx: [batch, n] -> [batch, n, ...]."""
    return jax.vmap(lambda xi, ii: xi[ii])(x, idx)


# Ways to apply a plan, all exact up to float rounding order (see `merge_sum`).
MERGE_IMPLEMENTATIONS = ("scatter", "segment_sum", "onehot")


def default_merge_implementation(backend: str | None = None) -> str:
    """The merge implementation for a JAX backend (default: the current one).

    CPU: chosen by timing the whole model with each, interleaved. GPU and TPU: not
    timed; the choice follows from their structure.
    On TPU, scatters and gathers are serialised row by row while the matrix unit
    is idle, so the one-hot product wins. On GPU, the gather and `r`-row scatter
    move little memory with atomics and add no FLOPs.
    """
    backend = backend or jax.default_backend()
    return {"tpu": "onehot"}.get(backend, "scatter")


def _check_merge_implementation(implementation: str | None) -> str:
    implementation = implementation or default_merge_implementation()
    if implementation not in MERGE_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown merge implementation {implementation!r}; "
            f"expected one of {', '.join(MERGE_IMPLEMENTATIONS)}"
        )
    return implementation


def _scatter_sum(plan: MergePlan, x: jax.Array) -> jax.Array:
    """Gathers the kept tokens, then scatter-adds only the `r` merged rows."""
    slots = jnp.take_along_axis(plan.dest, plan.merged, axis=1)
    moved = gather_tokens(x, plan.merged)
    kept = gather_tokens(x, plan.kept)
    return jax.vmap(lambda k, s, m: k.at[s].add(m))(kept, slots, moved)


def _segment_sum(plan: MergePlan, x: jax.Array) -> jax.Array:
    """One `segment_sum` over the batch's tokens, segment `b * tokens_out + dest`."""
    batch, tokens_in = plan.dest.shape
    offsets = plan.tokens_out * jnp.arange(batch, dtype=plan.dest.dtype)[:, None]
    # A dropped token's segment is out of range, which segment_sum leaves out.
    segments = jnp.where(plan.dest == DROPPED, batch * plan.tokens_out, plan.dest + offsets)
    summed = jax.ops.segment_sum(
        x.reshape(batch * tokens_in, *x.shape[2:]),
        segments.reshape(-1),
        num_segments=batch * plan.tokens_out,
    )
    return summed.reshape(batch, plan.tokens_out, *x.shape[2:])


def _onehot_sum(plan: MergePlan, x: jax.Array) -> jax.Array:
    """A [batch, tokens_out, tokens_in] 0/1 matrix times x, on the matrix units.

    Full precision: at default precision a TPU would round x to bfloat16.
    """
    onehot = plan.dest[:, None, :] == jnp.arange(plan.tokens_out, dtype=plan.dest.dtype)[:, None]
    flat = x.reshape(*x.shape[:2], -1)
    summed = jnp.einsum(
        "bot,btc->boc", onehot.astype(x.dtype), flat, precision=jax.lax.Precision.HIGHEST
    )
    return summed.reshape(x.shape[0], plan.tokens_out, *x.shape[2:])


_MERGE_SUMS = {"scatter": _scatter_sum, "segment_sum": _segment_sum, "onehot": _onehot_sum}


def merge_sum(plan: MergePlan, x: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """Sums the tokens that share an output slot.

    Args:
      x: [batch, tokens_in, ...].
      implementation: how, all from the same plan (results differ only in the
        order floats are added):
        "scatter": gathers the kept tokens and scatter-adds the `r` merged ones
          (`plan.kept`, `plan.merged`), so the scatter is `r` rows, not the sequence;
        "segment_sum": `jax.ops.segment_sum` of every token by `plan.dest`;
        "onehot": a 0/1 [tokens_out, tokens_in] matrix product per example (runs
          on matrix units; its FLOPs show in XLA's cost analysis);
        None: `default_merge_implementation()`.

    Returns:
      [batch, tokens_out, ...].
    """
    implementation = _check_merge_implementation(implementation)
    if plan.merged.shape[-1] == 0:
        return gather_tokens(x, plan.kept)
    return _MERGE_SUMS[implementation](plan, x)


def merge_max(plan: MergePlan, x: jax.Array) -> jax.Array:
    """The largest value among the tokens sharing a slot (elementwise).

    Args:
      x: [batch, tokens_in, ...]. Returns [batch, tokens_out, ...].
    """
    kept = gather_tokens(x, plan.kept)
    if plan.merged.shape[-1] == 0:
        return kept
    slots = jnp.take_along_axis(plan.dest, plan.merged, axis=1)
    moved = gather_tokens(x, plan.merged)
    return jax.vmap(lambda k, s, m: k.at[s].max(m))(kept, slots, moved)


def merge_mean(
    plan: MergePlan, x: jax.Array, weight: jax.Array, *, implementation: str | None = None
) -> jax.Array:
    """Weighted average of the tokens sharing a slot, `sum(w x) / sum(w)`.

    Args:
      x: [batch, tokens_in, ...], usually [batch, tokens_in, channels].
      weight: [batch, tokens_in] each token's weight (its size in ToMe).
      implementation: how the sums are taken, see `merge_sum`.

    Returns:
      [batch, tokens_out, ...] in x's dtype (accumulated in float32). A slot
      of zero total weight (only after a soft merge faded a token) is zero.
    """
    if plan.merged.shape[-1] == 0:
        return gather_tokens(x, plan.kept)
    per_token = (slice(None), slice(None)) + (None,) * (x.ndim - 2)  # weights over x's trailing axes
    weight = weight.astype(jnp.float32)
    total = merge_sum(plan, x.astype(jnp.float32) * weight[per_token], implementation=implementation)
    norm = merge_sum(plan, weight, implementation=implementation)
    return (total / jnp.where(norm > 0, norm, 1.0)[per_token]).astype(x.dtype)


def merge_wavg(
    plan: MergePlan,
    x: jax.Array,
    size: jax.Array | None = None,
    *,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Size-weighted average of merged tokens, and the merged sizes.

    Args:
      x: [batch, tokens_in, channels].
      size: [batch, tokens_in] patches held by each token; None means all ones.
      implementation: how the sums are taken, see `merge_sum`.

    Returns:
      x: [batch, tokens_out, channels] in x's dtype (accumulated in float32);
      size: [batch, tokens_out] float32.
    """
    implementation = _check_merge_implementation(implementation)
    size = jnp.ones(x.shape[:2], jnp.float32) if size is None else size.astype(jnp.float32)
    merged_x = merge_mean(plan, x, size, implementation=implementation)
    return merged_x, merge_sum(plan, size, implementation=implementation)


def unmerge(plan: MergePlan, x: jax.Array) -> jax.Array:
    """Copies every merged token back to each position it came from.

    Args:
      x: [batch, tokens_out, ...] outputs of the merged sequence.

    Returns:
      [batch, tokens_in, ...] in the order the plan's input had; a pruned
      token's position is zero.
    """
    copied = gather_tokens(x, jnp.maximum(plan.dest, 0))
    dropped = (plan.dest == DROPPED).reshape(*plan.dest.shape, *(1,) * (x.ndim - 2))
    return jnp.where(dropped, jnp.zeros((), x.dtype), copied)


def initial_source(batch: int, tokens: int) -> jax.Array:
    """[batch, tokens] int32: before any merge, input token i is output token i."""
    return jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))


def merge_source(plan: MergePlan, source: jax.Array) -> jax.Array:
    """Source tracking: follows each original token through one more merge.

    The official code tracks a [batch, tokens, patches] 0/1 matrix merged with
    `max`; since merged groups are disjoint, the token index of each original
    patch says the same in [batch, patches] (see `source_matrix`).

    Args:
      source: [batch, patches] the current token holding each original token, or
        `DROPPED` for one pruned earlier.

    Returns:
      [batch, patches] the token holding each original token after `plan`
      (`DROPPED` for the pruned ones).
    """
    followed = jnp.take_along_axis(plan.dest, jnp.maximum(source, 0), axis=1)
    return jnp.where(source == DROPPED, DROPPED, followed)


def source_matrix(source: jax.Array, tokens: int) -> jax.Array:
    """[batch, patches] token indices -> [batch, tokens, patches] bool membership.

    Row `j` marks the original tokens that current token `j` holds, as in the
    official `merge_source`; a pruned patch is in no row.
    """
    return jnp.arange(tokens)[None, :, None] == source[:, None, :]
