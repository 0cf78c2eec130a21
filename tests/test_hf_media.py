"""Hugging Face's video and audio towers (VideoMAE, AST) against transformers itself:
random small configs written by `save_pretrained`, read back by tome_jax."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tome_jax
from tome_jax.convert.resample import sinusoid_table

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# 4 frames of 16 x 16 in 2-frame tubelets of 4 x 4: 2 x 4 x 4 = 32 space-time tokens.
VIDEOMAE = dict(SMALL, image_size=16, patch_size=4, num_frames=4, tubelet_size=2)
# 20 time frames x 16 mel bins, 4 x 4 patches every 3 bins and 2 frames: 5 x 9 = 45
# overlapping patches (strides that differ, so that a swapped axis shows).
AST = dict(SMALL, patch_size=4, num_mel_bins=16, max_length=20, frequency_stride=3, time_stride=2)
TOWERS = {
    "VideoMAEForVideoClassification": (transformers.VideoMAEConfig, dict(VIDEOMAE, num_labels=5)),
    "VideoMAEModel": (transformers.VideoMAEConfig, VIDEOMAE),
    # The final LayerNorm instead of mean pooling's none; no query and value biases.
    "VideoMAEModel_layernorm": (transformers.VideoMAEConfig, dict(VIDEOMAE, use_mean_pooling=False, qv_bias=False)),
    "ASTForAudioClassification": (transformers.ASTConfig, dict(AST, num_labels=5)),
    "ASTModel": (transformers.ASTConfig, dict(AST, hidden_act="gelu_new")),
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """name -> (the transformers model, its directory); every weight random, norms included."""
    out = {}
    for name, (config_class, config) in TOWERS.items():
        torch.manual_seed(len(out))
        model = getattr(transformers, name.split("_")[0])(config_class(**config)).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.2 * torch.randn_like(param))
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        out[name] = model, directory
    return out


def reference_inputs(model, seed=0):
    """Inputs for a transformers tower (torch) and the same for tome_jax (NumPy):
    videos [batch, frames, channels, height, width] -> [batch, frames, height, width, channels];
    spectrograms [batch, time, mel bins] as they are."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    if config.model_type == "videomae":
        shape = (2, config.num_frames, config.num_channels, config.image_size, config.image_size)
        torch_inputs = torch.randn(shape, generator=generator)
        return {"pixel_values": torch_inputs}, torch_inputs.numpy().transpose(0, 1, 3, 4, 2)
    torch_inputs = torch.randn((2, config.max_length, config.num_mel_bins), generator=generator)
    return {"input_values": torch_inputs}, torch_inputs.numpy()


def reference_output(model, inputs):
    """What tome_jax's output is compared with: the logits of a classifier, the pooled
    output of ASTModel, the mean of VideoMAEModel's last hidden state (it has no pooler)."""
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "logits"):
        return out.logits.numpy(), None
    hidden = out.last_hidden_state.numpy()
    pooled = out.pooler_output.numpy() if getattr(out, "pooler_output", None) is not None else hidden.mean(1)
    return pooled, hidden


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_towers_give_transformers_outputs_and_merge(towers, name):
    reference, directory = towers[name]
    model, variables = tome_jax.from_hf(directory)
    torch_inputs, inputs = reference_inputs(reference)
    want, hidden = reference_output(reference, torch_inputs)
    got, state = jax.jit(lambda v, x: model.apply(v, x, r=0, mutable="intermediates"))(variables, inputs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if hidden is not None:  # the bare towers: every token of the last hidden state too
        tokens = np.asarray(tome_jax.token_features(state["intermediates"]).tokens)
        np.testing.assert_allclose(tokens, hidden, rtol=1e-4, atol=1e-4 * np.abs(hidden).max())

    # Merging over the space-time (or time-frequency) tokens; AST's two prefix tokens stay.
    merged, state = jax.jit(lambda v, x: model.apply(v, x, r=(8, -1), mutable="intermediates"))(variables, inputs)
    final = tome_jax.token_features(state["intermediates"])
    assert np.isfinite(np.asarray(merged)).all() and merged.shape == got.shape
    assert final.tokens.shape[1] < model.num_tokens
    np.testing.assert_array_equal(np.asarray(final.size.sum(1)), model.num_tokens)
    source, size = np.asarray(final.source), np.asarray(final.size)
    for prefix in range(model.num_prefix_tokens):
        np.testing.assert_array_equal(source[:, prefix], prefix)
        np.testing.assert_array_equal(size[:, prefix], 1)


def test_a_videomae_classifier_without_mean_pooling_is_refused(tmp_path):
    config = transformers.VideoMAEConfig(**VIDEOMAE, num_labels=5, use_mean_pooling=False)
    transformers.VideoMAEForVideoClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="classifies its first patch token .* use_mean_pooling=True"):
        tome_jax.from_hf(tmp_path)


