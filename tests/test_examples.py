"""The composition examples: Linen and NNX encoders with ToMe, and dense outputs by unmerging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples import dense_output, linen_encoder, nnx_encoder
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
