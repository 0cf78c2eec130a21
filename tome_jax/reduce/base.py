"""What every token-reduction method shares: the step a block hands it, what it returns.

A method is a frozen dataclass of its static settings (hashable, so it can be a
`ViT` attribute and part of a jit-static model), subclassing `Reduction`. Its
class attributes tell the block what to compute for it and where to call it;
`__call__` takes one `Step` and returns a `Reduced`. The work itself is done by
the method module's pure functions: a plan from the step's metric or scores,
then the plan applied to every per-token array (`tome_jax.merge`).

Every method removes exactly `step.r` tokens (static), so shapes are known at
trace time; `r` is already clamped to the method's `max_r` (half the tokens
after the prefix for most). The two that train something keep every token
instead: DTEM's soft merge fades merged tokens out, DiffRate's search masks them.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import typing
from typing import Any, Callable, ClassVar, NamedTuple

import jax

from tome_jax import merge
from tome_jax.tokens import Tokens

# Where in the block a method runs (`Reduction.position`).
AFTER_ATTENTION = "after_attention"  # between attention and MLP, as ToMe
BEFORE_ATTENTION = "before_attention"  # on the block's input, before its attention (MCTF)
AFTER_MLP = "after_mlp"  # on the block's output (DCT)
POSITIONS = (AFTER_ATTENTION, BEFORE_ATTENTION, AFTER_MLP)


class Valid(NamedTuple):
    """The values a method's setting may take: numbers from `low` to `high` (both included,
    `low` excluded when `open_low`), or one of `choices`; None: no bound."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple = ()

    def admits(self, value) -> bool:
        if self.choices:
            return value in self.choices
        above = self.low is None or value > self.low or (value == self.low and not self.open_low)
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(choice) for choice in self.choices)
        low = f"{'>' if self.open_low else '>='} {self.low}" if self.low is not None else ""
        if self.high is None:
            return low
        if self.low is None:
            return f"<= {self.high}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}]"


def setting(default, **valid) -> Any:
    """A method's setting (a dataclass field) with the values it may take (`Valid(**valid)`),
    which every construction of the method checks (`check_settings`)."""
    return dataclasses.field(default=default, metadata={"valid": Valid(**valid)})


class Step(NamedTuple):
    """One block's reduction step: what the block hands its method.

    Attributes:
      tokens: the tokens at the method's position (`x`, `size`, `state` read through).
      metric: [batch, tokens, channels] the merge metric: the keys' mean over
        heads, or what the method's `metric` made of it (DTEM's learned one);
        None before attention, where there are no keys yet.
      r: tokens to remove, a static int, already clamped.
      num_prefix_tokens: leading tokens (class, distillation, registers) that stay first, unmerged.
      layer: the block's index; num_layers: the model's depth.
      weights: [batch, heads, tokens, tokens] the block's attention weights
        (softmax, with the size bias under proportional attention, then the
        method's `adjust_weights`), only for a method with `needs_weights`; else None.
      rng: a PRNG key, only for a method with `needs_rng` and only when the
        caller passed one (`rngs={"reduction": key}`); else None.
      implementation: how plans are applied (`merge.merge_sum`); None: the default.
      train: whether the model is applied for training (`ViT.__call__(train=)`).
      block: the Flax block the step runs in, where a method with parameters
        of its own creates them (`block.param(...)`, `block.dense(...)`).
    """

    tokens: Tokens
    metric: jax.Array | None
    r: int
    num_prefix_tokens: int
    layer: int
    num_layers: int
    weights: jax.Array | None = None
    rng: jax.Array | None = None
    implementation: str | None = None
    train: bool = False
    block: Any = None

    @property
    def x(self) -> jax.Array:
        """[batch, tokens, width]."""
        return self.tokens.x

    @property
    def size(self) -> jax.Array:
        """[batch, tokens]."""
        return self.tokens.size

    @property
    def state(self) -> Any:
        """The method's state from the previous block (`Reduction.start` made the first)."""
        return self.tokens.state


