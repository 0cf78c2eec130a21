"""Fewer visual tokens for a language model: a SigLIP So400m/14 tower at 384 px, merged.

A vision-language model (PaliGemma, LLaVA-style) hands its language model every
token of its vision tower: 27 x 27 = 729 for So400m/14 at 384 px. With ToMe each
of the tower's 27 blocks merges `r` tokens, so the language model reads fewer:
`tome_jax.tokens_per_layer` gives 513 at r = 8 and 297 at r = 16. Each merged
token comes with its size (the patches it holds), which the language model can
use as ToMe's blocks do, as a log(size) bias in its attention to those tokens.

    model = tome_jax.ViT(**SO400M_384)
    tokens, size = vision_tokens(model, variables, images, r=16)  # [b, 297, 1152], [b, 297]

(`images` cropped to 378 px, see `SO400M_384`.)

PaliGemma takes the tower's last output after its final norm (`block=None`);
LLaVA takes the output of the block before last, without the norm, and drops
the class token (`block=-2`).

Run: `python -m examples.siglip_tokens` (random weights, the full 400M-parameter
tower, one image).
"""

from __future__ import annotations

import functools

import jax

import tome_jax
from tome_jax import schedules

# So400m/14 at 384 px as timm's `vit_so400m_patch14_siglip_384`, but pooled by
# average instead of SigLIP's attention-pooling head (its tokens are the same).
# timm's patch convolution reads the top-left 27 x 14 = 378 pixels of a 384 px
# image and skips the last 6 rows and columns; this ViT takes images that are a
# multiple of the patch, so it is given that crop, `images[:, :378, :378]`.
# With SigLIP in the registry this is one line:
#     model = tome_jax.create_model("vit_so400m_patch14_siglip_384", num_classes=0)
SO400M_384 = dict(
    img_size=378,
    patch_size=14,
    width=1152,
    depth=27,
    num_heads=16,
    mlp_ratio=3.7362,  # timm's: int(1152 * 3.7362) = 4304 hidden units
    class_token=False,
    global_pool="avg",
    num_classes=0,
)


def token_count(model: tome_jax.ViT, r: schedules.RSpec, block: int | None = None) -> int:
    """The tokens `vision_tokens` returns at `r`, without running the model."""
    counts = tome_jax.tokens_per_layer(
        model.num_tokens, tome_jax.parse_r(model.depth, r), model.num_prefix_tokens
    )
    after = model.depth if block is None else block % model.depth + 1
    return counts[after] - model.num_prefix_tokens


def vision_tokens(model, variables, images, r: schedules.RSpec, block: int | None = None):
    """The tokens a language model reads, and the patches each holds.

    Args:
      images: [batch, height, width, 3], normalised, at the model's size.
      r: tokens merged per block (any `r` spec; static under `jax.jit`).
      block: None for the final tokens after the final norm, or a block index
        (-2: the block before last) for that block's output before any norm.

    Returns:
      tokens [batch, n, width] and size [batch, n], prefix (class) tokens left
      out; n = `token_count(model, r, block)`.
    """
    _, state = model.apply(variables, images, r=r, mutable="intermediates")
    tokens, size, _ = tome_jax.token_features(state["intermediates"], block)
    prefix = model.num_prefix_tokens
    return tokens[:, prefix:], size[:, prefix:]


def main(config=SO400M_384, r_values=(0, 8, 16)):
    model = tome_jax.ViT(**config)
    images = jax.random.normal(jax.random.key(0), (1, *model.input_shape))
    variables = jax.jit(model.init)(jax.random.key(1), images)
    for r in r_values:
        tokens, size = jax.jit(functools.partial(vision_tokens, model, r=r))(variables, images)
        print(
            f"r={r}: {model.num_tokens} tokens -> {tokens.shape[1]} "
            f"(tokens_per_layer: {token_count(model, r)}), features {tokens.shape}, "
            f"patches held: {int(size[0].sum())}"
        )


if __name__ == "__main__":
    main()
