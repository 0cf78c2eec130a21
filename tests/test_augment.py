"""Training augmentation: each op against timm/PIL, crop and erasing statistics, determinism,
the composed tf.data transform, and mixup/cutmix against timm's Mixup."""

import functools
import io
import math
import tarfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tome_jax import data
from tome_jax.data import augment, mixing

# timm is the reference (its RandAugment ops on PIL, its Mixup); without the torch extra
# the tests that compare against it skip and the rest run.
NEEDS_TIMM = "timm is the reference: pip install -e '.[torch]'"
FILL = (124, 116, 104)  # timm's RandAugment fill for the ImageNet mean
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_jpeg(height, width, subsampling, seed=0):
    """A JPEG of smooth colour waves plus noise; subsampling 2 is 4:2:0, 0 is 4:4:4."""
    y, x = np.mgrid[0:height, 0:width]
    waves = np.stack([128 + 100 * np.sin(x / 17 + y / 29), 128 + 90 * np.cos(x / 11 - y / 7), (x * y) % 256], -1)
    noisy = waves + np.random.default_rng(seed).normal(0, 8, waves.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90, subsampling=subsampling)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cifar_jpegs():
    """The first eight JPEGs of the bundled CIFAR-10 archive, as bytes."""
    encoded = []
    with tarfile.open(data.BUNDLED_CIFAR10) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg"):
                encoded.append(archive.extractfile(member).read())
            if len(encoded) == 8:
                return encoded
    raise AssertionError("bundled CIFAR-10 has fewer than 8 JPEGs")


@pytest.fixture(scope="module")
def jpegs(cifar_jpegs):
    """Real 32x32 CIFAR JPEGs and larger synthetic ones, 4:2:0 and 4:4:4."""
    return cifar_jpegs[:4] + [synthetic_jpeg(300, 420, 2), synthetic_jpeg(257, 199, 0, seed=1)]


@pytest.fixture(scope="module")
def test_images(cifar_jpegs):
    """uint8 [h, w, 3] arrays: real photos, noise of odd size, a dim low-contrast one, a flat channel."""
    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.open(io.BytesIO(e)).convert("RGB")) for e in cifar_jpegs[:3]]
    noise = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    dim = rng.integers(90, 141, (29, 33, 3), dtype=np.uint8)
    flat_channel = noise[:20, :24].copy()
    flat_channel[..., 2] = 77
    return photos + [noise, dim, flat_channel]


def apply_op(name, image, arg, fill=FILL):
    """Our op on a uint8 array -> uint8 array."""
    op = augment.RAND_AUGMENT_OPS[name]
    out = op.apply(tf.constant(image, tf.float32), tf.constant(arg or 0, tf.float64), tf.constant(fill, tf.float32))
    return out.numpy().astype(np.uint8)


def timm_op(name, image, arg, resample=Image.BILINEAR):
    """timm's op (PIL) on a uint8 array -> uint8 array."""
    auto_augment = pytest.importorskip("timm.data.auto_augment", reason=NEEDS_TIMM)
    args = () if arg is None else (arg,)
    out = auto_augment.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=FILL, resample=resample)
    return np.asarray(out)


def difference(a, b):
    return np.abs(a.astype(np.int32) - b.astype(np.int32))


# ---------------------------------------------------------------------------
# RandAugment ops against PIL

COLOUR_CASES = [
    ("AutoContrast", None), ("Equalize", None), ("Invert", None),
    ("Posterize", 1), ("Posterize", 4), ("Solarize", 0), ("Solarize", 100), ("Solarize", 256),
    ("SolarizeAdd", 0), ("SolarizeAdd", 99), ("Color", 0.3), ("Color", 1.63), ("Contrast", 0.2),
    ("Contrast", 1.9), ("Brightness", 0.1), ("Brightness", 1.81), ("Sharpness", 0.1), ("Sharpness", 1.9),
]  # fmt: skip
GEOMETRIC_CASES = [
    ("Rotate", 27.3), ("Rotate", -13.0), ("ShearX", 0.27), ("ShearX", -0.3), ("ShearY", -0.21),
    ("TranslateXRel", 0.4), ("TranslateXRel", -0.17), ("TranslateYRel", -0.33), ("TranslateYRel", 0.45),
]  # fmt: skip


