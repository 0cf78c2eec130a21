"""Pruning baselines: EViT's top-k by class attention (inattentive tokens fused) and random drop.

Both remove `r` tokens between attention and MLP and keep the prefix tokens
first. A pruned token goes to no slot (`merge.DROPPED`): its patches leave the
sizes and the pictures.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from tome_jax import merge
from tome_jax.reduce.base import Reduced, Reduction, Step, class_attention, setting


def prefix_first(dest_rest: jax.Array, num_prefix_tokens: int) -> jax.Array:
    """[batch, tokens - prefix] slots of the other tokens -> [batch, tokens], prefix token i in slot i."""
    batch = dest_rest.shape[0]
    prefix = jnp.broadcast_to(jnp.arange(num_prefix_tokens, dtype=jnp.int32), (batch, num_prefix_tokens))
    return jnp.concatenate([prefix, dest_rest.astype(jnp.int32)], axis=1)


def random_drop_plan(draws: jax.Array, r: int, num_prefix_tokens: int) -> merge.MergePlan:
    """Drops the `r` tokens with the largest draws; the rest keep their order.

    Args:
      draws: [batch, tokens - prefix] random numbers, one per non-prefix token.
    """
    dropped = merge.descending_rank(draws) < r
    slot = num_prefix_tokens + merge.count_before(~dropped)
    dest = prefix_first(jnp.where(dropped, merge.DROPPED, slot), num_prefix_tokens)
    return merge.plan_from_dest(dest, dest.shape[1] - r, 0)


def topk_plan(score: jax.Array, r: int, num_prefix_tokens: int, *, fuse: bool) -> merge.MergePlan:
    """EViT's selection: the highest-scoring tokens stay, in descending score order (ties by position).

    Args:
      score: [batch, tokens - prefix] importance (the class attention).
      r: tokens removed. Without `fuse` the `r` lowest-scoring tokens are pruned;
        with it the `r + 1` lowest go to one last slot, so `r` go all the same.
    """
    rest = score.shape[1]
    kept = rest - r - int(fuse)
    rank = merge.descending_rank(score)
    leftover = num_prefix_tokens + kept if fuse else merge.DROPPED
    dest = prefix_first(jnp.where(rank < kept, num_prefix_tokens + rank, leftover), num_prefix_tokens)
    return merge.plan_from_dest(dest, num_prefix_tokens + rest - r, r if fuse else 0)


@dataclasses.dataclass(frozen=True)
class EViT(Reduction):
    """EViT (Liang et al., ICLR 2022): keep the tokens the class token attends to most.

    The class token's attention to each token (mean over heads) ranks them; the
    top ones stay, ordered by that attention, and the rest are either pruned or,
    with `fuse` (EViT's inattentive token fusion), summed into one last token
    weighted by their attention (a weighted sum, as in EViT, not an average).
    The fused token's size is the patches it holds; proportional attention is off
    by default, as in EViT.

    Settings:
      fuse: fuse the inattentive tokens into one (EViT's choice) or drop them.
    """

    name: ClassVar[str] = "evit"
    needs_weights: ClassVar[bool] = True
    prop_attn: ClassVar[bool] = False
    fuse: bool = True

    def __call__(self, step: Step) -> Reduced:
        score = class_attention(step)
        plan = topk_plan(score, step.r, step.num_prefix_tokens, fuse=self.fuse)
        fused = plan.dest[:, step.num_prefix_tokens :] == plan.tokens_out - 1
        weight = jnp.where(fused & self.fuse, score, 1.0)
        weight = jnp.concatenate([jnp.ones_like(step.size[:, : step.num_prefix_tokens]), weight], axis=1)
        x = merge.merge_sum(plan, step.x.astype(jnp.float32) * weight[..., None], implementation=step.implementation)
        size = merge.merge_sum(plan, step.size, implementation=step.implementation)
        return Reduced(x.astype(step.x.dtype), size, plan)


@dataclasses.dataclass(frozen=True)
class RandomDrop(Reduction):
    """Drops `r` tokens drawn uniformly at random (never a prefix token); the rest keep their order.

    Draws from the caller's `rngs={"reduction": key}` when given, else from
    `seed` and the layer index (then the same draws on every call).

    Settings:
      seed: the fallback key's seed.
    """

    name: ClassVar[str] = "random_drop"
    needs_rng: ClassVar[bool] = True
    seed: int = setting(0, low=0)  # jax.random.key's

    def __call__(self, step: Step) -> Reduced:
        rng = step.rng if step.rng is not None else jax.random.fold_in(jax.random.key(self.seed), step.layer)
        batch, tokens = step.size.shape
        draws = jax.random.uniform(rng, (batch, tokens - step.num_prefix_tokens))
        plan = random_drop_plan(draws, step.r, step.num_prefix_tokens)
        x, size = merge.merge_wavg(plan, step.x, step.size, implementation=step.implementation)
        return Reduced(x, size, plan)
