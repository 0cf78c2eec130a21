"""ToFu (Kim et al., WACV 2024): prune in early layers, merge norm-preservingly (MLERP) in late ones.

Both use ToMe's bipartite matching on the keys. Early layers, where the model
responds far from linearly to averaged inputs, drop the matched A tokens
instead of merging them; late layers merge them with MLERP: the plain mean of a
group's tokens, rescaled to the largest norm in the group, so merging does not
shrink the features as averaging does.

As in the public implementations (OpenToMe's, PiToMe's baseline), the merge is
unweighted and proportional attention is off; the sizes are still kept, so
average pooling counts patches.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from tome_jax import merge
from tome_jax.reduce.base import Reduced, Reduction, Step, setting


def without_merges(plan: merge.MergePlan) -> merge.MergePlan:
    """The same matching, pruning instead of merging: merged tokens are dropped."""
    tokens = jnp.arange(plan.tokens_in, dtype=jnp.int32)
    starts_slot = jnp.take_along_axis(plan.kept, jnp.maximum(plan.dest, 0), axis=1) == tokens
    return merge.MergePlan(
        dest=jnp.where(starts_slot, plan.dest, merge.DROPPED), kept=plan.kept, merged=plan.merged[:, :0]
    )


def mlerp(plan: merge.MergePlan, x: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """MLERP merge: each group's mean direction at the group's largest norm.

    Args:
      x: [batch, tokens_in, channels]. Returns [batch, tokens_out, channels].
    """
    x32 = x.astype(jnp.float32)
    mean = merge.merge_mean(plan, x32, jnp.ones(x.shape[:2]), implementation=implementation)
    largest_norm = merge.merge_max(plan, jnp.linalg.norm(x32, axis=-1))
    return (merge.unit_vectors(mean) * largest_norm[..., None]).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class ToFu(Reduction):
    """ToFu off the shelf: bipartite matching, pruning up to `merge_after` of the depth, MLERP after.

    Settings:
      merge_after: layers past this share of the depth merge (MLERP), the
        others prune; 0.5 is the authors' `layer > depth // 2`.
    """

    name: ClassVar[str] = "tofu"
    prop_attn: ClassVar[bool] = False
    merge_after: float = setting(0.5, low=0, high=1)  # a share of the depth

    def __call__(self, step: Step) -> Reduced:
        plan = merge.bipartite_soft_merge(step.metric, step.r, num_prefix_tokens=step.num_prefix_tokens)
        if step.layer > self.merge_after * step.num_layers:
            x = mlerp(plan, step.x, implementation=step.implementation)
            return Reduced(x, merge.merge_sum(plan, step.size, implementation=step.implementation), plan)
        plan = without_merges(plan)  # the kept tokens as they are
        x, size = merge.merge_wavg(plan, step.x, step.size, implementation=step.implementation)
        return Reduced(x, size, plan)
