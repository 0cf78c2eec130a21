"""tome_jax.convert against timm's and torchvision's own forwards, their loaders, and
a PyTorch ToMe on the real CIFAR-10 checkpoint."""

import functools
import json
import pathlib
import re
import tarfile
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# timm, torchvision and PyTorch ToMe are the references throughout.
NEEDS_TORCH = "the references are timm and torchvision: pip install -e '.[torch]'"
torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
timm = pytest.importorskip("timm", reason=NEEDS_TORCH)
torchvision = pytest.importorskip("torchvision", reason=NEEDS_TORCH)
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn  # noqa: E402

from test_vit import jit_apply  # noqa: E402
from tome_jax import convert, from_timm, pretrained_data_config, to_timm_state_dict, torch_tome  # noqa: E402

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
CIFAR_MODEL = ASSETS / "vit_tiny_p4_cifar10.safetensors"
CIFAR_DATA = ASSETS / "cifar10-jpg.tar.gz"
CIFAR_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGES_PER_CLASS = 20


def randomised(model, seed=0):
    """Noise on every parameter, in eval mode: timm's init leaves LayerScale at 1e-5
    and cls tokens near zero, which would hide their conversion."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def small_timm(name="vit_tiny_patch16_224", depth=2, **kwargs):
    return randomised(timm.create_model(name, pretrained=False, depth=depth, **kwargs))


def images_for(height, width, batch=2, seed=0):
    """[batch, 3, height, width] float32, NCHW as torch wants."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def tome_jax_logits(model, variables, images_nchw, r=0):
    return np.asarray(jit_apply(model)(variables, images_nchw.permute(0, 2, 3, 1).numpy(), r=r))


def torch_logits(module, images_nchw):
    with torch.no_grad():
        return module(images_nchw).numpy()


def max_abs_diff(a, b):
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


# --- r = 0 equals the original -------------------------------------------------------

TIMM_CASES = {
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
    "vit_base_patch32": ("vit_base_patch32_224", {}),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", {}),
    "gap_no_class_token": ("vit_small_patch16_224", dict(class_token=False, global_pool="avg")),
    "gap_norm_before_pool": (
        "vit_small_patch16_224",
        dict(class_token=False, global_pool="avg", fc_norm=False),
    ),
    "mae_fc_norm": ("vit_base_patch16_224", dict(global_pool="avg")),
    "deit3_layer_scale": ("deit3_small_patch16_224", {}),
    "img_size_288": ("vit_small_patch16_224", dict(img_size=288)),
    "non_square": ("vit_tiny_patch16_224", dict(img_size=(96, 160), patch_size=(16, 32))),
    "qk_norm_pre_norm_no_qkv_bias": (
        "vit_tiny_patch16_224",
        dict(qk_norm=True, pre_norm=True, qkv_bias=False),
    ),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_r0_matches_timm_and_converts_back_exactly(case):
    name, kwargs = TIMM_CASES[case]
    module = small_timm(name, **kwargs)
    model, variables = from_timm(module)
    images = images_for(*module.patch_embed.img_size)
    assert max_abs_diff(tome_jax_logits(model, variables, images), torch_logits(module, images)) < 1e-4
    back = to_timm_state_dict(model, variables)
    want = {k: v.numpy() for k, v in module.state_dict().items()}
    assert sorted(back) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(back[key], want[key], err_msg=key)


def test_timm_name_creates_the_timm_model():
    torch.manual_seed(0)
    module = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    torch.manual_seed(0)
    model, variables = from_timm("deit_tiny_patch16_224", pretrained=False)
    assert (model.width, model.depth, model.num_heads) == (192, 12, 3)
    back = to_timm_state_dict(model, variables)
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize(
    "old_grid,new_grid,prefix",
    [((14, 14), (20, 20), 1), ((14, 14), (9, 9), 1), ((7, 7), (5, 9), 2), ((6, 10), (12, 4), 0)],
)
def test_pos_embed_resampling_matches_timm(old_grid, new_grid, prefix):
    from timm.layers import resample_abs_pos_embed

    pos_embed = torch.randn(1, prefix + old_grid[0] * old_grid[1], 32)
    want = resample_abs_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens=prefix)
    got = convert.resample_pos_embed(pos_embed.numpy(), new_grid, old_grid, prefix)
    assert max_abs_diff(got, want.numpy()) < 1e-5
    np.testing.assert_array_equal(got[:, :prefix], pos_embed[:, :prefix].numpy())


