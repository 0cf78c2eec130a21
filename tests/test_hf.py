"""tome_jax.from_hf against transformers' own forwards, on tiny random models saved with
`save_pretrained`; merging against the PyTorch ToMe reference; eval.py on a model directory."""

import functools
import json
import sys

import numpy as np
import pytest

NEEDS_TRANSFORMERS = "the reference is transformers (with torch): pip install -e '.[test]'"
torch = pytest.importorskip("torch", reason=NEEDS_TRANSFORMERS)
transformers = pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)

from test_vit import jit_apply  # noqa: E402
from tome_jax import from_hf, from_timm, pretrained_data_config, save_checkpoint, to_timm_state_dict, torch_tome  # noqa: E402

# 24 px images of 4 px patches: a 6 x 6 grid, 36 patches.
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=24, patch_size=4)
BERT_STYLE = dict(SMALL, intermediate_size=64)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
T = transformers
# name -> (transformers class, its config, what from_hf's model gives: an output's name,
# or "get_image_features").
CASES = {
    "ViTModel": (T.ViTModel, lambda: T.ViTConfig(**BERT_STYLE), "pooler_output"),
    "ViTForImageClassification": (T.ViTForImageClassification, lambda: T.ViTConfig(**BERT_STYLE, num_labels=5), "logits"),
    "DeiTForImageClassification": (T.DeiTForImageClassification, lambda: T.DeiTConfig(**BERT_STYLE, num_labels=5), "logits"),
    "DeiTForImageClassificationWithTeacher": (
        T.DeiTForImageClassificationWithTeacher, lambda: T.DeiTConfig(**BERT_STYLE, num_labels=5), "logits"
    ),
    "Dinov2Model": (T.Dinov2Model, lambda: T.Dinov2Config(**SMALL), "pooler_output"),
    "Dinov2Model-swiglu": (T.Dinov2Model, lambda: T.Dinov2Config(**SMALL, use_swiglu_ffn=True), "pooler_output"),
    "Dinov2ForImageClassification": (
        T.Dinov2ForImageClassification, lambda: T.Dinov2Config(**SMALL, num_labels=5), "logits"
    ),
    "Dinov2WithRegistersModel": (T.Dinov2WithRegistersModel, lambda: T.Dinov2WithRegistersConfig(**SMALL), "pooler_output"),
    "Dinov2WithRegistersForImageClassification": (
        T.Dinov2WithRegistersForImageClassification,
        lambda: T.Dinov2WithRegistersConfig(**SMALL, num_labels=5),
        "logits",
    ),
    "DINOv3ViTModel": (
        T.DINOv3ViTModel, lambda: T.DINOv3ViTConfig(**BERT_STYLE, num_register_tokens=4), "pooler_output"
    ),
    "DINOv3ViTModel-gated": (
        T.DINOv3ViTModel,
        lambda: T.DINOv3ViTConfig(**BERT_STYLE, num_register_tokens=4, use_gated_mlp=True, hidden_act="silu"),
        "pooler_output",
    ),
    "CLIPVisionModel": (T.CLIPVisionModel, lambda: T.CLIPVisionConfig(**BERT_STYLE), "pooler_output"),
    "CLIPVisionModelWithProjection": (
        T.CLIPVisionModelWithProjection, lambda: T.CLIPVisionConfig(**BERT_STYLE, projection_dim=16), "image_embeds"
    ),
    "CLIPModel": (
        T.CLIPModel,
        lambda: T.CLIPConfig(vision_config=BERT_STYLE, text_config=TEXT, projection_dim=16),
        "get_image_features",
    ),
    "SiglipVisionModel": (T.SiglipVisionModel, lambda: T.SiglipVisionConfig(**BERT_STYLE), "pooler_output"),
    "SiglipModel": (
        T.SiglipModel, lambda: T.SiglipConfig(vision_config=BERT_STYLE, text_config=TEXT), "get_image_features"
    ),
    "SiglipForImageClassification": (
        T.SiglipForImageClassification,
        lambda: T.SiglipConfig(vision_config=BERT_STYLE, text_config=TEXT, num_labels=5),
        "logits",
    ),
}


