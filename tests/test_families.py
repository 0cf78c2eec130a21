"""CLIP, SigLIP and DINOv2 (registers, SwiGLU): equal to timm at r = 0 and to the
PyTorch reference when merging; their checkpoint layouts read as timm's own readers
read them, from files written here by hand in each source's layout."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from safetensors.numpy import save_file  # noqa: E402
from timm.models.vision_transformer import _load_weights, checkpoint_filter_fn  # noqa: E402

from checkpoint_layouts import DEPTH, EMBED, GRID, HEADS, PATCH, SMALL, WIDTH, openai_clip_state, random_arrays  # noqa: E402
from test_convert import images_for, max_abs_diff, randomised, tome_jax_logits, torch_logits  # noqa: E402
from tome_jax import create_model, from_timm, pretrained_data_config, to_timm_state_dict, torch_tome  # noqa: E402
from tome_jax.layers import pair  # noqa: E402
from tome_jax.schedules import tokens_per_layer  # noqa: E402


def relative_diff(got, want):
    """The largest difference, relative to the largest |output|."""
    return max_abs_diff(got, want) / float(np.abs(want).max())


# timm name, timm kwargs (224 px, at reduced depth), tome_jax overrides of the named config.
SWIGLU = dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)  # DINOv2-giant's MLP
FAMILIES = {
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", {}, {}),
    "clip": ("vit_base_patch16_clip_224", {}, {}),
    "siglip": ("vit_base_patch16_siglip_224", {}, {}),
    "so400m_siglip": ("vit_so400m_patch14_siglip_224", {}, {}),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=224), dict(img_size=224)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=224), dict(img_size=224)),
    "dinov2_swiglu": (
        "vit_small_patch14_dinov2",
        dict(img_size=224, **SWIGLU),
        dict(img_size=224, mlp_layer="swiglu_packed", act_layer="silu"),
    ),
}
# What the named config must share with the model read from timm's module.
SHARED_ATTRIBUTES = (
    "width", "num_heads", "patch_size", "img_size", "class_token", "reg_tokens", "no_embed_class", "pre_norm",
    "global_pool", "act_layer", "norm_eps", "mlp_layer", "num_classes",
)


def described(model):
    """The shared attributes, sizes as pairs (a name says 224, a module (224, 224))."""
    values = {a: getattr(model, a) for a in SHARED_ATTRIBUTES}
    return {a: pair(v) if a.endswith("_size") else v for a, v in values.items()}


# Over 20 s on 2 shared cores (the ViT-B towers at 224 px); the file tests below keep a
# quick CLIP and SigLIP check, the DINOv2 cases here are quick.
SLOW_FAMILIES = ("clip_quickgelu", "clip", "siglip", "so400m_siglip")


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAMILIES else f for f in FAMILIES]
)
def test_family_equals_timm_at_r0_and_the_reference_when_merging(family):
    name, timm_kwargs, overrides = FAMILIES[family]
    module = randomised(timm.create_model(name, pretrained=False, depth=2, **timm_kwargs))
    model, variables = from_timm(module)
    assert described(model) == described(create_model(name, depth=2, **overrides))

    images = images_for(224, 224)
    plain = tome_jax_logits(model, variables, images)
    assert relative_diff(plain, torch_logits(module, images)) < 1e-4
    for r in (8, (8, -1)):
        got = tome_jax_logits(model, variables, images, r=r)
        assert relative_diff(got, torch_tome.tome_forward(module, images, r).numpy()) < 1e-3
        assert relative_diff(got, plain) > 1e-3  # the merges changed the output

    back = to_timm_state_dict(model, variables)
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_unpacked_swiglu_with_its_norm_equals_timm():
    module = randomised(timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=56,
        mlp_layer=timm.layers.SwiGLU, act_layer=torch.nn.SiLU, scale_mlp_norm=True,
    ))
    model, variables = from_timm(module)
    assert (model.mlp_layer, model.act_layer, model.scale_mlp_norm) == ("swiglu", "silu", True)
    images = images_for(56, 56)
    assert relative_diff(tome_jax_logits(model, variables, images), torch_logits(module, images)) < 1e-4
    want = torch_tome.tome_forward(module, images, 4).numpy()
    assert relative_diff(tome_jax_logits(model, variables, images, r=4), want) < 1e-3


def test_a_size_the_patches_do_not_divide_reads_as_timm_computes_it():
    """timm's So400m/14 at 384 px reads 27 x 27 patches and ignores the last 6 pixels;
    so does tome_jax's (here 64 px in 14 px patches: 4 x 4, 8 pixels ignored)."""
    module = randomised(timm.create_model(
        "vit_base_patch16_siglip_224", pretrained=False, depth=2, embed_dim=128, num_heads=2, patch_size=14, img_size=64
    ))
    model, variables = from_timm(module)
    assert (model.img_size, model.grid_size) == ((64, 64), (4, 4))
    images = images_for(64, 64)
    assert relative_diff(tome_jax_logits(model, variables, images), torch_logits(module, images)) < 1e-4
    want = torch_tome.tome_forward(module, images, 4).numpy()
    assert relative_diff(tome_jax_logits(model, variables, images, r=4), want) < 1e-3