@pytest.mark.parametrize(
    "name,img_size",
    [("vit_tiny_patch16_224", 288), ("deit3_small_patch16_224", (160, 256))],
)
def test_img_size_override_resamples_like_timm(name, img_size):
    module = small_timm(name)
    resized = timm.create_model(name, pretrained=False, depth=2, img_size=img_size).eval()
    # timm's own loading path for a checkpoint trained at another size.
    resized.load_state_dict(checkpoint_filter_fn(module.state_dict(), resized))
    model, variables = from_timm(module, img_size=img_size)
    images = images_for(*resized.patch_embed.img_size)
    assert max_abs_diff(tome_jax_logits(model, variables, images), torch_logits(resized, images)) < 1e-4


def small_torchvision():
    vit = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=10
    )
    return randomised(vit)


def test_torchvision_layout_matches_torchvision():
    vit = small_torchvision()
    images = images_for(64, 64)
    want = torch_logits(vit, images)
    model, variables = from_timm(vit)
    assert max_abs_diff(tome_jax_logits(model, variables, images), want) < 1e-4
    # The legacy MLP names, as in torchvision's first ViT (and SWAG) checkpoints.
    legacy = {
        k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
        for k, v in vit.state_dict().items()
    }
    model, from_dict = from_timm(legacy)
    assert model.num_heads == 12 and model.img_size == (64, 64)
    assert max_abs_diff(tome_jax_logits(model, from_dict, images), want) < 1e-4


# --- merging matches a PyTorch ToMe ------------------------------------------------


@pytest.mark.parametrize("name", ["deit_small_distilled_patch16_224", "deit3_small_patch16_224"])
def test_merging_matches_torch_tome_with_distill_token_and_layer_scale(name):
    module = small_timm(name, depth=4, img_size=128)
    model, variables = from_timm(module)
    images = images_for(128, 128)
    r = (12, -1)  # 24, 16, 8, 0 tokens
    want = torch_tome.tome_forward(module, images, r).numpy()
    assert max_abs_diff(tome_jax_logits(model, variables, images, r=r), want) < 1e-4


@functools.cache
def cifar_test_images():
    """The first IMAGES_PER_CLASS test images of each class, normalised as the
    checkpoint was trained (NCHW float32), and their labels."""
    images, labels = [], []
    counts = dict.fromkeys(CIFAR_CLASSES, 0)
    with tarfile.open(CIFAR_DATA) as tar:
        for member in tar:
            split, *rest = member.name.split("/")
            if split != "test" or not member.isfile():
                continue
            label = rest[0]
            if counts[label] < IMAGES_PER_CLASS:
                counts[label] += 1
                images.append(np.asarray(Image.open(tar.extractfile(member)).convert("RGB")))
                labels.append(CIFAR_CLASSES.index(label))
    images = (np.stack(images) / np.float32(255) - CIFAR_MEAN) / CIFAR_STD
    return torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2).contiguous(), np.array(labels)


