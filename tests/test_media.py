"""Video and spectrogram ViTs: tubelets, merging over space-time tokens, image weights
inflated to video and summed to one channel."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tome_jax
from tome_jax import schedules, vis
from tome_jax.convert.names import flat_params, param_shapes
from test_vit import jit_apply, plain_vit, random_variables

TINY = dict(num_classes=5, img_size=16, patch_size=4, width=24, depth=2, num_heads=3)
# 4 frames in 2-frame tubelets of 4x4 frames: 2 x 4 x 4 = 32 patch tokens.
VIDEO = dict(TINY, num_frames=4, tubelet_size=2)
VIDEO_GAP = dict(VIDEO, class_token=False, global_pool="avg")  # VideoMAE's pooling
# Spectrograms of 8 frequency bins x 32 time frames: 2 x 8 = 16 patch tokens.
AUDIO = dict(TINY, img_size=(8, 32), in_chans=1)
MEDIA = {"video_class_token": VIDEO, "video_gap": VIDEO_GAP, "audio": AUDIO}


def inputs_for(model, batch=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, *model.input_shape))


def video_as_image(videos, tubelet):
    """[b, frames, h, w, c] -> [b, frames // tubelet * h, w, tubelet * c]: the tubelets
    of each time step stacked into channels, time steps stacked downwards, so that
    image patches are tubelets and the image's row-major token order is the video's."""
    b, frames, h, w, c = videos.shape
    steps = videos.reshape(b, frames // tubelet, tubelet, h, w, c).transpose(0, 1, 3, 4, 2, 5)
    return steps.reshape(b, frames // tubelet * h, w, tubelet * c)


def image_twin(model, variables):
    """The image ViT over `video_as_image` inputs, with the video model's weights."""
    steps, _, _ = model.token_grid
    (height, width), channels = model.image_hw, model.tubelet_size * model.in_chans
    twin = model.clone(num_frames=None, tubelet_size=1, img_size=(steps * height, width), in_chans=channels)
    params = dict(variables["params"])
    kernel = params["patch_embed"]["kernel"]  # [tubelet, ph, pw, c, width]
    kernel = kernel.transpose(1, 2, 0, 3, 4).reshape(*kernel.shape[1:3], channels, -1)
    params["patch_embed"] = {**params["patch_embed"], "kernel": kernel}
    return twin, {"params": params}


@pytest.mark.parametrize("variant", ["video_class_token", "video_gap"])
def test_video_vit_is_the_image_vit_over_space_time_tokens(variant):
    model = tome_jax.ViT(**MEDIA[variant])
    videos = inputs_for(model)
    variables = random_variables(model, videos)
    twin, twin_variables = image_twin(model, variables)
    images = video_as_image(videos, model.tubelet_size)
    want = plain_vit(twin_variables["params"], images, dict(MEDIA[variant], patch_size=4))
    got = jit_apply(model)(variables, videos, r=0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    # Merging sees the same flat sequence: same groups, same logits.
    got, state = jit_apply(model)(variables, videos, r=(5, -1), mutable="intermediates")
    want, twin_state = jit_apply(twin)(twin_variables, images, r=(5, -1), mutable="intermediates")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    source, twin_source = (tome_jax.token_features(s["intermediates"]).source for s in (state, twin_state))
    np.testing.assert_array_equal(np.asarray(source), np.asarray(twin_source))


@pytest.mark.parametrize("variant", sorted(MEDIA))
def test_merging_counts_tokens_and_protects_the_class_token(variant):
    model = tome_jax.ViT(**MEDIA[variant])
    inputs = inputs_for(model)
    variables = random_variables(model, inputs)
    assert model.num_tokens == math.prod(model.token_grid) + model.num_prefix_tokens
    for r in ((6, -1), (5,)):  # (5,): per layer, padded to [5, 0]
        logits, state = jit_apply(model)(variables, inputs, r=r, mutable="intermediates")
        final = tome_jax.token_features(state["intermediates"])
        tokens = schedules.tokens_per_layer(model.num_tokens, schedules.parse_r(model.depth, r), model.num_prefix_tokens)
        assert logits.shape == (2, 5) and np.isfinite(np.asarray(logits)).all()
        assert final.tokens.shape == (2, tokens[-1], model.width)
        np.testing.assert_array_equal(np.asarray(final.size.sum(1)), model.num_tokens)
        source = np.asarray(final.source)
        counts = np.stack([np.bincount(s, minlength=tokens[-1]) for s in source])
        np.testing.assert_array_equal(counts, np.asarray(final.size))
        if model.class_token:
            np.testing.assert_array_equal(source[:, 0], 0)
            np.testing.assert_array_equal(np.asarray(final.size[:, 0]), 1)


@pytest.mark.parametrize("variant", ["video_gap", "audio"])
def test_gradients_through_merging_are_finite(variant):
    model = tome_jax.ViT(**MEDIA[variant], drop_path_rate=0.1)
    inputs = inputs_for(model)
    variables = random_variables(model, inputs)

    def loss(params):
        logits = model.apply({"params": params}, inputs, r=(6, -1), train=True, rngs={"dropout": jax.random.key(1)})
        return jax.nn.log_softmax(logits)[:, 0].mean()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])
    assert np.isfinite(flat).all() and np.abs(grads["patch_embed"]["kernel"]).max() > 0


