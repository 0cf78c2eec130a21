"""The registry of named architectures: timm's model names -> `tome_jax.ViT` attributes.

    model = create_model("deit_small_patch16_224")
    model = create_model("vit_base_patch16_clip_224", img_size=384)   # any ViT attribute overridden
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from tome_jax.rope import Rope
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



def _swiglu(width: int, packed: bool) -> dict[str, Any]:
    """EVA02's SwiGLU MLP at timm's `mlp_ratio = 4 * 2 / 3`: packed (one fc1, gate and value
    halves) or separate with a norm inside (`scale_mlp`)."""
    features = int(width * 4 * 2 / 3) * (2 if packed else 1)
    ratio = features / width if int(width * (features / width)) == features else (features + 0.5) / width
    return dict(mlp_ratio=ratio, act_layer="silu", mlp_layer="swiglu_packed" if packed else "swiglu",
                scale_mlp_norm=not packed)  # fmt: skip


# timm's Eva models. EVA02: average pooling, absolute and rotary positions (`cat`, the
# frequencies at a 16 x 16 grid); the small ones with a packed SwiGLU, the larger with a
# normed one. SBB and RoPE-ViT: no absolute positions, LayerScale. PE: a norm before the
# blocks, the MAP head over every token (8 heads), rotary positions at x/y offset by 1,
# CLIP's projection as the head. DINOv3: 4 registers, `dinov3` rotary positions in the
# half layout, features.
_EVA02 = dict(patch_size=14, global_pool="avg", rope=Rope("cat", ref_feat_shape=(16, 16)))
_SBB = dict(patch_size=16, img_size=256, layer_scale_init=1e-5, class_token=False, global_pool="avg",
            abs_pos_embed=False, rope=Rope("cat", ref_feat_shape=(16, 16)))  # fmt: skip
_ROPE_VIT = dict(patch_size=16, layer_scale_init=1e-5, abs_pos_embed=False, rope=Rope("cat", 100.0, grid_indexing="xy"))
_ROPE_MIXED = dict(_ROPE_VIT, rope=Rope("mixed", 10.0, grid_indexing="xy"))
_ROPE_APE = dict(_ROPE_VIT, abs_pos_embed=True, no_embed_class=True)
_PE = dict(pre_norm=True, norm_eps=1e-5, global_pool="map", pool_num_heads=8, pool_mlp_ratio=4.0,
           pool_include_prefix=True)  # fmt: skip
_PE_ROPE = dict(grid_offset=1.0, grid_indexing="xy")
_DINOV3 = dict(patch_size=16, img_size=256, layer_scale_init=1e-5, reg_tokens=4, fc_norm=False, global_pool="avg",
               abs_pos_embed=False, norm_eps=1e-5, num_classes=0, rope=Rope("dinov3", 100.0, half=True))  # fmt: skip
_NO_QKV_BIAS = dict(qkv_bias=False)
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
    # Its DINOv3-like rotary sibling (configs/train_rope_cifar10.py): no absolute positions, 4
    # registers, `dinov3` rotary positions, average pooling after the final norm.
    "vit_tiny_patch4_dinov3_32": dict(**_TI, **{**_DINOV3, "patch_size": 4, "img_size": 32, "num_classes": 10}),
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
    "eva02_tiny_patch14_224": dict(**_TI, **_EVA02, **_swiglu(192, packed=True), num_classes=0),
    "eva02_tiny_patch14_336": dict(**_TI, **_EVA02, **_swiglu(192, packed=True), img_size=336),
    "eva02_small_patch14_224": dict(**_S, **_EVA02, **_swiglu(384, packed=True), num_classes=0),
    "eva02_small_patch14_336": dict(**_S, **_EVA02, **_swiglu(384, packed=True), img_size=336),
    "eva02_base_patch14_224": dict(**_B, **_EVA02, **_swiglu(768, packed=False), num_classes=0),
    "eva02_base_patch14_448": dict(**_B, **_EVA02, **_swiglu(768, packed=False), img_size=448),
    "eva02_large_patch14_224": dict(**_L, **_EVA02, **_swiglu(1024, packed=False), num_classes=0),
    "eva02_large_patch14_448": dict(**_L, **_EVA02, **_swiglu(1024, packed=False), img_size=448),
    "vit_medium_patch16_rope_reg1_gap_256": dict(width=512, num_heads=8, reg_tokens=1, **_SBB),
    "vit_mediumd_patch16_rope_reg1_gap_256": dict(width=512, depth=20, num_heads=8, reg_tokens=1, **_SBB,
                                                  **_NO_QKV_BIAS),  # fmt: skip
    "vit_betwixt_patch16_rope_reg4_gap_256": dict(width=640, num_heads=10, reg_tokens=4, **_SBB),
    "vit_base_patch16_rope_reg1_gap_256": dict(**_B, reg_tokens=1, **_SBB),
    "vit_small_patch16_rope_224": dict(**_S, **_ROPE_VIT),
    "vit_base_patch16_rope_224": dict(**_B, **_ROPE_VIT),
    "vit_large_patch16_rope_224": dict(**_L, **_ROPE_VIT),
    "vit_small_patch16_rope_mixed_224": dict(**_S, **_ROPE_MIXED),
    "vit_base_patch16_rope_mixed_224": dict(**_B, **_ROPE_MIXED),
    "vit_large_patch16_rope_mixed_224": dict(**_L, **_ROPE_MIXED),
    "vit_small_patch16_rope_ape_224": dict(**_S, **_ROPE_APE),
    "vit_base_patch16_rope_ape_224": dict(**_B, **_ROPE_APE),
    "vit_large_patch16_rope_ape_224": dict(**_L, **_ROPE_APE),
    "vit_pe_core_tiny_patch16_384": dict(**_TI, **_PE, patch_size=16, img_size=384, num_classes=512,
                                         rope=Rope("cat", ref_feat_shape=(24, 24), **_PE_ROPE)),  # fmt: skip
    "vit_pe_core_small_patch16_384": dict(**_S, **_PE, patch_size=16, img_size=384, num_classes=512,
                                          rope=Rope("cat", ref_feat_shape=(24, 24), **_PE_ROPE)),  # fmt: skip
    "vit_pe_core_base_patch16_224": dict(**_B, **_PE, patch_size=16, num_classes=1024,
                                         rope=Rope("cat", ref_feat_shape=(14, 14), **_PE_ROPE)),  # fmt: skip
    "vit_pe_core_large_patch14_336": dict(**_L, **_PE, patch_size=14, img_size=336, num_classes=1024,
                                          rope=Rope("cat", ref_feat_shape=(24, 24), **_PE_ROPE)),  # fmt: skip
    "vit_pe_core_gigantic_patch14_448": dict(
        width=1536, depth=50, num_heads=16, mlp_ratio=8960 / 1536, class_token=False, **_PE, patch_size=14,
        img_size=448, num_classes=1280, rope=Rope("cat", ref_feat_shape=(32, 32), grid_indexing="xy"),
    ),
    "vit_tiny_patch16_dinov3_qkvb": dict(**_TI, **_DINOV3),
    "vit_small_patch16_dinov3": dict(**_S, **_DINOV3, **_NO_QKV_BIAS),
    "vit_small_patch16_dinov3_qkvb": dict(**_S, **_DINOV3),
    "vit_small_plus_patch16_dinov3": dict(**_S, **_DINOV3, **_NO_QKV_BIAS, mlp_layer="swiglu", act_layer="silu"),
    "vit_small_plus_patch16_dinov3_qkvb": dict(**_S, **_DINOV3, mlp_layer="swiglu", act_layer="silu"),
    "vit_base_patch16_dinov3": dict(**_B, **_DINOV3, **_NO_QKV_BIAS),
    "vit_base_patch16_dinov3_qkvb": dict(**_B, **_DINOV3),
    "vit_large_patch16_dinov3": dict(**_L, **_DINOV3, **_NO_QKV_BIAS),
    "vit_large_patch16_dinov3_qkvb": dict(**_L, **_DINOV3),
}


def model_config(name: str, **overrides) -> dict[str, Any]:
    """The ViT attributes of a named architecture, with `overrides` applied."""
    arch = name.split(".")[0]
    if arch not in MODEL_CONFIGS:
        hint = did_you_mean(arch, MODEL_CONFIGS) or "tome_jax.MODEL_CONFIGS lists the names"
        raise ValueError(f"unknown model {name!r}: {hint}")
    unknown = set(overrides) - set(ViT.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown ViT attributes {sorted(unknown)} for {name!r}")
    return {**MODEL_CONFIGS[arch], **overrides}


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """"did you mean A, B or C?" for the names in `known` closest to a misspelt `name`; "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=3)
    if not close:
        return ""
    names = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f"did you mean {names}?"


def create_model(name: str, **overrides) -> ViT:
    """A ViT by timm architecture name, e.g. `create_model("deit_small_patch16_224")`."""
    return ViT(**model_config(name, **overrides))
