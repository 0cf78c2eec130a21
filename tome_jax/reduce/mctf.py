"""MCTF (Lee et al., CVPR 2024): multi-criteria token fusion with one-step-ahead attention.

At the start of a block, before its attention, the block's attention map on
the unreduced tokens is computed and drives the fusion:
- multi-criteria scores between A (even positions) and B (odd positions):
  similarity `((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)` of the block's input
  tokens, informativeness `(i_a i_b) ** (1 / tau_info)` with `i` the inverse of
  the attention each token receives (mean over heads and queries, scaled to a
  maximum of 1: uninformative tokens fuse first), and size `(s_a s_b) ** (1 /
  tau_size)` with `s` the inverse size likewise scaled (small tokens fuse first);
- bidirectional matching: `r // 2` A tokens fuse into their best B token, then
  `r - r // 2` B tokens (with what they received) into their best unfused A token;
- fusion weighted by attention: a group's token is the average of its tokens
  weighted by `attention received * size`;
- one-step-ahead attention: the map itself is fused (summed over fused keys,
  attention-weighted over fused queries), and the block attends with it,
  projecting only the values of the fused tokens.

Output order (as the authors'): the prefix tokens, the unfused A tokens (in
sequence order, by score without a prefix token), then the unfused B tokens by
score. A criterion with a zero temperature is left out, as in the authors' code.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from tome_jax import merge
from tome_jax.reduce.base import BEFORE_ATTENTION, Reduced, Reduction, Step, setting


def scaled_inverse(value: jax.Array) -> jax.Array:
    """[batch, tokens] -> `(1 / value) / max(1 / value)` per example."""
    inverse = 1.0 / value
    return inverse / inverse.max(axis=1, keepdims=True)


def criterion(a: jax.Array, b: jax.Array, tau: float) -> jax.Array:
    """`(a_i b_j) ** (1 / tau)`: [batch, na], [batch, nb] -> [batch, na, nb]."""
    return (a[:, :, None] * b[:, None, :]) ** (1.0 / tau)


def mctf_scores(
    x: jax.Array,
    attention_received: jax.Array,
    size: jax.Array,
    num_prefix_tokens: int,
    *,
    tau_sim: float,
    tau_info: float,
    tau_size: float,
) -> jax.Array:
    """[batch, num_a, num_b] the multi-criteria scores; -inf for a prefix token.

    Args:
      x: [batch, tokens, width] the block's input tokens.
      attention_received: [batch, tokens] attention each token gets, mean over heads and queries.
      size: [batch, tokens].
    """
    unit = merge.unit_vectors(x)
    scores = 1.0
    if tau_sim:
        scores = ((merge.cosine_scores(unit[:, ::2], unit[:, 1::2]) + 1) / 2) ** (1.0 / tau_sim)
    if tau_info > 0:
        info = scaled_inverse(attention_received)
        scores = scores * criterion(info[:, ::2], info[:, 1::2], tau_info)
    if tau_size:
        inverse_size = scaled_inverse(size)
        scores = scores * criterion(inverse_size[:, ::2], inverse_size[:, 1::2], tau_size)
    tokens = x.shape[1]
    scores = jnp.broadcast_to(scores, (x.shape[0], (tokens + 1) // 2, tokens // 2))
    prefix = jnp.arange(tokens) < num_prefix_tokens
    return jnp.where(prefix[::2, None] | prefix[None, 1::2], -jnp.inf, scores)


def mctf_plan(scores: jax.Array, r: int, num_prefix_tokens: int, *, bidirectional: bool) -> merge.MergePlan:
    """The bidirectional matching of `r` tokens from A x B scores ([batch, num_a, num_b])."""
    batch, num_a, num_b = scores.shape
    tokens = num_a + num_b
    r_a = r // 2 if bidirectional else r
    a_rank = merge.descending_rank(scores.max(axis=-1))
    a_fused = a_rank < r_a
    a_into = scores.argmax(axis=-1).astype(jnp.int32)  # a B token
    if bidirectional:
        open_scores = jnp.where(a_fused[:, :, None], -jnp.inf, scores)
        b_rank = merge.descending_rank(open_scores.max(axis=1))
        b_fused = b_rank < r - r_a
        b_into = open_scores.argmax(axis=1).astype(jnp.int32)  # an unfused A token
    else:
        b_rank = jnp.broadcast_to(jnp.arange(num_b, dtype=jnp.int32), (batch, num_b))
        b_fused, b_into = jnp.zeros((batch, num_b), bool), jnp.zeros((batch, num_b), jnp.int32)

    # Slots by sort key: prefix tokens, unfused A tokens, unfused B tokens, each group in its order.
    position = jnp.arange(tokens, dtype=jnp.int32)
    a_order = jnp.broadcast_to(position[::2], (batch, num_a)) if num_prefix_tokens else a_rank
    key = merge.interleave(tokens + a_order, 2 * tokens + b_rank, tokens)
    key = jnp.where(position < num_prefix_tokens, position, key)
    key = jnp.where(merge.interleave(a_fused, b_fused, tokens), 3 * tokens, key)
    slot = merge.descending_rank(-key)
    a_slot, b_slot = slot[:, ::2], slot[:, 1::2]
    b_dest = jnp.where(b_fused, jnp.take_along_axis(a_slot, b_into, axis=1), b_slot)
    a_dest = jnp.where(a_fused, jnp.take_along_axis(b_dest, a_into, axis=1), a_slot)
    return merge.plan_from_dest(merge.interleave(a_dest, b_dest, tokens), tokens - r, r)


def fuse_attention(plan: merge.MergePlan, weights: jax.Array, weight: jax.Array, norm: jax.Array, implementation):
    """One-step-ahead attention: the map fused as the tokens are.

    Keys that fuse add up (the fused token draws their attention); queries that
    fuse average with the fusion's weights, so rows still sum to one.

    Args:
      weights: [batch, heads, tokens_in, tokens_in]; weight: [batch, tokens_in]
        each token's fusion weight; norm: [batch, tokens_out] their sums per slot.

    Returns:
      [batch, heads, tokens_out, tokens_out].
    """
    by_key = merge.merge_sum(plan, weights.transpose(0, 3, 1, 2), implementation=implementation)  # [b, k', h, q]
    by_query = by_key.transpose(0, 3, 2, 1) * weight[:, :, None, None]  # [b, q, h, k']
    fused = merge.merge_sum(plan, by_query, implementation=implementation) / norm[:, :, None, None]
    return fused.transpose(0, 2, 1, 3)


@dataclasses.dataclass(frozen=True)
class MCTF(Reduction):
    """MCTF's training-free setting, on the block's input before its attention.

    The authors run it in every layer but the first (`r` per layer as a list,
    e.g. `[0] + [16] * 11` for DeiT-S), with proportional attention.

    Settings:
      tau_sim, tau_info, tau_size: the criteria's temperatures (1, 20, 40); 0
        leaves a criterion out.
      bidirectional: A into B then B into A (the authors'), or A into B only.
      one_step_ahead: attend with the fused attention map (the authors'
        default); False recomputes attention on the fused tokens (their
        "precise" mode).
    """

    name: ClassVar[str] = "mctf"
    position: ClassVar[str] = BEFORE_ATTENTION
    needs_weights: ClassVar[bool] = True
    tau_sim: float = setting(1.0, low=0)  # a power 1 / tau: 0 leaves the criterion out, below 0 inverts it
    tau_info: float = setting(20.0, low=0)
    tau_size: float = setting(40.0, low=0)
    bidirectional: bool = True
    one_step_ahead: bool = True

    def __call__(self, step: Step) -> Reduced:
        x = jax.lax.stop_gradient(step.x)
        attention_received = jax.lax.stop_gradient(step.weights.mean(axis=(1, 2)))
        scores = mctf_scores(
            x,
            attention_received,
            step.size,
            step.num_prefix_tokens,
            tau_sim=self.tau_sim,
            tau_info=self.tau_info,
            tau_size=self.tau_size,
        )
        plan = mctf_plan(scores, step.r, step.num_prefix_tokens, bidirectional=self.bidirectional)
        weight = attention_received * step.size / step.size.max(axis=1, keepdims=True)
        norm = merge.merge_sum(plan, weight, implementation=step.implementation)
        fused = merge.merge_mean(plan, step.x, weight, implementation=step.implementation)
        size = merge.merge_sum(plan, step.size, implementation=step.implementation)
        if not self.one_step_ahead:
            return Reduced(fused, size, plan)
        return Reduced(fused, size, plan, fuse_attention(plan, step.weights, weight, norm, step.implementation))
