"""Features for downstream models, read from a ViT's intermediates.

A `tome_jax.ViT` applied with `mutable="intermediates"` records, through Flax's
`sow`, each block's output tokens, their sizes and its merge plan, and the final
tokens (see `ViT.__call__`). These functions turn that record into what a
downstream model takes:

    logits, state = model.apply(variables, images, r=8, mutable="intermediates")
    final = token_features(state["intermediates"])            # after the final norm
    hidden = token_features(state["intermediates"], block=-2)  # LLaVA's layer, no norm
    dense = patch_features(model, state["intermediates"])     # [batch, gh, gw, width]

Shapes are static (fixed by the model and `r`), so they run inside `jax.jit`.
When the ViT is a submodule, pass its own part of the collection
(`state["intermediates"]["vision"]`).
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, NamedTuple

import jax

from tome_jax import merge
from tome_jax.vit import require_vit


class TokenFeatures(NamedTuple):
    """Merged tokens and what each one holds.

    Attributes:
      tokens: [batch, tokens, width] the merged tokens, prefix tokens first.
      size: [batch, tokens] input tokens (patches and prefix tokens) each holds.
      source: [batch, input_tokens] the token holding each input token, prefix
        tokens first (`merge.source_matrix` gives the official membership matrix).
    """

    tokens: jax.Array
    size: jax.Array
    source: jax.Array


def _last_call(record: Mapping[str, Any], name: str):
    """`sow` keeps a tuple, one entry per call of the module: the latest call's value."""
    return record[name][-1]


def _num_blocks(intermediates: Mapping[str, Any]) -> int:
    """The blocks recorded in a ViT's intermediates (`blocks_0`, `blocks_1`, ...)."""
    count = 0
    while f"blocks_{count}" in intermediates:
        count += 1
    if count == 0:
        raise ValueError(
            "no blocks in these intermediates: pass state['intermediates'] from "
            "model.apply(variables, images, mutable='intermediates') (for a ViT inside "
            "another model, its own entry, e.g. state['intermediates']['vision'])"
        )
    return count


def _block_index(intermediates, block: int) -> int:
    depth = _num_blocks(intermediates)
    if isinstance(block, bool) or not isinstance(block, numbers.Integral):
        raise TypeError(
            f"block must be an int (a block index, negative from the end, in [{-depth}, {depth})) or None "
            f"(the final tokens), got {block!r} ({type(block).__name__})"
        )
    if not -depth <= block < depth:
        raise ValueError(f"block {block} is out of range for a ViT of {depth} blocks")
    return block % depth


def _block_plan(intermediates, index: int) -> merge.MergePlan:
    record = intermediates[f"blocks_{index}"]
    if "plan" not in record:
        raise ValueError(
            f"block {index} recorded no merge plan, so its tokens cannot be traced back: "
            "DTEM's soft merge (training) keeps every token, and a reduction that "
            "returns no plan loses the mapping; read 'tokens' and 'size' directly"
        )
    return _last_call(record, "plan")


def _token_source(intermediates, last: int) -> jax.Array:
    """[batch, input_tokens]: the token of block `last`'s output holding each input
    token, the plans of blocks 0 to `last` composed."""
    plans = [_block_plan(intermediates, i) for i in range(last + 1)]
    source = merge.initial_source(*plans[0].dest.shape)
    for plan in plans:
        source = merge.merge_source(plan, source)
    return source


def token_features(intermediates: Mapping[str, Any], block: int | None = None) -> TokenFeatures:
    """The merged tokens of one block, or the final ones, with their sizes and sources.

    Args:
      intermediates: `state["intermediates"]` of a ViT applied with
        `mutable="intermediates"`.
      block: None for the final tokens, after the final norm (timm's
        `forward_features`; no norm when the model pools with `fc_norm`), or a
        block index, negative from the end, for that block's output before any
        norm (the hidden states LLaVA takes from block -2).

    Returns:
      `TokenFeatures`: tokens [batch, tokens_k, width], size [batch, tokens_k],
      source [batch, input_tokens], tokens_k the tokens left after that block.
    """
    index = _num_blocks(intermediates) - 1 if block is None else _block_index(intermediates, block)
    record = intermediates if block is None else intermediates[f"blocks_{index}"]
    return TokenFeatures(
        tokens=_last_call(record, "tokens"),
        size=_last_call(record, "size"),
        source=_token_source(intermediates, index),
    )


def patch_features(model, intermediates: Mapping[str, Any], block: int | None = None) -> jax.Array:
    """Per-patch features at full resolution: each patch gets the token holding it.

    Merging leaves fewer tokens than patches; this copies each merged token back
    to every patch it holds (`merge.unmerge` through all the plans, in one
    gather), for dense tasks such as segmentation and depth. At r = 0 it is the
    model's own patch tokens.

    Args:
      model: the `tome_jax.ViT` that recorded `intermediates` (for its prefix
        tokens and patch grid).
      intermediates: as for `token_features`.
      block: as for `token_features` (None: the final, normed tokens).

    Returns:
      [batch, *model.token_grid, width]: [batch, grid_h, grid_w, width] for
      images ([batch, time, grid_h, grid_w, width] for videos), prefix tokens
      (class, distillation) left out.
    """
    require_vit(model, "patch_features")
    tokens, _, source = token_features(intermediates, block)
    if source.shape[1] != model.num_tokens:
        raise ValueError(
            f"these intermediates trace {source.shape[1]} input tokens, but the model has "
            f"{model.num_tokens}; pass the model that recorded them"
        )
    patches = merge.gather_tokens(tokens, source[:, model.num_prefix_tokens :])
    return patches.reshape(tokens.shape[0], *model.token_grid, tokens.shape[-1])
