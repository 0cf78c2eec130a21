"""tome_jax.torch_tome on timm's rotary Eva (EVA02, DINOv3, PE, RoPE-ViT): equal to timm's
own forward at r = 0, and merging by the rules of ALGORITHMS.md ("Rotary position
embeddings under merging") when r > 0. Random weights at depth 2 and reduced width."""

import functools
import math

import pytest

torch = pytest.importorskip("torch", reason="the reference is PyTorch: pip install -e '.[torch]'")
timm = pytest.importorskip("timm", reason="the reference reads timm's Eva: pip install -e '.[torch]'")
from timm.layers.pos_embed_sincos import _build_grid, get_mixed_grid, make_coords_dinov3  # noqa: E402
from timm.models.eva import Eva  # noqa: E402

from tome_jax import torch_tome  # noqa: E402

# timm name: (width overrides, native size, another size). Depth 2 everywhere.
SMALL = dict(embed_dim=192, num_heads=3)
MODELS = {
    "eva02_tiny_patch14_224": ({}, 224, 112),  # cat, ref_feat_shape 16, abs pos, SwiGLU, avg + fc_norm
    "vit_small_patch16_dinov3": (SMALL, 224, 160),  # dinov3, 4 registers, layer scale, no abs pos
    "vit_pe_core_tiny_patch16_384": ({}, 384, 224),  # cat, offset 1, xy, norm_pre, MAP head
    "vit_small_patch16_rope_mixed_224": (SMALL, 224, 160),  # mixed, xy, token pooling
    "vit_base_patch16_rope_reg1_gap_256": (SMALL, 256, 160),  # cat, one register and no class token, avg
}
# Hand-built Eva variants for what the five above do not exercise.
TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, use_rot_pos_emb=True)
VARIANTS = {
    "separate_qkv_sub_ln_swiglu_norm_qk_norm_avgmax": dict(
        qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, qk_norm=True,
        ref_feat_shape=(4, 4), init_values=0.1, num_reg_tokens=2, global_pool="avgmax", rope_grid_offset=0.5,
    ),
    "post_norm_mrope_max": dict(
        use_post_norm=True, rope_type="mrope", global_pool="max", class_token=False, num_reg_tokens=1,
        embed_dim=96, rope_mrope_section=(4, 4, 4),
    ),
    "grouped_kv_heads_xy_non_square": dict(
        attn_type="rope", num_kv_heads=1, qkv_fused=False, rope_grid_indexing="xy", global_pool="token",
        use_abs_pos_emb=False, num_heads=4, img_size=(64, 48), ref_feat_shape=(6, 10),
    ),
    "dinov3_xy_offset_map_norm_pre": dict(
        rope_type="dinov3", rope_rotate_half=True, rope_grid_indexing="xy", rope_grid_offset=0.25,
        global_pool="map", use_pre_transformer_norm=True, init_values=1e-5,
    ),
    "cat_rotate_half_bias_separate": dict(rope_rotate_half=True, init_values=0.1),
}


def randomised(model, seed=0):
    """Noise on every parameter, layer scale near 0.5 (timm starts it at 1e-5) and
    query/key projections large enough that attention is peaked, so that the
    rotation, and so each coordinate, shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
            if name.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")):
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith(("attn.qkv.weight", "attn.q_proj.weight", "attn.k_proj.weight")):
                p.copy_(1.5 * torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[1]))
    return model.eval()


@functools.cache
def timm_model(name, size):
    widths, _, _ = MODELS[name]
    dynamic = name == "vit_small_patch16_dinov3"  # dynamic_img_size: any size, no img_size needed
    sized = {} if dynamic else {"img_size": size}
    return randomised(timm.create_model(name, pretrained=False, depth=2, **widths, **sized))


@functools.cache
def variant_model(variant):
    model = Eva(**{**TINY, **VARIANTS[variant]})
    if variant == "cat_rotate_half_bias_separate":
        for block in model.blocks:
            block.attn.qkv_bias_separate = True  # not an Eva argument; EvaAttention's attribute
    return randomised(model)


def images(height, width, batch=2, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def relative_diff(got, want):
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("which", ["native", "other"])
@pytest.mark.parametrize("name", list(MODELS))
def test_at_r0_the_reference_is_timm(name, which):
    _, native, other = MODELS[name]
    size = native if which == "native" else other
    model, x = timm_model(name, size), images(size, size)
    with torch.no_grad():
        want = model(x)
    assert relative_diff(torch_tome.tome_forward(model, x, 0), want) < 1e-5
    # The coordinates matter: a quarter-cell shift of every patch shows in the logits.
    shifted = torch_tome.patch_coordinates
    try:
        torch_tome.patch_coordinates = lambda rope, grid: shifted(rope, grid) * 1.25 + 0.25
        assert relative_diff(torch_tome.tome_forward(model, x, 0), want) > 1e-5
    finally:
        torch_tome.patch_coordinates = shifted


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_at_r0_the_reference_is_timm_on_eva_variants(variant):
    model = variant_model(variant)
    x = images(*model.patch_embed.img_size)
    with torch.no_grad():
        want = model(x)
    assert relative_diff(torch_tome.tome_forward(model, x, 0), want) < 1e-5
    for rule in ("mean", "dest"):
        assert torch.isfinite(torch_tome.tome_forward(model, x, 4, rope_position=rule, rope_metric="post")).all()


@pytest.mark.parametrize("grid", [(4, 6), (16, 16)])
@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_coordinates_are_timms_grids(indexing, grid):
    """Each kind's coordinates are the grid its timm module builds for that shape."""
    cat = timm.layers.RotaryEmbeddingCat(
        32, in_pixels=False, ref_feat_shape=(14, 10), grid_offset=1.0, grid_indexing=indexing
    )
    want = _build_grid(list(grid), "index", [14, 10], 1.0, indexing).reshape(-1, 2)
    assert torch.equal(torch_tome.patch_coordinates(cat, grid), want)
    for normalize in ("separate", "min", "max"):
        dinov3 = timm.layers.RotaryEmbeddingDinoV3(
            32, normalize_coords=normalize, grid_offset=0.5, grid_indexing=indexing
        )
        want = make_coords_dinov3(*grid, normalize, indexing, 0.5)
        assert torch.equal(torch_tome.patch_coordinates(dinov3, grid), want)
    mixed = timm.layers.RotaryEmbeddingMixed(64, depth=1, num_heads=2, grid_indexing=indexing)
    assert torch.equal(torch_tome.patch_coordinates(mixed, grid), torch.stack(get_mixed_grid(list(grid), indexing), -1))


