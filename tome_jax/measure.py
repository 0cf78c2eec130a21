"""Compiling and timing forward passes: XLA's FLOP count, and the project's one timing loop.

Every speed the project reports (eval.py's sweep, `choose_r`'s speed-up search,
the benchmark) comes from `interleaved_times`, so all of them time the same way.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import jax

from tome_jax import schedules
from tome_jax.vit import ViT

# (variables, images [batch, h, w, 3]) -> logits [batch, classes]
PredictFn = Callable[[Any, jax.Array], jax.Array]


def compile_predict(
    model: ViT, r: schedules.RSpec, variables, images: jax.Array, *, prop_attn: bool | None = None
) -> tuple[PredictFn, dict[str, float]]:
    """Compiles `(variables, images) -> logits` at a fixed `r` for `images`' shape.

    Returns the compiled function and its compile time and GFLOPs per image (XLA's
    cost analysis), so accuracy and timing run exactly the program that was costed.
    """
    predict = jax.jit(lambda v, x: model.apply(v, x, r=r, prop_attn=prop_attn))
    start = time.perf_counter()
    compiled = predict.lower(variables, images).compile()
    seconds = time.perf_counter() - start
    return compiled, {"gflops": gflops_of(compiled, images.shape[0]), "compile_s": seconds}


def gflops_of(stage, batch_size: int) -> float:
    """GFLOPs per image from XLA's cost analysis of a lowered or compiled program."""
    analysis = stage.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return analysis["flops"] / batch_size / 1e9


def interleaved_times(
    calls: Mapping[str, Callable[[int], Any]], *, rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each timed call, alternating the entries call by call.

    The one timing loop of the project, for every framework: `calls[name](i)` runs
    call `i` to completion (blocking on its result; `i` picks the input batch).
    Each round runs every entry once, in reverse order every other round, so
    load that drifts over the run hits all entries alike; `warmup` rounds first
    are not recorded.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds} and {warmup}")
    times = {name: [] for name in calls}
    names = list(calls)
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            calls[name](i)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def jax_call(predict: PredictFn, variables, images: Sequence[jax.Array]) -> Callable[[int], Any]:
    """Call `i` of `predict`, blocking, on batch `i` of `images` (rotated)."""
    return lambda i: jax.block_until_ready(predict(variables, images[i % len(images)]))


def throughput(
    predict: PredictFn,
    variables,
    images: Sequence[jax.Array],
    *,
    runs: int = 5,
    warmup: int = 1,
) -> dict[str, float]:
    """Images/s of a compiled `predict`: median over `runs` timed calls after `warmup`.

    `images` holds a few batches that the runs rotate through, so no result can be
    served from a cache of the same input.
    """
    times = interleaved_times({"predict": jax_call(predict, variables, images)}, rounds=runs, warmup=warmup)
    median = statistics.median(times["predict"])
    return {"images_per_s": images[0].shape[0] / median, "batch_time_s": median}