@functools.cache
def cifar_timm_model():
    """timm's VisionTransformer from the constructor arguments in the file's metadata, independently of tome_jax."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(CIFAR_MODEL, "pt") as handle:
        config = json.loads(handle.metadata()["config"])
    module = VisionTransformer(**config)
    module.load_state_dict(load_file(CIFAR_MODEL))
    return module.eval()


@pytest.fixture(scope="module")
def cifar():
    model, variables = from_timm(CIFAR_MODEL)
    return model, variables, cifar_timm_model(), *cifar_test_images()


@pytest.mark.slow
def test_cifar_checkpoint_r0_matches_timm(cifar):
    model, variables, module, images, labels = cifar
    got, want = tome_jax_logits(model, variables, images), torch_logits(module, images)
    assert max_abs_diff(got, want) < 1e-4
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    assert (got.argmax(1) == labels).mean() > 0.5  # 59.77% on the full test set


@pytest.mark.slow
@pytest.mark.parametrize("r", [3, (6, -1), (8, -1)], ids=str)
def test_cifar_merging_matches_torch_tome(cifar, r):
    model, variables, module, images, _ = cifar
    got = tome_jax_logits(model, variables, images, r=r)
    want = torch_tome.tome_forward(module, images, r).numpy()
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    assert max_abs_diff(got, want) < 1e-4


@pytest.mark.slow
def test_torch_tome_at_r0_is_timm(cifar):
    _, _, module, images, _ = cifar
    want = torch_logits(module, images[:8])
    assert max_abs_diff(torch_tome.tome_forward(module, images[:8], 0).numpy(), want) < 1e-5


# --- file formats --------------------------------------------------------------------


def write_augreg_npz(module, path, big_vision=False):
    """timm weights -> Google's ViT .npz, transcribed from the layout timm's loader reads.

    AugReg: one group per block, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
    `MlpBlock_3`. big_vision: a `params/` prefix, a top-level `pos_embedding` and
    scanned blocks (one array with a leading depth axis) numbered 0, 1, 0.
    """
    sd = {k: v.numpy() for k, v in module.state_dict().items()}
    width, heads = sd["pos_embed"].shape[-1], module.blocks[0].attn.num_heads
    per_head = lambda w: w.T.reshape(width, heads, -1)  # noqa: E731  [out, in] -> [in, heads, head_dim]
    attn, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else (
        "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    blocks = []
    for i in range(len(module.blocks)):
        b = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        qkv_w, qkv_b = np.split(b("attn.qkv.weight"), 3), np.split(b("attn.qkv.bias"), 3)
        block = {
            "LayerNorm_0/scale": b("norm1.weight"), "LayerNorm_0/bias": b("norm1.bias"),
            f"{ln2}/scale": b("norm2.weight"), f"{ln2}/bias": b("norm2.bias"),
            f"{attn}/out/kernel": b("attn.proj.weight").T.reshape(heads, -1, width),
            f"{attn}/out/bias": b("attn.proj.bias"),
            f"{mlp}/Dense_0/kernel": b("mlp.fc1.weight").T, f"{mlp}/Dense_0/bias": b("mlp.fc1.bias"),
            f"{mlp}/Dense_1/kernel": b("mlp.fc2.weight").T, f"{mlp}/Dense_1/bias": b("mlp.fc2.bias"),
        }
        for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            block[f"{attn}/{name}/kernel"] = per_head(w)
            block[f"{attn}/{name}/bias"] = bias.reshape(heads, -1)
        blocks.append(block)
    arrays = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    if "cls_token" in sd:
        arrays["cls"] = sd["cls_token"]
    if big_vision:
        arrays["pos_embedding"] = sd["pos_embed"]
        arrays.update({f"Transformer/encoderblock/{n}": np.stack([b[n] for b in blocks]) for n in blocks[0]})
        arrays = {f"params/{k}": v for k, v in arrays.items()}
    else:
        arrays["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
        for i, block in enumerate(blocks):
            arrays.update({f"Transformer/encoderblock_{i}/{n}": v for n, v in block.items()})
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "big_vision,kwargs",
    [(False, {}), (True, dict(class_token=False, global_pool="avg", fc_norm=False))],
    ids=["augreg", "big_vision_gap"],
)
def test_npz_loads_like_timms_npz_loader(tmp_path, big_vision, kwargs):
    module = small_timm("vit_small_patch16_224", **kwargs)
    path = tmp_path / "vit.npz"
    write_augreg_npz(module, path, big_vision)
    images = images_for(224, 224)
    want = torch_logits(module, images)
    reloaded = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, **kwargs).eval()
    reloaded.load_pretrained(str(path))
    assert max_abs_diff(torch_logits(reloaded, images), want) < 1e-5  # the file is what timm reads
    model, variables = from_timm(path)
    assert model.num_heads == 6
    assert max_abs_diff(tome_jax_logits(model, variables, images), want) < 1e-4


def test_pth_round_trip(tmp_path):
    module = small_timm("deit_small_distilled_patch16_224")
    model, variables = from_timm(module)
    state = {k: torch.from_numpy(v) for k, v in to_timm_state_dict(model, variables).items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "epoch": 3}, path)
    reloaded = timm.create_model("deit_small_distilled_patch16_224", pretrained=False, depth=2).eval()
    reloaded.load_state_dict(torch.load(path)["model"])
    images = images_for(224, 224)
    assert max_abs_diff(torch_logits(reloaded, images), torch_logits(module, images)) == 0
    model2, variables2 = from_timm(path)
    assert model2 == model
    chex.assert_trees_all_equal(variables2, variables)


def test_pretrained_data_config():
    want = dict(input_size=(3, 224, 224), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.9,
                interpolation="bicubic", crop_mode="center")
    assert pretrained_data_config("vit_base_patch16_224.augreg_in21k_ft_in1k") == want
    module = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1)
    assert pretrained_data_config(module)["mean"] == (0.485, 0.456, 0.406)
    assert pretrained_data_config(CIFAR_MODEL) is None


# --- errors --------------------------------------------------------------------------


def timm_state(**kwargs):
    return {k: v.numpy() for k, v in small_timm(**kwargs).state_dict().items()}


def edited(state, drop=(), **replace):
    """A copy of `state` without `drop`, with `replace` (dots written as __)."""
    out = {k: v for k, v in state.items() if k not in drop}
    out.update({k.replace("__", "."): v for k, v in replace.items()})
    return out


@pytest.mark.parametrize(
    "edit,message",
    [
        (partial(edited, drop=["blocks.1.norm2.bias"]), r"missing:\n  blocks.1.norm2.bias"),
        (
            partial(edited, blocks__0__attn__gate__weight=np.zeros((192, 192))),
            r"unexpected:\n  blocks.0.attn.gate.weight",
        ),
        (
            partial(edited, blocks__1__mlp__fc2__weight=np.zeros((192, 700))),
            r"wrong shape:\n  blocks.1.mlp.fc2.weight: expected \(192, 768\), got \(192, 700\)",
        ),
        (partial(edited, blocks__3__norm1__weight=np.ones(192)), r"missing:(.|\n)*  blocks.2.norm1.weight\n"),
    ],
    ids=["missing", "unexpected", "wrong_shape", "holes_in_depth"],
)
def test_bad_timm_tensors_are_named(edit, message):
    with pytest.raises(ValueError, match=message):
        from_timm(edit(timm_state()))


def test_bad_tensors_are_named_in_the_sources_layout(tmp_path):
    vit = small_torchvision().state_dict()
    vit["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"] = torch.zeros(2304, 700)
    vit["heads.pre_logits.weight"] = torch.zeros(768, 768)
    pattern = (
        r"unexpected:\n  heads.pre_logits.weight\nwrong shape:\n  blocks.1.attn.qkv.weight "
        r"\(from encoder.layers.encoder_layer_1.self_attention.in_proj_weight\): "
        r"expected \(2304, 768\), got \(2304, 700\)"
    )
    with pytest.raises(ValueError, match=pattern):
        from_timm(vit)

    path = tmp_path / "vit.npz"
    write_augreg_npz(small_timm(), path)
    arrays = dict(np.load(path))
    key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel"
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    arrays[key] = np.zeros((192, 3, 60))
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=(
        r"missing:\n  blocks.1.mlp.fc2.bias \(from Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias\)\n"
        r"wrong shape:\n  blocks.0.attn.qkv.weight \(from [^)]*/key/kernel[^)]*\): "
        r"expected \(576, 192\), got \(564, 192\)"
    )):
        from_timm(path)
    arrays[key] = np.zeros((190, 3, 64))
    np.savez(path, **arrays)
    combine = r"cannot combine .*query/kernel \(192, 3, 64\), .*key/kernel \(190, 3, 64\)"
    with pytest.raises(ValueError, match=combine):
        from_timm(path)


def test_num_heads_comes_from_an_override_when_shapes_cannot_tell():
    state = timm_state(embed_dim=200, num_heads=5)
    with pytest.raises(ValueError, match="width-200 .* pass num_heads="):
        from_timm(state)
    model, _ = from_timm(state, num_heads=5)
    assert model.num_heads == 5


def test_overrides_win_over_inference():
    model, variables = from_timm(
        timm_state(), num_heads=6, global_pool="avg", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
    )
    assert (model.num_heads, model.global_pool, model.dtype) == (6, "avg", jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(act_layer="relu"), r"blocks.0.mlp.act is ReLU, not one of \['gelu'"),
        (dict(mlp_layer=timm.layers.GluMlp), r"GluMlp gating its second half \(gate_last=True\)"),
        (dict(global_pool="avgmax"), "global_pool='avgmax'"),
        (dict(global_pool="avg", pool_include_prefix=True), "pool_include_prefix=True with global_pool=.avg."),
        (dict(block_fn=timm.models.vision_transformer.ResPostBlock), "blocks.0 is ResPostBlock"),
    ],
    ids=["relu", "glu_gate_last", "avgmax_pool", "pool_include_prefix", "res_post_block"],
)
def test_timm_features_vit_lacks_are_refused(kwargs, message):
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, **kwargs)
    with pytest.raises(ValueError, match=message):
        from_timm(module)


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        from_timm(tmp_path / "missing.pth")
    (tmp_path / "weights.txt").write_text("")
    with pytest.raises(ValueError, match="unsupported checkpoint format '.txt'"):
        from_timm(tmp_path / "weights.txt")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        from_timm({"encoder.weight": np.zeros(3)})
    with pytest.raises(TypeError, match=r"unknown ViT attributes \['embed_dim'\]"):
        from_timm(timm_state(), embed_dim=3)
    with pytest.raises(TypeError, match="pretrained= only applies to a timm model name"):
        from_timm(timm_state(), pretrained=False)
    config = json.dumps({"act_layer": "relu"})
    save_file(timm_state(), tmp_path / "w.safetensors", metadata={"config": config})
    with pytest.raises(ValueError, match=re.escape("timm options {'act_layer': 'relu'}")):
        from_timm(tmp_path / "w.safetensors")
