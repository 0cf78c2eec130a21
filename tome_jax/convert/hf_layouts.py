"""Hugging Face transformers checkpoints (`save_pretrained` names) -> timm's names and layouts.

One function per config.json `model_type`, `layout(config, arrays) -> layouts.Checkpoint`,
collected in `LAYOUTS`. The tensors are renamed into timm's (separate q/k/v projections
fused into `qkv`); the config says what no tensor shows (heads, LayerNorm epsilon,
activation, image size, pooling), as hints. Each head becomes timm's `head`, so that
`ViT.apply` gives what the transformers class returns:

- ViT, DeiT: `pooler.dense` (ViTModel's pooler_output) with `head_act`, or `classifier`
  (ViTForImageClassification); DeiT's `cls_classifier` and `distillation_classifier`
  are `head` and `head_dist` (the mean of the two), and a lone `classifier` beside the
  distillation token is `head` at twice its weights with a zero `head_dist`, the same mean.
- DINOv2 (with registers): no head (pooler_output, the class token), or `classifier` on
  the class token beside the patches' mean (`global_pool="token_avg"`, registers left out).
- DINOv3 (rotary: `rope.Rope("dinov3")`, its keys without a bias): no head (pooler_output).
- CLIP: `visual_projection` (get_image_features, image_embeds) with a zero bias, or no head
  (CLIPVisionModel's pooler_output).
- SigLIP: the MAP head (pooler_output), or `classifier` on the mean of all tokens
  (SiglipForImageClassification, whose unused MAP head is left out).
- VideoMAE: no head (the mean of the last hidden state: VideoMAEModel has no pooled
  output), or mean pooling, `fc_norm` and `classifier` (VideoMAEForVideoClassification).
- AST: no head (pooler_output, the mean of the class and distillation tokens), or the
  classifier's LayerNorm and Linear as `fc_norm` and `head` (ASTForAudioClassification).

A CLIPModel or SiglipModel is read for its `vision_config` and `vision_model.` tensors.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from tome_jax.convert import layouts
from tome_jax.convert.layouts import Checkpoint
from tome_jax.convert.resample import sinusoid_table
from tome_jax.layers import pair
from tome_jax.rope import Rope


# transformers' activation names (its ACT2FN keys) -> `ViT.act_layer`; the tanh forms of GELU are one.
_ACTIVATIONS = {
    "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu",
    "silu": "silu", "swish": "silu", "tanh": "tanh",
}  # fmt: skip

# The embeddings of ViT, DeiT and DINOv2 (name templates as in `layouts`).
_VIT_EMBEDDINGS = (
    ("^embeddings.cls_token$", "^cls_token$"),
    ("^embeddings.distillation_token$", "^dist_token$"),
    ("^embeddings.register_tokens$", "^reg_token$"),
    ("^embeddings.position_embeddings$", "^pos_embed$"),
    ("^embeddings.patch_embeddings.projection.", "^patch_embed.proj."),
    ("^encoder.layer.{i}.", "^blocks.{i}."),
    (".attention.attention.query.", ".attn.q_proj."),
    (".attention.attention.key.", ".attn.k_proj."),
    (".attention.attention.value.", ".attn.v_proj."),
    (".attention.output.dense.", ".attn.proj."),
    ("^layernorm.", "^norm."),
)
# ViT's and DeiT's blocks (BERT's names) and heads.
_BERT_LAYERS = (
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
)
_VIT_RENAMES = _VIT_EMBEDDINGS + _BERT_LAYERS + (
    ("^pooler.dense.", "^head."),
    ("^cls_classifier.", "^head."),
    ("^distillation_classifier.", "^head_dist."),
    ("^classifier.", "^head."),  # last: a missing `head` is named as the common classes name it
)
# DINOv2's blocks: LayerScale, and its SwiGLU's packed `weights_in` (gate first, as timm's SwiGLUPacked).
_DINOV2_RENAMES = _VIT_EMBEDDINGS + (
    (".layer_scale{i}.lambda1$", ".ls{i}.gamma$"),
    (".mlp.weights_in.", ".mlp.fc1."),
    (".mlp.weights_out.", ".mlp.fc2."),
    ("^classifier.", "^head."),
)
# VideoMAE: BERT's blocks with separate query and value biases (the keys have none) and
# the classifier's own `fc_norm`; its position table is not a tensor (`videomae` adds it).
_VIDEOMAE_RENAMES = _VIT_EMBEDDINGS + _BERT_LAYERS + (
    (".attention.attention.q_bias$", ".attn.q_proj.bias$"),
    (".attention.attention.v_bias$", ".attn.v_proj.bias$"),
    ("^classifier.", "^head."),
)
# AST: BERT's blocks; its classifier is a LayerNorm (timm's `fc_norm`) and a Linear.
_AST_RENAMES = _VIT_EMBEDDINGS + _BERT_LAYERS + (
    ("^classifier.layernorm.", "^fc_norm."),
    ("^classifier.dense.", "^head."),
)
# VideoMAEForPreTraining's decoder, which the encoder (a VideoMAEModel) does without.
_VIDEOMAE_DECODER = r"decoder\..*|encoder_to_decoder\..*"
# PyTorch's LayerNorm epsilon, which VideoMAE's classifier norm keeps whatever the config says.
_TORCH_LAYER_NORM_EPS = 1e-5
# DINOv3: no position embeddings (rotary), separate q/k/v projections (the keys without a bias).
_DINOV3_EMBEDDINGS = (
    ("^embeddings.cls_token$", "^cls_token$"),
    ("^embeddings.register_tokens$", "^reg_token$"),
    ("^embeddings.patch_embeddings.", "^patch_embed.proj."),
    ("^layer.{i}.", "^blocks.{i}."),
    (".attention.o_proj.", ".attn.proj."),
    (".attention.", ".attn."),
    (".layer_scale{i}.lambda1$", ".ls{i}.gamma$"),
    (".mlp.down_proj.", ".mlp.fc2."),
)
_DINOV3_RENAMES = _DINOV3_EMBEDDINGS + ((".mlp.up_proj.", ".mlp.fc1."),)
# Its gated MLP: act(gate_proj x) * up_proj x, timm's SwiGLU.
_DINOV3_GATED_RENAMES = _DINOV3_EMBEDDINGS + ((".mlp.gate_proj.", ".mlp.fc1_g."), (".mlp.up_proj.", ".mlp.fc1_x."))
# The vision towers of CLIP and SigLIP.
_TOWER_RENAMES = (
    ("^embeddings.class_embedding$", "^cls_token$"),
    ("^embeddings.patch_embedding.", "^patch_embed.proj."),
    ("^embeddings.position_embedding.weight$", "^pos_embed$"),
    ("^pre_layrnorm.", "^norm_pre."),  # sic
    ("^encoder.layers.{i}.", "^blocks.{i}."),
    (".layer_norm{i}.", ".norm{i}."),
    (".self_attn.out_proj.", ".attn.proj."),
    (".self_attn.", ".attn."),
    ("^post_layernorm.", "^norm."),
)
_CLIP_RENAMES = _TOWER_RENAMES + (("^visual_projection.weight$", "^head.weight$"),)
# SigLIP's MAP head; its fused `in_proj` is split into timm's `q` and `kv` below.
_SIGLIP_RENAMES = _TOWER_RENAMES + (
    ("^head.probe$", "^attn_pool.latent$"),
    ("^head.attention.in_proj_", "^attn_pool.in_proj_"),
    ("^head.attention.out_proj.", "^attn_pool.proj."),
    ("^head.layernorm.", "^attn_pool.norm."),
    ("^head.mlp.", "^attn_pool.mlp."),
    ("^classifier.", "^head."),
)
# What no tower computes: masked-image-modelling tokens, the text tower, CLIP's logit scales, and
# the `position_ids` buffers older transformers saved.
_UNUSED = r"(.*\.)?(mask_token|position_ids)|text_model\..*|text_projection\..*|logit_(scale|bias)"
# Heads beside the base model, outside its prefix.
_HEADS = ("classifier.", "cls_classifier.", "distillation_classifier.", "visual_projection.")


def _unused(besides: str | None = None) -> Callable[[str], Any]:
    """Whether a tensor name is `_UNUSED`, or `besides` (a regex: a head the class does not read)."""
    return re.compile(_UNUSED + (f"|{besides}" if besides else "")).fullmatch


def _activation(name: str, key: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"config {key}={name!r}: tome_jax.ViT has {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


# What each config class assumes where a config.json leaves a key out (older transformers wrote
# only the values that differ from these).
_DEFAULTS = {
    "vit": dict(num_attention_heads=12, layer_norm_eps=1e-12, hidden_act="gelu", image_size=224),
    "dinov2": dict(num_attention_heads=12, layer_norm_eps=1e-6, hidden_act="gelu", image_size=224),
    "dinov3": dict(num_attention_heads=6, layer_norm_eps=1e-5, hidden_act="gelu", image_size=224),
    "clip": dict(num_attention_heads=12, layer_norm_eps=1e-5, hidden_act="quick_gelu", image_size=224),
    "siglip": dict(num_attention_heads=12, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", image_size=224),
    "videomae": dict(
        num_attention_heads=12, layer_norm_eps=1e-12, hidden_act="gelu", image_size=224, patch_size=16,
        num_frames=16, tubelet_size=2, hidden_size=768, use_mean_pooling=True,
    ),
    "audio-spectrogram-transformer": dict(
        num_attention_heads=12, layer_norm_eps=1e-12, hidden_act="gelu", num_mel_bins=128, max_length=1024,
        frequency_stride=10, time_stride=10,
    ),
}


def _hints(config: Mapping[str, Any], family: str, **more) -> dict[str, Any]:
    """What a vision config states that the tensors do not (the `family`'s defaults where it is silent)."""
    value = {**_DEFAULTS[family], **config}
    return dict(
        num_heads=value["num_attention_heads"],
        norm_eps=value["layer_norm_eps"],
        act_layer=_activation(value["hidden_act"], "hidden_act"),
        img_size=value["image_size"],
        **more,
    )


def _timm_named(
    arrays: Mapping[str, np.ndarray],
    base: str,
    renames,
    hints: dict[str, Any],
    unused: Callable[[str], Any] = _unused(),
) -> Checkpoint:
    """The base model's tensors without their `{base}.` prefix (heads sit outside it),
    renamed, the unused ones left out, q/k/v fused; named in the checkpoint's own terms."""
    prefix = f"{base}." if any(k.startswith(f"{base}.") for k in arrays) else ""
    own = {k: k[len(prefix) :] if k.startswith(prefix) else k for k in arrays if not unused(k)}
    renamed, renamed_from = layouts.rename({short: arrays[full] for full, short in own.items()}, renames)
    full_name = {short: full for full, short in own.items()}
    original = lambda name: full_name.get(renamed_from.get(name, name), name)  # noqa: E731

    def name_in_source(key: str) -> str:
        if re.search(r"\.attn\.qkv\.", key):  # the three projections it is fused from
            return ", ".join(name_in_source(key.replace(".qkv.", f".{part}_proj.")) for part in "qkv")
        name = layouts.renamed(key, renames, backwards=True)
        return name if name.startswith(_HEADS) else prefix + name

    projections = {m.group(1) for k in renamed if (m := re.fullmatch(r"(.*\.attn\.)[qkv]_proj\.weight", k))}
    missing = [
        f"{a}{part}_proj.weight" for a in sorted(projections) for part in "qkv" if f"{a}{part}_proj.weight" not in renamed
    ]
    if missing:
        raise ValueError(f"the checkpoint lacks the attention projection(s) {', '.join(map(name_in_source, missing))}")
    fused, fused_from = layouts.fused_attention(renamed)
    source_names = {key: ", ".join(map(original, fused_from[key].split(", "))) for key in fused_from}
    source_names.update({key: original(key) for key in fused if key not in fused_from and original(key) != key})
    return Checkpoint(fused, source_names, hints, name_in_source)


def _class_position_in_class_token(checkpoint: Checkpoint) -> Checkpoint:
    """timm's layout of class-token and register positions: Hugging Face's DINOv2 with
    registers adds a position to the class token and none to the registers, which timm
    (`no_embed_class`) keeps as the class token plus its position, then the patches' positions."""
    arrays = dict(checkpoint.arrays)
    if "reg_token" not in arrays or "pos_embed" not in arrays:
        return checkpoint
    arrays["cls_token"] = arrays["cls_token"] + arrays["pos_embed"][:, :1]
    arrays["pos_embed"] = arrays["pos_embed"][:, 1:]
    return checkpoint._replace(arrays=arrays)


def vit(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """ViTModel (its pooler with `pooler_act`), ViTForImageClassification; DeiT's classes too."""
    classifier = any(k.startswith(_HEADS) for k in arrays)
    # A classifier reads the class token itself; a pooler saved beside it is unused.
    unused = _unused(r"(.*\.)?pooler\..*" if classifier else None)
    pooled = not classifier and any(".pooler." in f".{k}" for k in arrays)
    head_act = {"head_act": _activation(config.get("pooler_act", "tanh"), "pooler_act")} if pooled else {}
    checkpoint = _timm_named(arrays, config["model_type"], _VIT_RENAMES, _hints(config, "vit", **head_act), unused)
    return _class_head_as_mean(checkpoint)


def _class_head_as_mean(checkpoint: Checkpoint) -> Checkpoint:
    """A distilled model's head on the class token alone (DeiTForImageClassification, DeiTModel's
    pooler) as `tome_jax.ViT` computes a distilled head, the mean of two: doubled (exactly, a
    power of two) beside a zero distillation head."""
    out, names = dict(checkpoint.arrays), dict(checkpoint.source_names)
    if "dist_token" not in out or "head.weight" not in out or "head_dist.weight" in out:
        return checkpoint
    for part in ("weight", "bias"):
        if f"head.{part}" in out:
            out[f"head_dist.{part}"] = np.zeros_like(out[f"head.{part}"])
            out[f"head.{part}"] = 2 * out[f"head.{part}"]
            names[f"head_dist.{part}"] = f"zeros (the class token's head alone, {checkpoint.name_in_source(f'head.{part}')})"
    return checkpoint._replace(arrays=out, source_names=names)


def dinov2(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """Dinov2Model, Dinov2ForImageClassification, and their WithRegisters forms."""
    base = config["model_type"]
    classifier = arrays.get("classifier.weight")
    width = config.get("hidden_size", 768)  # Dinov2Config's default
    pool = "token_avg" if classifier is not None and classifier.shape[-1] == 2 * width else "token"
    hints = _hints(config, "dinov2", global_pool=pool)
    if config.get("use_swiglu_ffn"):  # SiLU whatever hidden_act says (Dinov2SwiGLUFFN)
        hints["act_layer"] = "silu"
    checkpoint = _timm_named(arrays, base, _DINOV2_RENAMES, hints)
    return _class_position_in_class_token(checkpoint)


def dinov3(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """DINOv3ViTModel (pooler_output, the class token): rotary, "dinov3" kind (`rope.Rope`)."""
    rope = Rope("dinov3", temperature=float(config.get("rope_theta", 100.0)), half=True)
    hints = _hints(config, "dinov3", global_pool="token", rope=rope)
    renames = _DINOV3_GATED_RENAMES if config.get("use_gated_mlp") else _DINOV3_RENAMES
    checkpoint = _timm_named(arrays, "model", renames, hints)
    if checkpoint.arrays.get("reg_token", np.zeros((1, 1))).shape[1] == 0:  # num_register_tokens=0 saves [1, 0, width]
        checkpoint = checkpoint._replace(arrays={k: v for k, v in checkpoint.arrays.items() if k != "reg_token"})
    return checkpoint


def _tower_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """A CLIPModel's or SiglipModel's `vision_config`, or a vision model's own config."""
    return config.get("vision_config", config)


def _with_batch_axes(checkpoint: Checkpoint) -> Checkpoint:
    """CLIP's `class_embedding` [width] and position `Embedding` [positions, width] with timm's batch axes."""
    arrays = dict(checkpoint.arrays)
    if "cls_token" in arrays:
        arrays["cls_token"] = arrays["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in arrays and arrays["pos_embed"].ndim == 2:
        arrays["pos_embed"] = arrays["pos_embed"][None]
    return checkpoint._replace(arrays=arrays)


def clip(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel (its vision tower and projection)."""
    tower = _tower_config(config)
    hints = _hints(tower, "clip", pre_norm=True)
    if {"CLIPModel", "CLIPVisionModelWithProjection"} & set(config.get("architectures") or ()):
        hints["projection"] = "visual_projection.weight"  # these classes have one: its absence is an error
    checkpoint = _with_batch_axes(_timm_named(arrays, "vision_model", _CLIP_RENAMES, hints))
    out, names = dict(checkpoint.arrays), dict(checkpoint.source_names)
    if "head.weight" in out:
        out["head.bias"] = np.zeros(out["head.weight"].shape[0], out["head.weight"].dtype)
        names["head.bias"] = "visual_projection (no bias: zeros)"
    return checkpoint._replace(arrays=out, source_names=names)


def siglip(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """SiglipVisionModel (the MAP head), SiglipForImageClassification (the mean of all
    tokens; its MAP head unused), SiglipModel (its vision tower)."""
    tower = _tower_config(config)
    # The classifier reads the mean of the tokens: the MAP head saved beside it is unused.
    unused = _unused(r"(vision_model\.)?head\..*" if "classifier.weight" in arrays else None)
    # The MAP head has the blocks' heads (ViT's default, pool_num_heads=None).
    checkpoint = _with_batch_axes(_timm_named(arrays, "vision_model", _SIGLIP_RENAMES, _hints(tower, "siglip"), unused))
    out, names = dict(checkpoint.arrays), dict(checkpoint.source_names)
    for part in ("weight", "bias"):  # nn.MultiheadAttention's in_proj: query rows, then key and value
        fused = out.pop(f"attn_pool.in_proj_{part}", None)
        if fused is not None:
            width, source = fused.shape[0] // 3, names.pop(f"attn_pool.in_proj_{part}")
            out[f"attn_pool.q.{part}"], out[f"attn_pool.kv.{part}"] = fused[:width], fused[width:]
            names[f"attn_pool.q.{part}"] = f"{source}[:{width}]"
            names[f"attn_pool.kv.{part}"] = f"{source}[{width}:]"
    return checkpoint._replace(arrays=out, source_names=names)


def videomae(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """VideoMAEModel (the mean of its last hidden state), VideoMAEForPreTraining (its encoder,
    the same) and VideoMAEForVideoClassification (mean pooling, `fc_norm`, head); the fixed
    sinusoid table is `pos_embed`, built again for any other size (`fixed_pos_embed`)."""
    config = {**_DEFAULTS["videomae"], **config}
    mean_pooling = config["use_mean_pooling"]
    if "classifier.weight" in arrays and not mean_pooling:
        raise ValueError(
            "a VideoMAE classifier with use_mean_pooling=False classifies its first patch token (VideoMAE has no "
            "class token), which merging moves; tome_jax reads VideoMAE classifiers with use_mean_pooling=True"
        )
    hints = _hints(
        config, "videomae", num_frames=config["num_frames"], global_pool="avg", fixed_pos_embed="sinusoid",
        # The classifier's norm is PyTorch's default; a bare model's mean pooling has no norm at all.
        fc_norm_eps=_TORCH_LAYER_NORM_EPS, token_norm=not mean_pooling,
    )  # fmt: skip
    checkpoint = _timm_named(arrays, "videomae", _VIDEOMAE_RENAMES, hints, _unused(_VIDEOMAE_DECODER))
    height, width = pair(config["image_size"])
    patch = pair(config["patch_size"])
    positions = config["num_frames"] // config["tubelet_size"] * (height // patch[0]) * (width // patch[1])
    out = {**checkpoint.arrays, "pos_embed": sinusoid_table(positions, config["hidden_size"])}
    names = {**checkpoint.source_names, "pos_embed": f"the fixed sinusoid table over {positions} tokens (config)"}
    return checkpoint._replace(arrays=out, source_names=names)


def audio_spectrogram_transformer(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """ASTModel (its pooled output) and ASTForAudioClassification: [batch, time, mel bins]
    inputs read as [mel bins, time] images, patches `frequency_stride` x `time_stride` apart,
    the class and distillation tokens' mean after the final norm, then `fc_norm` and head."""
    config = {**_DEFAULTS["audio-spectrogram-transformer"], **config}
    spectrogram = {**config, "image_size": (config["num_mel_bins"], config["max_length"])}
    hints = _hints(
        spectrogram, "audio-spectrogram-transformer", patch_stride=(config["frequency_stride"], config["time_stride"]), fbank_input=True,
        global_pool="cls_distill_avg", token_norm=True,
    )  # fmt: skip
    return _timm_named(arrays, "audio_spectrogram_transformer", _AST_RENAMES, hints)


LAYOUTS: dict[str, Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], Checkpoint]] = {
    "vit": vit,
    "deit": vit,
    "dinov2": dinov2,
    "dinov2_with_registers": dinov2,
    "dinov3_vit": dinov3,
    "clip": clip,
    "clip_vision_model": clip,
    "siglip": siglip,
    "siglip_vision_model": siglip,
    "videomae": videomae,
    "audio-spectrogram-transformer": audio_spectrogram_transformer,
}
