"""Choosing `r` for a budget: GFLOPs per image, or a speed-up over r = 0 measured here.

    choice = choose_r(model, variables, target_gflops=2.5)
    logits = model.apply(variables, images, r=choice.r)

Candidates are `(r, inflection)` schedules, constant (inflection 0) and decreasing
(-1) by default. For each shape the smallest `r` that meets the target is found by
bisection (`schedules.smallest_fitting_r`, as `schedules.schedule_for_token_budget` does for
a token budget: cost falls as `r` grows); the shape that merges fewer tokens in all
wins, the first listed on a tie.
"""

from __future__ import annotations

import statistics
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from tome_jax import measure, schedules
from tome_jax.vit import ViT, require_vit


class RChoice(NamedTuple):
    """A schedule chosen for a budget and what it achieved.

    Attributes:
      r: the spec to pass as `r`: an int (constant) or an `(r, inflection)` pair.
      schedule: the tokens each layer merges, after the clamp.
      merged_tokens: tokens merged away over the whole network.
      gflops: GFLOPs per image, from XLA's cost analysis of the lowered forward.
      speedup: images/s over r = 0, measured; None for a GFLOPs target.
    """

    r: schedules.RSpec
    schedule: tuple[int, ...]
    merged_tokens: int
    gflops: float
    speedup: float | None


def gflops_per_image(
    model: ViT, variables, r: schedules.RSpec, *, batch_size: int = 1, prop_attn: bool | None = None
) -> float:
    """XLA's FLOP count of one forward, per image, without compiling.

    The lowered program's count is close to the compiled one's
    (`measure.compile_predict`), without the compilation.
    """
    images = jax.ShapeDtypeStruct((batch_size, *require_vit(model, "gflops_per_image").input_shape), jnp.float32)
    lowered = jax.jit(lambda v, x: model.apply(v, x, r=r, prop_attn=prop_attn)).lower(variables, images)
    return measure.gflops_of(lowered, batch_size)


def _measured_speedup(model, variables, images, runs, prop_attn) -> Callable[[tuple], float]:
    """schedule -> images/s over r = 0, timed alternately with r = 0 on `images`."""
    baseline, _ = measure.compile_predict(model, 0, variables, images[0], prop_attn=prop_attn)

    def speedup(schedule):
        if not any(schedule):
            return 1.0  # r = 0 itself
        predict, _ = measure.compile_predict(model, list(schedule), variables, images[0], prop_attn=prop_attn)
        times = measure.interleaved_times(
            {
                "r=0": measure.jax_call(baseline, variables, images),
                "schedule": measure.jax_call(predict, variables, images),
            },
            rounds=runs,
        )
        return statistics.median(times["r=0"]) / statistics.median(times["schedule"])

    return speedup


def _cached(function: Callable[[tuple], float]) -> Callable[[tuple], float]:
    """`function` evaluated once per schedule: many `r` clamp to the same one."""
    values = {}

    def cached(schedule):
        if schedule not in values:
            values[schedule] = function(schedule)
        return values[schedule]

    return cached