@pytest.mark.parametrize("name, arg", COLOUR_CASES)
def test_colour_ops_equal_pil(name, arg, test_images):
    for image in test_images:
        np.testing.assert_array_equal(apply_op(name, image, arg), timm_op(name, image, arg), err_msg=name)


@pytest.mark.parametrize("name, arg", GEOMETRIC_CASES)
def test_geometric_ops_match_pil_bilinear(name, arg, test_images):
    """Same geometry, fill and truncation as PIL. Where the exact value is a whole number
    (a shear of 0.3 puts many samples half-way between two pixels), truncating it after
    float32 (TensorFlow) or float64 (PIL) coordinate arithmetic can differ by 1."""
    for image in test_images:
        diff = difference(apply_op(name, image, arg), timm_op(name, image, arg))
        assert diff.max() <= 1, name
        assert (diff > 0).mean() < 0.05, name


@pytest.mark.parametrize("name, arg", GEOMETRIC_CASES)
def test_geometric_ops_close_to_timm_bicubic(name, arg, test_images):
    """timm resamples bicubically with DeiT's settings; we interpolate bilinearly."""
    for image in test_images[:3]:
        diff = difference(apply_op(name, image, arg), timm_op(name, image, arg, Image.BICUBIC))
        assert diff.mean() < 4, name


def test_posterize_extremes():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    np.testing.assert_array_equal(apply_op("Posterize", image, 8), image)
    # Pillow >= 10 refuses 0 bits, which timm passes at magnitude 10; older Pillow gave black.
    np.testing.assert_array_equal(apply_op("Posterize", image, 0), np.zeros_like(image))


def test_op_sets_are_timms():
    auto_augment = pytest.importorskip("timm.data.auto_augment", reason=NEEDS_TIMM)
    assert augment.RAND_AUGMENT_NAMES == tuple(auto_augment._RAND_TRANSFORMS)
    assert augment.RAND_AUGMENT_INCREASING_NAMES == tuple(auto_augment._RAND_INCREASING_TRANSFORMS)


