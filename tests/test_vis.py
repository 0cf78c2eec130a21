"""Merge pictures: group fills and outlines, upsampling, grids, PNGs, the ViT path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tome_jax
from tome_jax import cli, vis

# Two groups on a 2x4 grid of 4x4 patches (8x16 pixels): the left 2x2 patches went
# into token 1, the right ones into token 2; token 0 is the class token.
TWO_GROUPS = np.array([0] + [1, 1, 2, 2] * 2)


def dyadic_image(height, width, seed=0):
    """Values k / 256: sums and means over 64 pixels are exact in float64."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)) / 256.0


def test_two_groups_fill_with_their_mean_and_outline_in_their_colour():
    image = dyadic_image(8, 16)
    out = vis.merge_visualization(image, TWO_GROUPS, (2, 4), seed=3)
    colours = vis.group_colours(3, seed=3)
    for token, cols in ((1, slice(0, 8)), (2, slice(8, 16))):
        group = out[:, cols]
        mean = image[:, cols].mean(axis=(0, 1))
        np.testing.assert_array_equal(group[1:-1, 1:-1], np.broadcast_to(mean, (6, 6, 3)))
        outline = np.ones((8, 8), bool)
        outline[1:-1, 1:-1] = False
        np.testing.assert_array_equal(group[outline], np.broadcast_to(colours[token], (28, 3)))


def test_output_shape_dtype_range_and_uint8_input():
    image = np.random.default_rng(1).integers(0, 256, (8, 16, 3)).astype(np.uint8)
    out = vis.merge_visualization(image, TWO_GROUPS, (2, 4))
    assert out.shape == (8, 16, 3) and out.dtype == np.float64
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, vis.merge_visualization(image / 255.0, TWO_GROUPS, (2, 4)))


def test_identity_source_reproduces_patch_means():
    grid, patch = (3, 2), (4, 6)  # non-square patches and image
    image = dyadic_image(grid[0] * patch[0], grid[1] * patch[1], seed=2)
    source = np.arange(1 + grid[0] * grid[1])
    out = vis.merge_visualization(image, source, grid)
    patch_means = image.reshape(grid[0], patch[0], grid[1], patch[1], 3).mean(axis=(1, 3))
    interiors = out.reshape(grid[0], patch[0], grid[1], patch[1], 3)[:, 1:-1, :, 1:-1]
    want = np.broadcast_to(patch_means[:, None, :, None], interiors.shape)
    np.testing.assert_allclose(interiors, want, rtol=0, atol=1e-15)


def test_upsampling_covers_non_square_and_non_multiple_sizes():
    grid = np.arange(6).reshape(2, 3)
    blocks = np.kron(grid, np.ones((2, 2), int))
    np.testing.assert_array_equal(vis.upsample_nearest(grid, 4, 6), blocks)
    want = np.array([[0, 0, 0, 1, 1, 2, 2]] * 3 + [[3, 3, 3, 4, 4, 5, 5]] * 2)
    np.testing.assert_array_equal(vis.upsample_nearest(grid, 5, 7), want)


def test_border_width_erodes_deeper_and_grows_with_image_size():
    labels = np.zeros((8, 8), int)
    inside = ~vis.group_borders(labels, width=2)
    assert inside.sum() == 16 and inside[2:6, 2:6].all()
    assert vis.default_border_width(224, 224) == 1 and vis.default_border_width(448, 600) == 2


@pytest.mark.parametrize(
    "image,source,grid,message",
    [
        (np.zeros((8, 16, 3)), TWO_GROUPS[1:], (2, 4), "source has 8 tokens, but a 2x4 grid with 1 prefix tokens needs 9"),
        (np.zeros((8, 16, 3)), TWO_GROUPS[None], (2, 4), "source must be a 1-D int array"),
        (np.zeros((8, 16)), TWO_GROUPS, (2, 4), r"image must be \[height, width, 3\]"),
        (np.full((8, 16, 3), 2.0), TWO_GROUPS, (2, 4), r"must lie in \[0, 1\]"),
        (np.zeros((1, 16, 3)), TWO_GROUPS, (2, 4), "a 1x16 image is smaller than its 2x4 patch grid"),
        (np.zeros((8, 16, 3)), TWO_GROUPS, (2, 0), "grid_size must be two positive ints"),
    ],
)
def test_bad_input_gets_a_clear_error(image, source, grid, message):
    with pytest.raises(ValueError, match=message):
        vis.merge_visualization(image, source, grid)


def test_visualization_grid_pairs_each_image_with_its_merges():
    images = np.stack([dyadic_image(8, 16, seed) for seed in range(3)])
    sources = np.stack([TWO_GROUPS, np.arange(9), TWO_GROUPS])
    out = vis.visualization_grid(images, sources, (2, 4), columns=2, scale=2)
    tile_h, tile_w, gap = 16, 32, 2
    assert out.shape == (2 * tile_h + gap, 4 * tile_w + 3 * gap, 3)

    def tile(row, col):
        top, left = row * (tile_h + gap), col * (tile_w + gap)
        return out[top : top + tile_h, left : left + tile_w]

    np.testing.assert_array_equal(tile(1, 0), vis.upscale(images[2], 2))
    merged = vis.merge_visualization(vis.upscale(images[1], 2), sources[1], (2, 4))
    np.testing.assert_array_equal(tile(0, 3), merged)
    np.testing.assert_array_equal(tile(1, 2), 1.0)  # the short last row is background


