"""ToMe (Bolya et al., ICLR 2023) as a reduction method: the default of every ViT."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from tome_jax import merge
from tome_jax.reduce.base import Reduced, Reduction, Step


def bipartite_plan(metric: jax.Array, r: int, num_prefix_tokens: int) -> merge.MergePlan:
    """ToMe's bipartite soft matching with the prefix tokens protected (ToMe, ToFu)."""
    return merge.bipartite_soft_merge(
        metric, r, class_token=num_prefix_tokens >= 1, distill_token=num_prefix_tokens >= 2
    )


@dataclasses.dataclass(frozen=True)
class ToMe(Reduction):
    """Bipartite soft matching on the metric (the keys' mean), then the size-weighted merge."""

    name: ClassVar[str] = "tome"

    def __call__(self, step: Step) -> Reduced:
        plan = bipartite_plan(step.metric, step.r, step.num_prefix_tokens)
        x, size = merge.merge_wavg(plan, step.x, step.size, implementation=step.implementation)
        return Reduced(x, size, plan)