@pytest.mark.parametrize("name", ["vit_base_patch16_siglip_224", "vit_small_patch16_224"])
def test_merging_down_to_one_token_equals_the_reference(name):
    """A schedule that leaves nothing to pair (one token, or a class token and one
    patch token) before its last blocks: those blocks merge nothing on both sides.
    SigLIP has no class token and pools with its MAP head; ViT-S reads its class token."""
    module = randomised(timm.create_model(name, pretrained=False, depth=4, embed_dim=64, num_heads=2, img_size=32))
    model, variables = from_timm(module)
    r = 2  # 2 x 2 patches: 4 -> 2 -> 1 tokens after two blocks (with a class token: 5 -> 3 -> 2)
    assert tokens_per_layer(model.num_tokens, model.effective_schedule(r))[-1] == model.num_prefix_tokens + 1
    assert model.effective_schedule(r)[-2:] == (0, 0)
    images = images_for(32, 32)
    want = torch_tome.tome_forward(module, images, r).numpy()
    assert relative_diff(tome_jax_logits(model, variables, images, r=r), want) < 1e-3


@pytest.mark.slow
def test_so400m_at_384_px_equals_timm():
    """The registry's `vit_so400m_patch14_siglip_384` is timm's (27 x 27 = 729 patches of
    the 384 px image), at reduced depth."""
    name = "vit_so400m_patch14_siglip_384"
    module = randomised(timm.create_model(name, pretrained=False, depth=1))
    model, variables = from_timm(module)
    assert described(model) == described(create_model(name, depth=1))
    assert model.num_tokens == 729
    images = images_for(384, 384)
    assert relative_diff(tome_jax_logits(model, variables, images), torch_logits(module, images)) < 1e-4
    want = torch_tome.tome_forward(module, images, 8).numpy()
    assert relative_diff(tome_jax_logits(model, variables, images, r=8), want) < 1e-3


# --- checkpoint files ----------------------------------------------------------------

@pytest.mark.parametrize("act_layer,name", [
    ("quick_gelu", "vit_base_patch16_clip_quickgelu_224"),  # OpenAI CLIP
    pytest.param("gelu", "vit_base_patch16_clip_224", marks=pytest.mark.slow),  # OpenCLIP
])
def test_openai_clip_state_dict_reads_as_timms_converter_reads_it(act_layer, name):
    state = openai_clip_state()
    module = timm.create_model(name, pretrained=False, num_classes=EMBED, **SMALL).eval()
    # timm's own path for this layout: checkpoint_filter_fn -> _convert_openai_clip.
    module.load_state_dict(checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in state.items()}, module))
    images = images_for(PATCH * GRID, PATCH * GRID)
    want = torch_logits(module, images)

    with pytest.raises(ValueError, match="does not say its activation; pass act_layer='quick_gelu'"):
        from_timm(state)
    model, variables = from_timm(state, act_layer=act_layer)
    assert (model.norm_eps, model.pre_norm, model.num_heads, model.num_classes) == (1e-5, True, HEADS, EMBED)
    assert relative_diff(tome_jax_logits(model, variables, images), want) < 1e-4
    # The visual module's own state dict: the same names without `visual.`.
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    model, variables = from_timm(visual, act_layer=act_layer)
    assert relative_diff(tome_jax_logits(model, variables, images), want) < 1e-4
    assert relative_diff(tome_jax_logits(model, variables, images, r=4), torch_tome.tome_forward(
        module, images, 4).numpy()) < 1e-3