@pytest.mark.parametrize("negate", [False, True])
def test_magnitude_mappings_equal_timms(negate, monkeypatch):
    auto_augment = pytest.importorskip("timm.data.auto_augment", reason=NEEDS_TIMM)
    monkeypatch.setattr(auto_augment, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
    levels = [*range(11), 0.37, 2.5, 4.5, 8.99, 9.61]
    for name, op in augment.RAND_AUGMENT_OPS.items():
        timm_level_to_arg = auto_augment.LEVEL_TO_ARG[name]
        for level in levels:
            ours = float(op.level_to_arg(tf.constant(level, tf.float64), tf.constant(negate)))
            expected = timm_level_to_arg(level, auto_augment._HPARAMS_DEFAULT)[0] if timm_level_to_arg else 0.0
            assert ours == expected, (name, level)


# ---------------------------------------------------------------------------
# RandAugment as a whole


def test_rand_augment_applies_the_drawn_op(test_images):
    """One layer at prob 1 is exactly the drawn op at the drawn magnitude and sign."""
    image = test_images[0]
    names = augment.RAND_AUGMENT_INCREASING_NAMES
    seen = set()
    for index in range(24):
        seed = tf.constant([index, 5])
        draws = augment._rand_augment_draws(seed, 1, len(names), 9, 0.5, 1.0)
        op = augment.RAND_AUGMENT_OPS[names[int(draws.op_index[0])]]
        seen.add(names[int(draws.op_index[0])])
        arg = op.level_to_arg(draws.level[0], draws.negate[0])
        expected = op.apply(tf.constant(image, tf.float32), arg, tf.constant(FILL, tf.float32))
        out = augment.rand_augment(image, seed, num_layers=1, prob=1.0, fill=FILL)
        np.testing.assert_array_equal(out.numpy(), expected.numpy().astype(np.uint8))
    assert len(seen) >= 10


def test_rand_augment_draw_statistics():
    draws = augment._rand_augment_draws(tf.constant([1, 2]), 30000, 15, 9, 0.5, 0.5)
    counts = np.bincount(draws.op_index.numpy(), minlength=15) / 30000
    np.testing.assert_allclose(counts, 1 / 15, atol=0.01)
    level = draws.level.numpy()
    assert level.min() >= 0 and level.max() == 10
    assert abs(level.mean() - 9) < 0.02 and abs(level.std() - 0.5) < 0.02
    assert abs((level == 10).mean() - 0.0228) < 0.005  # P(N(9, 0.5) >= 10), clipped
    assert abs(draws.applied.numpy().mean() - 0.5) < 0.02
    assert abs(draws.negate.numpy().mean() - 0.5) < 0.02
    uniform = augment._rand_augment_draws(tf.constant([1, 2]), 30000, 15, 9, math.inf, 0.5).level.numpy()
    assert uniform.min() >= 0 and uniform.max() <= 9 and abs(uniform.mean() - 4.5) < 0.1


def test_rand_augment_identity_settings(test_images):
    image = test_images[0]
    for settings in (dict(num_layers=0), dict(prob=0.0)):
        np.testing.assert_array_equal(augment.rand_augment(image, tf.constant([0, 1]), **settings).numpy(), image)


def test_rand_augment_in_graph_mode(test_images):
    image = tf.constant(test_images[0])
    run = tf.function(lambda seed: augment.rand_augment(image, seed))
    outputs = [run(tf.constant([s, 0])).numpy() for s in range(6)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outputs)
    np.testing.assert_array_equal(outputs[0], augment.rand_augment(image, tf.constant([0, 0])).numpy())
    assert sum(not np.array_equal(o, test_images[0]) for o in outputs) >= 3


@pytest.mark.parametrize(
    "bad", [dict(num_layers=-1), dict(magnitude=-1), dict(magnitude_std=-0.5), dict(prob=1.5), dict(fill=(1, 2))]
)
def test_rand_augment_rejects_bad_arguments(bad, test_images):
    with pytest.raises(ValueError):
        augment.rand_augment(test_images[0], tf.constant([0, 0]), **bad)


# ---------------------------------------------------------------------------
# Crops and flips


def windows(height, width, count):
    """random_crop_window for `count` seeds -> int32 [count, 4]."""
    seeds = tf.stack([tf.range(count), tf.fill([count], 11)], 1)
    window = functools.partial(augment.random_crop_window, height, width)
    return tf.function(lambda: tf.map_fn(window, seeds, fn_output_signature=tf.int32))().numpy()


def test_random_crop_window_statistics():
    height, width = 300, 400
    top, left, crop_height, crop_width = windows(height, width, 1000).T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_height <= height).all() and (left + crop_width <= width).all()
    # Rounding the sides to whole pixels moves area and aspect by at most half a pixel a side.
    area = crop_height * crop_width / (height * width)
    assert area.min() >= 0.08 * 0.9 and area.max() <= 1.0
    aspect = crop_width / crop_height
    slack = 2 / np.minimum(crop_height, crop_width)
    assert (aspect >= 3 / 4 * (1 - slack)).all() and (aspect <= 4 / 3 * (1 + slack)).all()
    # Every box that fits is placed uniformly: small boxes reach all sides.
    small = area < 0.2
    assert top[small].min() < 10 and (top + crop_height)[small].max() > height - 10
    assert left[small].min() < 10 and (left + crop_width)[small].max() > width - 10
    assert 0.4 < area.mean() < 0.6


@pytest.mark.parametrize("height, width", [(1, 1), (1, 7), (2, 1000), (1000, 3), (5, 5)])
def test_random_crop_window_is_never_empty_nor_outside(height, width):
    top, left, crop_height, crop_width = windows(height, width, 200).T
    assert (crop_height >= 1).all() and (crop_width >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + crop_height <= height).all() and (left + crop_width <= width).all()


