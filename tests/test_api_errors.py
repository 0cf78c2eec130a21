"""Library misuse ends in one ValueError or TypeError that names the problem and the fix
(the commands print it as `error: ...`, exit 2), not in an error from deep inside."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tome_jax
from checkpoint_layouts import WIDTH, openai_clip_state
from examples import nnx_encoder
from tome_jax import merge, vis

IMAGES = np.zeros((1, 32, 32, 3), np.float32)


@pytest.fixture(scope="module")
def tiny_vit():
    """A 2-block ViT over 8 x 8 patches of a 32 px image, and its variables."""
    model = tome_jax.ViT(img_size=32, patch_size=4, width=16, depth=2, num_heads=2, num_classes=10)
    return model, {"params": tome_jax.init_params(model)}


@pytest.fixture(scope="module")
def tiny_intermediates(tiny_vit):
    """What the tiny ViT records at r=2 (one compiled apply for the tests that read it)."""
    model, variables = tiny_vit
    apply = jax.jit(lambda v, x: model.apply(v, x, r=2, mutable="intermediates")[1]["intermediates"])
    return apply(variables, IMAGES)


@pytest.fixture(scope="module")
def nnx_model():
    return nnx_encoder.Encoder(8, width=16, depth=2, num_heads=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("call", [
    lambda model: tome_jax.choose_r(model, {}, target_gflops=1.0),
    lambda model: vis.visualize(model, {}, IMAGES, IMAGES, 2),
    lambda model: tome_jax.patch_features(model, {}),
    lambda model: tome_jax.to_timm_state_dict(model, {}),
], ids=["choose_r", "visualize", "patch_features", "to_timm_state_dict"])
def test_an_nnx_module_is_refused_with_what_to_do(call, nnx_model):
    with pytest.raises(TypeError, match=r"takes a Linen tome_jax.ViT, got Encoder: an NNX module.*"
                       r"tome_jax.create_model.*examples/nnx_encoder.py"):
        call(nnx_model)


def test_a_vit_wrapped_for_nnx_is_refused_with_where_the_vit_is(tiny_vit):
    bridged = nnx.bridge.ToNNX(tiny_vit[0], rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"choose_r takes a Linen tome_jax.ViT, got ToNNX: .*its to_nnx__module"):
        tome_jax.choose_r(bridged, {}, target_gflops=1.0)


@pytest.mark.parametrize("matcher", [
    lambda metric: merge.bipartite_soft_merge(metric, 2),
    lambda metric: merge.kth_bipartite_merge(metric, 2),
    lambda metric: merge.random_bipartite_merge(metric, 2, jax.random.key(0)),
], ids=["bipartite", "kth", "random"])
def test_a_metric_without_a_batch_axis_is_refused_with_the_shape_it_needs(matcher):
    with pytest.raises(ValueError, match=r"\[batch, tokens, channels\], got shape \(10, 4\).*metric\[None\]"):
        matcher(jnp.zeros((10, 4)))


@pytest.mark.parametrize("block", [1.0, "1", True])
def test_token_features_block_must_be_an_int_or_none(tiny_intermediates, block):
    with pytest.raises(TypeError, match=r"block must be an int .*\[-2, 2\)\) or None .*got "):
        tome_jax.token_features(tiny_intermediates, block=block)
    assert tome_jax.token_features(tiny_intermediates, block=np.int64(1)).tokens.shape == (1, 61, 16)


def test_visualize_r_must_be_an_int_or_a_list(tiny_vit):
    with pytest.raises(TypeError, match=r"r must be an int or a list of r specs .*got 2.0 \(float\)"):
        vis.visualize(*tiny_vit, IMAGES, IMAGES, 2.0)


# --- conversion: the tensor really missing or mis-shaped, in the checkpoint's own names ---

BLOCK_0 = "visual.transformer.resblocks.0."


def without(state, *names):
    return {key: value for key, value in state.items() if key not in names}


@pytest.mark.parametrize("absent", [["weight"], ["bias", "weight"]])
def test_a_clip_state_dict_without_ln_pre_names_ln_pre(absent):
    state = without(openai_clip_state(), *(f"visual.ln_pre.{part}" for part in absent))
    with pytest.raises(ValueError) as error:
        tome_jax.from_timm(state, act_layer="quick_gelu")
    listing = "".join(f"\n  norm_pre.{part} (from visual.ln_pre.{part})" for part in absent)
    assert str(error.value).endswith(":\nmissing:" + listing)


def test_a_cut_clip_mlp_kernel_is_the_one_blamed():
    state = openai_clip_state()
    state[BLOCK_0 + "mlp.c_fc.weight"] = state[BLOCK_0 + "mlp.c_fc.weight"][:100]
    with pytest.raises(ValueError, match=(
        r"\nwrong shape:\n  blocks\.0\.mlp\.fc1\.weight \(from visual\.transformer\.resblocks\.0\.mlp\.c_fc\.weight\): "
        rf"expected \({4 * WIDTH}, {WIDTH}\), got \(100, {WIDTH}\)$"
    )):
        tome_jax.from_timm(state, act_layer="quick_gelu")


def test_a_clip_state_dict_without_its_projection_is_read_only_when_asked():
    state = without(openai_clip_state(), "visual.proj")
    with pytest.raises(ValueError, match=r"no 'visual.proj', the projection .* pass num_classes=0"):
        tome_jax.from_timm(state, act_layer="quick_gelu")
    model, variables = tome_jax.from_timm(state, act_layer="quick_gelu", num_classes=0)
    assert model.num_classes == 0 and "head" not in variables["params"]
    assert model.apply(variables, np.zeros((1, *model.input_shape), np.float32)).shape == (1, WIDTH)
