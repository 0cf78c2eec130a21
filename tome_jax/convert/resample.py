"""Fitting a checkpoint's position embeddings and patch kernel to another model.

Position embeddings are resized to another patch grid as timm does; an image
checkpoint's patch kernel is inflated to a video model's tubelets or summed over
RGB for a one-channel (spectrogram) model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tome_jax.layers import pair
from tome_jax.vit import ViT


# --- position embeddings -----------------------------------------------------------


def resample_pos_embed(
    pos_embed: np.ndarray, new_grid, old_grid, num_prefix_tokens: int
) -> np.ndarray:
    """Resizes position embeddings to another patch grid, like timm's
    `resample_abs_pos_embed` (bicubic, antialiased); prefix positions are kept.

    timm calls torch's `F.interpolate(mode="bicubic", antialias=True)`: PIL's
    scheme, Keys' cubic kernel with a = -0.5, stretched by the scale when
    shrinking and renormalised at the borders, pixel centres at half-integers.
    `jax.image.resize(..., "bicubic", antialias=True)` computes the same weights;
    it runs in float32 at least (float64 with jax x64), on the default device.

    Video grids add time: each axis is resized alike. An image grid is one step
    of time, so image embeddings resized to a video grid repeat in every step.

    Args:
      pos_embed: [1, num_prefix_tokens + prod(old_grid), width], grid positions
        flattened time first, then rows, then columns.
      new_grid, old_grid: (rows, columns) of patches, or (time, rows, columns).

    Returns:
      [1, num_prefix_tokens + prod(new_grid), width] in pos_embed's dtype.
    """
    old, new = _space_time(old_grid), _space_time(new_grid)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if grid.shape[1] != math.prod(old):
        given = "x".join(map(str, pair(old_grid)))
        raise ValueError(f"pos_embed has {grid.shape[1]} grid positions, not {given}={math.prod(old)}")
    grid = grid.reshape(*old, -1).astype(np.promote_types(grid.dtype, np.float32))
    resized = jax.image.resize(jnp.asarray(grid), (*new, grid.shape[-1]), "bicubic", antialias=True)
    resized = np.asarray(resized).reshape(1, math.prod(new), -1).astype(pos_embed.dtype)
    return np.concatenate([prefix, resized], axis=1)


def _space_time(grid) -> tuple[int, int, int]:
    """A side, (rows, columns) or (time, rows, columns) -> (time, rows, columns)."""
    grid = pair(grid)
    return grid if len(grid) == 3 else (1, *grid)


def sinusoid_table(positions: int, width: int) -> np.ndarray:
    """VideoMAE's fixed position table [1, positions, width]: position / 10000^(2 (j // 2) / width),
    sine in the even channels, cosine in the odd; float64 rounded to float32, as transformers builds it."""
    channel = np.arange(width)
    angles = np.arange(positions)[:, None] / np.power(10000, 2 * (channel // 2) / width)[None]
    return np.where(channel % 2 == 0, np.sin(angles), np.cos(angles))[None].astype(np.float32)


# Position embeddings a checkpoint may hold that are a function of the token count, not
# learned (its `fixed_pos_embed` hint): built again for the model, never resampled.
FIXED_POS_EMBEDS = {"sinusoid": sinusoid_table}


def fit_pos_embed(pos_embed: np.ndarray, model: ViT, old_grid, fixed: str | None = None) -> np.ndarray:
    """pos_embed [1, positions, width] for the checkpoint's `old_grid` -> for the
    model's token grid, resampled where the two differ; a `fixed` table (a key of
    `FIXED_POS_EMBEDS`) is built for the model's tokens instead."""
    if fixed is not None:
        return FIXED_POS_EMBEDS[fixed](math.prod(model.token_grid), model.width).astype(pos_embed.dtype)
    if tuple(old_grid) == model.token_grid:
        return pos_embed
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    return resample_pos_embed(pos_embed, model.token_grid, old_grid, prefix)


# --- image checkpoints for video and audio models ---------------------------------

# from_timm's `inflation=` choices (see `_inflate_patch_kernel`).
INFLATIONS = ("average", "central")


def _inflate_patch_kernel(kernel: np.ndarray, tubelet: int, inflation: str) -> np.ndarray:
    """An image patch kernel [width, c, ph, pw] -> a tubelet's [width, c, tubelet, ph, pw].

    "average" spreads it evenly over the tubelet's frames (I3D's inflation), so a
    still clip embeds exactly as its frame; "central" puts it on frame
    `tubelet // 2` and zeros on the others (ViViT's choice, which it found to
    fine-tune better), so a clip embeds as its tubelets' central frames.
    """
    if inflation == "average":
        return np.repeat(kernel[:, :, None] / tubelet, tubelet, axis=2)
    inflated = np.zeros((*kernel.shape[:2], tubelet, *kernel.shape[2:]), kernel.dtype)
    inflated[:, :, tubelet // 2] = kernel
    return inflated


def fit_patch_embed(kernel: np.ndarray, model: ViT, inflation: str) -> np.ndarray:
    """An image checkpoint's patch kernel [width, c, ph, pw] -> the model's.

    For a one-channel model (spectrograms) the RGB kernels are summed, as AST and
    timm's `adapt_input_conv` do: a grey image replicated to RGB embeds exactly as
    the one-channel image does. For a video model the kernel is inflated to tubelets.
    """
    if model.in_chans == 1 and kernel.shape[1] == 3:
        kernel = kernel.sum(axis=1, keepdims=True)
    if model.num_frames is not None and kernel.ndim == 4:
        kernel = _inflate_patch_kernel(kernel, model.tubelet_size, inflation)
    return kernel