def big_vision_siglip_arrays(prefix, scanned, seed=0):
    """A SigLIP image tower in big_vision's layout (its `vit.py`: `embedding`, a
    `pos_embedding` without class position, blocks numbered 0/1/0, `encoder_norm`,
    `MAPHead_0`, `head`), under `prefix`, blocks scanned (a leading depth axis) or
    one group each; a text-tower entry beside it is left out by a reader."""
    w, hd, mlp = WIDTH, WIDTH // HEADS, 4 * WIDTH
    attention = lambda name: {  # noqa: E731  Flax's MultiHeadDotProductAttention
        **{f"{name}/{n}/kernel": (w, HEADS, hd) for n in ("query", "key", "value")},
        **{f"{name}/{n}/bias": (HEADS, hd) for n in ("query", "key", "value")},
        f"{name}/out/kernel": (HEADS, hd, w), f"{name}/out/bias": (w,),
    }
    norm = lambda name: {f"{name}/scale": (w,), f"{name}/bias": (w,)}  # noqa: E731
    mlp_block = lambda name: {  # noqa: E731
        f"{name}/Dense_0/kernel": (w, mlp), f"{name}/Dense_0/bias": (mlp,),
        f"{name}/Dense_1/kernel": (mlp, w), f"{name}/Dense_1/bias": (w,),
    }
    block = {
        **norm("LayerNorm_0"), **attention("MultiHeadDotProductAttention_0"),
        **norm("LayerNorm_1"), **mlp_block("MlpBlock_0"),
    }
    shapes = {
        "embedding/kernel": (PATCH, PATCH, 3, w), "embedding/bias": (w,),
        "pos_embedding": (1, GRID * GRID, w),
        **norm("Transformer/encoder_norm"),
        "MAPHead_0/probe": (1, 1, w),
        **{f"MAPHead_0/{k}": v for k, v in attention("MultiHeadDotProductAttention_0").items()},
        **{f"MAPHead_0/{k}": v for k, v in norm("LayerNorm_0").items()},
        **{f"MAPHead_0/{k}": v for k, v in mlp_block("MlpBlock_0").items()},
        "head/kernel": (w, EMBED), "head/bias": (EMBED,),
    }
    for name, shape in block.items():
        if scanned:
            shapes[f"Transformer/encoderblock/{name}"] = (DEPTH, *shape)
        else:
            shapes.update({f"Transformer/encoderblock_{i}/{name}": shape for i in range(DEPTH)})
    arrays = {f"{prefix}{k}": v for k, v in random_arrays(shapes, seed).items()}
    arrays[prefix.replace("img/", "txt/") + "Embed_0/embedding"] = np.zeros((10, w), np.float32)
    return arrays


@pytest.mark.parametrize("prefix,scanned", [("img/", False), ("params/img/", True)])
def test_big_vision_siglip_npz_reads_as_timms_loader_reads_it(tmp_path, prefix, scanned):
    path = tmp_path / "siglip.npz"
    np.savez(path, **big_vision_siglip_arrays(prefix, scanned))
    module = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=EMBED, **SMALL).eval()
    with torch.no_grad():
        _load_weights(module, str(path), prefix if prefix == "img/" else "")  # timm's reader of this layout
    images = images_for(PATCH * GRID, PATCH * GRID)
    model, variables = from_timm(path)
    assert (model.global_pool, model.class_token, model.act_layer, model.num_heads) == ("map", False, "gelu", HEADS)
    assert relative_diff(tome_jax_logits(model, variables, images), torch_logits(module, images)) < 1e-4
    assert relative_diff(tome_jax_logits(model, variables, images, r=4), torch_tome.tome_forward(
        module, images, 4).numpy()) < 1e-3


