"""The examples: Linen and NNX encoders with ToMe, dense outputs by unmerging, and features
for downstream models (SigLIP tokens for a language model, DINOv2 patch features)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tome_jax
from examples import dense_output, dinov2_patches, linen_encoder, nnx_encoder, siglip_tokens
from test_vit import random_variables
from tome_jax import merge, schedules

TINY = dict(width=16, depth=2, num_heads=2)
BATCH, FRAMES, FEATURES, R = 2, 13, 6, 3
FRAMES_IN = jax.random.normal(jax.random.key(0), (BATCH, FRAMES, FEATURES))


def linen_forward_backward(class_token):
    """(EncoderOutput, gradients) of the Linen encoder, compiled once."""
    model = linen_encoder.Encoder(**TINY, class_token=class_token)
    loss_and_grads = jax.value_and_grad(linen_encoder.pooled_energy, has_aux=True)

    @jax.jit
    def run(key):
        params = model.init(key, FRAMES_IN)["params"]
        return loss_and_grads(params, model, FRAMES_IN, R)

    (_, out), grads = run(jax.random.key(1))
    return out, grads


def nnx_forward_backward(class_token):
    """(EncoderOutput, gradients) of the NNX encoder, compiled once."""
    model = nnx_encoder.Encoder(FEATURES, **TINY, class_token=class_token, rngs=nnx.Rngs(1))
    (_, out), grads = nnx_encoder.loss_and_grads(model, FRAMES_IN, r=R)
    return out, grads


# One flag each keeps compilation short; the tagger test runs Linen with a class token.
@pytest.mark.parametrize(
    "forward_backward,class_token", [(linen_forward_backward, False), (nnx_forward_backward, True)]
)
def test_encoder_merges_conserves_size_and_has_finite_gradients(forward_backward, class_token):
    out, grads = forward_backward(class_token)
    prefix = int(class_token)
    tokens = schedules.tokens_per_layer(FRAMES + prefix, (R,) * TINY["depth"], prefix)
    assert out.tokens.shape == (BATCH, tokens[-1], TINY["width"])
    assert [plan.tokens_out for plan in out.plans] == list(tokens[1:])
    np.testing.assert_array_equal(np.asarray(out.size.sum(axis=1)), FRAMES + prefix)
    if class_token:
        np.testing.assert_array_equal(np.asarray(out.size[:, 0]), 1.0)
    # Size-weighted pooling is the plain mean over input positions of the unmerged tokens.
    per_frame = dense_output.unmerge_all(out.plans, out.tokens)[:, prefix:]
    np.testing.assert_allclose(out.pooled, per_frame.mean(axis=1), rtol=1e-5, atol=1e-6)
    flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])
    assert np.isfinite(flat).all() and np.abs(flat).max() > 0


def test_frame_tagger_gives_each_frame_the_logits_of_the_token_holding_it():
    encoder = linen_encoder.Encoder(**TINY, class_token=True)
    tagger = dense_output.FrameTagger(num_labels=5, encoder=encoder)

    @jax.jit
    def run(key):
        params = tagger.init(key, FRAMES_IN)["params"]
        out = encoder.apply({"params": params["encoder"]}, FRAMES_IN, r=R)
        merged_logits = out.tokens @ params["head"]["kernel"] + params["head"]["bias"]
        dense = dense_output.unmerge_all(out.plans, merged_logits)
        return tagger.apply({"params": params}, FRAMES_IN, r=R), out.plans, merged_logits, dense

    logits, plans, merged_logits, dense = run(jax.random.key(1))
    assert logits.shape == (BATCH, FRAMES, 5) and dense.shape == (BATCH, 1 + FRAMES, 5)
    source = merge.initial_source(BATCH, 1 + FRAMES)
    for plan in plans:
        source = merge.merge_source(plan, source)
    assert len(np.unique(source[0])) == 1 + FRAMES - TINY["depth"] * R
    holder_logits = jnp.take_along_axis(merged_logits, source[..., None], axis=1)
    np.testing.assert_array_equal(dense, holder_logits)
    np.testing.assert_allclose(logits, holder_logits[:, 1:], rtol=1e-5, atol=1e-6)


# The examples' architectures, narrow and shallow so that they run in seconds; the
# SigLIP tower keeps its 27 x 27 = 729 tokens.
TINY_SIGLIP = dict(siglip_tokens.SO400M_384, width=16, depth=2, num_heads=2)
TINY_DINOV2 = dict(dinov2_patches.DINOV2_S14, img_size=112, width=16, depth=2, num_heads=2)


def run_example(config, example, r, blocks):
    """The example's output for each of `blocks`, and the model's intermediates at `r`,
    from a random model of `config`, in one compilation."""
    model = tome_jax.ViT(**config)
    images = jax.random.normal(jax.random.key(0), (2, *model.input_shape))
    variables = random_variables(model, images)

    @jax.jit
    def run(variables, images):
        _, state = model.apply(variables, images, r=r, mutable="intermediates")
        return state["intermediates"], [example(model, variables, images, r, block) for block in blocks]

    return run(variables, images)


def holders(intermediates, block):
    """[batch, input_tokens]: the token of block `block`'s output holding each input token,
    found by unmerging token indices through the plans, last first (not from sources)."""
    plans = [intermediates[f"blocks_{i}"]["plan"][0] for i in range(block + 1)]
    index = jnp.broadcast_to(jnp.arange(plans[-1].tokens_out), plans[-1].kept.shape)
    for plan in reversed(plans):
        index = merge.unmerge(plan, index)
    return np.asarray(index)


def test_siglip_tokens_follow_tokens_per_layer_and_carry_their_sizes():
    r = 16
    assert siglip_tokens.token_count(tome_jax.ViT(**siglip_tokens.SO400M_384), r) == 297  # 27 blocks
    model = tome_jax.ViT(**TINY_SIGLIP)
    intermediates, outputs = run_example(TINY_SIGLIP, siglip_tokens.vision_tokens, r, (None, -2))
    counts = schedules.tokens_per_layer(729, (r, r))  # 729, 713, 697
    for block, index, (tokens, size) in zip((None, -2), (1, 0), outputs):
        n = siglip_tokens.token_count(model, r, block)
        assert n == counts[index + 1] and tokens.shape == (2, n, 16) and size.shape == (2, n)
        # Sizes (summed by the merges) count the patches each token holds (traced by plans).
        held = np.stack([np.bincount(h, minlength=n) for h in holders(intermediates, index)])
        np.testing.assert_array_equal(held, np.asarray(size))
    # Average pooling with fc_norm leaves the final tokens un-normed: the last block's.
    final, last = tome_jax.token_features(intermediates), tome_jax.token_features(intermediates, -1)
    for got, want in zip(final, last):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    siglip_tokens.main(TINY_SIGLIP, r_values=(r,))


def test_dinov2_patch_features_give_each_patch_its_token():
    r = 8
    intermediates, outputs = run_example(TINY_DINOV2, dinov2_patches.dense_features, r, (None, 0))
    counts = schedules.tokens_per_layer(65, (r, r), 1)  # 65, 57, 49
    for block, index, features in zip((None, 0), (1, 0), outputs):
        tokens = np.asarray(tome_jax.token_features(intermediates, block).tokens)
        holder = holders(intermediates, index)[:, 1:]  # the class token left out
        want = np.stack([tokens[b, holder[b]] for b in range(2)]).reshape(2, 8, 8, 16)
        np.testing.assert_array_equal(np.asarray(features), want)
        assert tokens.shape[1] == counts[index + 1]
        distinct = [len(np.unique(f.reshape(64, 16), axis=0)) for f in np.asarray(features)]
        assert distinct == [counts[index + 1] - 1] * 2
    # At r = 0 the patch features are the model's own patch tokens (main runs r = 0 too).
    intermediates, (features,) = run_example(TINY_DINOV2, dinov2_patches.dense_features, 0, (None,))
    final = np.asarray(tome_jax.token_features(intermediates).tokens)
    np.testing.assert_array_equal(np.asarray(features), final[:, 1:].reshape(2, 8, 8, 16))
    dinov2_patches.main(TINY_DINOV2, r_values=(0, r))
