"""Pictures of token merges, in the style of the ToMe paper's figures.

Every group of patches that ended up in one token is filled with the group's mean
colour and outlined in a colour of its own. The drawing functions are NumPy and
PIL only; `visualize` also runs a `tome_jax.ViT` to get the groups.

Sources come from the ViT's intermediates: after `_, state = model.apply(...,
mutable="intermediates")`, `tome_jax.token_features(state["intermediates"])
.source[i]` gives, for each input token of image `i` (prefix tokens first), the
final token holding it.

As a command, offline by default (the bundled CIFAR-10 model and test images),
`tome_jax.cli`'s:

    tome-jax-vis merges.png --images 8 --r "2, 4, 5"
"""

from __future__ import annotations

import numbers
import pathlib
import sys
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from tome_jax import features, merge, reduce, schedules
from tome_jax.vit import require_vit

# The fill of a pruned patch, which no token holds (white, as EViT's masked pictures).
PRUNED_COLOUR = 1.0


def as_float_image(image) -> np.ndarray:
    """[H, W, 3] uint8, or float in [0, 1] -> [H, W, 3] float64 in [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [height, width, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be uint8 or float in [0, 1], got dtype {image.dtype}")
    image = image.astype(np.float64)
    if not (np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0):
        raise ValueError(
            f"a float image must lie in [0, 1], got values in [{image.min()}, {image.max()}]"
        )
    return image


def patch_groups(source, grid_size: tuple[int, int], num_prefix_tokens: int = 1) -> np.ndarray:
    """[input_tokens] source of one image -> [gh, gw] the final token of each patch.

    A pruned patch (no final token holds it) is `merge.DROPPED` (-1).
    """
    gh, gw = _check_grid_size(grid_size)
    source = np.asarray(source)
    if source.ndim != 1 or not np.issubdtype(source.dtype, np.integer):
        raise ValueError(
            f"source must be a 1-D int array (one image), got {source.dtype} {source.shape}"
        )
    expected = gh * gw + num_prefix_tokens
    if source.shape[0] != expected:
        raise ValueError(
            f"source has {source.shape[0]} tokens, but a {gh}x{gw} grid with "
            f"{num_prefix_tokens} prefix tokens needs {expected}"
        )
    if source.min(initial=0) < merge.DROPPED:
        raise ValueError(f"source holds token indices below {merge.DROPPED} (a pruned patch)")
    return source[num_prefix_tokens:].reshape(gh, gw)


def _check_grid_size(grid_size) -> tuple[int, int]:
    if len(grid_size) != 2 or not all(
        isinstance(n, numbers.Integral) and n > 0 for n in grid_size
    ):
        raise ValueError(f"grid_size must be two positive ints (gh, gw), got {grid_size!r}")
    return int(grid_size[0]), int(grid_size[1])


def upsample_nearest(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """[gh, gw] -> [height, width]: each pixel takes the cell covering it.

    Pixel row `y` takes cell row `floor(y * gh / height)` (likewise columns), so
    non-square grids and sizes that are not a multiple of the grid work too.
    """
    gh, gw = grid.shape
    if height < gh or width < gw:
        raise ValueError(f"a {height}x{width} image is smaller than its {gh}x{gw} patch grid")
    rows = np.arange(height) * gh // height
    cols = np.arange(width) * gw // width
    return grid[rows[:, None], cols[None, :]]


def _four_neighbours(array: np.ndarray, fill) -> np.ndarray:
    """[H, W] -> [4, H, W]: the value above, below, left and right of each cell."""
    padded = np.pad(array, 1, constant_values=fill)
    return np.stack([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])


def group_borders(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """[H, W] group labels -> [H, W] bool, the pixels drawn as a group's outline.

    A pixel is on the outline when it lies within `width` steps (up, down, left,
    right) of another group or of the image edge: each group's mask eroded
    `width` times with a cross, the pixels the erosion removed.
    """
    if width < 1:
        raise ValueError(f"border width must be >= 1, got {width}")
    inside = (_four_neighbours(labels, -1) == labels).all(axis=0)
    for _ in range(width - 1):
        inside &= _four_neighbours(inside, False).all(axis=0)
    return ~inside


def default_border_width(height: int, width: int) -> int:
    """1 pixel up to 447-pixel images (the paper's 224), proportionally more above."""
    return max(1, min(height, width) // 224)


def group_colours(count: int, seed: int = 0) -> np.ndarray:
    """[count, 3] random outline colours in [0, 1], the same for the same seed."""
    return np.random.default_rng(seed).random((count, 3))


def merge_visualization(
    image,
    source,
    grid_size: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    seed: int = 0,
    border_width: int | None = None,
) -> np.ndarray:
    """Draws one image's merged groups as in the ToMe paper.

    Args:
      image: [H, W, 3] uint8 or float in [0, 1], any size not below the grid's.
      source: [input_tokens] ints, the final token holding each input token
        (`tome_jax.token_features(...).source[i]`); the first `num_prefix_tokens`
        are dropped.
      grid_size: (gh, gw) patches the model saw; input_tokens = gh * gw + prefix.
      seed: picks the outline colours (one per final token).
      border_width: outline thickness in pixels; None: `default_border_width`.

    Returns:
      [H, W, 3] float64 in [0, 1]: each group filled with the mean colour of its
      pixels, its outline pixels in the group's colour; pruned patches in
      `PRUNED_COLOUR`.
    """
    image = as_float_image(image)
    height, width, _ = image.shape
    labels = upsample_nearest(patch_groups(source, grid_size, num_prefix_tokens), height, width)
    groups, group_of_pixel = np.unique(labels, return_inverse=True)
    group_of_pixel = group_of_pixel.reshape(-1)
    pixels = image.reshape(-1, 3)
    pixel_counts = np.bincount(group_of_pixel)
    colour_sums = np.stack(
        [np.bincount(group_of_pixel, weights=pixels[:, c]) for c in range(3)], axis=-1
    )
    mean_colours = colour_sums / pixel_counts[:, None]
    outline_colours = group_colours(int(groups.max()) + 1, seed)
    if border_width is None:
        border_width = default_border_width(height, width)
    border = group_borders(labels, border_width)
    filled = mean_colours[group_of_pixel].reshape(height, width, 3)
    drawn = np.where(border[..., None], outline_colours[labels], filled)
    return np.where((labels == merge.DROPPED)[..., None], PRUNED_COLOUR, drawn)


def merge_visualizations(
    images, sources, grid_size: tuple[int, int], *, num_prefix_tokens: int = 1, seed: int = 0
) -> np.ndarray:
    """`merge_visualization` for each image: [n, H, W, 3], [n, input_tokens] -> [n, H, W, 3]."""
    sources = np.asarray(sources)
    if len(images) != len(sources):
        raise ValueError(f"{len(images)} images but {len(sources)} sources")
    return np.stack(
        [
            merge_visualization(
                image, source, grid_size, num_prefix_tokens=num_prefix_tokens, seed=seed
            )
            for image, source in zip(images, sources)
        ]
    )


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """[..., H, W, C] -> [..., H * factor, W * factor, C] by repeating pixels."""
    if not isinstance(factor, numbers.Integral) or factor < 1:
        raise ValueError(f"the upscale factor must be a positive int, got {factor!r}")
    return np.repeat(np.repeat(images, factor, axis=-3), factor, axis=-2)


def display_scale(height: int, width: int, target: int = 256) -> int:
    """The integer upscale that brings a small image near `target` pixels (>= 1)."""
    return max(1, target // max(height, width))


def tile_grid(tiles, columns: int, *, gap: int = 2, background: float = 1.0) -> np.ndarray:
    """[n, H, W, 3] equal-size tiles -> one picture, row by row, `columns` a row.

    Tiles are separated by `gap` pixels of `background`; a short last row is
    padded with background.
    """
    tiles = np.asarray(tiles, np.float64)
    if tiles.ndim != 4 or len(tiles) == 0:
        raise ValueError(f"tiles must be a non-empty [n, H, W, C] stack, got {tiles.shape}")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    count, height, width, channels = tiles.shape
    rows = -(-count // columns)
    out = np.full(
        (rows * (height + gap) - gap, columns * (width + gap) - gap, channels), background
    )
    for i, tile in enumerate(tiles):
        top, left = (i // columns) * (height + gap), (i % columns) * (width + gap)
        out[top : top + height, left : left + width] = tile
    return out


def visualization_grid(
    images,
    sources,
    grid_size: tuple[int, int],
    *,
    columns: int,
    num_prefix_tokens: int = 1,
    scale: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Each image next to its merge picture, `columns` such pairs a row.

    Args:
      images: [n, H, W, 3] uint8 or float in [0, 1] (or a list of such images).
      sources: [n, input_tokens] ints, `tome_jax.token_features(...).source`.
      scale: integer upscale applied before drawing, so outlines stay thin.

    Returns:
      [rows * H', 2 * columns * W' (plus gaps), 3] float64 in [0, 1], H' = H * scale.
    """
    images = np.stack([upscale(as_float_image(image), scale) for image in images])
    merged = merge_visualizations(
        images, sources, grid_size, num_prefix_tokens=num_prefix_tokens, seed=seed
    )
    pairs = np.stack([images, merged], axis=1).reshape(-1, *images.shape[1:])
    return tile_grid(pairs, 2 * columns)


def image_format(path) -> str:
    """The PIL format the file name's suffix says ("PNG" for .png, "JPEG" for .jpg), or an error."""
    suffix = pathlib.Path(path).suffix.lower()
    name = Image.registered_extensions().get(suffix)
    if name not in Image.SAVE:
        raise ValueError(f"{path}: no image format PIL writes has the suffix {suffix!r}; name it .png, .jpg or .webp")
    return name


def save_image(array, path) -> None:
    """Writes [H, W, 3] uint8, or float in [0, 1], as 8-bit RGB in the format the file name's
    suffix says (`image_format`: .png, .jpg, .webp, any PIL writes)."""
    pixels = np.round(as_float_image(array) * 255.0).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=image_format(path))


def _final_sources(model, variables, images, r: schedules.RSpec) -> np.ndarray:
    """[n, input_tokens] the final token holding each input token of each image, at `r`."""

    # A closure rather than a static argument: per-layer lists are not hashable.
    @jax.jit
    def sources(variables, images):
        _, state = model.apply(variables, images, r=r, mutable="intermediates")
        return features.token_features(state["intermediates"]).source

    return np.asarray(sources(variables, images))


def visualize(
    model,
    variables,
    images,
    display_images,
    r: schedules.RSpec | Sequence[schedules.RSpec],
    *,
    scale: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Runs a `tome_jax.ViT` and draws its merges: one column per image, one row per r.

    The first row holds the display images, each further row the merge picture
    for one `r`. An int `r` gives one row; a list or tuple gives one row per
    element, each any spec `ViT` accepts (so a per-layer schedule goes inside a
    list: `[(4, 4, 2)]`).

    Args:
      model: a `tome_jax.ViT`.
      variables: its variables.
      images: [n, height, width, 3] model inputs (normalised, at the model's size).
      display_images: [n, H, W, 3] the same images for display, uint8 or float
        in [0, 1], any size (e.g. unnormalised originals); where the patches do
        not divide the model's image size, the part they cover is shown.
      scale: integer display upscale; None: `display_scale` (8x for 32x32).

    Returns:
      [(1 + len(r)) * H', n * W' (plus gaps), 3] float64 in [0, 1].
    """
    if require_vit(model, "visualize").num_frames is not None:
        raise ValueError("visualize draws image models; a video model's token groups span frames")
    if model.patch_strides != model.patch_kernel:
        raise ValueError("visualize draws patches that tile the image; this model's overlap (its patch_stride)")
    reduce.check_tracks_sources(model.method)
    if not isinstance(r, (numbers.Integral, list, tuple)):
        raise TypeError(f"r must be an int or a list of r specs (one row each), got {r!r} ({type(r).__name__})")
    r_values = [r] if isinstance(r, numbers.Integral) else list(r)
    display = np.stack([as_float_image(image) for image in display_images])
    if len(display) != len(images):
        raise ValueError(f"{len(images)} model images but {len(display)} display images")
    # Pixels past the model's last whole patch are not read (timm's So400m/14 reads
    # 378 of 384): the pictures show the part the patches cover.
    height, width = display.shape[1:3]
    (h, w), (gh, gw), (ph, pw) = model.image_hw, model.grid_size, model.patch_kernel
    display = display[:, : round(height * gh * ph / h), : round(width * gw * pw / w)]
    if scale is None:
        scale = display_scale(*display.shape[1:3])
    display = upscale(display, scale)
    rows = [display]
    for r_value in r_values:
        rows.append(
            merge_visualizations(
                display,
                _final_sources(model, variables, images, r_value),
                model.grid_size,
                num_prefix_tokens=model.num_prefix_tokens,
                seed=seed,
            )
        )
    return tile_grid(np.concatenate(rows), columns=len(display))


if __name__ == "__main__":  # the pictures' spelling before they became a command
    print("error: the pictures are now the command tome-jax-vis OUTPUT.png (or python -m tome_jax vis)", file=sys.stderr)
    sys.exit(2)