def test_prefix_tokens_are_never_rotated():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 8, generator=generator)
    sin, cos = torch.randn(2, 3, 2, 5, 8, generator=generator).unbind(2)
    for half in (False, True):
        out = torch_tome.rotate(x, sin, cos, 2, half)
        assert torch.equal(out[:, :, :2], x[:, :, :2])
        assert not torch.allclose(out[:, :, 2:], x[:, :, 2:])


@pytest.mark.parametrize("name", list(MODELS))
def test_merging_moves_positions_by_the_rules(name):
    _, native, _ = MODELS[name]
    model = timm_model(name, native)
    x = images(native, native)
    prefix = model.num_prefix_tokens
    grid = model.patch_embed.dynamic_feat_size((native, native))
    start = torch_tome.patch_coordinates(model.rope, grid)  # [patches, 2]
    inputs = prefix + start.shape[0]
    sources, logits = {}, {}
    for position in ("mean", "dest"):
        for metric in ("pre", "post"):
            state = torch_tome.tome_tokens(model, x, 8, rope_position=position, rope_metric=metric, track_source=True)
            tokens = state.tokens.shape[1]
            assert tokens == inputs - 2 * 8
            # Every input token is in exactly one output token; sizes count them.
            assert torch.equal(state.source.sum(1), torch.ones(2, inputs))
            assert torch.equal(state.size, state.source.sum(2))
            assert torch.equal(state.size.sum(1), torch.full((2,), float(inputs)))
            # The prefix tokens stay first, alone and in their order.
            assert torch.equal(state.source[:, :prefix], torch.eye(prefix, inputs).expand(2, -1, -1))
            assert state.coord.shape == (2, tokens - prefix, 2)
            patches = state.source[:, prefix:, prefix:]  # [batch, patch tokens, input patches]
            if position == "mean":
                mean = patches @ start / state.size[:, prefix:, None]
                assert float((state.coord - mean).abs().max()) < 1e-5 * float(start.abs().max())
            else:  # exactly one of its patches' coordinates
                hit = (state.coord[:, :, None] == start[None, None]).all(-1) & (patches > 0)
                assert torch.equal(hit.sum(-1), torch.ones_like(hit.sum(-1)))
            merged = state.size[:, prefix:] > 1
            assert merged.any()
            sources[position, metric] = state.source
            logits[position, metric] = torch_tome.eva_forward_head(model, state.tokens, state.size)
            assert torch.isfinite(logits[position, metric]).all()
            assert torch.equal(
                logits[position, metric],
                torch_tome.tome_forward(model, x, 8, rope_position=position, rope_metric=metric),
            )
    # The metric changes the merges.
    assert not torch.equal(sources["mean", "pre"], sources["mean", "post"])
    assert not torch.equal(logits["mean", "pre"], logits["dest", "pre"])
    # Merging in the first block only: the same merges, and the rule moves the
    # positions the second block rotates by.
    first = {
        rule: torch_tome.tome_tokens(model, x, [8], rope_position=rule, track_source=True) for rule in ("mean", "dest")
    }
    assert torch.equal(first["mean"].source, first["dest"].source)
    assert not torch.equal(first["mean"].coord, first["dest"].coord)
    heads = [torch_tome.eva_forward_head(model, state.tokens, state.size) for state in first.values()]
    assert relative_diff(heads[0], heads[1]) > 1e-6
    for rule in ("mean", "dest"):
        assert torch.isfinite(torch_tome.tome_forward(model, x, (8, -1), rope_position=rule)).all()


def test_the_rules_are_checked():
    model = variant_model("cat_rotate_half_bias_separate")
    x = images(64, 64)
    with pytest.raises(ValueError, match="rope_position"):
        torch_tome.tome_forward(model, x, 2, rope_position="source")
    with pytest.raises(ValueError, match="rope_metric"):
        torch_tome.tome_forward(model, x, 2, rope_metric="rotated")
