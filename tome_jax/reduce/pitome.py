"""PiToMe (Tran et al., NeurIPS 2024): an energy score keeps isolated tokens from merging.

Each token's energy is its mean `elu(cos - margin)` similarity to all tokens
(itself included): tokens in large clusters of similar tokens score high and
merge, isolated ones (small objects, details) score low and stay. The margin
falls with depth, `margin * (1 - layer / depth)`, as in the authors' code.

Two matchings, as the authors run them off the shelf: in the first half of the
layers, tokens sorted by energy alternate into sets A and B and ToMe's
bipartite matching merges the `r` best A tokens; in the later half, only the `2r`
highest-energy tokens take part, alternating into A and B, and every A token
merges into its most similar B token.

Output order (the next layer's split depends on it): the prefix tokens, then
the unmerged tokens (first half: the unmerged A tokens by best score; later
half: the tokens outside the top 2r, by energy), then the B tokens in energy order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from tome_jax import merge
from tome_jax.reduce.base import Reduced, Reduction, Step, setting


def energy_score(unit: jax.Array, margin: float, alpha: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """[batch, n, c] unit vectors -> (energy [batch, n], cosine similarities [batch, n, n])."""
    similarity = merge.cosine_scores(unit, unit)
    return jax.nn.elu(similarity - margin, alpha).mean(axis=-1), similarity


def pitome_plan(
    metric: jax.Array,
    r: int,
    num_prefix_tokens: int,
    *,
    margin: float,
    alpha: float = 1.0,
    bipartite: bool,
) -> merge.MergePlan:
    """PiToMe's merge of `r` tokens, the prefix tokens aside.

    Args:
      metric: [batch, tokens, channels] the keys' mean over heads.
      margin: this layer's margin; alpha: the ELU's.
      bipartite: the first-half matching (ToMe's over energy-sorted A and B);
        else the later-half one (the top 2r tokens pair off).

    Returns:
      A plan from `tokens` to `tokens - r`.
    """
    p = num_prefix_tokens
    unit = merge.unit_vectors(jax.lax.stop_gradient(metric[:, p:]))
    energy, similarity = energy_score(unit, margin, alpha)
    batch, n = energy.shape
    energy_rank = merge.descending_rank(energy)  # [batch, n]: each token's place by energy
    by_energy = merge.position_of(energy_rank, jnp.arange(n, dtype=jnp.int32))  # token at each place
    if bipartite:
        a, b = by_energy[:, 0::2], by_energy[:, 1::2]
    else:
        a, b = by_energy[:, 0 : 2 * r : 2], by_energy[:, 1 : 2 * r : 2]
    scores = jnp.take_along_axis(jnp.take_along_axis(similarity, a[:, :, None], axis=1), b[:, None, :], axis=2)
    partner = scores.argmax(axis=-1).astype(jnp.int32)  # [batch, num_a]
    num_a, num_b = a.shape[1], b.shape[1]
    half = energy_rank // 2  # index within A (even places) or B (odd places)
    if bipartite:
        a_rank = merge.descending_rank(scores.max(axis=-1))
        b_slot = p + num_a - r + jnp.arange(num_b, dtype=jnp.int32)
        a_slot = jnp.where(a_rank < r, b_slot[partner], p + a_rank - r)
        slot_of = lambda table, i: jnp.take_along_axis(table, jnp.minimum(i, table.shape[1] - 1), axis=1)  # noqa: E731
        rest = jnp.where(
            energy_rank % 2 == 0, slot_of(a_slot, half), slot_of(jnp.broadcast_to(b_slot, (batch, num_b)), half)
        )
    else:
        b_start = p + n - 2 * r
        into = b_start + jnp.take_along_axis(partner, jnp.minimum(half, r - 1), axis=1)
        rest = jnp.where(
            energy_rank >= 2 * r,
            p + energy_rank - 2 * r,
            jnp.where(energy_rank % 2 == 1, b_start + half, into),
        )
    prefix = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (batch, p))
    dest = jnp.concatenate([prefix, rest.astype(jnp.int32)], axis=1)
    return merge.plan_from_dest(dest, p + n - r, r)


@dataclasses.dataclass(frozen=True)
class PiToMe(Reduction):
    """PiToMe's training-free setting: energy-protected merging on the keys, size-weighted.

    Proportional attention is off by default: the authors' code computes the
    sizes but never hands them to attention.

    Settings:
      margin: the first layer's margin; layer `i` of `depth` uses
        `margin * (1 - i / depth)` (0.75 in the authors' code).
      alpha: the ELU's alpha in the energy score (1.0).
      bipartite_share: the share of the layers, from the first, that use the
        bipartite matching (0.5; the authors take `ceil(0.5 * depth)`).
    """

    name: ClassVar[str] = "pitome"
    prop_attn: ClassVar[bool] = False
    margin: float = setting(0.75, low=-1, high=1)  # a cosine similarity
    alpha: float = setting(1.0, low=0)
    bipartite_share: float = setting(0.5, low=0, high=1)  # a share of the layers

    def __call__(self, step: Step) -> Reduced:
        plan = pitome_plan(
            step.metric,
            step.r,
            step.num_prefix_tokens,
            margin=self.margin * (1 - step.layer / step.num_layers),
            alpha=self.alpha,
            bipartite=step.layer < math.ceil(step.num_layers * self.bipartite_share),
        )
        x, size = merge.merge_wavg(plan, step.x, step.size, implementation=step.implementation)
        return Reduced(x, size, plan)