def choose_r(
    model: ViT,
    variables,
    *,
    target_gflops: float | None = None,
    target_speedup: float | None = None,
    batch_size: int = 16,
    inflections: Sequence[float] = (0, -1),
    images: Sequence[jax.Array] | None = None,
    timing_runs: int = 5,
    prop_attn: bool | None = None,
) -> RChoice:
    """The schedule with the fewest merged tokens that meets one target.

    Args:
      model, variables: the ViT and its parameters (shapes suffice for GFLOPs).
      target_gflops: at most this many GFLOPs per image (XLA's cost analysis; the
        merge implementation's own FLOPs count, as they run).
      target_speedup: at least this many times the images/s of r = 0, measured on
        the default device at `batch_size`: each schedule tried is compiled and
        timed (`timing_runs` rounds, alternating with r = 0). Bisection bounds
        the tries to about log2 of `schedules.most_merging_r` per inflection (8 to 11
        for ViT-B/16), each a compilation.
      batch_size: the batch the costs are taken at.
      inflections: the schedule shapes to consider (see `schedules.parse_r`).
      images: batches for timing, [batch_size, *model.input_shape]; None: random.
      prop_attn: as in `ViT.__call__`.

    Raises:
      TypeError: a model other than a (Linen) `tome_jax.ViT`, such as an NNX module.
      ValueError: not exactly one target, or a target that even the most merging
        schedule misses (the message gives the best reached).
    """
    require_vit(model, "choose_r")
    if (target_gflops is None) == (target_speedup is None):
        raise ValueError("give exactly one of target_gflops and target_speedup")
    # Schedules go in as lists: a per-layer tuple of two would read as (r, inflection).
    gflops = _cached(lambda s: gflops_per_image(model, variables, list(s), batch_size=batch_size, prop_attn=prop_attn))
    if target_gflops is not None:
        meets = lambda s: gflops(s) <= target_gflops  # noqa: E731
        speedup = None
    else:
        if images is None:
            keys = jax.random.split(jax.random.key(0), 3)
            images = [jax.random.normal(k, (batch_size, *model.input_shape)) for k in keys]
        speedup = _cached(_measured_speedup(model, variables, images, timing_runs, prop_attn))
        meets = lambda s: speedup(s) >= target_speedup  # noqa: E731

    choices, best_reached = [], []
    for inflection in inflections:
        choice, reached = _choose_with_inflection(model, inflection, meets, gflops, speedup)
        if choice is None:
            best_reached.append((inflection, reached))
        else:
            choices.append(choice)
    if not choices:
        target = f"{target_gflops} GFLOPs per image" if speedup is None else f"a {target_speedup}x speed-up"
        reached = ", ".join(f"{value:.4g} with inflection {f}" for f, value in best_reached)
        raise ValueError(f"{target} is out of reach at batch {batch_size}: the most merging schedules give {reached}")
    return min(choices, key=lambda choice: choice.merged_tokens)


def _choose_with_inflection(
    model: ViT, inflection: float, meets, gflops, speedup
) -> tuple[RChoice | None, float | None]:
    """The smallest `(r, inflection)` that `meets` the target, by bisection, and else None and the
    cost (GFLOPs, or the speed-up when `speedup` is given) the most merging schedule reaches."""
    def schedule(r):
        return model.effective_schedule((r, inflection))

    limit = schedules.most_merging_r(model.num_tokens, model.depth, inflection)
    r = schedules.smallest_fitting_r(lambda r: meets(schedule(r)), limit)
    if r is None:
        return None, gflops(schedule(limit)) if speedup is None else speedup(schedule(limit))
    chosen = schedule(r)
    choice = RChoice(
        r=r if inflection == 0 else (r, inflection),
        schedule=chosen,
        merged_tokens=sum(chosen),
        gflops=gflops(chosen),
        speedup=None if speedup is None else speedup(chosen),
    )
    return choice, None


def choose_r_near_gflops(
    model: ViT,
    variables,
    target_gflops: float,
    *,
    tolerance: float = 0.03,
    batch_size: int = 16,
    inflections: Sequence[float] = (0, -0.5, -1),
    prop_attn: bool | None = None,
) -> RChoice:
    """The schedule closest to `target_gflops` from below `target_gflops * (1 + tolerance)`.

    For comparing methods at one FLOPs budget, each method's `r` being its own knob.
    `choose_r`'s bisection runs once per schedule shape; of the shapes' picks the
    one with the most GFLOPs wins (not the fewest merged tokens, as in `choose_r`:
    a decreasing schedule removes more FLOPs per merged token than a constant
    one). The result can still fall below `target_gflops * (1 - tolerance)` where
    one more token per layer costs more than the window (check `choice.gflops`).

    Raises:
      ValueError: a bad tolerance, or a target that no shape reaches.
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    choices, misses = [], []
    for inflection in inflections:
        try:
            choices.append(choose_r(
                model, variables, target_gflops=target_gflops * (1 + tolerance), batch_size=batch_size,
                inflections=(inflection,), prop_attn=prop_attn,
            ))  # fmt: skip
        except ValueError as error:
            misses.append(str(error))
    if not choices:
        raise ValueError("; ".join(misses))
    return max(choices, key=lambda choice: choice.gflops)


def config_targets(
    model: ViT, variables, config, *, batch_size: int, images: Sequence[jax.Array] | None = None
) -> list[tuple[schedules.RSpec, str]]:
    """The `r` chosen for a config's `target_gflops` and `target_speedup` (absent or
    None: no target), each with its target as text, e.g. `(5, -1), "target_gflops=2.5"`."""
    chosen = []
    for key in ("target_gflops", "target_speedup"):
        target = config.get(key)
        if target is not None:
            choice = choose_r(
                model, variables, batch_size=batch_size, images=images,
                prop_attn=config.get("prop_attn"), **{key: target},
            )
            chosen.append((choice.r, f"{key}={target}"))
    return chosen