def convert(state, **overrides):
    return tome_jax.from_timm(state, num_heads=3, **overrides)  # width 24 does not tell


def image_checkpoint(**overrides):
    """A random image ViT and its timm state dict, the source of the conversions."""
    model = tome_jax.ViT(**{**TINY, **overrides})
    variables = random_variables(model, inputs_for(model))
    return model, variables, tome_jax.to_timm_state_dict(model, variables)


def test_averaged_inflation_gives_still_clips_the_image_models_output():
    image_model, image_variables, state = image_checkpoint()
    frames = inputs_for(image_model)
    want = jit_apply(image_model)(image_variables, frames, r=3)
    # One tubelet: the clip's tokens are the image's, whatever r and the class token.
    model, variables = convert(state, num_frames=2, tubelet_size=2)
    still = jnp.repeat(frames[:, None], 2, axis=1)
    np.testing.assert_allclose(np.asarray(jit_apply(model)(variables, still, r=3)), np.asarray(want), atol=1e-5)

    # Two tubelets: every token twice. Attention over duplicated keys is unchanged and
    # average pooling counts both copies, so without a class token the output is too.
    image_model, image_variables, state = image_checkpoint(class_token=False, global_pool="avg")
    model, variables = convert(state, num_frames=4, tubelet_size=2)
    pos_embed = image_variables["params"]["pos_embed"]
    np.testing.assert_array_equal(variables["params"]["pos_embed"], jnp.tile(pos_embed, (1, 2, 1)))
    still = jnp.repeat(frames[:, None], 4, axis=1)
    got = jit_apply(model)(variables, still, r=0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jit_apply(image_model)(image_variables, frames, r=0)), atol=1e-5)


def test_central_inflation_sees_the_central_frame():
    image_model, image_variables, state = image_checkpoint()
    model, variables = convert(state, num_frames=3, tubelet_size=3, inflation="central")
    clip = inputs_for(model)
    want = jit_apply(image_model)(image_variables, clip[:, 1], r=3)
    np.testing.assert_allclose(np.asarray(jit_apply(model)(variables, clip, r=3)), np.asarray(want), atol=1e-5)


def test_rgb_kernels_summed_give_grey_images_the_image_models_output():
    image_model, image_variables, state = image_checkpoint(img_size=(8, 32))
    # A non-square checkpoint that does not say its size: its 16 positions also fit 4x4.
    model, variables = convert(state, in_chans=1, img_size=(8, 32), checkpoint_img_size=(8, 32))
    spectrograms = inputs_for(model)
    want = jit_apply(image_model)(image_variables, jnp.repeat(spectrograms, 3, axis=-1), r=3)
    np.testing.assert_allclose(np.asarray(jit_apply(model)(variables, spectrograms, r=3)), np.asarray(want), atol=1e-5)


def test_image_position_embeddings_are_resampled_to_the_media_grid():
    _, image_variables, state = image_checkpoint()  # a 4x4 grid and a class token
    pos_embed = np.asarray(image_variables["params"]["pos_embed"])
    # AST's recipe. (Not 8x32: its 2x8 grid has as many positions as the checkpoint's
    # 4x4, which from_timm refuses to guess between; see test_convert.)
    model, variables = convert(state, in_chans=1, img_size=(8, 24))
    want = tome_jax.resample_pos_embed(pos_embed, (2, 6), (4, 4), num_prefix_tokens=1)
    np.testing.assert_allclose(variables["params"]["pos_embed"], want, rtol=1e-6)
    model, variables = convert(state, num_frames=6, tubelet_size=2, img_size=8)
    spatial = tome_jax.resample_pos_embed(pos_embed, (2, 2), (4, 4), num_prefix_tokens=1)
    want = np.concatenate([spatial[:, :1]] + [spatial[:, 1:]] * 3, axis=1)
    np.testing.assert_allclose(variables["params"]["pos_embed"], want, rtol=1e-6)
    assert model.token_grid == (3, 2, 2) and variables["params"]["pos_embed"].shape == (1, 13, 24)


