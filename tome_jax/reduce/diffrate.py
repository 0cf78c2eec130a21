"""DiffRate (Chen et al., ICCV 2023): per-layer pruning and merging rates found by gradient.

Every block, after attention, ranks its tokens by the class token's attention
(mean over heads). It keeps the first `prune_kept` (the rest are pruned), then
merges the least important of those, ranks `[merge_kept, prune_kept)`, each into
its most similar token (cosine of the tokens themselves) among the first
`merge_kept`, the prefix tokens excluded. As in the authors' code the merge is
a plain mean of the tokens, and a merged token brings its size scaled by that
similarity.

The two counts per block are what DiffRate learns. Each is a distribution over
candidate kept counts (`patches`, `patches - granularity`, ...; the first block
has only `patches`: it reduces nothing), a softmax of learned logits; its
expectation, rounded up with a straight-through gradient, is the count. During
the search the sequence keeps its length: a 0/1 mask says which tokens are
alive (pruned and merged-away ones are masked out of the attention's keys), and
its gradient is that of each position's probability of being kept, so the
classification loss says where keeping more would pay; the FLOPs of the counts
(`schedule_flops`, in multiply-adds as the authors count them: XLA's FLOPs,
which eval.py reports, count each as two, so about twice) pulls toward a target. The searched counts then run as a
hard schedule: per layer `r` tokens removed, of which `prune` pruned.

    model = tome_jax.create_model("deit_small_patch16_224", reduction=reduce.DiffRate(prune=prune))
    logits = model.apply(variables, images, r=r)
    searching = model.clone(reduction=reduce.DiffRateSearch(target_gflops=2.9))  # train.py searches
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from typing import ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tome_jax import merge
from tome_jax import schedules
from tome_jax.reduce.base import Reduced, Reduction, Step, class_attention, setting
from tome_jax.reduce.prune import prefix_first
from tome_jax.tokens import Tokens


@jax.custom_vjp
def ste_ceil(x: jax.Array) -> jax.Array:
    """`ceil(x)` whose gradient is the identity's (straight-through)."""
    return jnp.ceil(x)


ste_ceil.defvjp(lambda x: (jnp.ceil(x), None), lambda _, g: (g,))


@jax.custom_vjp
def ste_min(tokens: jax.Array, prune_kept: jax.Array, merge_kept: jax.Array) -> jax.Array:
    """`min(tokens, prune_kept, merge_kept)`; the gradient goes whole to both kept counts, none to tokens.

    The authors' rule: each block's counts answer for the FLOPs after them,
    never the counts of earlier blocks.
    """
    return jnp.minimum(tokens, jnp.minimum(prune_kept, merge_kept))


ste_min.defvjp(
    lambda t, p, m: (ste_min(t, p, m), None), lambda _, g: (jnp.zeros_like(g), g, g)
)


def candidates(num_candidates: int, patches: int, granularity: int) -> jax.Array:
    """[num_candidates] kept patch counts a block chooses from: patches, patches - granularity, ..."""
    return (patches - granularity * np.arange(num_candidates)).astype(np.float32)


def num_candidates(patches: int, granularity: int) -> int:
    """How many candidates `patches, patches - granularity, ...` stay above zero."""
    return len(range(patches, 0, -granularity))


def expected_kept(logits: jax.Array, patches: int, granularity: int, num_prefix_tokens: int) -> jax.Array:
    """The tokens a block keeps: `ceil(E[kept patches]) + prefix`, a float with a straight-through gradient.

    Args:
      logits: [num_candidates] the block's learned selection logits.
    """
    probability = jax.nn.softmax(logits.astype(jnp.float32))
    return ste_ceil(candidates(logits.shape[0], patches, granularity) @ probability) + num_prefix_tokens


def kept_probability(logits: jax.Array, tokens: int, granularity: int, num_prefix_tokens: int) -> jax.Array:
    """[tokens] each position's probability of being kept: the mass of candidates that reach past it.

    Positions are ranks (most important first, the prefix tokens at the front),
    so a prefix token's probability is 1.
    """
    patches = tokens - num_prefix_tokens
    reach = candidates(logits.shape[0], patches, granularity) + num_prefix_tokens
    survives = (np.arange(tokens)[:, None] < reach[None, :]).astype(np.float32)
    return survives @ jax.nn.softmax(logits.astype(jnp.float32))


