"""The registry of named architectures: timm's model names -> `tome_jax.ViT` attributes.

    model = create_model("deit_small_patch16_224")
    model = create_model("vit_base_patch16_clip_224", img_size=384)   # any ViT attribute overridden
"""

from __future__ import annotations

from typing import Any

from tome_jax.vit import ViT

# timm architecture names -> ViT attributes. Pretrained tags (".augreg_in21k", ...)
# select weights, not architecture, and are stripped by `create_model`.
_TI, _S, _B = dict(width=192, num_heads=3), dict(width=384, num_heads=6), dict(width=768, num_heads=12)
_L, _H = dict(width=1024, depth=24, num_heads=16), dict(width=1280, depth=32, num_heads=16)
_DEIT3 = dict(no_embed_class=True, layer_scale_init=1e-6)
# CLIP towers (OpenAI and OpenCLIP): LayerNorm before the blocks, eps 1e-5; the
# head is CLIP's projection to the joint embedding (timm's default tags' widths).
_CLIP = dict(pre_norm=True, norm_eps=1e-5)
_QUICKGELU = dict(_CLIP, act_layer="quick_gelu")
# SigLIP (big_vision): no class token, attention pooling; feature extractors.
_SIGLIP = dict(class_token=False, global_pool="map", num_classes=0)
_SO400M = dict(width=1152, depth=27, num_heads=16, mlp_ratio=3.7362, **_SIGLIP)
# DINOv2: LayerScale, 518 px; with registers the position embeddings skip the
# prefix tokens; the giant's MLP is a packed SwiGLU (fc1 of 2 x 4096 features).
_DINOV2 = dict(patch_size=14, img_size=518, layer_scale_init=1e-5, num_classes=0)
_REG4 = dict(reg_tokens=4, no_embed_class=True)
_G_DINOV2 = dict(
    width=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed", act_layer="silu"
)
_VIDEO = dict(
    num_frames=16, tubelet_size=2, class_token=False, global_pool="avg", num_classes=400
)
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": dict(**_TI, patch_size=16),
    "vit_tiny_patch16_384": dict(**_TI, patch_size=16, img_size=384),
    "vit_small_patch16_224": dict(**_S, patch_size=16),
    "vit_small_patch32_224": dict(**_S, patch_size=32),
    "vit_small_patch16_384": dict(**_S, patch_size=16, img_size=384),
    "vit_base_patch8_224": dict(**_B, patch_size=8),
    "vit_base_patch16_224": dict(**_B, patch_size=16),
    "vit_base_patch32_224": dict(**_B, patch_size=32),
    "vit_base_patch16_384": dict(**_B, patch_size=16, img_size=384),
    "vit_large_patch16_224": dict(**_L, patch_size=16),
    "vit_large_patch16_384": dict(**_L, patch_size=16, img_size=384),
    "vit_huge_patch14_224": dict(**_H, patch_size=14),
    "deit_tiny_patch16_224": dict(**_TI, patch_size=16),
    "deit_small_patch16_224": dict(**_S, patch_size=16),
    "deit_base_patch16_224": dict(**_B, patch_size=16),
    "deit_base_patch16_384": dict(**_B, patch_size=16, img_size=384),
    "deit_tiny_distilled_patch16_224": dict(**_TI, patch_size=16, distill_token=True),
    "deit_small_distilled_patch16_224": dict(**_S, patch_size=16, distill_token=True),
    "deit_base_distilled_patch16_224": dict(**_B, patch_size=16, distill_token=True),
    "deit_base_distilled_patch16_384": dict(
        **_B, patch_size=16, img_size=384, distill_token=True
    ),
    "deit3_small_patch16_224": dict(**_S, patch_size=16, **_DEIT3),
    "deit3_base_patch16_224": dict(**_B, patch_size=16, **_DEIT3),
    "deit3_large_patch16_224": dict(**_L, patch_size=16, **_DEIT3),
    "vit_base_patch32_clip_224": dict(**_B, patch_size=32, **_CLIP),
    "vit_base_patch16_clip_224": dict(**_B, patch_size=16, **_CLIP),
    "vit_base_patch16_clip_384": dict(**_B, patch_size=16, img_size=384, **_CLIP),
    "vit_large_patch14_clip_224": dict(**_L, patch_size=14, **_CLIP),
    "vit_large_patch14_clip_336": dict(**_L, patch_size=14, img_size=336, **_CLIP),
    "vit_huge_patch14_clip_224": dict(**_H, patch_size=14, **_CLIP),
    "vit_base_patch16_clip_quickgelu_224": dict(**_B, patch_size=16, num_classes=512, **_QUICKGELU),
    "vit_large_patch14_clip_quickgelu_224": dict(**_L, patch_size=14, num_classes=768, **_QUICKGELU),
    "vit_large_patch14_clip_quickgelu_336": dict(
        **_L, patch_size=14, img_size=336, num_classes=768, **_QUICKGELU
    ),
    "vit_base_patch16_siglip_224": dict(**_B, patch_size=16, **_SIGLIP),
    "vit_base_patch16_siglip_256": dict(**_B, patch_size=16, img_size=256, **_SIGLIP),
    "vit_base_patch16_siglip_384": dict(**_B, patch_size=16, img_size=384, **_SIGLIP),
    "vit_so400m_patch14_siglip_224": dict(patch_size=14, **_SO400M),
    "vit_so400m_patch14_siglip_378": dict(patch_size=14, img_size=378, **_SO400M),
    # 384 px in 14 px patches: 27 x 27 patches, the last 6 pixel rows and columns unread.
    "vit_so400m_patch14_siglip_384": dict(patch_size=14, img_size=384, **_SO400M),
    "vit_so400m_patch16_siglip_256": dict(patch_size=16, img_size=256, act_layer="gelu_tanh", **_SO400M),
    "vit_small_patch14_dinov2": dict(**_S, **_DINOV2),
    "vit_base_patch14_dinov2": dict(**_B, **_DINOV2),
    "vit_large_patch14_dinov2": dict(**_L, **_DINOV2),
    "vit_giant_patch14_dinov2": dict(**_G_DINOV2, **_DINOV2),
    "vit_small_patch14_reg4_dinov2": dict(**_S, **_DINOV2, **_REG4),
    "vit_base_patch14_reg4_dinov2": dict(**_B, **_DINOV2, **_REG4),
    "vit_large_patch14_reg4_dinov2": dict(**_L, **_DINOV2, **_REG4),
    "vit_giant_patch14_reg4_dinov2": dict(**_G_DINOV2, **_DINOV2, **_REG4),
    # MAE fine-tuned checkpoints: global average pooling with fc_norm.
    "vit_base_patch16_224_mae": dict(**_B, patch_size=16, global_pool="avg"),
    "vit_large_patch16_224_mae": dict(**_L, patch_size=16, global_pool="avg"),
    "vit_huge_patch14_224_mae": dict(**_H, patch_size=14, global_pool="avg"),
    # The bundled CIFAR-10 model (assets/vit_tiny_p4_cifar10.safetensors).
    "vit_tiny_patch4_32": dict(**_TI, patch_size=4, img_size=32, num_classes=10),
    # Video (Kinetics-400), the ToMe paper's video setting (MAE-ST; VideoMAE alike):
    # 16 frames of 224x224 in 2x16x16 tubelets, 8 x 14 x 14 = 1568 tokens with joint
    # space-time attention, average pooling with fc_norm, no class token. One learned
    # position embedding per space-time token (MAE-ST's separable space + time
    # embeddings and VideoMAE's fixed sinusoids are special cases of this table).
    "video_vit_base_patch16_tubelet2_16x224": dict(**_B, patch_size=16, **_VIDEO),
    "video_vit_large_patch16_tubelet2_16x224": dict(**_L, patch_size=16, **_VIDEO),
    # Audio (AudioSet's 527 classes) after AST: log-mel spectrograms of 128 bins x 1024
    # frames as one-channel images [batch, 128, 1024, 1], class token. The 16x16
    # patches do not overlap (8 x 64 = 512 tokens); AST's overlap them (stride 10).
    "audio_vit_base_patch16_128x1024": dict(
        **_B, patch_size=16, img_size=(128, 1024), in_chans=1, num_classes=527
    ),
}


def model_config(name: str, **overrides) -> dict[str, Any]:
    """The ViT attributes of a named architecture, with `overrides` applied."""
    arch = name.split(".")[0]
    if arch not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_CONFIGS))}")
    unknown = set(overrides) - set(ViT.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown ViT attributes {sorted(unknown)} for {name!r}")
    return {**MODEL_CONFIGS[arch], **overrides}


def create_model(name: str, **overrides) -> ViT:
    """A ViT by timm architecture name, e.g. `create_model("deit_small_patch16_224")`."""
    return ViT(**model_config(name, **overrides))