def test_random_crop_window_falls_back_to_the_centre():
    """No box of 90-100% area fits 20x400 within the aspect range: centre crop, 4:3 wide."""
    window = augment.random_crop_window(20, 400, tf.constant([0, 0]), scale=(0.9, 1.0)).numpy()
    np.testing.assert_array_equal(window, [0, (400 - 27) // 2, 20, 27])
    tall = augment.random_crop_window(400, 20, tf.constant([0, 0]), scale=(0.9, 1.0)).numpy()
    np.testing.assert_array_equal(tall, [(400 - 27) // 2, 0, 27, 20])


def test_random_resized_crop_matches_pil(jpegs):
    """The crop resized as timm does it (PIL bicubic) from the same window. PIL resamples in
    two 8-bit passes, TensorFlow in one float pass: a fraction of a level on average, more
    where clipping an overshoot at a hard edge differs."""
    for encoded in jpegs:
        image = data.decode_image(encoded).numpy()
        size = (32, 32) if image.shape[0] == 32 else (96, 112)
        for index in range(3):
            seed = tf.constant([index, 7])
            top, left, height, width = augment.random_crop_window(*image.shape[:2], seed).numpy()
            crop = Image.fromarray(image).crop((left, top, left + width, top + height))
            expected = np.asarray(crop.resize(size[::-1], Image.BICUBIC))
            out = augment.random_resized_crop(image, size, seed).numpy()
            assert out.shape == (*size, 3) and out.dtype == np.uint8
            diff = difference(out, expected)
            assert diff.max() <= 24 and diff.mean() < 0.3


def test_decode_and_random_crop_equals_decode_then_crop(jpegs, test_images):
    png = io.BytesIO()
    Image.fromarray(test_images[3]).save(png, "PNG")
    for encoded in [*jpegs, png.getvalue()]:
        image = data.decode_image(encoded)
        for index in range(6):
            seed = tf.constant([index, 3])
            expected = augment.random_resized_crop(image, 48, seed, scale=(0.02, 1.0))
            out = augment.decode_and_random_crop(tf.constant(encoded), 48, seed, scale=(0.02, 1.0))
            np.testing.assert_array_equal(out.numpy(), expected.numpy())


@pytest.mark.parametrize(
    "bad", [dict(scale=(0.0, 1.0)), dict(scale=(0.5, 0.2)), dict(scale=(0.5, 1.5)), dict(ratio=(2.0, 1.0)),
            dict(interpolation="lanczos"), dict(size=0)]
)  # fmt: skip
def test_random_resized_crop_rejects_bad_arguments(bad, test_images):
    kwargs = dict(size=32, seed=tf.constant([0, 0])) | bad
    with pytest.raises(ValueError):
        augment.random_resized_crop(test_images[0], **kwargs)


def test_random_crop_with_padding_is_a_window_of_the_padded_image(test_images):
    image = test_images[0]
    padded = np.pad(image, [(4, 4), (4, 4), (0, 0)])
    offsets = set()
    for index in range(150):
        out = augment.random_crop_with_padding(image, 32, 4, tf.constant([index, 1])).numpy()
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        matches = [(t, l) for t in range(9) for l in range(9) if np.array_equal(padded[t : t + 32, l : l + 32], out)]
        assert matches
        offsets.add(matches[0])
    tops, lefts = zip(*offsets)
    assert min(tops) == 0 and max(tops) == 8 and min(lefts) == 0 and max(lefts) == 8
    with pytest.raises(ValueError):
        augment.random_crop_with_padding(image, 32, -1, tf.constant([0, 0]))


def test_random_flip(test_images):
    image = test_images[0]
    outs = [augment.random_flip(image, tf.constant([i, 0])).numpy() for i in range(40)]
    flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
    assert all(f or np.array_equal(o, image) for f, o in zip(flipped, outs))
    assert 10 <= sum(flipped) <= 30


# ---------------------------------------------------------------------------
# Random erasing


def erased_box(before, after):
    """The bounding box (top, left, height, width) of the changed pixels, checked to be all of it."""
    changed = np.any(before != after, axis=-1)
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    top, left, height, width = rows[0], cols[0], rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
    assert changed[top : top + height, left : left + width].all()
    return top, left, height, width


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_random_erasing_erases_one_box(mode):
    image = tf.fill([40, 48, 3], 7.0)
    for index in range(30):
        out = augment.random_erasing(image, tf.constant([index, 2]), probability=1.0, mode=mode).numpy()
        assert out.shape == (40, 48, 3) and out.dtype == np.float32
        top, left, height, width = erased_box(image.numpy(), out)
        assert 0.02 * 0.8 <= height * width / (40 * 48) <= 1 / 3 * 1.2
        assert 0.3 * 0.8 <= height / width <= 1 / 0.3 * 1.2
        box = out[top : top + height, left : left + width]
        if mode == "const":
            np.testing.assert_array_equal(box, 0.0)
        elif mode == "rand":
            np.testing.assert_array_equal(box, np.broadcast_to(box[:1, :1], box.shape))
        else:
            assert np.unique(box).size == box.size


def test_random_erasing_probability():
    image = tf.zeros([16, 16, 3]) + 3.0
    seeds = tf.stack([tf.range(400), tf.fill([400], 9)], 1)
    erase = functools.partial(augment.random_erasing, image)
    erased = tf.function(lambda: tf.map_fn(erase, seeds, fn_output_signature=tf.float32))().numpy() != 3.0
    assert 0.18 < np.mean(np.any(erased, axis=(1, 2, 3))) < 0.32
    never = augment.random_erasing(image, tf.constant([0, 0]), probability=0.0)
    np.testing.assert_array_equal(never.numpy(), image.numpy())


@pytest.mark.parametrize(
    "bad", [dict(probability=1.5), dict(mode="noise"), dict(min_area=0.5, max_area=0.1), dict(min_aspect=0.0)]
)
def test_random_erasing_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        augment.random_erasing(tf.zeros([8, 8, 3]), tf.constant([0, 0]), **bad)


# ---------------------------------------------------------------------------
# Determinism of every per-example op, and the composition


SEEDED_OPS = {
    "random_resized_crop": lambda image, enc, seed: augment.random_resized_crop(image, 24, seed),
    "decode_and_random_crop": lambda image, enc, seed: augment.decode_and_random_crop(enc, 24, seed),
    "random_crop_with_padding": lambda image, enc, seed: augment.random_crop_with_padding(image, 32, 4, seed),
    "random_flip": lambda image, enc, seed: augment.random_flip(image, seed),
    "rand_augment": lambda image, enc, seed: augment.rand_augment(image, seed),
    "random_erasing": lambda image, enc, seed: augment.random_erasing(tf.cast(image, tf.float32), seed, 0.5),
    "augment_train": lambda image, enc, seed: augment.augment_train(
        enc, seed, augment.TrainAugment((32, 32), IMAGENET_MEAN, IMAGENET_STD)
    ),
}


@pytest.mark.parametrize("name", SEEDED_OPS)
def test_same_seed_same_output_other_seed_other_output(name, cifar_jpegs):
    encoded = tf.constant(cifar_jpegs[1])
    image = data.decode_image(encoded)
    run = tf.function(functools.partial(SEEDED_OPS[name], image, encoded))
    first = run(tf.constant([3, 4])).numpy()
    np.testing.assert_array_equal(first, run(tf.constant([3, 4])).numpy())
    # Eagerly, float ops may round differently from the optimised graph.
    eager = SEEDED_OPS[name](image, encoded, tf.constant([3, 4])).numpy()
    np.testing.assert_allclose(first, eager, rtol=0, atol=1e-6)
    others = [run(tf.constant([3, 5 + i])).numpy() for i in range(6)]
    assert any(not np.array_equal(first, other) for other in others)


def train_dataset(encoded_images, config, epochs):
    """What a training pipeline does, `epochs` times over: per-example seeds from (run seed, epoch, index)."""
    count = len(encoded_images)
    epoch, index = np.repeat(np.arange(epochs), count), np.tile(np.arange(count), epochs)
    ds = tf.data.Dataset.from_tensor_slices((epoch, index, encoded_images * epochs))

    def augment_example(epoch, index, encoded):
        seed = tf.random.experimental.stateless_fold_in(tf.stack([tf.constant(17, tf.int64), epoch]), index)
        return augment.augment_train(encoded, seed, config)

    return ds.map(augment_example, num_parallel_calls=2)


@pytest.mark.parametrize(
    "config",
    [
        augment.TrainAugment((40, 40), IMAGENET_MEAN, IMAGENET_STD),
        augment.TrainAugment((32, 32), data.CIFAR10_MEAN, data.CIFAR10_STD, crop="padded", erasing_prob=1.0),
    ],
)
def test_augment_train_in_tf_data(config, jpegs):
    encoded = jpegs[:4] if config.crop == "padded" else jpegs
    ds = train_dataset(encoded, config, epochs=2)
    images = np.stack(list(ds.as_numpy_iterator()))
    np.testing.assert_array_equal(images, np.stack(list(ds.as_numpy_iterator())))
    assert images.shape == (2 * len(encoded), *config.size, 3) and images.dtype == np.float32
    epoch0, epoch1 = np.split(images, 2)
    assert all(not np.array_equal(a, b) for a, b in zip(epoch0, epoch1))
    low = (0 - np.array(config.mean)) / np.array(config.std)
    high = (1 - np.array(config.mean)) / np.array(config.std)
    # Pixels outside the normalised range can only be erasing noise.
    outside = np.any((images < low - 1e-5) | (images > high + 1e-5), axis=-1).mean(axis=(1, 2))
    assert outside.max() < 1 / 3 + 0.05
    if config.erasing_prob == 1.0:
        assert outside.min() > 0


def test_train_augment_fill_and_errors():
    assert augment.TrainAugment((224, 224), IMAGENET_MEAN, IMAGENET_STD).fill == FILL
    for bad in (
        dict(crop="centre"), dict(scale=(0.0, 1.0)), dict(interpolation="area"), dict(padding=-4),
        dict(rand_augment_layers=-1), dict(rand_augment_magnitude_std=-1.0), dict(erasing_prob=2.0),
        dict(erasing_mode="x"),
    ):  # fmt: skip
        with pytest.raises(ValueError):
            augment.TrainAugment((224, 224), IMAGENET_MEAN, IMAGENET_STD, **bad)


# ---------------------------------------------------------------------------
# Mixup / CutMix


def random_batch(batch=8, height=32, width=24, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, height, width, 3)).astype(np.float32)
    return images, rng.integers(0, num_classes, batch).astype(np.int32)


def test_one_hot_smoothed_is_timms():
    torch = pytest.importorskip("torch", reason=NEEDS_TIMM)
    timm_mixup = pytest.importorskip("timm.data.mixup", reason=NEEDS_TIMM)
    labels = np.array([0, 3, 9, 3])
    for smoothing in (0.0, 0.1, 0.5):
        expected = timm_mixup.mixup_target(torch.tensor(labels), 10, 1.0, smoothing).numpy()
        # optax.smooth_labels adds in float32 where timm adds in float64: 1 ulp apart.
        np.testing.assert_allclose(mixing.one_hot_smoothed(jnp.asarray(labels), 10, smoothing), expected, rtol=1e-7)
    with pytest.raises(ValueError):
        mixing.one_hot_smoothed(jnp.asarray(labels), 10, 1.0)


class ForcedNumpy:
    """numpy for timm.data.mixup with its random draws replaced by given values."""

    def __init__(self, rands, beta, randints):
        self.random = types.SimpleNamespace(
            rand=lambda: rands.pop(0), beta=lambda a, b: beta, randint=lambda low, high, size=None: randints.pop(0)
        )

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.parametrize("use_cutmix", [False, True])
@pytest.mark.parametrize("lam, centre", [(0.3137, (0, 0)), (0.72, (31, 5)), (0.05, (12, 20)), (0.97, (17, 23))])
def test_mix_batch_equals_timm_mixup(use_cutmix, lam, centre, monkeypatch):
    torch = pytest.importorskip("torch", reason=NEEDS_TIMM)
    timm_mixup = pytest.importorskip("timm.data.mixup", reason=NEEDS_TIMM)
    images, labels = random_batch()
    lam = float(np.float32(lam))
    # timm draws: apply (rand < prob), cutmix switch (rand < switch_prob), Beta, box centre row then column.
    forced = ForcedNumpy([0.0, 0.0 if use_cutmix else 0.99], lam, list(centre))
    monkeypatch.setattr(timm_mixup, "np", forced)
    mixer = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    timm_images, timm_targets = mixer(torch.tensor(images).permute(0, 3, 1, 2), torch.tensor(labels))
    params = mixing.MixParams(jnp.float32(lam), jnp.asarray(use_cutmix), jnp.asarray(centre, jnp.int32))
    ours, targets = mixing.mix_batch(jnp.asarray(images), jnp.asarray(labels), params, 10, 0.1)
    np.testing.assert_allclose(ours, timm_images.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets, timm_targets.numpy(), rtol=1e-6, atol=1e-6)


def test_cutmix_lambda_is_the_kept_area():
    """Each image i holds constant i: the targets' weights must equal the pixel shares."""
    batch, height, width = 8, 20, 28
    images = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.float32)[:, None, None, None], (batch, height, width, 1))
    labels = jnp.arange(batch)
    cutmix = jax.jit(functools.partial(mixing.mixup_cutmix, num_classes=batch, mixup_alpha=0.0, label_smoothing=0.0))
    for index in range(20):
        out, targets = cutmix(jax.random.key(index), images, labels)
        kept = np.mean(np.asarray(out) == np.asarray(images), axis=(1, 2, 3))
        np.testing.assert_allclose(np.asarray(targets)[np.arange(batch), np.arange(batch)], kept, atol=1e-6)
        np.testing.assert_allclose(np.asarray(targets)[np.arange(batch), np.arange(batch)[::-1]], 1 - kept, atol=1e-6)


def test_mixup_cutmix_jits_and_targets_are_distributions():
    images, labels = random_batch()
    mix = functools.partial(mixing.mixup_cutmix, num_classes=10)
    jitted = jax.jit(mix)
    for index in range(6):
        out, targets = jitted(jax.random.key(index), images, labels)
        assert out.shape == images.shape and targets.shape == (8, 10) and targets.dtype == jnp.float32
        np.testing.assert_allclose(np.sum(targets, 1), 1.0, rtol=1e-6)
        assert np.all(np.asarray(targets) >= 0)
    assert jitted._cache_size() == 1
    eager_out, eager_targets = mix(jax.random.key(5), images, labels)
    np.testing.assert_allclose(out, eager_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets, eager_targets, rtol=1e-6)


def test_no_mixing_is_the_identity_up_to_smoothing():
    images, labels = random_batch()
    smoothed = mixing.one_hot_smoothed(jnp.asarray(labels), 10, 0.1)
    out, targets = mixing.mixup_cutmix(jax.random.key(0), images, labels, 10, prob=0.0)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(targets, smoothed)
    for use_cutmix in (False, True):
        params = mixing.MixParams(jnp.float32(1.0), jnp.asarray(use_cutmix), jnp.array([10, 10]))
        out, targets = mixing.mix_batch(jnp.asarray(images), jnp.asarray(labels), params, 10)
        np.testing.assert_array_equal(out, images)
        np.testing.assert_allclose(targets, smoothed, rtol=1e-6)


def test_sample_mix_params_statistics():
    keys = jax.random.split(jax.random.key(0), 4000)
    sample = functools.partial(mixing.sample_mix_params, height=32, width=24, prob=0.8)
    params = jax.jit(jax.vmap(sample))(keys)
    lam, use_cutmix, centre = (np.asarray(p) for p in params)
    mixed = lam < 1
    assert abs(mixed.mean() - 0.8) < 0.03
    assert abs(use_cutmix.mean() - 0.5) < 0.03
    assert abs(lam[mixed].mean() - 0.5) < 0.03 and lam.min() >= 0
    # Beta(1, 1) for cutmix is uniform; Beta(0.8, 0.8) for mixup is wider.
    assert abs(lam[mixed & use_cutmix].std() - math.sqrt(1 / 12)) < 0.02
    assert abs(lam[mixed & ~use_cutmix].std() - math.sqrt(1 / (4 * 2.6))) < 0.02
    assert centre[:, 0].min() == 0 and centre[:, 0].max() == 31 and centre[:, 1].max() == 23


@pytest.mark.parametrize(
    "bad, error",
    [
        (dict(mixup_alpha=-0.1), ValueError),
        (dict(mixup_alpha=0.0, cutmix_alpha=0.0), ValueError),
        (dict(prob=1.5), ValueError),
        (dict(switch_prob=-0.5), ValueError),
        (dict(label_smoothing=1.0), ValueError),
    ],
)
def test_mixup_cutmix_rejects_bad_arguments(bad, error):
    images, labels = random_batch()
    with pytest.raises(error):
        mixing.mixup_cutmix(jax.random.key(0), images, labels, 10, **bad)


def test_mixup_cutmix_rejects_bad_batches():
    images, labels = random_batch(batch=7)
    with pytest.raises(ValueError, match="even"):
        mixing.mixup_cutmix(jax.random.key(0), images, labels, 10)
    images, labels = random_batch()
    with pytest.raises(TypeError):
        mixing.mixup_cutmix(jax.random.key(0), images.astype(np.uint8), labels, 10)
