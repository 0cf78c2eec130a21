"""Training-time augmentation, DeiT style: the per-example ops, on tf.data.

The order of timm's training transform as DeiT configures it:

  1. crop: `decode_and_random_crop` (ImageNet, straight from JPEG bytes) or
     `random_crop_with_padding` (CIFAR: pad 4, random 32x32), uint8 out;
  2. `random_flip` (horizontal, p = 0.5);
  3. `rand_augment` (timm's "rand-m9-mstd0.5-inc1"), uint8 in and out;
  4. to float in [0, 1] and normalise with the dataset mean/std (`normalise`);
  5. `random_erasing` (p = 0.25, per-pixel normal noise), on the normalised image;
  then, after batching, on device inside the jitted train step (`tome_jax.data.mixing`):
  6. `mixup_cutmix` (or `one_hot_smoothed` where mixing is off) for soft targets.

`TrainAugment` and `augment_train` compose steps 1-5 for a tf.data map.

Every per-example op takes `seed`, an int32/int64 tensor [2] fed to TensorFlow's
stateless random ops, so an (image, seed) pair always gives the same output and a
resumed run reproduces its augmentation; derive it per example, e.g.
`tf.random.experimental.stateless_fold_in([run_seed, epoch], example_index)`.
Images are [height, width, 3], NHWC batches [batch, height, width, 3].

Deliberate differences from timm: RandAugment's geometric ops interpolate bilinearly
(ImageProjectiveTransformV3 has no bicubic; timm uses bicubic with DeiT's settings),
and Posterize keeping 0 bits gives black, as Pillow < 10 did (Pillow >= 10 raises).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import tensorflow as tf

from tome_jax.data.images import decode_image

# timm retries a random box this many times before falling back.
_ATTEMPTS = 10
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_ERASING_MODES = ("const", "rand", "pixel")
# timm's magnitude scale: level 10 is an op's full strength.
_MAX_LEVEL = 10.0


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return pair


def _check_range(name: str, bounds: Sequence[float], low: float, high: float) -> None:
    lo, hi = bounds
    if not low < lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} < min <= max <= {high}, got {tuple(bounds)}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _uniform(seed: tf.Tensor, shape, low: float, high: float, dtype=tf.float32) -> tf.Tensor:
    return low + (high - low) * tf.random.stateless_uniform(shape, seed, dtype=dtype)


def _randint(seed: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """A uniform int32 in [0, high], both ends included (Python's random.randint)."""
    count = tf.cast(tf.maximum(high, 0) + 1, tf.float32)
    draw = tf.cast(tf.floor(tf.random.stateless_uniform([], seed) * count), tf.int32)
    # float32 rounding can land a draw just below 1 on `count`.
    return tf.minimum(draw, tf.maximum(high, 0))


# ---------------------------------------------------------------------------
# Crops and flips (uint8 in, uint8 out)


def _first_fitting_box(seed, height, width, area_range, log_ratio_range, strict):
    """timm's box search: up to 10 random (area, aspect) proposals, the first that fits wins.

    Args:
      seed: [2] stateless seed.
      height, width: int32 scalars, the image size.
      area_range: box area as fractions of the image area (uniform).
      log_ratio_range: log of box width / height (uniform).
      strict: boxes must be smaller than the image (RandomErasing), not merely fit (crops).
    Returns:
      found: bool scalar; top, left, box_height, box_width: int32 scalars (the
      position is uniform over the places the box fits).
    """
    seeds = tf.random.split(seed, 4)
    image_area = tf.cast(height * width, tf.float32)
    target_area = _uniform(seeds[0], [_ATTEMPTS], *area_range) * image_area
    ratio = tf.exp(_uniform(seeds[1], [_ATTEMPTS], *log_ratio_range))
    box_width = tf.cast(tf.round(tf.sqrt(target_area * ratio)), tf.int32)
    box_height = tf.cast(tf.round(tf.sqrt(target_area / ratio)), tf.int32)
    if strict:
        fits = (box_width < width) & (box_height < height)
    else:
        fits = (box_width <= width) & (box_height <= height)
    # Unlike timm, never propose an empty box (tiny images round sides down to 0).
    fits &= (box_width > 0) & (box_height > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    box_height, box_width = box_height[first], box_width[first]
    top = _randint(seeds[2], height - box_height)
    left = _randint(seeds[3], width - box_width)
    return tf.reduce_any(fits), top, left, box_height, box_width


def _centre_window(height, width, ratio):
    """timm's fallback crop: the centre, clipped to the aspect range. -> int32 [4]."""
    in_ratio = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
    low, high = ratio
    crop_width = tf.where(
        in_ratio > high, tf.cast(tf.round(tf.cast(height, tf.float32) * high), tf.int32), width
    )
    crop_height = tf.where(
        in_ratio < low, tf.cast(tf.round(tf.cast(width, tf.float32) / low), tf.int32), height
    )
    return tf.stack([(height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width])


def _check_crop_ranges(scale, ratio) -> None:
    _check_range("scale", scale, 0.0, 1.0)
    _check_range("ratio", ratio, 0.0, math.inf)


def _check_interpolation(interpolation) -> None:
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")


def random_crop_window(height, width, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
    """The Inception crop box of timm's RandomResizedCrop for an image of `height` x `width`.

    Up to 10 proposals with area uniform in `scale` (fractions of the image) and
    aspect (width / height) log-uniform in `ratio`; the first that fits is placed
    uniformly, else the centre crop clipped to `ratio` is used.
    Returns int32 [4]: (top, left, crop_height, crop_width).
    """
    _check_crop_ranges(scale, ratio)
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    found, top, left, crop_height, crop_width = _first_fitting_box(
        seed, height, width, scale, log_ratio, strict=False
    )
    return tf.where(
        found, tf.stack([top, left, crop_height, crop_width]), _centre_window(height, width, ratio)
    )


def _resize_uint8(image: tf.Tensor, size: tuple[int, int], interpolation: str) -> tf.Tensor:
    """[h, w, 3] -> [size, 3] uint8, antialiased like PIL, rounded to 8 bits like PIL."""
    resized = tf.image.resize(tf.cast(image, tf.float32), size, method=interpolation, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def random_resized_crop(
    image_uint8, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic"
) -> tf.Tensor:
    """timm's RandomResizedCropAndInterpolation: [h, w, 3] uint8 -> [size, 3] uint8.

    The box comes from `random_crop_window`; `size` is an int or (height, width).
    """
    size = _pair(size)
    _check_interpolation(interpolation)
    shape = tf.shape(image_uint8)
    top, left, crop_height, crop_width = tf.unstack(random_crop_window(shape[0], shape[1], seed, scale, ratio))
    crop = image_uint8[top : top + crop_height, left : left + crop_width]
    return _resize_uint8(crop, size, interpolation)


def _decode_jpeg_window(encoded, image_shape, window):
    """The `window` (int32 [4]: top, left, height, width) of a JPEG of `image_shape` [2].

    Returns [height, width, 3] uint8.

    Bit-identical to decoding the whole image and slicing: libjpeg's cropped decode
    replicates chroma at the crop's edges instead of upsampling from the neighbours,
    so a margin beyond any chroma sample's reach is decoded and then sliced off.
    """
    margin = 8
    start, size = window[:2], window[2:]
    outer_start = tf.maximum(start - margin, 0)
    outer_end = tf.minimum(start + size + margin, image_shape)
    outer = tf.image.decode_and_crop_jpeg(
        encoded, tf.concat([outer_start, outer_end - outer_start], 0), channels=3, dct_method="INTEGER_ACCURATE"
    )
    return tf.slice(outer, tf.concat([start - outer_start, [0]], 0), tf.concat([size, [3]], 0))


def decode_and_random_crop(
    encoded, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic"
) -> tf.Tensor:
    """Encoded image bytes -> [size, 3] uint8, equal to `random_resized_crop(decode_image(encoded))`.

    JPEGs decode little more than the crop (with the accurate DCT of
    `data.decode_image`), so a large image is never decoded whole; other formats
    are decoded, then cropped.
    """
    size = _pair(size)
    _check_interpolation(interpolation)

    def crop_jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)[:2]
        window = random_crop_window(shape[0], shape[1], seed, scale, ratio)
        return _resize_uint8(_decode_jpeg_window(encoded, shape, window), size, interpolation)

    def crop_decoded():
        return random_resized_crop(decode_image(encoded), size, seed, scale, ratio, interpolation)

    return tf.cond(tf.io.is_jpeg(encoded), crop_jpeg, crop_decoded)


def _check_padding(padding) -> None:
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")


def random_crop_with_padding(image, size, padding, seed) -> tf.Tensor:
    """The CIFAR crop: zero-pad every side by `padding`, then a uniform random `size` crop.

    [h, w, c] -> [size, c], any dtype.
    """
    height, width = _pair(size)
    _check_padding(padding)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    shape = tf.shape(padded)
    seeds = tf.random.split(seed, 2)
    top = _randint(seeds[0], shape[0] - height)
    left = _randint(seeds[1], shape[1] - width)
    return tf.slice(padded, [top, left, 0], [height, width, -1])


def random_flip(image, seed) -> tf.Tensor:
    """Mirrors [h, w, c] left-right with probability 0.5."""
    return tf.image.stateless_random_flip_left_right(image, seed)


# ---------------------------------------------------------------------------
# RandAugment. Ops see [h, w, 3] float32 holding integers in 0..255 and return the
# same, reproducing PIL's 8-bit arithmetic; all take (image, arg, fill) like
# timm's ops take **kwargs, ignoring what they do not use.


def _blend(degenerate, image, factor):
    """PIL's Image.blend(degenerate, image, factor): float32 arithmetic, truncated, clipped."""
    factor = tf.cast(factor, tf.float32)
    return tf.clip_by_value(tf.floor(degenerate + factor * (image - degenerate)), 0.0, 255.0)


def _grey(image):
    """PIL's RGB -> L conversion (ITU-R 601-2 luma, fixed point): [h, w, 3] -> [h, w, 1]."""
    rgb = tf.cast(image, tf.int32)
    weighted = rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471
    return tf.cast(tf.bitwise.right_shift(weighted + 0x8000, 16), tf.float32)


def auto_contrast(image, *_):
    """ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255]."""
    pixels = tf.cast(image, tf.float64)
    low = tf.reduce_min(pixels, axis=[0, 1])
    high = tf.reduce_max(pixels, axis=[0, 1])
    flat = high <= low
    scale = 255.0 / tf.where(flat, tf.ones_like(high), high - low)
    # PIL's LUT arithmetic, in float64 as in Python, so integer boundaries agree.
    stretched = tf.clip_by_value(tf.floor(pixels * scale + -low * scale), 0.0, 255.0)
    return tf.cast(tf.where(flat, pixels, stretched), tf.float32)


def equalize(image, *_):
    """ImageOps.equalize: per-channel histogram equalisation with PIL's integer LUT."""
    # Each channel's levels in its own range of 256, for one histogram and one lookup.
    index = tf.cast(image, tf.int32) + 256 * tf.range(3)
    histogram = tf.reshape(tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768), [3, 256])
    top_level = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.int32)
    last_count = tf.gather(histogram, top_level, batch_dims=1)
    step = (tf.reduce_sum(histogram, axis=1) - last_count) // 255
    safe_step = tf.maximum(step, 1)[:, None]
    lut = tf.minimum((safe_step // 2 + tf.cumsum(histogram, axis=1, exclusive=True)) // safe_step, 255)
    # A single grey level gives step 0, where PIL keeps the channel as it is.
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), index), tf.float32)


def invert(image, *_):
    """ImageOps.invert."""
    return 255.0 - image


def posterize(image, bits, *_):
    """ImageOps.posterize keeping `bits` (0-8) high bits; 0 bits gives black."""
    quantum = tf.pow(2.0, 8.0 - tf.cast(bits, tf.float32))
    return tf.floor(image / quantum) * quantum


def solarize(image, threshold, *_):
    """ImageOps.solarize: invert the pixels at or above `threshold`."""
    return tf.where(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


def solarize_add(image, addition, *_):
    """timm's solarize_add: add `addition` to the pixels below 128, saturating."""
    return tf.where(image < 128.0, tf.minimum(image + tf.cast(addition, tf.float32), 255.0), image)


def color(image, factor, *_):
    """ImageEnhance.Color: blend from the greyscale image (0) to the image (1) and beyond."""
    return _blend(tf.broadcast_to(_grey(image), tf.shape(image)), image, factor)


def contrast(image, factor, *_):
    """ImageEnhance.Contrast: blend from flat grey at the rounded mean luma."""
    mean = tf.floor(tf.reduce_mean(tf.cast(_grey(image), tf.float64)) + 0.5)
    return _blend(tf.cast(mean, tf.float32), image, factor)


def brightness(image, factor, *_):
    """ImageEnhance.Brightness: blend from black."""
    return _blend(0.0, image, factor)


def sharpness(image, factor, *_):
    """ImageEnhance.Sharpness: blend from PIL's SMOOTH filter (border pixels unfiltered)."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.clip_by_value(tf.floor(smooth + 0.5), 0.0, 255.0)
    degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    border = tf.pad(tf.zeros_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]], constant_values=True)
    return _blend(tf.where(border, image, degenerate), image, factor)


def _affine(image, matrix, fill):
    """PIL's Image.transform(AFFINE, BILINEAR, fillcolor=fill) of [h, w, 3] float32.

    `matrix` (a, b, c, d, e, f) maps each output point (x, y) to the input point
    (a x + b y + c, d x + e y + f), pixel centres at half-integers as in PIL. As in
    PIL, a point outside the image takes `fill` [3]; one inside interpolates among
    clamped neighbours, and values truncate.
    """
    a, b, c, d, e, f = (tf.cast(m, tf.float32) for m in matrix)
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    # ImageProjectiveTransformV3 puts pixel centres at integers; NEAREST clamps.
    transform = tf.stack([a, b, c + 0.5 * (a + b) - 0.5, d, e, f + 0.5 * (d + e) - 0.5, 0.0, 0.0])
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=shape[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )[0]
    x = tf.range(width)[None, :] + 0.5
    y = tf.range(height)[:, None] + 0.5
    x_in, y_in = a * x + b * y + c, d * x + e * y + f
    inside = (x_in >= 0.0) & (x_in < width) & (y_in >= 0.0) & (y_in < height)
    return tf.where(inside[..., None], tf.floor(moved), fill)


def rotate(image, degrees, fill):
    """Image.rotate(degrees) about the centre, counter-clockwise, same size."""
    angle = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    shape = tf.cast(tf.shape(image), tf.float64)
    centre_x, centre_y = shape[1] / 2.0, shape[0] / 2.0
    offset_x = -cos * centre_x - sin * centre_y + centre_x
    offset_y = sin * centre_x - cos * centre_y + centre_y
    return _affine(image, (cos, sin, offset_x, -sin, cos, offset_y), fill)


def shear_x(image, factor, fill):
    """timm's shear_x: input x = x + factor * y."""
    return _affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image, factor, fill):
    """timm's shear_y: input y = y + factor * x."""
    return _affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x_rel(image, fraction, fill):
    """timm's translate_x_rel: content moves left by `fraction` of the width."""
    pixels = tf.cast(fraction, tf.float32) * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y_rel(image, fraction, fill):
    """timm's translate_y_rel: content moves up by `fraction` of the height."""
    pixels = tf.cast(fraction, tf.float32) * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


# Magnitude -> argument, timm's mappings. `level` is a float64 scalar in [0, 10]
# (float64 and timm's operation order, so int() truncations agree with Python's);
# `negate` is the coin that flips a signed argument.


def _no_arg(level, negate):
    return tf.constant(0.0, tf.float64)


def _signed(full_scale):
    def level_to_arg(level, negate):
        arg = (level / _MAX_LEVEL) * full_scale
        return tf.where(negate, -arg, arg)

    return level_to_arg


def _enhance(level, negate):
    return (level / _MAX_LEVEL) * 1.8 + 0.1


def _enhance_increasing(level, negate):
    return tf.maximum(1.0 + _signed(0.9)(level, negate), 0.1)


def _posterize(level, negate):
    return tf.floor((level / _MAX_LEVEL) * 4)


def _posterize_increasing(level, negate):
    return 4 - _posterize(level, negate)


def _solarize(level, negate):
    return tf.minimum(tf.floor((level / _MAX_LEVEL) * 256), 256.0)


def _solarize_increasing(level, negate):
    return 256 - _solarize(level, negate)


def _solarize_add(level, negate):
    return tf.minimum(tf.floor((level / _MAX_LEVEL) * 110), 128.0)


class RandOp(NamedTuple):
    """A RandAugment op: `apply(image, arg, fill)` and its `level_to_arg(level, negate)`."""

    apply: Callable
    level_to_arg: Callable


# timm's names, ops and magnitude mappings (translations: timm's default 0.45 of the size).
RAND_AUGMENT_OPS = {
    "AutoContrast": RandOp(auto_contrast, _no_arg),
    "Equalize": RandOp(equalize, _no_arg),
    "Invert": RandOp(invert, _no_arg),
    "Rotate": RandOp(rotate, _signed(30.0)),
    "Posterize": RandOp(posterize, _posterize),
    "PosterizeIncreasing": RandOp(posterize, _posterize_increasing),
    "Solarize": RandOp(solarize, _solarize),
    "SolarizeIncreasing": RandOp(solarize, _solarize_increasing),
    "SolarizeAdd": RandOp(solarize_add, _solarize_add),
    "Color": RandOp(color, _enhance),
    "ColorIncreasing": RandOp(color, _enhance_increasing),
    "Contrast": RandOp(contrast, _enhance),
    "ContrastIncreasing": RandOp(contrast, _enhance_increasing),
    "Brightness": RandOp(brightness, _enhance),
    "BrightnessIncreasing": RandOp(brightness, _enhance_increasing),
    "Sharpness": RandOp(sharpness, _enhance),
    "SharpnessIncreasing": RandOp(sharpness, _enhance_increasing),
    "ShearX": RandOp(shear_x, _signed(0.3)),
    "ShearY": RandOp(shear_y, _signed(0.3)),
    "TranslateXRel": RandOp(translate_x_rel, _signed(0.45)),
    "TranslateYRel": RandOp(translate_y_rel, _signed(0.45)),
}

# timm's _RAND_TRANSFORMS, in timm's order; the increasing set (timm's
# _RAND_INCREASING_TRANSFORMS) swaps in each op's "Increasing" mapping where there is one.
RAND_AUGMENT_NAMES = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
RAND_AUGMENT_INCREASING_NAMES = tuple(
    f"{name}Increasing" if f"{name}Increasing" in RAND_AUGMENT_OPS else name for name in RAND_AUGMENT_NAMES
)


class _LayerDraws(NamedTuple):
    """What RandAugment draws per layer, each [num_layers]."""

    op_index: tf.Tensor  # int32, uniform over the op set (with replacement)
    applied: tf.Tensor  # bool, True with probability `prob`
    level: tf.Tensor  # float64 magnitude, noisy then clipped to [0, 10]
    negate: tf.Tensor  # bool, a fair coin for signed arguments


def _rand_augment_draws(seed, num_layers, num_ops, magnitude, magnitude_std, prob) -> _LayerDraws:
    seeds = tf.random.split(seed, 4)
    op_index = tf.random.stateless_uniform([num_layers], seeds[0], 0, num_ops, tf.int32)
    applied = tf.random.stateless_uniform([num_layers], seeds[1]) < prob
    if math.isinf(magnitude_std):
        level = _uniform(seeds[2], [num_layers], 0.0, magnitude, tf.float64)
    else:
        noise = tf.random.stateless_normal([num_layers], seeds[2], dtype=tf.float64)
        level = magnitude + magnitude_std * noise
    negate = tf.random.stateless_uniform([num_layers], seeds[3]) > 0.5
    return _LayerDraws(op_index, applied, tf.clip_by_value(level, 0.0, _MAX_LEVEL), negate)


def _check_rand_augment(num_layers, magnitude, magnitude_std) -> None:
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if magnitude < 0 or not magnitude_std >= 0:
        raise ValueError(f"magnitude and magnitude_std must be >= 0, got {magnitude}, {magnitude_std}")


def _apply_rand_op(op: RandOp, image, level, negate, fill):
    return tf.ensure_shape(op.apply(image, op.level_to_arg(level, negate), fill), image.shape)


def rand_augment(
    image_uint8,
    seed,
    num_layers=2,
    magnitude=9,
    magnitude_std=0.5,
    increasing=True,
    *,
    prob=0.5,
    fill=(128, 128, 128),
) -> tf.Tensor:
    """timm's RandAugment ("rand-m9-mstd0.5-inc1" by default): [h, w, 3] uint8 -> same.

    Each of `num_layers` layers picks one of the 15 ops uniformly (with replacement)
    and applies it with probability `prob` at a magnitude drawn from
    N(magnitude, magnitude_std) (uniform on [0, magnitude] for an infinite std),
    clipped to [0, 10]. `increasing` picks timm's op set whose severity grows with
    magnitude. `fill` colours the pixels that geometric ops bring in; timm's
    training transform passes the dataset mean, round(255 * mean).
    """
    _check_rand_augment(num_layers, magnitude, magnitude_std)
    _check_probability("prob", prob)
    if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
        raise ValueError(f"fill must be three values in [0, 255], got {fill!r}")
    names = RAND_AUGMENT_INCREASING_NAMES if increasing else RAND_AUGMENT_NAMES
    ops = [RAND_AUGMENT_OPS[name] for name in names]
    draws = _rand_augment_draws(seed, num_layers, len(ops), magnitude, magnitude_std, prob)
    image = tf.cast(image_uint8, tf.float32)
    fill = tf.constant(fill, tf.float32)
    for layer in range(num_layers):
        level, negate = draws.level[layer], draws.negate[layer]
        branches = [functools.partial(_apply_rand_op, op, image, level, negate, fill) for op in ops]
        image = tf.cond(
            draws.applied[layer],
            functools.partial(tf.switch_case, draws.op_index[layer], branches),
            functools.partial(tf.identity, image),
        )
    return tf.cast(image, tf.uint8)


# ---------------------------------------------------------------------------
# After normalisation


def normalise(image_uint8, mean, std) -> tf.Tensor:
    """[h, w, 3] uint8 -> float32, scaled to [0, 1], then (x - mean) / std per channel."""
    return (tf.cast(image_uint8, tf.float32) / 255.0 - tf.constant(mean)) / tf.constant(std)


def random_erasing(
    image, seed, probability=0.25, mode="pixel", *, min_area=0.02, max_area=1 / 3, min_aspect=0.3, max_aspect=None
) -> tf.Tensor:
    """timm's RandomErasing (one box) on a normalised [h, w, c] float image.

    With probability `probability`, a box of area uniform in [min_area, max_area]
    of the image and aspect (height / width) log-uniform in [min_aspect,
    max_aspect or 1 / min_aspect] is replaced by per-pixel ("pixel"), per-channel
    ("rand") standard normal values or zeros ("const"). If none of 10 proposals is
    smaller than the image, nothing is erased.
    """
    _check_probability("probability", probability)
    _check_range("(min_area, max_area)", (min_area, max_area), 0.0, 1.0)
    if not min_aspect > 0:
        raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
    max_aspect = max_aspect or 1 / min_aspect
    _check_range("(min_aspect, max_aspect)", (min_aspect, max_aspect), 0.0, math.inf)
    if mode not in _ERASING_MODES:
        raise ValueError(f"mode must be one of {_ERASING_MODES}, got {mode!r}")
    seeds = tf.random.split(seed, 3)
    shape = tf.shape(image)
    # The helper's ratio is width / height, the inverse of timm's erasing aspect.
    log_ratio = (-math.log(max_aspect), -math.log(min_aspect))
    found, top, left, box_height, box_width = _first_fitting_box(
        seeds[0], shape[0], shape[1], (min_area, max_area), log_ratio, strict=True
    )
    erase = found & (tf.random.stateless_uniform([], seeds[1]) < probability)
    rows, cols = tf.range(shape[0]), tf.range(shape[1])
    in_rows = (rows >= top) & (rows < top + box_height)
    in_cols = (cols >= left) & (cols < left + box_width)
    in_box = in_rows[:, None, None] & in_cols[None, :, None] & erase
    if mode == "const":
        values = tf.zeros([1, 1, shape[2]], image.dtype)
    else:
        values_shape = shape if mode == "pixel" else [1, 1, shape[2]]
        values = tf.random.stateless_normal(values_shape, seeds[2], dtype=image.dtype)
    return tf.where(in_box, values, image)


# ---------------------------------------------------------------------------
# The composed per-example transform


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """The training augmentation, DeiT's settings by default (timm's create_transform).

    `crop` is "random_resized" (ImageNet: Inception crop from `scale`/`ratio`,
    resized with `interpolation`) or "padded" (CIFAR: zero-pad `padding`, crop
    `size`). `rand_augment_layers` 0 and `erasing_prob` 0 turn those steps off.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: str = "random_resized"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    padding: int = 4
    hflip: bool = True
    rand_augment_layers: int = 2
    rand_augment_magnitude: float = 9
    rand_augment_magnitude_std: float = 0.5
    erasing_prob: float = 0.25
    erasing_mode: str = "pixel"

    def __post_init__(self):
        if self.crop not in ("random_resized", "padded"):
            raise ValueError(f"crop must be 'random_resized' or 'padded', got {self.crop!r}")
        _pair(self.size)
        _check_crop_ranges(self.scale, self.ratio)
        _check_interpolation(self.interpolation)
        _check_padding(self.padding)
        _check_rand_augment(self.rand_augment_layers, self.rand_augment_magnitude, self.rand_augment_magnitude_std)
        _check_probability("erasing_prob", self.erasing_prob)
        if self.erasing_mode not in _ERASING_MODES:
            raise ValueError(f"erasing_mode must be one of {_ERASING_MODES}, got {self.erasing_mode!r}")

    @classmethod
    def from_config(cls, config, size) -> TrainAugment:
        """The augmentation a train.py config sets (its keys `mean`, `std`, `crop`,
        `crop_scale`, `crop_padding`, `interpolation`, `flip`, `rand_augment_layers`,
        `rand_augment_magnitude`, `random_erasing`), for images of `size`."""
        return cls(
            size=tuple(size),
            mean=tuple(config.mean),
            std=tuple(config.std),
            crop=config.crop,
            scale=tuple(config.crop_scale),
            padding=config.crop_padding,
            interpolation=config.interpolation,
            hflip=config.flip,
            rand_augment_layers=config.rand_augment_layers,
            rand_augment_magnitude=config.rand_augment_magnitude,
            erasing_prob=config.random_erasing,
        )

    @property
    def fill(self) -> tuple[int, int, int]:
        """What timm's training transform gives RandAugment to fill with: the mean in 8 bits."""
        return tuple(min(255, round(255 * m)) for m in self.mean)


def augment_train(encoded, seed, config: TrainAugment) -> tf.Tensor:
    """Encoded image bytes -> [size, 3] float32, normalised: steps 1-5 of the module docstring."""
    crop_seed, flip_seed, rand_augment_seed, erasing_seed = tf.unstack(tf.random.split(seed, 4))
    if config.crop == "random_resized":
        image = decode_and_random_crop(
            encoded, config.size, crop_seed, config.scale, config.ratio, config.interpolation
        )
    else:
        image = random_crop_with_padding(decode_image(encoded), config.size, config.padding, crop_seed)
    if config.hflip:
        image = random_flip(image, flip_seed)
    if config.rand_augment_layers:
        image = rand_augment(
            image,
            rand_augment_seed,
            config.rand_augment_layers,
            config.rand_augment_magnitude,
            config.rand_augment_magnitude_std,
            fill=config.fill,
        )
    image = normalise(image, config.mean, config.std)
    if config.erasing_prob:
        image = random_erasing(image, erasing_seed, config.erasing_prob, config.erasing_mode)
    return image