# Merged too (r = 2): one class for each token layout and pooling (the classes left out
# build the same graph but for the head; two more are merged against PyTorch below).
MERGED = {
    "ViTModel", "DeiTForImageClassification", "Dinov2ForImageClassification",
    "Dinov2WithRegistersForImageClassification", "DINOv3ViTModel", "CLIPModel", "SiglipVisionModel", "SiglipForImageClassification",
}  # fmt: skip


def images_nchw(batch=2, size=24, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hf_output(module, name: str, images) -> np.ndarray:
    with torch.no_grad():
        if name == "get_image_features":
            features = module.get_image_features(pixel_values=images)
            return getattr(features, "pooler_output", features).numpy()
        return getattr(module(pixel_values=images), name).numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (the transformers module, its save_pretrained directory), built once each.

    Every parameter gets noise: transformers' init leaves zero biases and unit LayerNorms,
    which would hide a swapped tensor."""

    @functools.cache
    def build(name):
        cls, config, _ = CASES[name]
        torch.manual_seed(0)
        module = cls(config()).eval()
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
        directory = tmp_path_factory.mktemp(name)
        module.save_pretrained(directory)
        return module, directory

    return build


def apply(model, variables, images, r=0) -> np.ndarray:
    """tome_jax takes NHWC, transformers NCHW."""
    return np.asarray(jit_apply(model)(variables, images.permute(0, 2, 3, 1).numpy(), r=r))


def relative_error(got, want) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers_and_merges(saved, name):
    module, directory = saved(name)
    model, variables = from_hf(directory)
    images = images_nchw()
    assert relative_error(apply(model, variables, images), hf_output(module, CASES[name][2], images)) < 1e-4
    if name in MERGED:
        assert np.isfinite(apply(model, variables, images, r=2)).all() and model.effective_schedule(2) == (2, 2)


def timm_twin(model, variables, **kwargs):
    """The timm VisionTransformer of the same architecture holding the same weights."""
    timm = pytest.importorskip("timm")
    module = timm.models.vision_transformer.VisionTransformer(
        img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.width, depth=model.depth,
        num_heads=model.num_heads, mlp_ratio=model.mlp_ratio, num_classes=model.num_classes,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=model.norm_eps), **kwargs,
    )  # fmt: skip
    module.load_state_dict({k: torch.from_numpy(v) for k, v in to_timm_state_dict(model, variables).items()})
    return module.eval()


@pytest.mark.parametrize(
    "name, timm_kwargs",
    [
        ("ViTForImageClassification", {}),
        ("Dinov2WithRegistersModel", dict(reg_tokens=4, no_embed_class=True, init_values=1.0)),
    ],
)
def test_merging_matches_the_pytorch_reference(saved, name, timm_kwargs):
    _, directory = saved(name)
    model, variables = from_hf(directory)
    images = images_nchw(seed=1)
    with torch.no_grad():
        want = torch_tome.tome_forward(timm_twin(model, variables, **timm_kwargs), images, 3).numpy()
    assert model.effective_schedule(3) == (3, 3)
    assert np.abs(apply(model, variables, images, r=3) - want).max() < 1e-3


@pytest.mark.parametrize(
    "name", ["ViTModel", "Dinov2WithRegistersForImageClassification", "SiglipForImageClassification", "DINOv3ViTModel"]
)
def test_a_converted_model_survives_save_checkpoint(saved, name, tmp_path):
    """What the config said (head_act, token_avg pooling, the rope) is kept in the file's metadata."""
    model, variables = from_hf(saved(name)[1])
    assert from_timm(save_checkpoint(model, variables, tmp_path / "model.safetensors"))[0] == model


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipVisionModel", "ViTModel"])
def test_a_config_silent_on_class_defaults_reads_the_same(saved, name, tmp_path):
    """Older transformers wrote only the values that differ from the config class's defaults."""
    _, directory = saved(name)
    config = json.loads((directory / "config.json").read_text())
    tower = config.get("vision_config", config)
    for key in ("hidden_act", "layer_norm_eps", "pooler_act"):
        tower.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    assert from_hf(tmp_path)[0] == from_hf(directory)[0]


def test_reads_shards(saved, tmp_path):
    module, directory = saved("CLIPModel")
    module.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    images = images_nchw()
    sharded, single = from_hf(tmp_path), from_hf(directory)
    assert sharded[0] == single[0]
    np.testing.assert_array_equal(apply(*sharded, images), apply(*single, images))


def test_a_hub_id_is_downloaded_then_read(saved, monkeypatch):
    """Its JSON and safetensors files only (no download here: the hub answers with a saved directory)."""
    hub = pytest.importorskip("huggingface_hub")
    _, directory = saved("ViTModel")
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", lambda repo, allow_patterns: calls.append((repo, allow_patterns)) or str(directory))
    model, _ = from_hf("google/vit-base-patch16-224")
    assert calls == [("google/vit-base-patch16-224", ["*.json", "*.safetensors"])] and model.head_act == "tanh"


def test_what_it_cannot_read_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported; tome_jax reads \[.*'vit'\]"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no model.safetensors .*\(it has pytorch_model.bin\).*save_pretrained"):
        from_hf(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"hub id, which needs huggingface_hub: pip install 'tome_jax\[hf\]'"):
        from_hf("google/vit-base-patch16-224")


