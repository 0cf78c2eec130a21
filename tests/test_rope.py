"""Rotary ViTs (timm's Eva: EVA02, DINOv3, PE, RoPE-Mixed, SBB): timm's own forward at r = 0, the
PyTorch reference (tome_jax.torch_tome) when merging under both position rules and both metrics,
and every reduction method on a rotary model. Random weights at depth 2 (test_torch_rope.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tome_jax
from tome_jax import reduce, rope

torch = pytest.importorskip("torch", reason="compared with timm: pip install -e '.[torch]'")
timm = pytest.importorskip("timm", reason="compared with timm: pip install -e '.[torch]'")

from test_torch_rope import MODELS, images, relative_diff, timm_model  # noqa: E402
from tome_jax import torch_tome  # noqa: E402


@functools.cache
def converted(name, size, **changes):
    """tome_jax's model of `timm_model(name, size)` (DINOv3 is timm's dynamic-size model: told its size)."""
    model, variables = tome_jax.from_timm(timm_model(name, size), img_size=size)
    return model.clone(**changes), variables


def run(model, variables, x, r):
    """Logits and the last block's tokens, sizes and positions (jitted)."""
    def apply(v, x):
        logits, state = model.apply(v, x, r=r, mutable="intermediates")
        record = state["intermediates"][f"blocks_{model.depth - 1}"]
        return logits, record["size"][0], record["fields"][0][rope.POSITION_FIELD]

    return jax.jit(apply)(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))


@pytest.mark.parametrize("which", ["native", "other"])
@pytest.mark.parametrize("name", list(MODELS))
def test_at_r0_it_is_timm(name, which):
    _, native, other = MODELS[name]
    size = native if which == "native" else other
    x = images(size, size)
    with torch.no_grad():
        want = timm_model(name, size)(x)
    logits, _, _ = run(*converted(name, size), x, 0)
    assert relative_diff(torch.from_numpy(np.array(logits)), want) < 1e-4


CASES = [(rule, metric, 8) for rule in rope.POSITION_RULES for metric in rope.METRICS] + [("mean", "post", (8, -1))]


@pytest.mark.parametrize("rule, metric, r", CASES)
@pytest.mark.parametrize("name", list(MODELS))
def test_merging_matches_the_reference(name, rule, metric, r):
    size = MODELS[name][1]
    x = images(size, size)
    model, variables = converted(name, size, rope_position=rule, rope_metric=metric)
    logits, size_out, position = run(model, variables, x, r)
    with torch.no_grad():
        want = torch_tome.tome_tokens(timm_model(name, size), x, r, rope_position=rule, rope_metric=metric)
        want_logits = torch_tome.eva_forward_head(timm_model(name, size), want.tokens, want.size)
    assert relative_diff(torch.from_numpy(np.array(logits)), want_logits) < 1e-3
    np.testing.assert_allclose(np.asarray(size_out), want.size.numpy())  # the same merges
    prefix = model.num_prefix_tokens
    np.testing.assert_allclose(np.asarray(position)[:, prefix:], want.coord.numpy(), rtol=1e-5, atol=1e-5)


def tiny_rotary(**changes):
    settings = dict(num_classes=5, img_size=32, patch_size=4, width=32, depth=3, num_heads=2, reg_tokens=2)
    model = tome_jax.ViT(**{**settings, **changes}, abs_pos_embed=False, rope=rope.Rope("dinov3", 100.0, half=True))
    return model, jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


@pytest.mark.parametrize("name", sorted(reduce.METHODS))
def test_every_method_runs_on_a_rotary_model_or_says_why_not(name):
    settings = {"target_gflops": 1e-3} if name == "diffrate_search" else {}
    model, images = tiny_rotary(reduction=reduce.create(name, **settings), reg_tokens=0)  # a class token alone
    if name in ("dct", "diffrate_search"):  # no plan for the positions to follow
        with pytest.raises(ValueError, match=r"gives no plan .* field\(s\) position cannot follow it"):
            model.init(jax.random.key(1), images, r=4)
        return
    variables = model.init(jax.random.key(1), images)
    logits = jax.jit(lambda v, x: model.apply(v, x, r=4, train=name == "dtem"))(variables, images)
    assert np.isfinite(np.asarray(logits)).all()


