"""ToMe in your own Flax Linen model: a transformer encoder over any token sequence.

Nothing here is specific to images: the tokens can be audio frames, text
embeddings or patches, with or without a class token. Each block merges `r`
tokens between attention and MLP with the pure functions of `tome_jax.merge`:

    y, metric = attend(qkv(norm1(x)), size, heads) # token_ops.py: metric = keys' head-mean
    x = x + proj(y)
    plan = merge.bipartite_soft_merge(metric, r, num_prefix_tokens=int(class_token))
    x, size = merge.merge_wavg(plan, x, size)      # size: input tokens each token holds
    x = x + mlp(norm2(x))

and the encoder pools by a size-weighted mean. Run: `python -m examples.linen_encoder`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from examples.token_ops import EncoderOutput, attend, run_summary, size_weighted_mean
from tome_jax import merge


class Block(nn.Module):
    """Pre-norm transformer block with ToMe between attention and MLP."""

    num_heads: int
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x, size, *, r: int, class_token: bool):
        """x [batch, tokens, width], size [batch, tokens] -> x, size with r fewer tokens, plan."""
        width = x.shape[-1]
        qkv = nn.Dense(3 * width, name="qkv")(nn.LayerNorm(name="norm1")(x))
        y, metric = attend(qkv, size, self.num_heads)
        x = x + nn.Dense(width, name="proj")(y)
        plan = merge.bipartite_soft_merge(metric, r, num_prefix_tokens=int(class_token))
        x, size = merge.merge_wavg(plan, x, size)
        hidden = nn.Dense(int(width * self.mlp_ratio), name="fc1")(nn.LayerNorm(name="norm2")(x))
        hidden = nn.gelu(hidden)
        return x + nn.Dense(width, name="fc2")(hidden), size, plan


class Encoder(nn.Module):
    """Embeds [batch, tokens, features] and runs `depth` ToMe blocks.

    With `class_token` a learned token is prepended; it never merges and is left
    out of the pooled mean (read it as `tokens[:, 0]` if you prefer it).
    """

    width: int = 64
    depth: int = 4
    num_heads: int = 4
    class_token: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, r: int = 0) -> EncoderOutput:
        """x: [batch, tokens, features]; r: tokens merged per block, a static int."""
        x = nn.Dense(self.width, name="embed")(x)
        if self.class_token:
            cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
        size = jnp.ones(x.shape[:2], jnp.float32)
        plans = []
        for i in range(self.depth):
            block = Block(self.num_heads, name=f"block_{i}")
            x, size, plan = block(x, size, r=r, class_token=self.class_token)
            plans.append(plan)
        x = nn.LayerNorm(name="norm")(x)
        pooled = size_weighted_mean(x, size, int(self.class_token))
        return EncoderOutput(pooled, x, size, tuple(plans))


def pooled_energy(params, model: Encoder, x: jax.Array, r: int):
    """A stand-in loss, the mean square of the pooled features, and the encoder's output."""
    out = model.apply({"params": params}, x, r=r)
    return jnp.mean(out.pooled**2), out


def main():
    frames = jax.random.normal(jax.random.key(0), (2, 50, 16))  # e.g. 50 audio frames
    model = Encoder(class_token=True)
    params = model.init(jax.random.key(1), frames)["params"]
    loss_and_grads = jax.jit(
        jax.value_and_grad(pooled_energy, has_aux=True), static_argnames=("model", "r")
    )
    for r in (0, 8):
        (value, out), grads = loss_and_grads(params, model, frames, r=r)
        print(run_summary(r, frames, out, value, grads))


if __name__ == "__main__":
    main()
