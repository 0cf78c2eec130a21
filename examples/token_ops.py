"""Framework-neutral pieces of the example encoders, shared by the Linen and NNX versions.

Pure functions on token arrays; the frameworks only own the parameters.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tome_jax import merge
from tome_jax.attention import proportional_attention


class EncoderOutput(NamedTuple):
    """What the example encoders return.

    Attributes:
      pooled: [batch, width] size-weighted mean of the final tokens.
      tokens: [batch, tokens_out, width] final tokens (after the final norm).
      size: [batch, tokens_out] input tokens each final token holds.
      plans: one `merge.MergePlan` a block, to map outputs back to the input tokens.
    """

    pooled: jax.Array
    tokens: jax.Array
    size: jax.Array
    plans: tuple[merge.MergePlan, ...]


def attend(qkv: jax.Array, size: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array]:
    """Multi-head proportional attention from a fused projection, and ToMe's metric.

    Args:
      qkv: [batch, tokens, 3 * width] queries, keys and values, head by head.
      size: [batch, tokens] input tokens each token holds (ones before any merge).

    Returns:
      ([batch, tokens, width] attention output before the output projection,
       [batch, tokens, head_dim] the merge metric).
    """
    batch, tokens, three_width = qkv.shape
    qkv = qkv.reshape(batch, tokens, 3, num_heads, three_width // (3 * num_heads))
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # log(size) in the softmax lets a merged token weigh as much as the tokens it holds.
    out = proportional_attention(query, key, value, size)
    # ToMe's metric: the keys, averaged over heads, already summarise each token's content.
    return out.reshape(batch, tokens, three_width // 3), key.mean(axis=2)


def size_weighted_mean(x: jax.Array, size: jax.Array, num_prefix_tokens: int) -> jax.Array:
    """[batch, tokens, width] -> [batch, width]: the mean over input tokens, not merged ones.

    Prefix (class) tokens are left out, as in global average pooling.
    """
    weights = size[:, num_prefix_tokens:, None]
    return (x[:, num_prefix_tokens:] * weights).sum(axis=1) / weights.sum(axis=1)



def run_summary(r: int, inputs: jax.Array, out: EncoderOutput, loss: jax.Array, grads) -> str:
    """One line for the examples' `main`: shapes in and out, conserved size, gradients."""
    grad_leaves = jax.tree_util.tree_leaves(grads)
    finite = all(bool(jnp.isfinite(g).all()) for g in grad_leaves)
    return (
        f"r={r}: inputs {inputs.shape} -> tokens {out.tokens.shape}, pooled {out.pooled.shape}, "
        f"sizes sum to {float(out.size[0].sum()):g}, loss {float(loss):.4f}, "
        f"{len(grad_leaves)} gradient arrays, all finite: {finite}"
    )