def small_state(name, **kwargs):
    module = randomised(timm.create_model(name, pretrained=False, **SMALL, **kwargs))
    return module, {k: v.numpy() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_timm_files_say_what_their_tensors_cannot(tmp_path):
    """Activation and LayerNorm epsilon from the `config` metadata or overrides;
    registers, their position embeddings, SwiGLU and attention pooling from the tensors."""
    images = images_for(PATCH * GRID, PATCH * GRID)
    clip, state = small_state("vit_base_patch16_clip_quickgelu_224")
    with pytest.raises(ValueError, match="does not say its activation; pass act_layer="):
        from_timm(state)
    with pytest.raises(ValueError, match="does not say its LayerNorm epsilon; pass norm_eps=1e-5"):
        from_timm(state, act_layer="quick_gelu")
    path = tmp_path / "clip.safetensors"
    save_file(state, path, metadata={"config": json.dumps({"act_layer": "quick_gelu", "norm_eps": 1e-5})})
    model, variables = from_timm(path)
    assert relative_diff(tome_jax_logits(model, variables, images), torch_logits(clip, images)) < 1e-4

    siglip, state = small_state("vit_base_patch16_siglip_224")
    with pytest.raises(ValueError, match="attention-pooled .* pass act_layer='gelu'"):
        from_timm(state)
    model, variables = from_timm(state, act_layer="gelu")
    assert relative_diff(tome_jax_logits(model, variables, images), torch_logits(siglip, images)) < 1e-4

    for kwargs in (dict(reg_tokens=4, no_embed_class=True), dict(reg_tokens=2, mlp_layer=timm.layers.SwiGLUPacked,
                                                                   act_layer=torch.nn.SiLU)):
        dinov2, state = small_state("vit_small_patch14_dinov2", patch_size=PATCH, **kwargs)
        model, variables = from_timm(state)
        assert model.reg_tokens == kwargs["reg_tokens"] and model.no_embed_class == kwargs.get("no_embed_class", False)
        assert relative_diff(tome_jax_logits(model, variables, images), torch_logits(dinov2, images)) < 1e-4


def test_pretrained_data_config_of_each_family(tmp_path):
    clip = pretrained_data_config("vit_base_patch16_clip_224.openai")
    assert clip["mean"] == timm.data.OPENAI_CLIP_MEAN and clip["std"] == timm.data.OPENAI_CLIP_STD
    assert pretrained_data_config("vit_base_patch16_siglip_224")["mean"] == (0.5, 0.5, 0.5)
    assert pretrained_data_config("vit_small_patch14_reg4_dinov2")["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    _, state = small_state("vit_base_patch16_siglip_224")
    path = tmp_path / "siglip.safetensors"
    save_file(state, path)
    assert pretrained_data_config(path) is None
    cfg = dict(mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation="bilinear", hf_hub_id="x")
    save_file(state, path, metadata={"pretrained_cfg": json.dumps(cfg)})
    assert pretrained_data_config(path) == dict(mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, interpolation="bilinear")


# --- eval.py and tome-jax-vis by timm name -------------------------------------------


@pytest.mark.slow
def test_eval_takes_a_family_by_name_with_its_preprocessing(tmp_path):
    """Random weights (pretrained=False), SigLIP's mean and std from timm's pretrained
    config; a feature model without a head is refused in one line that says what to pass."""
    from configs import eval_cifar10

    from tome_jax import evaluate

    config = eval_cifar10.get_config()
    config.model, config.pretrained, config.preprocess = "vit_base_patch16_siglip_224", False, "timm"
    config.update(r="0, 1", limit=4, batch_size=4, timing_runs=1, workdir=str(tmp_path))
    config.model_overrides.update(depth=1, img_size=32)
    with pytest.raises(ValueError, match="num_classes=0.*--config.model_overrides.num_classes=10"):
        evaluate.run(config)
    config.model_overrides.num_classes = 10
    model, _, source = evaluate.load_model(config)
    preprocess = evaluate.preprocess_for(config, model, source)
    assert (preprocess.mean, preprocess.std, preprocess.size) == ((0.5,) * 3, (0.5,) * 3, (32, 32))
    rows = evaluate.run(config)
    assert [row["r"] for row in rows] == ["0", "1"] and all(row["count"] == 4 for row in rows)
    assert rows[1]["tokens_left"] == 3  # 2 x 2 patches, no class token, one merge


@pytest.mark.slow
def test_vis_draws_a_family_by_name_with_random_weights(tmp_path, capsys):
    from tome_jax import cli

    out = tmp_path / "merges.png"
    cli.vis_main([str(out), "--model", "vit_base_patch16_siglip_224", "--random-weights", "--preprocess", "timm",
                  "--images", "1", "--r", "8"])
    assert out.exists() and "r=8: 196 tokens -> 100" in capsys.readouterr().out