def test_spectrograms_are_time_by_mel_bins(towers):
    model, variables = tome_jax.from_hf(towers["ASTModel"][1])
    assert model.input_shape == (20, 16) and model.grid_size == (5, 9) and model.num_tokens == 47
    with pytest.raises(ValueError, match=r"spectrograms must be \[batch, time, mel bins\]: got \(16, 20\)"):
        model.apply(variables, jnp.zeros((1, 16, 20)))
    with pytest.raises(ValueError, match=r"spectrograms must be \[batch, time, mel bins\], got \(1, 20, 16, 1\)"):
        model.apply(variables, jnp.zeros((1, 20, 16, 1)))


def test_the_audio_tower_survives_a_checkpoint(towers, tmp_path):
    model, variables = tome_jax.from_hf(towers["ASTForAudioClassification"][1])
    path = tome_jax.save_checkpoint(model, variables, tmp_path / "ast.safetensors")
    loaded, loaded_variables = tome_jax.from_timm(path)
    assert (loaded.patch_stride, loaded.fbank_input, loaded.global_pool) == ((3, 2), True, "cls_distill_avg")
    spectrograms = jax.random.normal(jax.random.key(0), (1, *model.input_shape))
    want = jax.jit(lambda v, x: model.apply(v, x, r=4))(variables, spectrograms)
    got = jax.jit(lambda v, x: loaded.apply(v, x, r=4))(loaded_variables, spectrograms)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_videomaes_fixed_table_is_built_for_another_size(towers):
    directory = towers["VideoMAEForVideoClassification"][1]
    model, variables = tome_jax.from_hf(directory, num_frames=6, img_size=8)
    assert model.token_grid == (3, 2, 2)
    np.testing.assert_array_equal(variables["params"]["pos_embed"], sinusoid_table(12, 32))


@pytest.mark.slow
def test_the_media_benchmark_puts_each_tower_beside_transformers():
    """configs/bench_media.py's models, tiny: the transformers model is the PyTorch column."""
    import ml_collections
    import tiny_bench_config

    from tome_jax import bench
    from tome_jax.configs import bench_media

    config = tiny_bench_config.get_config()
    config.models = bench_media.get_config().models
    config.hf_overrides = ml_collections.ConfigDict(
        {"VideoMAEForVideoClassification": dict(VIDEOMAE, num_labels=5), "ASTForAudioClassification": AST}
    )
    rows = bench.run(config)["rows"]
    assert [(row["model"].split(":")[1], row["r"]) for row in rows] == [
        (name, r) for name in ("VideoMAEForVideoClassification", "ASTForAudioClassification") for r in ("0", "1")
    ]
    for row in rows:
        assert row["tome_jax_img_s"] > 0 and row["timm_r0_img_s"] > 0 and row["reference_img_s"] is None
    assert [row["schedule"] for row in rows] == [[0, 0], [1, 1]] * 2


def test_a_videomae_pretraining_checkpoint_is_read_for_its_encoder(tmp_path):
    torch.manual_seed(0)
    reference = transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(**VIDEOMAE)).eval()
    reference.save_pretrained(tmp_path)
    model, variables = tome_jax.from_hf(tmp_path)
    torch_inputs, inputs = reference_inputs(reference.videomae)
    with torch.no_grad():
        want = reference.videomae(**torch_inputs).last_hidden_state.mean(1).numpy()
    got = jax.jit(lambda v, x: model.apply(v, x, r=0))(variables, inputs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("name", ["VideoMAEForVideoClassification", "ASTForAudioClassification"])
def test_a_config_silent_on_its_defaults_reads_the_same(towers, name, tmp_path):
    """Older transformers wrote only the values that differ from the config class's defaults."""
    reference, directory = towers[name]
    defaults = type(reference.config)().to_dict()
    config = json.loads((directory / "config.json").read_text())
    silent = {k: v for k, v in config.items() if k == "model_type" or defaults.get(k) != v}
    assert len(silent) < len(config) - 5
    shutil.copy(directory / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(silent))
    model, _ = tome_jax.from_hf(directory)
    assert tome_jax.from_hf(tmp_path)[0] == model
