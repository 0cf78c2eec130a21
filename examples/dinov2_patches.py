"""DINOv2 patch features at full resolution, from a merged ViT.

Dense tasks (segmentation, depth) read one feature per patch: DINOv2's linear
probes put a head on the final, normed patch tokens. With ToMe the blocks end
with fewer tokens than patches; `tome_jax.patch_features` copies each final
token back to every patch it holds, so the head still gets the full grid, and
patches that were merged share one feature:

    model = tome_jax.ViT(**DINOV2_S14)
    features = dense_features(model, variables, images, r=8)  # [batch, 16, 16, 384]

The class token (and DINOv2's register tokens) are left out. At r = 0 these are
exactly the model's own patch tokens.

Run: `python -m examples.dinov2_patches` (random weights).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

import tome_jax
from tome_jax import schedules

# DINOv2 ViT-S/14 (timm's `vit_small_patch14_dinov2`) at 224 px: 16 x 16 patches
# and a class token. With DINOv2 in the registry this is one line:
#     model = tome_jax.create_model("vit_small_patch14_reg4_dinov2", img_size=224, num_classes=0)
DINOV2_S14 = dict(
    img_size=224, patch_size=14, width=384, depth=12, num_heads=6, layer_scale_init=1e-5, num_classes=0
)


def dense_features(model, variables, images, r: schedules.RSpec, block: int | None = None):
    """One feature per patch, whatever `r` merged.

    Args:
      images: [batch, height, width, 3], normalised.
      r: tokens merged per block (any `r` spec; static under `jax.jit`).
      block: None for the final tokens after the final norm (what DINOv2's linear
        probes read), or a block index for that block's output before any norm.

    Returns:
      [batch, grid_h, grid_w, width].
    """
    _, state = model.apply(variables, images, r=r, mutable="intermediates")
    return tome_jax.patch_features(model, state["intermediates"], block)


def main(config=DINOV2_S14, r_values=(0, 8)):
    model = tome_jax.ViT(**config)
    images = jax.random.normal(jax.random.key(0), (2, *model.input_shape))
    variables = jax.jit(model.init)(jax.random.key(1), images)
    for r in r_values:
        features = jax.jit(functools.partial(dense_features, model, r=r))(variables, images)
        flat = np.asarray(features[0]).reshape(-1, features.shape[-1])
        print(
            f"r={r}: {model.num_tokens} tokens -> features {features.shape}, "
            f"{len(np.unique(flat, axis=0))} distinct in the first image"
        )


if __name__ == "__main__":
    main()