def test_positions_follow_the_rule_and_the_metric_changes_the_merges():
    model, images = tiny_rotary()
    variables = model.init(jax.random.key(1), images)
    coords = rope.grid_coordinates(model.rope, model.grid_size)

    def final(**changes):
        m = model.clone(**changes)
        _, state = jax.jit(lambda v, x: m.apply(v, x, r=6, mutable="intermediates"))(variables, images)
        features = tome_jax.token_features(state["intermediates"], block=-1)
        position = state["intermediates"][f"blocks_{m.depth - 1}"]["fields"][0][rope.POSITION_FIELD]
        return features, np.asarray(position)

    prefix = model.num_prefix_tokens

    def held(features, b):  # the grid coordinates of the patches each token holds
        source = np.asarray(features.source)[b, prefix:]
        return [coords[source == token] for token in range(features.tokens.shape[1])]

    mean, mean_position = final()
    dest, dest_position = final(rope_position="dest")
    for b in range(2):
        for token, patches in enumerate(held(mean, b)[prefix:], prefix):
            np.testing.assert_allclose(mean_position[b, token], patches.mean(0), rtol=1e-5, atol=1e-6)
        for token, patches in enumerate(held(dest, b)[prefix:], prefix):
            assert any(np.array_equal(dest_position[b, token], c) for c in patches)
    np.testing.assert_array_equal(mean_position[:, :prefix], 0.0)  # never rotated
    assert (np.asarray(final(rope_metric="pre")[0].source) != np.asarray(mean.source)).any()


@pytest.mark.parametrize(
    "name",
    ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3", "vit_pe_core_tiny_patch16_384",
     "vit_small_patch16_rope_mixed_224", "vit_medium_patch16_rope_reg1_gap_256", "vit_small_plus_patch16_dinov3"],
)  # fmt: skip
def test_named_rotary_configs_have_timms_parameters(name):
    """The registry's Eva models count timm's parameters, and one more bias where Eva's fused
    projection leaves the keys without one (a zero there, folded into `qkv.bias`)."""
    model = timm.create_model(name, pretrained=False)
    zero_key_bias = sum(block.attn.q_bias.numel() for block in model.blocks if getattr(block.attn, "q_bias", None) is not None)
    shapes = jax.eval_shape(lambda: tome_jax.init_params(tome_jax.create_model(name)))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == sum(p.numel() for p in model.parameters()) + zero_key_bias


def test_dense_features_of_a_rotary_model_follow_the_merges():
    """DINOv3's dense features (`patch_features`): at r = 0 its patch tokens; merged, each patch
    gets the token holding it."""
    model, images = tiny_rotary()
    variables = model.init(jax.random.key(1), images)
    for r in (0, 6):
        _, state = jax.jit(lambda v, x: model.apply(v, x, r=r, mutable="intermediates"))(variables, images)
        final = tome_jax.token_features(state["intermediates"])
        dense = np.asarray(tome_jax.patch_features(model, state["intermediates"]))
        assert dense.shape == (2, *model.grid_size, model.width)
        source = np.asarray(final.source)[:, model.num_prefix_tokens :]
        want = np.take_along_axis(np.asarray(final.tokens), source[..., None], axis=1)
        np.testing.assert_array_equal(dense.reshape(want.shape), want)
        if r == 0:
            np.testing.assert_array_equal(source, np.arange(model.num_prefix_tokens, model.num_tokens)[None].repeat(2, 0))


def test_a_saved_rotary_model_reads_back_as_itself(tmp_path):
    """save_checkpoint writes the rotary kind, which no tensor shows, into the file's config."""
    model = tome_jax.ViT(**tome_jax.registry.MODEL_CONFIGS["vit_tiny_patch4_dinov3_32"], depth=2)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    path = tome_jax.save_checkpoint(model, variables, tmp_path / "rope.safetensors", test_acc=0.5)
    loaded, loaded_variables = tome_jax.from_timm(path)
    assert loaded.rope == model.rope and loaded.reg_tokens == 4 and not loaded.abs_pos_embed
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, r=4))  # noqa: E731
    np.testing.assert_array_equal(apply(loaded)(loaded_variables, x), apply(model)(variables, x))
    assert tome_jax.convert.safetensors_metadata(path)["test_acc"] == "0.5"


def test_a_checkpoint_whose_rope_is_not_a_rope_says_so(tmp_path):
    from safetensors.numpy import save_file

    model = tome_jax.ViT(**tome_jax.registry.MODEL_CONFIGS["vit_tiny_patch4_dinov3_32"], depth=2)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    path = tmp_path / "bad.safetensors"
    config = '{"num_heads": 3, "rope": {"kind": "spiral"}}'
    save_file(tome_jax.to_timm_state_dict(model, variables), path, metadata={"config": config})
    with pytest.raises(ValueError, match="rope.*spiral"):
        tome_jax.from_timm(path)
