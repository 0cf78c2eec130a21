"""Batch mixing for training, timm's Mixup/CutMix in JAX, on device inside the jitted step.

Soft targets with label smoothing for every batch (`one_hot_smoothed`), and
timm's batch-mode Mixup and CutMix (`mixup_cutmix`): one draw per batch, example
`i` mixed with example `batch - 1 - i`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def one_hot_smoothed(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """labels [batch] int -> [batch, num_classes] float32, timm's label smoothing.

    Off-target classes get smoothing / num_classes, the target 1 - smoothing + that
    (`optax.smooth_labels` of the one-hot rows).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


class MixParams(NamedTuple):
    """One batch's mixing draw (timm's batch mode), a pytree of scalars.

    Attributes:
      lam: [] float32, the weight of each image itself before cutmix's area
        correction; 1 means no mixing.
      use_cutmix: [] bool, paste a box (cutmix) rather than blend (mixup).
      centre: [2] int32, the cutmix box centre (row, column).
    """

    lam: jax.Array
    use_cutmix: jax.Array
    centre: jax.Array


def sample_mix_params(
    key, height, width, *, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5
) -> MixParams:
    """timm's Mixup._params_per_batch and rand_bbox's centre for images of `height` x `width`.

    With probability `prob` the batch is mixed; when both alphas are > 0, cutmix
    is chosen with probability `switch_prob`; lam ~ Beta(alpha, alpha) of the
    chosen method. An alpha of 0 turns that method off.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"alphas must be >= 0, got mixup {mixup_alpha}, cutmix {cutmix_alpha}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        raise ValueError("one of mixup_alpha and cutmix_alpha must be > 0")
    for name, probability in (("prob", prob), ("switch_prob", switch_prob)):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {probability}")
    apply_key, switch_key, lam_key, centre_key = jax.random.split(key, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(switch_key) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(lam_key, alpha, alpha)
    lam = jnp.where(jax.random.uniform(apply_key) < prob, lam, 1.0).astype(jnp.float32)
    centre = jax.random.randint(centre_key, (2,), 0, jnp.array([height, width]))
    return MixParams(lam, use_cutmix, centre)


def _cutmix_box(lam, centre, height, width):
    """timm's rand_bbox and area correction -> (in_box [height, width] bool, corrected lam)."""
    cut_fraction = jnp.sqrt(1.0 - lam)
    cut = jnp.floor(jnp.array([height, width]) * cut_fraction).astype(jnp.int32)
    low = jnp.clip(centre - cut // 2, 0, jnp.array([height, width]))
    high = jnp.clip(centre + (cut + 1) // 2, 0, jnp.array([height, width]))
    rows, cols = jnp.arange(height), jnp.arange(width)
    in_box = ((rows >= low[0]) & (rows < high[0]))[:, None] & ((cols >= low[1]) & (cols < high[1]))[None, :]
    box_area = jnp.prod(high - low)
    return in_box, 1.0 - box_area / (height * width)


def mix_batch(images, labels, params: MixParams, num_classes: int, label_smoothing: float = 0.1):
    """Mixes each example with its mirror in the batch (i with batch - 1 - i), timm's batch mode.

    Args:
      images: [batch, height, width, channels] float, batch even.
      labels: [batch] int.
      params: from `sample_mix_params`.
    Returns:
      images [batch, height, width, channels] and soft targets [batch, num_classes]
      (smoothed one-hots blended with the corrected lam; rows sum to 1).
    """
    batch, height, width = images.shape[:3]
    if batch % 2:
        raise ValueError(f"batch size must be even for mixup/cutmix, got {batch}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be floating point, got {images.dtype}")
    partners = images[::-1]
    in_box, cutmix_lam = _cutmix_box(params.lam, params.centre, height, width)
    cutmixed = jnp.where(in_box[None, :, :, None], partners, images)
    mixed_up = images * params.lam + partners * (1.0 - params.lam)
    images = jnp.where(params.use_cutmix, cutmixed, mixed_up).astype(images.dtype)
    lam = jnp.where(params.use_cutmix, cutmix_lam, params.lam)
    targets = one_hot_smoothed(labels, num_classes, label_smoothing)
    return images, targets * lam + targets[::-1] * (1.0 - lam)


def mixup_cutmix(
    key,
    images,
    labels,
    num_classes: int,
    *,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    prob=1.0,
    switch_prob=0.5,
    label_smoothing=0.1,
):
    """timm's Mixup(mode="batch") as a pure function: one lam per batch, pairs i and batch - 1 - i.

    images [batch, height, width, channels] float (batch even), labels [batch] int
    -> (mixed images, soft targets [batch, num_classes] float32). Static shapes
    throughout (the cutmix box is a mask), so it jits; keep the keyword arguments static.
    """
    params = sample_mix_params(
        key,
        images.shape[1],
        images.shape[2],
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
    )
    return mix_batch(images, labels, params, num_classes, label_smoothing)