def test_a_missing_tensor_is_named_as_the_checkpoint_names_it(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, directory = saved("ViTForImageClassification")
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    arrays = load_file(directory / "model.safetensors")
    del arrays["vit.encoder.layer.1.intermediate.dense.weight"]
    save_file(arrays, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing:\n  blocks.1.mlp.fc1.weight \(from vit.encoder.layer.1.intermediate.dense.weight\)$"):
        from_hf(tmp_path)
    del arrays["vit.encoder.layer.0.attention.attention.key.weight"]
    save_file(arrays, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks the attention projection\(s\) vit.encoder.layer.0.attention.attention.key.weight$"):
        from_hf(tmp_path)


def test_preprocessing_from_the_image_processor(saved, tmp_path):
    _, directory = saved("ViTForImageClassification")
    assert pretrained_data_config(directory) is None  # no preprocessor_config.json
    T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert pretrained_data_config(tmp_path) == dict(
        input_size=(3, 28, 28), mean=tuple(T.image_utils.OPENAI_CLIP_MEAN), std=tuple(T.image_utils.OPENAI_CLIP_STD),
        crop_pct=28 / 32, interpolation="bicubic", crop_mode="center",
    )  # fmt: skip


@pytest.mark.slow
def test_eval_takes_a_model_directory_with_its_preprocessing(tmp_path):
    """A 10-class ViTForImageClassification on 32 px CIFAR-10 images, its image processor's mean and std."""
    from configs import eval_cifar10

    from tome_jax import evaluate

    config = T.ViTConfig(**dict(BERT_STYLE, image_size=32, patch_size=8), num_labels=10)
    T.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    config = eval_cifar10.get_config()
    config.model, config.preprocess = str(tmp_path / "vit"), "timm"
    config.update(r="0, 1", limit=4, batch_size=4, timing_runs=1, workdir=str(tmp_path / "eval"))
    model, _, source = evaluate.load_model(config)
    preprocess = evaluate.preprocess_for(config, model, source)
    assert (preprocess.mean, preprocess.std, preprocess.size, preprocess.interpolation) == (
        (0.5,) * 3, (0.5,) * 3, (32, 32), "bilinear"
    )  # fmt: skip
    rows = evaluate.run(config)
    assert [row["r"] for row in rows] == ["0", "1"] and all(row["count"] == 4 for row in rows)
    assert rows[1]["tokens_left"] == 15  # 4 x 4 patches and the class token, one merge
