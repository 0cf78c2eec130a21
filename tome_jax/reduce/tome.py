"""ToMe (Bolya et al., ICLR 2023) as a reduction method: the default of every ViT."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from tome_jax import merge
from tome_jax.reduce.base import Reduced, Reduction, Step


@dataclasses.dataclass(frozen=True)
class ToMe(Reduction):
    """Bipartite soft matching on the metric (the keys' mean), then the size-weighted merge."""

    name: ClassVar[str] = "tome"

    def __call__(self, step: Step) -> Reduced:
        plan = merge.bipartite_soft_merge(step.metric, step.r, num_prefix_tokens=step.num_prefix_tokens)
        x, size = merge.merge_wavg(plan, step.x, step.size, implementation=step.implementation)
        return Reduced(x, size, plan)
