"""ToMe in your own Flax NNX model: the encoder of `linen_encoder.py`, in NNX.

The merge is the same two calls to `tome_jax.merge` between attention and MLP;
NNX only changes who owns the parameters. `r` is a Python int, static under
`nnx.jit`. Run: `python -m examples.nnx_encoder`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from examples.token_ops import EncoderOutput, attend, run_summary, size_weighted_mean
from tome_jax import merge


class Block(nnx.Module):
    """Pre-norm transformer block with ToMe between attention and MLP."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.proj = nnx.Linear(width, width, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, int(width * mlp_ratio), rngs=rngs)
        self.fc2 = nnx.Linear(int(width * mlp_ratio), width, rngs=rngs)

    def __call__(self, x, size, *, r: int, class_token: bool):
        """x [batch, tokens, width], size [batch, tokens] -> x, size with r fewer tokens, plan."""
        y, metric = attend(self.qkv(self.norm1(x)), size, self.num_heads)
        x = x + self.proj(y)
        plan = merge.bipartite_soft_merge(metric, r, num_prefix_tokens=int(class_token))
        x, size = merge.merge_wavg(plan, x, size)
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x)))), size, plan


class Encoder(nnx.Module):
    """Embeds [batch, tokens, features] and runs `depth` ToMe blocks.

    With `class_token` a learned token is prepended; it never merges and is left
    out of the pooled mean.
    """

    def __init__(
        self,
        features: int,
        width: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        *,
        class_token: bool = False,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Linear(features, width, rngs=rngs)
        self.class_token = class_token
        self.cls_token = (
            nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, width))) if class_token else None
        )
        self.blocks = nnx.List([Block(width, num_heads, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)

    def __call__(self, x: jax.Array, *, r: int = 0) -> EncoderOutput:
        """x: [batch, tokens, features]; r: tokens merged per block, a static int."""
        x = self.embed(x)
        if self.class_token:
            cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        size = jnp.ones(x.shape[:2], jnp.float32)
        plans = []
        for block in self.blocks:
            x, size, plan = block(x, size, r=r, class_token=self.class_token)
            plans.append(plan)
        x = self.norm(x)
        pooled = size_weighted_mean(x, size, int(self.class_token))
        return EncoderOutput(pooled, x, size, tuple(plans))


def pooled_energy(model: Encoder, x: jax.Array, r: int):
    """A stand-in loss, the mean square of the pooled features, and the encoder's output."""
    out = model(x, r=r)
    return jnp.mean(out.pooled**2), out


@nnx.jit(static_argnames="r")
def loss_and_grads(model: Encoder, x: jax.Array, r: int):
    """((loss, EncoderOutput), gradients with respect to the model's parameters)."""
    return nnx.value_and_grad(pooled_energy, has_aux=True)(model, x, r)


def main():
    frames = jax.random.normal(jax.random.key(0), (2, 50, 16))  # e.g. 50 audio frames
    model = Encoder(features=16, class_token=True, rngs=nnx.Rngs(1))
    for r in (0, 8):
        (value, out), grads = loss_and_grads(model, frames, r=r)
        print(run_summary(r, frames, out, value, grads))


if __name__ == "__main__":
    main()