def rate_mask(
    logits: jax.Array, kept: jax.Array, end: jax.Array, granularity: int, num_prefix_tokens: int, tokens: int
) -> jax.Array:
    """[tokens] 0 at the positions `[kept, end)` the block removes, 1 elsewhere, in the forward pass;
    the gradient of `kept_probability` (the straight-through trick)."""
    probability = kept_probability(logits, tokens, granularity, num_prefix_tokens)
    position = np.arange(tokens)
    removed = (position >= kept.astype(jnp.int32)) & (position < end)
    return jnp.where(removed, 0.0, 1.0) - jax.lax.stop_gradient(probability) + probability


def policy_weights(weights: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention weights renormalised over the alive keys: `w m / sum(w m)`, every query keeping itself.

    The mask multiplies (rather than adding `log m` to the logits) so that a
    masked key still passes the gradient of keeping it. The authors also add a
    1e-6 to the numerator and denominator for float16; in float32 it is left out.

    Args:
      weights: [batch, heads, tokens, tokens] the attention's softmax.
      mask: [batch, tokens] the alive tokens (straight-through 0/1).
    """
    tokens = mask.shape[-1]
    eye = np.eye(tokens, dtype=np.float32)
    policy = mask[:, None, None, :] + (1.0 - mask[:, None, None, :]) * eye
    masked = weights * policy
    return masked / masked.sum(axis=-1, keepdims=True)


class SearchState(NamedTuple):
    """What a searching block hands the next: the mask, and the counts so far for the FLOPs.

    Attributes:
      mask: [batch, tokens] 1 for the alive tokens, 0 for the pruned and the
        merged-away ones (forward values; straight-through gradients).
      prune_kept, merge_kept: each block's counts so far (floats, straight-through).
    """

    mask: jax.Array
    prune_kept: tuple[jax.Array, ...] = ()
    merge_kept: tuple[jax.Array, ...] = ()


def _alive_by_class_attention(x, size, mask, alive, weights, prefix):
    """x, size and mask in the order: the prefix tokens, the alive ones by class attention, the dead."""
    batch = x.shape[0]
    class_attn = weights[:, :, 0, prefix:].mean(axis=1)
    score = jnp.where(alive[:, prefix:], class_attn, -1.0)  # attention >= 0: the dead go last
    head = jnp.broadcast_to(jnp.arange(prefix), (batch, prefix))
    order = jnp.concatenate([head, prefix + jnp.argsort(-score, axis=1, stable=True)], axis=1)
    x = jnp.take_along_axis(x, order[..., None], axis=1)
    return (x, *(jnp.take_along_axis(a, order, axis=1) for a in (size, mask)))


def search_step(
    x: jax.Array,
    size: jax.Array,
    state: SearchState,
    weights: jax.Array,
    prune_logits: jax.Array,
    merge_logits: jax.Array,
    *,
    granularity: int,
    num_prefix_tokens: int,
) -> tuple[jax.Array, jax.Array, SearchState]:
    """One searching block's reduction, between its attention and its MLP; shapes never change.

    Sorts the tokens (alive ones first, by class attention), masks the ones the
    expected prune count removes, merges the ones the expected merge count
    removes into their partners (the merged tokens stay, masked), and masks
    them too.

    Args:
      x: [batch, tokens, width]; size: [batch, tokens]; state: the previous block's.
      weights: [batch, heads, tokens, tokens] the block's masked attention map
        (`policy_weights`); the class token's row, mean over heads, ranks the tokens.
      prune_logits, merge_logits: [num_candidates] the block's rate logits; the
        number of candidates and `granularity` say which counts they choose from.

    Returns:
      x, size and the new SearchState (this block's counts added).
    """
    tokens, prefix = x.shape[1], num_prefix_tokens
    patches = tokens - prefix
    alive = state.mask > 0.5  # forward values are exactly 0 or 1 up to rounding
    x, size, mask = _alive_by_class_attention(x, size, state.mask, alive, weights, prefix)
    last = jnp.sum(alive[0], dtype=jnp.int32)  # the same for every example
    position = np.arange(tokens)

    prune_kept = expected_kept(prune_logits, patches, granularity, prefix)
    prune_mask = rate_mask(prune_logits, prune_kept, last, granularity, prefix, tokens)
    mask = mask * jnp.where(prune_kept < last, prune_mask, 1.0)
    mid = jnp.minimum(last, prune_kept.astype(jnp.int32))

    merge_kept = expected_kept(merge_logits, patches, granularity, prefix)
    kept = merge_kept.astype(jnp.int32)
    merging = kept < mid
    source = (position >= kept) & (position < mid) & merging  # tokens merged away
    unit = jax.lax.stop_gradient(merge.unit_vectors(x))
    similarity = jnp.einsum("bic,bjc->bij", unit, unit)
    similarity = jnp.where((position < kept) & (position >= prefix), similarity, -jnp.inf)
    best, partner = similarity.max(axis=-1), similarity.argmax(axis=-1)
    assign = ((partner[..., None] == position) & source[None, :, None]).astype(x.dtype)  # [b, src, dst]

    # The authors' scatter_reduce "mean" with the destination included: a plain mean.
    count = 1.0 + assign.sum(axis=1)
    x = (x + jnp.einsum("bij,bic->bjc", assign, x)) / count[..., None]
    scaled = jnp.where(source, size * best, size)
    scaled = jnp.where((position < mid) & merging, jnp.maximum(scaled, 1.0), scaled)
    size = scaled + jnp.einsum("bij,bi->bj", assign, scaled)
    merge_mask = rate_mask(merge_logits, merge_kept, mid, granularity, prefix, tokens)
    mask = mask * jnp.where(merging, merge_mask, 1.0)
    return x, size, SearchState(mask, (*state.prune_kept, prune_kept), (*state.merge_kept, merge_kept))


def schedule_flops(
    prune_kept: Sequence[jax.Array],
    merge_kept: Sequence[jax.Array],
    *,
    tokens: int,
    width: int,
    patch_pixels: int,
    num_classes: int,
) -> jax.Array:
    """The authors' FLOPs count of a schedule (multiply-adds), differentiable in the counts.

    Per block: attention `4 N C^2 + 2 N^2 C` at the tokens entering it, the MLP
    `8 N C^2` at `min(N, prune_kept, merge_kept)` (`ste_min`); plus the patch
    embedding `tokens C patch_pixels` and the head `C num_classes`. Norms,
    softmax and the merging itself are not counted.

    Args:
      prune_kept, merge_kept: one count per block (floats, straight-through).
      tokens: the sequence entering the first block; width: C;
      patch_pixels: inputs per patch (height * width * channels).
    """
    n = jnp.asarray(tokens, jnp.float32)
    flops = n * width * patch_pixels + width * num_classes
    for pruned, merged in zip(prune_kept, merge_kept):
        flops = flops + 4 * n * width**2 + 2 * n**2 * width
        n = ste_min(n, jnp.asarray(pruned, jnp.float32), jnp.asarray(merged, jnp.float32))
        flops = flops + 8 * n * width**2
    return flops


class Schedule(NamedTuple):
    """A searched schedule as the hard model runs it.

    Attributes:
      r: tokens removed by each block (pruned + merged): the model's `r`.
      prune: tokens pruned by each block (`DiffRate.prune`).
      prune_kept, merge_kept: the counts as the authors write them (tokens kept
        after pruning, after merging, prefix included).
    """

    r: tuple[int, ...]
    prune: tuple[int, ...]
    prune_kept: tuple[int, ...]
    merge_kept: tuple[int, ...]


def schedule(prune_kept: Sequence[int], merge_kept: Sequence[int], tokens: int) -> Schedule:
    """The hard schedule of per-block kept counts (a count above the tokens left keeps them all)."""
    r, prune = [], []
    for pruned_to, merged_to in zip(prune_kept, merge_kept):
        after_prune = min(tokens, int(pruned_to))
        after_merge = min(after_prune, int(merged_to))
        prune.append(tokens - after_prune)
        r.append(tokens - after_merge)
        tokens = after_merge
    counts = (tuple(int(k) for k in kept) for kept in (prune_kept, merge_kept))
    return Schedule(tuple(r), tuple(prune), *counts)


def schedule_from_logits(
    prune_logits: Sequence[jax.Array],
    merge_logits: Sequence[jax.Array],
    *,
    tokens: int,
    granularity: int,
    num_prefix_tokens: int,
) -> Schedule:
    """The schedule a search's logits stand for (each block's expected counts, rounded up)."""
    patches = tokens - num_prefix_tokens
    def kept(logits):
        return int(expected_kept(jnp.asarray(logits), patches, granularity, num_prefix_tokens))

    return schedule([kept(p) for p in prune_logits], [kept(m) for m in merge_logits], tokens)


def prune_merge_plan(
    score: jax.Array, similarity: jax.Array, pruned: int, merged: int, num_prefix_tokens: int
) -> tuple[merge.MergePlan, jax.Array]:
    """The hard step: rank by score, prune the last `pruned`, merge the next `merged` into their partners.

    Args:
      score: [batch, rest] importance of the tokens after the prefix (class attention).
      similarity: [batch, rest, rest] cosine similarity of those tokens.

    Returns:
      The plan (kept tokens in score order after the prefix, pruned ones
      `merge.DROPPED`) and [batch, rest] each token's similarity to its partner
      (1 for a token that is not merged), which scales the size it brings.
    """
    rest = score.shape[1]
    keep = rest - pruned - merged
    rank = merge.descending_rank(score)
    is_kept, is_merged = rank < keep, (rank >= keep) & (rank < keep + merged)
    similarity = jnp.where(is_kept[:, None, :], similarity, -jnp.inf)
    partner, best = similarity.argmax(axis=-1), similarity.max(axis=-1)
    slot = num_prefix_tokens + rank
    merged_slot = jnp.where(is_merged, jnp.take_along_axis(slot, partner, axis=1), merge.DROPPED)
    dest = jnp.where(is_kept, slot, merged_slot)
    plan = merge.plan_from_dest(prefix_first(dest, num_prefix_tokens), num_prefix_tokens + keep, merged)
    return plan, jnp.where(is_merged, best, 1.0)


@dataclasses.dataclass(frozen=True)
class DiffRate(Reduction):
    """DiffRate's inference: per block, prune by class attention, then merge into the most similar kept token.

    The model's `r` gives each block's tokens removed; `prune` how many of them
    are pruned (the rest merge). Both come from a search (`DiffRateSearch`,
    which writes them to `diffrate_schedule.json` in its train.py workdir).

    Settings:
      prune: tokens pruned by each block, one count per block (empty: none pruned).
      search_gflops, flops_weight, granularity: deprecated; `search_gflops > 0`
        gives `DiffRateSearch(target_gflops=search_gflops, ...)` instead.
    """

    name: ClassVar[str] = "diffrate"
    needs_weights: ClassVar[bool] = True
    prop_attn: ClassVar[bool] = True
    prune: tuple[int, ...] = setting((), low=0)
    search_gflops: float = setting(0.0, low=0)
    flops_weight: float = setting(5.0, low=0)
    granularity: int = setting(4, low=1)

    def __new__(cls, *args, **settings):
        names = [field.name for field in dataclasses.fields(cls)]
        settings = {**dict(zip(names, args)), **settings}
        if settings.get("search_gflops", 0.0) > 0:
            warnings.warn(
                "DiffRate(search_gflops=...) is deprecated; search with reduce.DiffRateSearch(target_gflops=...) "
                "(on the command line --config.method=diffrate_search --config.diffrate_search.target_gflops=...)",
                DeprecationWarning,
                stacklevel=2,
            )
            return DiffRateSearch(
                target_gflops=settings["search_gflops"],
                **{k: settings[k] for k in ("flops_weight", "granularity") if k in settings},
            )
        return super().__new__(cls)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "prune", tuple(int(k) for k in self.prune))  # hashable, as a model attribute

    def check_depth(self, depth: int) -> None:
        """`prune` gives every block's count, or none (nothing pruned)."""
        if self.prune:
            schedules.check_per_layer(f"{self.name}.prune", self.prune, depth)

    def max_r(self, tokens: int, num_prefix_tokens: int) -> int:
        """A block may remove all but one token after the prefix."""
        return max(tokens - num_prefix_tokens - 1, 0)

    def __call__(self, step: Step) -> Reduced:
        pruned = self.prune[step.layer] if self.prune else 0
        if not 0 <= pruned <= step.r:
            raise ValueError(
                f"DiffRate prunes {pruned} tokens in block {step.layer}, but the block removes {step.r} "
                "in all; pass the r and prune of one schedule (diffrate_schedule.json)"
            )
        prefix = step.num_prefix_tokens
        unit = merge.unit_vectors(step.x[:, prefix:])
        similarity = jnp.einsum("bic,bjc->bij", unit, unit)
        plan, scale = prune_merge_plan(class_attention(step), similarity, pruned, step.r - pruned, prefix)
        scale = jnp.concatenate([jnp.ones_like(step.size[:, :prefix]), scale], axis=1)
        x = merge.merge_mean(plan, step.x, jnp.ones_like(step.size), implementation=step.implementation)
        size = merge.merge_sum(plan, step.size * scale, implementation=step.implementation)
        return Reduced(x, size, plan)


def search_gmacs(model, prune_kept: Sequence[jax.Array], merge_kept: Sequence[jax.Array]) -> jax.Array:
    """The authors' count (`schedule_flops`, billions of multiply-adds) of per-block kept counts, for a
    `tome_jax.ViT`; XLA's GFLOPs, which eval.py reports, are about twice."""
    return schedule_flops(
        prune_kept,
        merge_kept,
        tokens=model.num_tokens,
        width=model.width,
        patch_pixels=math.prod(model.patch_kernel) * model.in_chans,
        num_classes=model.num_classes,
    ) / 1e9


@dataclasses.dataclass(frozen=True)
class DiffRateSearch(Reduction):
    """DiffRate's search: every block's prune and merge counts learned by gradient for a FLOPs target.

    Each block owns two logit vectors over candidate kept counts (parameters
    `blocks_i/diffrate_prune`, `blocks_i/diffrate_merge`; the first block has one
    candidate, all patches) and runs `search_step` between attention and MLP
    whatever `r`: the sequence keeps its length, a straight-through mask takes
    the removed tokens out of the attention's keys. After the last block the
    model sows `flops_weight * (gmacs - target_gflops) ** 2` in the "losses"
    collection (train.py adds it to the loss) and the GMACs in "metrics"
    (`diffrate_gmacs`). At the end of training, `outputs` writes the schedule found.

    Settings:
      target_gflops: the target in the authors' count (`search_gmacs`: billions of multiply-adds,
        what their paper calls GFLOPs; eval.py's GFLOPs, XLA's, are about twice); > 0.
      flops_weight: the penalty's weight.
      granularity: the gap between candidate kept counts.
    """

    name: ClassVar[str] = "diffrate_search"
    needs_weights: ClassVar[bool] = True
    target_gflops: float = setting(0.0, low=0, open_low=True)  # the default lists the setting; a search needs a target
    flops_weight: float = setting(5.0, low=0)
    granularity: int = setting(4, low=1)

    def max_r(self, tokens: int, num_prefix_tokens: int) -> int:
        """The search keeps every token: `r` is not used."""
        return 0

    def acts(self, r: int) -> bool:
        return True

    def start(self, tokens: Tokens, model, train: bool) -> Tokens:
        if model.num_prefix_tokens != 1 or not model.class_token:
            raise ValueError("the DiffRate search ranks tokens by class attention: it needs one class token")
        return tokens.replace(state=SearchState(jnp.ones(tokens.size.shape, jnp.float32)))

    def adjust_weights(self, weights: jax.Array, tokens: Tokens) -> jax.Array:
        """Attention over the alive keys only (`policy_weights`)."""
        return policy_weights(weights, tokens.state.mask)

    def __call__(self, step: Step) -> Reduced:
        prefix = step.num_prefix_tokens
        count = 1 if step.layer == 0 else num_candidates(step.x.shape[1] - prefix, self.granularity)
        prune_logits, merge_logits = (
            step.block.param(f"diffrate_{kind}", jax.nn.initializers.zeros, (count,), jnp.float32)
            for kind in ("prune", "merge")
        )
        x, size, state = search_step(
            step.x, step.size, step.state, step.weights, prune_logits, merge_logits,
            granularity=self.granularity, num_prefix_tokens=prefix,
        )  # fmt: skip
        return Reduced(x, size, None, state=state)

    def finish(self, tokens: Tokens, model) -> None:
        gmacs = search_gmacs(model, tokens.state.prune_kept, tokens.state.merge_kept)
        keep = dict(reduce_fn=lambda _, value: value, init_fn=lambda: 0.0)
        model.sow("losses", "diffrate_flops", self.flops_weight * (gmacs - self.target_gflops) ** 2, **keep)
        model.sow("metrics", "diffrate_gmacs", gmacs, **keep)

    def found(self, model, params) -> Schedule:
        """The schedule the search's rate logits stand for."""
        return schedule_from_logits(
            [params[f"blocks_{i}"]["diffrate_prune"] for i in range(model.depth)],
            [params[f"blocks_{i}"]["diffrate_merge"] for i in range(model.depth)],
            tokens=model.num_tokens,
            granularity=self.granularity,
            num_prefix_tokens=model.num_prefix_tokens,
        )

    def outputs(self, model, params, gflops) -> dict[str, bytes]:
        """`diffrate_schedule.json`: the schedule found, its cost in the authors' count (`gmacs`,
        multiply-adds, the search's target) and in XLA's GFLOPs of the hard model (`xla_gflops`, what
        eval.py reports, about twice), and the eval.py command that runs it."""
        found = self.found(model, params)
        r, prune = str(list(found.r)), str(tuple(found.prune))
        record = {
            **found._asdict(),
            "gmacs": float(search_gmacs(model, found.prune_kept, found.merge_kept)),
            "xla_gflops": gflops(DiffRate(prune=found.prune), list(found.r)),
            "eval": f'python eval.py --config.method=diffrate --config.r="{r}" --config.diffrate.prune="{prune}"',
        }
        return {"diffrate_schedule.json": (json.dumps(record, indent=1) + "\n").encode()}