def test_video_checkpoints_round_trip_in_videomaes_layout():
    model = tome_jax.ViT(**VIDEO_GAP)
    variables = random_variables(model, inputs_for(model))
    state = tome_jax.to_timm_state_dict(model, variables)
    assert state["patch_embed.proj.weight"].shape == (24, 3, 2, 4, 4)  # torch's Conv3d
    with pytest.raises(ValueError, match="a video checkpoint .* pass num_frames="):
        tome_jax.from_timm(state)
    loaded, loaded_variables = convert(state, num_frames=4)
    assert (loaded.num_frames, loaded.tubelet_size, loaded.token_grid) == (4, 2, (2, 4, 4))
    chex.assert_trees_all_equal(loaded_variables, variables)


@pytest.mark.parametrize(
    "config,shape,message",
    [
        (VIDEO, (1, 16, 16, 3), r"videos must be \[batch, frames, height, width, channels\]"),
        (VIDEO, (1, 2, 16, 16, 3), "videos of 2 frames, but the model's num_frames is 4"),
        (VIDEO, (1, 4, 18, 16, 3), r"image size \(18, 16\) differs from the model's img_size \(16, 16\)"),
        (dict(VIDEO, num_frames=5), (1, 5, 16, 16, 3), "num_frames 5 is not a positive multiple of tubelet_size 2"),
        (dict(TINY, tubelet_size=2), (1, 16, 16, 3), "tubelet_size needs num_frames"),
        (AUDIO, (1, 8, 32, 3), "inputs have 3 channels, the model's in_chans is 1"),
        (dict(AUDIO, patch_stride=(4, 5)), (1, 8, 32, 1), r"patch_stride \(4, 5\) must be between 1 and patch_size 4"),
        (dict(AUDIO, fbank_input=True, in_chans=3), (1, 32, 8), r"fbank_input reads \[batch, time, mel bins\]"),
        (dict(TINY, global_pool="cls_distill_avg"), (1, 16, 16, 3), "it needs distill_token=True"),
        (dict(TINY, fc_norm_eps=0.0), (1, 16, 16, 3), "fc_norm_eps must be > 0"),
    ],
)
def test_bad_media_get_a_clear_error(config, shape, message):
    with pytest.raises(ValueError, match=message):
        tome_jax.ViT(**config).init(jax.random.key(0), jnp.zeros(shape))


def test_conversion_and_drawing_refuse_what_they_cannot_do():
    _, _, state = image_checkpoint()
    with pytest.raises(ValueError, match="inflation must be one of"):
        convert(state, num_frames=2, tubelet_size=2, inflation="first")
    model = tome_jax.ViT(**VIDEO)
    with pytest.raises(ValueError, match="visualize draws image models"):
        vis.visualize(model, None, inputs_for(model), np.zeros((2, 16, 16, 3)), 2)
    model = tome_jax.ViT(**dict(AUDIO, patch_stride=2))
    with pytest.raises(ValueError, match="visualize draws patches that tile the image"):
        vis.visualize(model, None, inputs_for(model), np.zeros((2, 8, 32, 3)), 2)


def test_named_media_configs():
    image = tome_jax.create_model("vit_base_patch16_224", class_token=False, global_pool="avg", num_classes=400)
    video = tome_jax.create_model("video_vit_base_patch16_tubelet2_16x224")
    audio = tome_jax.create_model("audio_vit_base_patch16_128x1024")
    assert (video.token_grid, video.num_tokens, video.input_shape) == ((8, 14, 14), 1568, (16, 224, 224, 3))
    assert (audio.token_grid, audio.num_tokens, audio.input_shape) == ((8, 64), 513, (128, 1024, 1))
    image, video, audio = (
        {"/".join(path): leaf.shape for path, leaf in flat_params(param_shapes(m)).items()}
        for m in (image, video, audio)
    )
    # The video ViT has the image ViT's parameters but for tubelet kernels and space-time positions.
    assert video.pop("patch_embed/kernel") == (2, 16, 16, 3, 768) and image.pop("patch_embed/kernel")
    assert video.pop("pos_embed") == (1, 1568, 768) and image.pop("pos_embed")
    assert video == image
    assert audio["patch_embed/kernel"] == (16, 16, 1, 768)
    assert tome_jax.create_model("video_vit_large_patch16_tubelet2_16x224").num_tokens == 1568
