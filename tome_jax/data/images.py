"""Decoding and evaluation preprocessing of single images, on tf.data (timm's conventions)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing, timm's conventions.

    The shorter side is resized to `size / crop_pct`, then the centre `size` is
    cropped; pixels scaled to [0, 1] and normalised with `mean`/`std`. Images that
    already have the target size are left unresized (CIFAR at 32x32).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def __post_init__(self):
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> [height, width, 3] uint8.

    JPEGs use the accurate integer DCT, which reproduces PIL (and so timm's data
    pipelines) bit for bit; the default fast DCT is off by up to 5 levels.
    """
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )


def _resize(image: tf.Tensor, size: tf.Tensor, method: str) -> tf.Tensor:
    return tf.image.resize(image, size, method=method, antialias=True)


def preprocess_eval(image: tf.Tensor, p: Preprocess) -> tf.Tensor:
    """[height, width, 3] uint8 -> [size, size, 3] float32, normalised."""
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)[:2]
    target = tf.constant(p.size, tf.int32)
    resize_to = tf.cast(tf.math.floor(tf.cast(target, tf.float32) / p.crop_pct), tf.int32)
    scale = tf.reduce_max(tf.cast(resize_to, tf.float32) / tf.cast(shape, tf.float32))
    resized_shape = tf.cast(tf.math.round(tf.cast(shape, tf.float32) * scale), tf.int32)
    image = tf.cond(
        tf.reduce_all(resized_shape == shape),
        lambda: image,
        lambda: _resize(image, resized_shape, p.interpolation),
    )
    offset = (tf.shape(image)[:2] - target) // 2
    image = tf.image.crop_to_bounding_box(image, offset[0], offset[1], p.size[0], p.size[1])
    if p.interpolation != "nearest":
        # Keep pixel values where an 8-bit pipeline (PIL) would have them.
        image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    return (image / 255.0 - tf.constant(p.mean)) / tf.constant(p.std)


def preprocess_from_config(config: dict, img_size: Sequence[int]) -> Preprocess:
    """timm's pretrained/data config (mean, std, crop_pct, interpolation) -> Preprocess."""
    return Preprocess(
        size=tuple(img_size),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        crop_pct=float(config.get("crop_pct", 1.0)),
        interpolation=config.get("interpolation", "bicubic"),
    )
