"""The per-token state a ViT's blocks carry, and how each quantity follows a merge.

A block takes a `Tokens` and returns one. Its reduction method decides how
the features `x` and the sizes combine and returns the plan it applied (a
`merge.MergePlan`, or DTEM's `dtem.SoftPlan`); every other per-token quantity
in `fields` then follows that plan by its own rule:

    MEAN  the size-weighted mean of the tokens that merge (as the features);
    SUM   their sum (as the sizes);
    DEST  the receiving token's own value (merged-away tokens' values are dropped);

or a function `rule(plan, value, size) -> value` of its own. Pruned tokens drop
their values under every rule. So a new quantity needs no change to any method,
and a new method none to any quantity: a method that mixes tokens without a plan
(DCT) says so, and a field cannot follow it.

A model adds fields through its `token_fields` attribute: `TokenField`s, each
naming the field, its rule and its value before the first block.

A plan offers the three rules as methods: `plan.sum(values)`, `plan.mean(values,
weights)` and `plan.receivers(values)`, each taking [batch, tokens_in, ...] and
returning [batch, tokens_out, ...].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Union

import jax
from flax import struct

MEAN = "mean"
SUM = "sum"
DEST = "dest"
RULES = (MEAN, SUM, DEST)

# A rule: one of RULES, or `rule(plan, value, size) -> value` for [batch, tokens_in, ...]
# values and [batch, tokens_in] sizes before the step.
Rule = Union[str, Callable[[Any, jax.Array, jax.Array], jax.Array]]


@struct.dataclass
class Field:
    """One per-token quantity and the rule it follows a plan by.

    Attributes:
      value: [batch, tokens, ...].
      rule: a `Rule` (static: part of the pytree's structure).
    """

    value: jax.Array
    rule: Rule = struct.field(pytree_node=False, default=MEAN)


@struct.dataclass
class Tokens:
    """The tokens between blocks.

    Attributes:
      x: [batch, tokens, width] the features.
      size: [batch, tokens] float32, the input tokens (patches, prefix tokens) each holds.
      fields: {name: Field} other per-token quantities (e.g. positions), [batch, tokens, ...].
      state: the reduction method's own state from block to block (None for
        most; DTEM's soft merge keeps its participant count, DiffRate's search
        its mask and counts).
    """

    x: jax.Array
    size: jax.Array
    fields: dict[str, Field] = struct.field(default_factory=dict)
    state: Any = None

    def follow(self, plan, x: jax.Array, size: jax.Array, *, method: str = "the reduction") -> Tokens:
        """The tokens after a step that gave `x`, `size` and `plan`: every field follows the plan.

        Raises ValueError when there are fields and no plan (`method` names the
        reduction in the message).
        """
        if self.fields and plan is None:
            raise ValueError(
                f"{method} gives no plan of which token went where (it mixes or masks tokens), so the "
                f"per-token field(s) {', '.join(sorted(self.fields))} cannot follow it; choose another method"
            )
        fields = {
            name: field.replace(value=_apply(field.rule, plan, field.value, self.size))
            for name, field in self.fields.items()
        }
        return self.replace(x=x, size=size, fields=fields)


def _apply(rule: Rule, plan, value: jax.Array, size: jax.Array) -> jax.Array:
    if callable(rule):
        return rule(plan, value, size)
    if rule == MEAN:
        return plan.mean(value, size)
    if rule == SUM:
        return plan.sum(value)
    if rule == DEST:
        return plan.receivers(value)
    raise ValueError(f"a field's rule must be one of {RULES} or a function, got {rule!r}")


@dataclasses.dataclass(frozen=True)
class TokenField:
    """A per-token quantity a model carries through its blocks (`ViT(token_fields=...)`).

    Subclasses set `name` and `rule` and give the value before the first block.
    Frozen and hashable, so it can be a model attribute.
    """

    name: ClassVar[str] = ""
    rule: ClassVar[Rule] = MEAN

    def initial(self, model, batch: int) -> jax.Array:
        """[batch, model.num_tokens, ...] the value of each token entering the first block."""
        raise NotImplementedError(f"{type(self).__name__} does not implement initial")
