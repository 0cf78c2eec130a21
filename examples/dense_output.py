"""Dense outputs from a merged encoder: one prediction per input token.

Merging makes the sequence shorter, but tasks such as frame tagging or
segmentation need an output at every input position. Run the per-token head on
the merged tokens (cheaper: fewer tokens), then copy each result back to every
input position its token holds, undoing the merges last first with
`merge.unmerge`. Gathering through the composed source
(`merge.merge_source` over the plans) gives the same result in one step.
Run: `python -m examples.dense_output`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from examples.linen_encoder import Encoder
from tome_jax import merge


def unmerge_all(plans: Sequence[merge.MergePlan], x: jax.Array) -> jax.Array:
    """[batch, tokens_out, ...] after all `plans` -> [batch, tokens_in, ...] before the first."""
    for plan in reversed(plans):
        x = merge.unmerge(plan, x)
    return x


class FrameTagger(nn.Module):
    """Per-frame logits from the ToMe encoder of `linen_encoder.py`."""

    num_labels: int
    encoder: Encoder

    @nn.compact
    def __call__(self, frames: jax.Array, *, r: int = 0) -> jax.Array:
        """[batch, frames, features] -> [batch, frames, num_labels]."""
        out = self.encoder(frames, r=r)
        logits = nn.Dense(self.num_labels, name="head")(out.tokens)  # on the merged tokens
        return unmerge_all(out.plans, logits)[:, int(self.encoder.class_token) :]


def main():
    frames = jax.random.normal(jax.random.key(0), (2, 50, 16))
    model = FrameTagger(num_labels=5, encoder=Encoder(class_token=True))
    variables = model.init(jax.random.key(1), frames)
    for r in (0, 8):
        logits = jax.jit(model.apply, static_argnames="r")(variables, frames, r=r)
        print(f"r={r}: frames {frames.shape} -> per-frame logits {logits.shape}")


if __name__ == "__main__":
    main()
