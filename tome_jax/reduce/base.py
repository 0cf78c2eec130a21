"""What every token-reduction method shares: the step a block hands it, what it returns.

A method is a frozen dataclass of its static settings (hashable, so it can be a
`ViT` attribute and part of a jit-static model), subclassing `Reduction`. Its
class attributes tell the block what to compute for it and where to call it;
`__call__` takes one `Step` and returns a `Reduced`. The work itself is done by
the method module's pure functions: a plan from the step's metric or scores,
then the plan applied to every per-token array (`tome_jax.merge`).

Every method removes exactly `step.r` tokens (static), so shapes are known at
trace time; `r` is already clamped to half the tokens after the prefix.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax

from tome_jax import merge

# Where in the block a method runs (`Reduction.position`).
AFTER_ATTENTION = "after_attention"  # between attention and MLP, as ToMe
BEFORE_ATTENTION = "before_attention"  # on the block's input, before its attention (MCTF)
AFTER_MLP = "after_mlp"  # on the block's output (DCT)
POSITIONS = (AFTER_ATTENTION, BEFORE_ATTENTION, AFTER_MLP)


class Step(NamedTuple):
    """One block's reduction step: what the block hands its method.

    Attributes:
      x: [batch, tokens, width] the tokens at the method's position.
      size: [batch, tokens] input tokens (patches) each token holds.
      metric: [batch, tokens, channels] the keys' mean over heads (DTEM: its
        learned metric); None before attention, where there are no keys yet.
      r: tokens to remove, a static int, already clamped and > 0.
      num_prefix_tokens: leading tokens (class, distillation) that stay first, unmerged.
      layer: the block's index; num_layers: the model's depth.
      weights: [batch, heads, tokens, tokens] the block's attention weights
        (softmax, with the size bias under proportional attention), only for a
        method with `needs_weights`; else None.
      rng: a PRNG key, only for a method with `needs_rng` and only when the
        caller passed one (`rngs={"reduction": key}`); else None.
      implementation: how plans are applied (`merge.merge_sum`); None: the default.
    """

    x: jax.Array
    size: jax.Array
    metric: jax.Array | None
    r: int
    num_prefix_tokens: int
    layer: int
    num_layers: int
    weights: jax.Array | None = None
    rng: jax.Array | None = None
    implementation: str | None = None


class Reduced(NamedTuple):
    """A method's result.

    Attributes:
      x: [batch, tokens - r, width].
      size: [batch, tokens - r].
      plan: where each input token went (source tracking follows it), or None
        for a method that mixes tokens (`Reduction.tracks_sources` False).
      weights: [batch, heads, tokens - r, tokens - r] attention weights the block
        must attend with instead of computing its own (MCTF's one-step-ahead
        attention; only from a `BEFORE_ATTENTION` method), or None.
    """

    x: jax.Array
    size: jax.Array
    plan: merge.MergePlan | None
    weights: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Reduction:
    """Base of the token-reduction methods; subclasses add their settings as fields.

    Class attributes (what the block must provide, and defaults from the
    method's own code):
      name: the method's name on the command line (`--config.method=`).
      position: where the block calls it, one of `POSITIONS`.
      needs_weights: the block materialises its attention weights for it.
      needs_rng: the method draws random numbers.
      tracks_sources: its plans say which token holds each patch (pictures).
      prop_attn: proportional attention when the caller does not say
        (`ViT.__call__(prop_attn=None)`): what the method's authors run.
    """

    name: ClassVar[str] = ""
    position: ClassVar[str] = AFTER_ATTENTION
    needs_weights: ClassVar[bool] = False
    needs_rng: ClassVar[bool] = False
    tracks_sources: ClassVar[bool] = True
    prop_attn: ClassVar[bool] = True

    def max_r(self, tokens: int, num_prefix_tokens: int) -> int:
        """The most tokens one step may remove (a larger `r` is clamped): half those after the prefix."""
        return merge.max_r(tokens, num_prefix_tokens)

    def __call__(self, step: Step) -> Reduced:
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")


def class_attention(step: Step) -> jax.Array:
    """[batch, tokens - prefix]: the class token's attention to each other token, mean over heads.

    EViT's and DiffRate's importance score (the class token is token 0).
    """
    if step.num_prefix_tokens < 1:
        raise ValueError("ranking tokens by class attention needs a class token; this model has none")
    return step.weights[:, :, 0, step.num_prefix_tokens :].mean(axis=1)


def check_tracks_sources(method: Reduction | None) -> None:
    """Raises for a method whose tokens hold no patches of their own (DCT mixes them all)."""
    if method is not None and not method.tracks_sources:
        raise ValueError(
            f"{type(method).__name__} mixes tokens, so no token holds a patch: "
            "it has no sources to trace or draw"
        )