class Reduced(NamedTuple):
    """A method's result. Every other per-token field follows `plan` (`tome_jax.tokens`).

    Attributes:
      x: [batch, tokens', width] (tokens' = tokens - r, or tokens for a step that keeps them all).
      size: [batch, tokens'].
      plan: where each input token went (`merge.MergePlan`; DTEM's soft merge
        gives a `dtem.SoftPlan`), or None for a method that mixes tokens
        (`Reduction.tracks_sources` False) or keeps them all masked.
      weights: [batch, heads, tokens', tokens'] attention weights the block
        must attend with instead of computing its own (MCTF's one-step-ahead
        attention; only from a `BEFORE_ATTENTION` method), or None.
      state: the method's state for the next block (None for a method without one).
    """

    x: jax.Array
    size: jax.Array
    plan: Any
    weights: jax.Array | None = None
    state: Any = None


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

    A method implements `__call__` (one block's step); the other methods have
    defaults that a method with more to it overrides: parameters of its own
    (`metric`, or `step.block`), state from block to block (`start`), an
    attention it reshapes (`adjust_weights`), a step at every block whatever
    `r` (`acts`), a loss (`finish`), files a training run leaves (`outputs`).
    """

    name: ClassVar[str] = ""
    position: ClassVar[str] = AFTER_ATTENTION
    needs_weights: ClassVar[bool] = False
    needs_rng: ClassVar[bool] = False
    tracks_sources: ClassVar[bool] = True
    prop_attn: ClassVar[bool] = True

    def __post_init__(self):
        check_settings(type(self), self.settings)

    @property
    def settings(self) -> dict[str, Any]:
        """{setting: value}, in the order the method declares them."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def check_depth(self, depth: int) -> None:
        """Raises ValueError when a per-block setting does not give one value per block of a `depth`-block model."""

    def max_r(self, tokens: int, num_prefix_tokens: int) -> int:
        """The most tokens one step may remove (a larger `r` is clamped): half those after the prefix."""
        return merge.max_r(tokens, num_prefix_tokens)

    def acts(self, r: int) -> bool:
        """Whether a block whose (clamped) `r` is this runs the step at all."""
        return r > 0

    def start(self, tokens: Tokens, model, train: bool) -> Tokens:
        """The tokens entering the first block, given the model (`tome_jax.ViT`); adds the method's state."""
        return tokens

    def metric(self, keys: jax.Array | None, normed: jax.Array, block) -> jax.Array | None:
        """The merge metric: by default the keys' mean over heads [batch, tokens, head_dim].

        Called in every block, whatever `r`, so parameters made here exist in each.
        `normed` is the attention's input, the block's normalised tokens.
        """
        return keys

    def adjust_weights(self, weights: jax.Array, tokens: Tokens) -> jax.Array:
        """The attention weights the block attends with, from its own (for a method with `needs_weights`)."""
        return weights

    def finish(self, tokens: Tokens, model) -> None:
        """After the last block, given the model (`tome_jax.ViT`, inside its apply): sows a loss if any."""

    def outputs(self, model, params, gflops: Callable[[Reduction, Any], float]) -> dict[str, bytes]:
        """Files a training run writes to its workdir at the end: {file name: contents}.

        `gflops(method, r)` is XLA's GFLOPs per image of `model` run with
        `method` at `r`, as eval.py reports them.
        """
        return {}

    def __call__(self, step: Step) -> Reduced:
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")


@functools.lru_cache(maxsize=None)
def _setting_types(method: type[Reduction]) -> dict[str, Any]:
    return typing.get_type_hints(method)


def _has_type(kind, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if typing.get_origin(kind) is tuple:  # tuple[int, ...]: one value per block
        return isinstance(value, (tuple, list)) and all(_has_type(typing.get_args(kind)[0], v) for v in value)
    return isinstance(value, kind)


def _type_name(kind) -> str:
    if typing.get_origin(kind) is tuple:  # tuple[int, ...]
        return f"a list of {typing.get_args(kind)[0].__name__}s"
    return {bool: "True or False", int: "an int", float: "a number", str: "a string"}.get(kind, kind.__name__)


def check_settings(method: type[Reduction], settings: dict[str, Any], prefix: str = "") -> None:
    """Raises ValueError, one line naming `<prefix><method name>.<setting>`, the value and what
    it may be, for a setting `method` does not have, of the wrong type, or out of its range
    (each method declares its settings' ranges beside them, `setting(default, low=, ...)`)."""
    fields = {field.name: field for field in dataclasses.fields(method)}
    types = _setting_types(method)
    for key, value in settings.items():
        where = f"{prefix}{method.name}.{key}"
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ValueError(f"{where}: {method.name} has no setting {key}; its settings: {known}")
        kind, valid = types[key], fields[key].metadata.get("valid", Valid())
        if not _has_type(kind, value):
            raise ValueError(f"{where}={value!r}: must be {_type_name(kind)}")
        listed = isinstance(value, (tuple, list))
        for item in value if listed else (value,):
            if not valid.admits(item):
                each = f"each value must be {valid}, got {item!r}" if listed else f"must be {valid}"
                raise ValueError(f"{where}={value!r}: {each}")


def class_attention(step: Step) -> jax.Array:
    """[batch, tokens - prefix]: the class token's attention to each other token, mean over heads.

    EViT's and DiffRate's importance score (the class token is token 0).
    """
    if step.num_prefix_tokens < 1:
        raise ValueError("ranking tokens by class attention needs a class token; this model has none")
    return step.weights[:, :, 0, step.num_prefix_tokens :].mean(axis=1)


def check_method(method) -> Reduction:
    """`method`, if it is a reduction method a block can run; else an error that says what is."""
    if not isinstance(method, Reduction):
        raise TypeError(f"reduction must be a tome_jax.reduce method (e.g. reduce.PiToMe()), got {method!r}")
    if method.position not in POSITIONS:
        raise ValueError(f"{type(method).__name__}.position must be one of {POSITIONS}")
    return method


def check_tracks_sources(method: Reduction | None) -> None:
    """Raises for a method whose tokens hold no patches of their own (DCT mixes them all)."""
    if method is not None and not method.tracks_sources:
        raise ValueError(
            f"{type(method).__name__} mixes tokens, so no token holds a patch: "
            "it has no sources to trace or draw"
        )
