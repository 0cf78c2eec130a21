"""Hugging Face's video and audio towers in timm's names: VideoMAE and AST.

Each reads a transformers `config.json` (a dict) and the checkpoint's arrays, as
`save_pretrained` writes them, and gives a `layouts.Checkpoint` whose hints say
what the tensors cannot (the patch stride, the input layout, the norms).

VideoMAE (`VideoMAEModel`, `VideoMAEForVideoClassification`): a tubelet Conv3d, a
fixed sinusoid table over all space-time tokens (no class token; the table becomes
`pos_embed`), query and value biases without a key bias (the keys' bias is zeros,
which leaves both the attention and ToMe's metric as they are), the classifier's
mean pooling and `fc_norm` (PyTorch's epsilon, 1e-5, where the blocks have the
config's). The bare model's output is compared as the mean of its last hidden state.

AST (`ASTModel`, `ASTForAudioClassification`): 16 x 16 patches every
`frequency_stride` x `time_stride` over the spectrogram read as the image
[mel bins, time], class and distillation tokens, learned positions; pooled output
the mean of the two tokens after the final norm, then the classifier's LayerNorm
(`fc_norm`) and Linear (`head`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from tome_jax.convert.layouts import Checkpoint
from tome_jax.convert.resample import sinusoid_table


# transformers' `hidden_act` names -> `ViT.act_layer`.
_ACTIVATIONS = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
    "silu": "silu", "swish": "silu",
}  # fmt: skip
# One encoder layer of transformers' ViT-style towers -> timm's block (after `encoder.layer.{i}.`).
_LAYER_RENAMES = (
    (r"attention\.output\.dense\.", "attn.proj."),
    (r"layernorm_before\.", "norm1."),
    (r"layernorm_after\.", "norm2."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"output\.dense\.", "mlp.fc2."),
)
# PyTorch's LayerNorm default, which VideoMAE's classifier norm keeps.
_TORCH_LAYER_NORM_EPS = 1e-5


def _activation(config: Mapping[str, Any]) -> str:
    act = config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} has no tome_jax activation; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def _fused_blocks(arrays: dict[str, np.ndarray], source_names: dict[str, str], bias_names) -> None:
    """Each layer's query, key and value -> timm's fused `qkv` (in place); `bias_names` the
    query's and value's bias names (the key has none in VideoMAE: zeros)."""
    layers = sorted({int(m.group(1)) for k in arrays if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        prefix, block = f"encoder.layer.{i}.attention.attention.", f"blocks.{i}."
        weights = [f"{prefix}{part}.weight" for part in ("query", "key", "value")]
        if all(w in arrays for w in weights):
            arrays[f"{block}attn.qkv.weight"] = np.concatenate([arrays.pop(w) for w in weights])
            source_names[f"{block}attn.qkv.weight"] = ", ".join(weights)
        biases = [f"{prefix}{name}" if name else None for name in bias_names]
        present = [b for b in biases if b is not None and b in arrays]
        if present:
            width = arrays[present[0]].shape[0]
            parts = [arrays.pop(b) if b is not None and b in arrays else np.zeros(width, np.float32) for b in biases]
            arrays[f"{block}attn.qkv.bias"] = np.concatenate(parts)
            source_names[f"{block}attn.qkv.bias"] = ", ".join(b or "zeros" for b in biases)
        for key in [k for k in arrays if k.startswith(f"encoder.layer.{i}.")]:
            rest = key[len(f"encoder.layer.{i}.") :]
            for before, after in _LAYER_RENAMES:
                if re.match(before, rest):
                    arrays[block + re.sub(before, after, rest, count=1)] = arrays.pop(key)
                    source_names[block + re.sub(before, after, rest, count=1)] = key
                    break


def _renamed(arrays: Mapping[str, np.ndarray], prefix: str, names: Mapping[str, str]) -> tuple[dict, dict]:
    """Drops the base model's `prefix` and renames the embeddings and heads (`names`: theirs -> timm's)."""
    out, source_names = {}, {}
    for key, array in arrays.items():
        bare = key[len(prefix) :] if key.startswith(prefix) else key
        new = names.get(bare, bare)
        out[new] = np.asarray(array)
        if new != key:
            source_names[new] = key
    return out, source_names


def videomae_checkpoint(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """A transformers VideoMAE checkpoint (model_type "videomae") in timm's names."""
    names = {
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
    }
    out, source_names = _renamed(arrays, "videomae.", names)
    _fused_blocks(out, source_names, ("q_bias", None, "v_bias"))
    classifier = "head.weight" in out
    mean_pooling = config.get("use_mean_pooling", True)
    if classifier and not mean_pooling:
        raise ValueError(
            "a VideoMAE classifier with use_mean_pooling=False classifies its first patch token (VideoMAE has no "
            "class token), which merging moves; tome_jax reads VideoMAE classifiers with use_mean_pooling=True"
        )
    size = config.get("image_size", 224)
    image_hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    patch = config.get("patch_size", 16)
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
    frames, tubelet = config.get("num_frames", 16), config.get("tubelet_size", 2)
    positions = (frames // tubelet) * (image_hw[0] // patch[0]) * (image_hw[1] // patch[1])
    width = config.get("hidden_size", 768)
    out["pos_embed"] = sinusoid_table(positions, width)
    source_names["pos_embed"] = f"the fixed sinusoid table over {positions} space-time tokens (config)"
    hints = dict(
        num_heads=config.get("num_attention_heads", 12),
        img_size=image_hw,
        num_frames=frames,
        act_layer=_activation(config),
        norm_eps=config.get("layer_norm_eps", 1e-12),
        fixed_pos_embed="sinusoid",
        global_pool="avg",
        # The classifier: mean, fc_norm, head; the bare model's mean pooling has no norm at all.
        fc_norm_eps=_TORCH_LAYER_NORM_EPS,
        token_norm=not mean_pooling,
    )
    return Checkpoint(out, source_names, hints)


def ast_checkpoint(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """A transformers AST checkpoint (model_type "audio-spectrogram-transformer") in timm's names."""
    names = {
        "embeddings.cls_token": "cls_token",
        "embeddings.distillation_token": "dist_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
        "classifier.layernorm.weight": "fc_norm.weight",
        "classifier.layernorm.bias": "fc_norm.bias",
        "classifier.dense.weight": "head.weight",
        "classifier.dense.bias": "head.bias",
    }
    out, source_names = _renamed(arrays, "audio_spectrogram_transformer.", names)
    _fused_blocks(out, source_names, ("query.bias", "key.bias", "value.bias"))
    hints = dict(
        num_heads=config.get("num_attention_heads", 12),
        img_size=(config.get("num_mel_bins", 128), config.get("max_length", 1024)),
        patch_stride=(config.get("frequency_stride", 10), config.get("time_stride", 10)),
        fbank_input=True,
        act_layer=_activation(config),
        norm_eps=config.get("layer_norm_eps", 1e-12),
        global_pool="cls_distill_avg",
        token_norm=True,
    )
    return Checkpoint(out, source_names, hints)
