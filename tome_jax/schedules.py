"""Merge schedules: how many tokens each block merges.

Users write `r` as one int for every layer, an `(r, inflection)` pair or a list
with one int per layer (`parse_r`); a block can merge at most half of its
unprotected tokens, so the schedule a model really runs depends on its token
count (`effective_schedule`, `tokens_per_layer`). On the command line and in
configs the same specs are text (`parse_r_values`, `r_label`).
"""

from __future__ import annotations

import ast
import math
import numbers
from typing import Callable, Sequence, Union

import numpy as np

from tome_jax.merge import clamp_r

# An `r` as users write it: one int for every layer, an `(r, inflection)` pair,
# or one int per layer.
RSpec = Union[int, tuple[int, float], Sequence[int]]


def parse_r(num_layers: int, r: RSpec) -> tuple[int, ...]:
    """Expands an `r` spec into one int per layer.

    Accepted forms (those of the official `parse_r`):
      * int: the same `r` for every layer;
      * `(r, inflection)` pair (a tuple of length 2), inflection in [-1, 1]: layer
        `i` gets `int(lo + (hi - lo) / (num_layers - 1) * i)` with
        `lo = int(r * (1 - inflection))` and `hi = 2 * r - lo`; `(r, -1)` is the
        paper's decreasing schedule, `(r, 0)` is constant;
      * list (or a tuple of another length) of per-layer ints, padded with zeros.
        A per-layer schedule of exactly two layers must be a list.

    Returns a tuple, hashable, so it can be a static argument of `jax.jit`.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral):
        raise TypeError(f"num_layers must be an int, got {num_layers!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if isinstance(r, numbers.Integral) and not isinstance(r, bool):
        _check_r(r, "r")
        return (int(r),) * num_layers
    if isinstance(r, tuple) and len(r) == 2:
        return _inflected_schedule(num_layers, *r)
    if isinstance(r, (list, tuple, np.ndarray)):
        per_layer = [_check_r(v, f"r[{i}]") for i, v in enumerate(r)]
        if len(per_layer) > num_layers:
            raise ValueError(
                f"r lists {len(per_layer)} layers but the model has {num_layers}"
            )
        return tuple(per_layer) + (0,) * (num_layers - len(per_layer))
    raise TypeError(
        f"r must be an int, an (r, inflection) tuple or a list of ints, got {r!r}"
    )


def check_per_layer(name: str, values: Sequence[int], num_layers: int) -> None:
    """Raises ValueError unless `values` gives one value per layer, saying what the list would
    become if it were padded with zeros or cut (what a shorter or longer list used to do unsaid)."""
    values = list(values)
    if len(values) == num_layers:
        return
    fitted = (values + [0] * num_layers)[:num_layers]
    change = "padded with zeros" if len(values) < num_layers else "cut"
    raise ValueError(
        f"{name}={values} lists {len(values)} layers but the model has {num_layers}: give one per layer "
        f"({change}: {fitted})"
    )


def _check_r(r, name: str) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {r!r} ({type(r).__name__})")
    if r < 0:
        raise ValueError(f"{name} must be >= 0, got {r}")
    return int(r)


def _inflected_schedule(num_layers: int, r, inflection) -> tuple[int, ...]:
    r = _check_r(r, "r")
    if not isinstance(inflection, numbers.Real) or not -1.0 <= inflection <= 1.0:
        raise ValueError(f"inflection must be a number in [-1, 1], got {inflection!r}")
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    if num_layers == 1:
        return (lo,)
    step = (hi - lo) / (num_layers - 1)
    return tuple(int(lo + step * i) for i in range(num_layers))


# A method's limit on one step, `(tokens, protected) -> most tokens removed`, as
# `reduce.Reduction.max_r`; None: half the unprotected tokens (ToMe's clamp).
MaxR = Callable[[int, int], int]


def effective_schedule(
    tokens: int, schedule: Sequence[int], protected: int = 0, max_r: MaxR | None = None
) -> tuple[int, ...]:
    """The `r` each layer really merges after the clamp, for `tokens` input tokens."""
    effective = []
    for r in schedule:
        r = clamp_r(r, tokens, protected, None if max_r is None else max_r(tokens, protected))
        effective.append(r)
        tokens -= r
    return tuple(effective)


def tokens_per_layer(
    tokens: int, schedule: Sequence[int], protected: int = 0, max_r: MaxR | None = None
) -> tuple[int, ...]:
    """Tokens entering each layer, then the tokens left at the end (len(schedule) + 1)."""
    counts = [tokens]
    for r in effective_schedule(tokens, schedule, protected, max_r):
        counts.append(counts[-1] - r)
    return tuple(counts)


def smallest_fitting_r(fits: Callable[[int], bool], limit: int) -> int | None:
    """The smallest `r` in [0, limit] with `fits(r)`, by bisection; None if none fits.

    `fits` must be monotone (once true, true for every larger `r`), as any cost
    that follows the tokens is: a larger `r` leaves every layer fewer tokens.
    """
    if not fits(limit):
        return None
    low, high = 0, limit  # fits(high) holds; every r below low fails
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return high


def most_merging_r(tokens: int, num_layers: int, inflection: float = 0.0) -> int:
    """An `r` from which a larger `(r, inflection)` schedule merges no more.

    Layer `i` gets about `r * share_i` (`share_i = (1 - inflection) + 2 * inflection
    * i / (num_layers - 1)`, less 2 for rounding), so from here on every layer whose
    share is not zero is given at least `tokens` and is clamped.
    """
    if num_layers == 1:
        shares = [1.0 - inflection]
    else:
        shares = [(1.0 - inflection) + 2.0 * inflection * i / (num_layers - 1) for i in range(num_layers)]
    growing = [share for share in shares if share > 1e-9]
    return math.ceil((tokens + 2) / min(growing)) if growing else 0


def schedule_for_token_budget(
    tokens: int,
    num_layers: int,
    budget: int,
    *,
    protected: int = 0,
    inflection: float = 0.0,
) -> tuple[int, ...]:
    """The `(r, inflection)` schedule with the smallest `r` within a token budget.

    Block cost grows with the tokens it processes, so the budget is the sum over
    layers of the tokens entering each block (`tokens * num_layers` at `r = 0`).

    Args:
      tokens: input sequence length, protected tokens included.
      budget: the largest admissible sum of tokens entering the blocks.
      inflection: schedule shape, 0 constant, -1 decreasing (see `parse_r`).

    Returns:
      the per-layer schedule, as `parse_r` gives it.
    """

    def cost(r):
        return sum(tokens_per_layer(tokens, parse_r(num_layers, (r, inflection)), protected)[:-1])

    limit = most_merging_r(tokens, num_layers, inflection)
    r = smallest_fitting_r(lambda r: cost(r) <= budget, limit)
    if r is None:
        raise ValueError(
            f"a budget of {budget} tokens is out of reach: with inflection {inflection} "
            f"the smallest total for {tokens} tokens over {num_layers} layers is {cost(limit)}"
        )
    return parse_r(num_layers, (r, inflection))


def r_label(r: RSpec) -> str:
    """A stable printable name for an r spec: `4`, `(8, -1)`, `[4, 4, 2]`."""
    return repr(list(r)) if is_per_layer(r) else repr(r)


def is_per_layer(r: RSpec) -> bool:
    """Whether `r` lists one value per layer (not an int or an (r, inflection) pair)."""
    return isinstance(r, (list, tuple)) and not _is_pair(r)


def _is_pair(r) -> bool:
    return isinstance(r, tuple) and len(r) == 2


R_SYNTAX = 'ints, (r, inflection) pairs or per-layer lists, separated by commas, e.g. "0, 8, (16, -1), [4, 4, 2]"'


def parse_r_values(text: str) -> list[RSpec]:
    """"0, 4, (8, -1), [4, 4, 2]" -> [0, 4, (8, -1), [4, 4, 2]] (one entry per sweep row).

    Each value is checked as far as it can be without a model (form, signs,
    inflection range; `parse_r` checks the depth): errors quote what was typed.
    """
    source = f"[{text}]"
    try:
        listed = ast.parse(source, mode="eval").body
    except SyntaxError:
        listed = None
    if not isinstance(listed, ast.List):
        raise ValueError(f"cannot parse r values {text!r}: expected {R_SYNTAX}")
    values = []
    for node in listed.elts:
        typed = ast.get_source_segment(source, node)
        try:
            value = ast.literal_eval(node)
        except ValueError:  # a name, call or other non-literal
            raise ValueError(f"r value {typed!r} in {text!r} is not a number; expected {R_SYNTAX}") from None
        try:
            if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
                raise TypeError(f"expected an int, an (r, inflection) pair or a list of ints, got {value!r}")
            # Any depth that holds the value: signs, types and the inflection.
            parse_r(len(value) if isinstance(value, (tuple, list)) and not _is_pair(value) else 1, value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"r value {typed!r} in {text!r}: {error}") from None
        values.append(value)
    return values


def describe_r(r: RSpec, tokens: int, num_layers: int, protected: int = 0, max_r: MaxR | None = None) -> str:
    """One line on what `r` does to a model: the tokens left and the per-layer
    schedule it runs, saying so when the clamp cut it, e.g.
    `r=1000: 65 tokens -> 2; clamped to [32, 16, 8, 4, 2, 1, 0, ...] per layer (...)`.
    """
    schedule = parse_r(num_layers, r)
    effective = effective_schedule(tokens, schedule, protected, max_r)
    line = f"r={r_label(r)}: {tokens} tokens -> {tokens - sum(effective)}; "
    if effective == schedule:
        return line + f"{list(effective)} per layer"
    if effective != effective_schedule(tokens, schedule, protected):  # a limit other than half
        return line + f"clamped to {list(effective)} per layer (the most the method removes per layer)"
    unprotected = "unprotected " if protected else ""
    return line + f"clamped to {list(effective)} per layer (a layer merges at most half of its {unprotected}tokens)"


def parse_r_value(text: str) -> RSpec:
    """One r spec from text: "13", "(8, -1)" or "[4, 4, 2]" (for config strings)."""
    values = parse_r_values(text)
    if len(values) != 1:
        raise ValueError(f"expected one r spec, got {len(values)} in {text!r}")
    return values[0]