def test_save_image_round_trips_8_bit_png(tmp_path):
    picture = vis.merge_visualization(dyadic_image(8, 16), TWO_GROUPS, (2, 4))
    vis.save_image(picture, tmp_path / "merges.png")
    saved = Image.open(tmp_path / "merges.png")
    assert saved.format == "PNG"
    np.testing.assert_array_equal(np.asarray(saved), np.round(picture * 255).astype(np.uint8))


def test_save_image_writes_the_format_its_suffix_names(tmp_path):
    picture = vis.merge_visualization(dyadic_image(8, 16), TWO_GROUPS, (2, 4))
    for name, image_format in (("merges.jpg", "JPEG"), ("merges.JPEG", "JPEG"), ("merges.webp", "WEBP")):
        vis.save_image(picture, tmp_path / name)
        assert Image.open(tmp_path / name).format == image_format
    with pytest.raises(ValueError, match="suffix '.txt'"):
        vis.save_image(picture, tmp_path / "merges.txt")


def test_visualize_runs_a_vit_one_row_per_r():
    model = tome_jax.ViT(num_classes=10, img_size=32, patch_size=4, width=24, depth=3, num_heads=3)
    display = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    images = jnp.asarray(display / 255.0 - 0.5, jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), images)
    out = vis.visualize(model, variables, images, display, [0, 4])
    tile, gap = 32 * 8, 2
    assert out.shape == (3 * tile + 2 * gap, 2 * tile + gap, 3)
    upscaled = vis.upscale(display[1] / 255.0, 8)
    np.testing.assert_array_equal(out[:tile, tile + gap:], upscaled)
    unmerged = out[tile + gap:][:tile, tile + gap:]
    identity = vis.merge_visualization(upscaled, np.arange(65), (8, 8))
    np.testing.assert_array_equal(unmerged, identity)
    merged = out[2 * (tile + gap):][:tile, tile + gap:]
    # A patch's centre pixel is never on an outline, so it shows its group's mean colour:
    # 64 patches less 4 merges in each of 3 blocks leave 52 groups.
    centres = merged[16::32, 16::32].reshape(-1, 3)
    assert len(np.unique(centres, axis=0)) == 64 - 3 * 4


def tiny_checkpoint(directory):
    """A random two-block ViT-Ti/4-like checkpoint for CIFAR-10's 32 px images."""
    from safetensors.numpy import save_file

    model = tome_jax.ViT(num_classes=10, img_size=32, patch_size=4, width=24, depth=2, num_heads=3)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    checkpoint = directory / "tiny.safetensors"
    save_file(tome_jax.to_timm_state_dict(model, variables), checkpoint, metadata={"config": '{"num_heads": 3}'})
    return checkpoint


def test_command_draws_a_checkpoint_on_bundled_images(tmp_path, capsys):
    """`tome-jax-vis`, on a small random checkpoint (the bundled model's
    twelve blocks take long to compile) and the bundled CIFAR-10 test images."""
    from tome_jax import data

    checkpoint = tiny_checkpoint(tmp_path)
    out = tmp_path / "merges.png"
    cli.vis_main([str(out), "--model", str(checkpoint), "--images", "2", "--r", "(8, -1)"])
    picture = np.asarray(Image.open(out))
    tile, gap = 32 * 8, 2
    assert picture.shape == (2 * tile + gap, 2 * tile + gap, 3)
    # The first row shows the images as they are (normalised, then back to pixels).
    originals, _ = data.images_for_display(data.builder("bundled_cifar10"), "test", 2)
    np.testing.assert_array_equal(picture[:tile, tile + gap :], vis.upscale(originals[1], 8))
    assert "r=(8, -1): 65 tokens -> 49" in capsys.readouterr().out


def test_visualize_shows_the_pixels_the_patches_cover():
    """18 x 18 px in 4 px patches: the model reads the top-left 16 x 16, and so does the picture."""
    model = tome_jax.ViT(num_classes=0, img_size=18, patch_size=4, width=24, depth=1, num_heads=3)
    display = np.random.default_rng(0).integers(0, 256, (1, 18, 18, 3)).astype(np.uint8)
    images = jnp.asarray(display / 255.0, jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), images)
    out = vis.visualize(model, variables, images, display, 0, scale=1)
    assert out.shape == (2 * 16 + 2, 16, 3)
    np.testing.assert_array_equal(out[:16], display[0, :16, :16] / 255.0)
    np.testing.assert_array_equal(out[18:], vis.merge_visualization(display[0, :16, :16], np.arange(17), (4, 4)))


def test_command_draws_a_method_on_a_files_architecture_as_jpeg(tmp_path, capsys):
    """--random-weights with a checkpoint file: its architecture, random weights; --method with a
    setting; a .jpg name gives JPEG bytes."""
    out = tmp_path / "merges.jpg"
    cli.vis_main([str(out), "--model", str(tiny_checkpoint(tmp_path)), "--random-weights", "--method", "pitome",
                  "--setting", "margin=0.5", "--images", "1", "--r", "4"])  # fmt: skip
    assert Image.open(out).format == "JPEG"
    assert "r=4: 65 tokens -> 57" in capsys.readouterr().out
