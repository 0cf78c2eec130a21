"""`tome_jax.ViT` attributes read from a checkpoint's timm-named tensors.

What the tensors cannot tell (`num_heads` at an unusual width, a non-square grid,
the pooling without `fc_norm`, the activation, the LayerNorm epsilon) comes from
the checkpoint's hints or the overrides.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, Mapping

import numpy as np

from tome_jax import reduce
from tome_jax.convert.layouts import Checkpoint
from tome_jax.layers import pair


# Attributes no tensor shows, taken as the checkpoint states them: the head's activation
# (Hugging Face's pooler), spectrogram inputs (AST), the norms around pooling (VideoMAE,
# AST). (So is AST's `patch_stride`.)
_STATED_ONLY = ("head_act", "fbank_input", "token_norm", "fc_norm_eps")
# Heads of the standard ViT widths where `width // 64` is wrong (H/14, g/14, G/14).
_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}


def _required(arrays: Mapping[str, np.ndarray], key: str, *ndims: int) -> np.ndarray:
    if key not in arrays:
        raise ValueError(f"checkpoint has no {key!r}, needed to infer the architecture")
    if arrays[key].ndim not in ndims:
        expected = " or ".join(map(str, ndims))
        raise ValueError(f"{key} must have {expected} dimensions, got shape {arrays[key].shape}")
    return arrays[key]


def _num_heads(width: int, hints: Mapping[str, Any]) -> int:
    if "num_heads" in hints:
        return int(hints["num_heads"])
    if width in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[width]
    if width % 64 == 0:
        return width // 64
    raise ValueError(
        f"cannot tell the number of attention heads of a width-{width} model from its tensors; "
        "pass num_heads="
    )


def _agreed_size(arrays: Mapping[str, np.ndarray], pattern: str, axis: int) -> int:
    """The size along `axis` that most tensors named by `pattern` (a regex) share.

    One cut tensor then shows as the one of the wrong shape, rather than setting
    the size that every other tensor is reported against. A tie goes to the first.
    """
    sizes = [a.shape[axis] for k, a in arrays.items() if re.fullmatch(pattern, k) and a.ndim > axis]
    return collections.Counter(sizes).most_common(1)[0][0]


def _mlp_layer(arrays: Mapping[str, np.ndarray]) -> tuple[str, int]:
    """timm's MLP kind and its `hidden_features` (fc1's width), as most blocks' tensors say.

    A packed SwiGLU's fc1 is twice as wide as fc2's input (gate and value halves).
    """
    blocks = r"blocks\.\d+\.mlp\."
    if "blocks.0.mlp.fc1_g.weight" in arrays:
        _required(arrays, "blocks.0.mlp.fc1_g.weight", 2)
        return "swiglu", _agreed_size(arrays, blocks + r"fc1_g\.(weight|bias)", 0)
    _required(arrays, "blocks.0.mlp.fc1.weight", 2)
    _required(arrays, "blocks.0.mlp.fc2.weight", 2)
    hidden = _agreed_size(arrays, blocks + r"fc1\.(weight|bias)", 0)
    fc2_in = _agreed_size(arrays, blocks + r"fc2\.weight", 1)
    return ("swiglu_packed" if hidden == 2 * fc2_in else "mlp"), hidden


def _invisible_layers(mlp_layer: str, pre_norm: bool, global_pool: str, hints: Mapping[str, Any]) -> dict:
    """The activation and LayerNorm epsilon, which no tensor shows.

    From the hints when they say; else timm's defaults (exact GELU, eps 1e-6; SiLU
    in a SwiGLU), except where timm's own models of that form differ: CLIP towers
    (pre-norm) use QuickGELU or GELU with eps 1e-5, SigLIP's (attention pooling)
    GELU or its tanh form. There the checkpoint must say, or the caller.
    """
    act = hints.get("act_layer")
    if act is None and pre_norm:
        raise ValueError(
            "a pre-norm (CLIP-style) checkpoint does not say its activation; pass act_layer='quick_gelu' "
            "(OpenAI CLIP) or act_layer='gelu' (OpenCLIP), or 'gelu' for timm's defaults"
        )
    if act is None and global_pool == "map":
        raise ValueError(
            "an attention-pooled (SigLIP-style) checkpoint does not say its activation; pass "
            "act_layer='gelu' (timm's SigLIP) or act_layer='gelu_tanh' (SigLIP 2 So400m/16, big_vision's)"
        )
    eps = hints.get("norm_eps")
    if eps is None and pre_norm:
        raise ValueError(
            "a pre-norm (CLIP-style) checkpoint does not say its LayerNorm epsilon; pass norm_eps=1e-5 "
            "(CLIP's) or norm_eps=1e-6 (timm's default)"
        )
    default_act = "silu" if mlp_layer != "mlp" else "gelu"
    return dict(act_layer=act or default_act, norm_eps=1e-6 if eps is None else eps)


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio with `int(width * ratio) == hidden`, as ViT's Mlp computes it."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _patch_grid(size, patch, stride) -> tuple[int, ...]:
    """The patches a strided patch convolution cuts from an image of `size`."""
    return tuple((s - p) // st + 1 for s, p, st in zip(pair(size), patch, stride))


def _position_grid(
    pos_len: int, prefix: int, patch, stride, stated, requested, steps: int = 1
) -> tuple[tuple[int, int], bool]:
    """The patch grid the position embeddings were trained for, and whether they
    skip the prefix tokens (`no_embed_class`).

    The checkpoint's stated image size decides when there is one. Otherwise a
    square grid and the requested image size are the candidates; when both fit the
    positions but differ (16 positions: 4x4, or a requested 2x8), the checkpoint is
    ambiguous and the caller must state its size. A video checkpoint has `steps`
    tubelets in time, each with the whole grid.
    """
    def fit(grid):
        patches = steps * grid[0] * grid[1]
        if pos_len == patches + prefix:
            return grid, False
        if prefix and pos_len == patches:
            return grid, True
        return None

    to_grid = lambda size: _patch_grid(size, patch, stride)  # noqa: E731
    if stated is not None:
        if fit(to_grid(stated)) is None:
            raise ValueError(f"pos_embed's {pos_len} positions do not fit the stated img_size {stated}")
        return fit(to_grid(stated))
    squares = [fit((math.isqrt(n // steps),) * 2) for n in (pos_len - prefix, pos_len) if n > 0]
    square = next((found for found in squares if found), None)
    wanted = fit(to_grid(requested)) if requested is not None else None
    if square and wanted and square != wanted:
        raise ValueError(
            f"pos_embed's {pos_len} positions fit a {square[0][0]}x{square[0][1]} grid and the requested "
            f"img_size {requested}; pass checkpoint_img_size= to say which size the checkpoint has"
        )
    if square or wanted:
        return square or wanted
    raise ValueError(
        f"pos_embed holds {pos_len} positions ({prefix} prefix tokens), which fit no square "
        "patch grid; pass the checkpoint's own size as checkpoint_img_size="
    )


def infer_config(checkpoint: Checkpoint, overrides: Mapping[str, Any]):
    """ViT attributes from timm-named tensors, hints, then overrides.

    Returns (attributes, the checkpoint's patch grid).
    """
    arrays, hints = checkpoint.arrays, {**checkpoint.hints, **overrides}
    has = arrays.__contains__
    width, in_chans, *kernel = _required(arrays, "patch_embed.proj.weight", 4, 5).shape
    # A 5-D kernel is a video checkpoint's tubelet embedding: [width, c, t, ph, pw].
    tubelet, patch = (kernel[0], kernel[1:]) if len(kernel) == 3 else (None, kernel)
    video = _video_config(tubelet, hints)
    steps = video["num_frames"] // tubelet if video else 1
    depth = 1 + max((int(m.group(1)) for k in arrays if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    class_token, distill_token = has("cls_token"), has("dist_token")
    reg_tokens = _required(arrays, "reg_token", 3).shape[1] if has("reg_token") else 0
    prefix = int(class_token) + int(distill_token) + reg_tokens
    stated = checkpoint.hints.get("img_size")
    stride = pair(hints["patch_stride"]) if hints.get("patch_stride") is not None else tuple(patch)
    grid, no_embed_class = _checkpoint_grid(checkpoint, prefix, patch, stride, overrides.get("img_size"), steps)
    fc_norm = has("fc_norm.weight")
    if has("attn_pool.latent"):
        global_pool = "map"
    else:  # token or average pooling over a final `norm` only the source can tell
        global_pool = checkpoint.hints.get("global_pool", "avg" if fc_norm or not class_token else "token")
    pre_norm = hints.get("pre_norm", has("norm_pre.weight") or has("norm_pre.bias"))
    mlp_layer, hidden = _mlp_layer(arrays)
    config = dict(
        num_classes=_num_classes(arrays, checkpoint.hints.get("projection"), overrides),
        # The stated size may leave pixels past the last whole patch (timm's
        # So400m/14 at 384 px), which the model then drops as timm does.
        img_size=pair(stated) if stated is not None else tuple((g - 1) * s + p for g, p, s in zip(grid, patch, stride)),
        patch_size=tuple(patch),
        patch_stride=stride if hints.get("patch_stride") is not None else None,
        in_chans=in_chans,
        **video,
        width=width,
        depth=depth,
        num_heads=_num_heads(width, hints),
        mlp_ratio=_mlp_ratio(width, hidden),
        mlp_layer=mlp_layer,
        scale_mlp_norm=has("blocks.0.mlp.norm.weight"),
        **_invisible_layers(mlp_layer, pre_norm, global_pool, hints),
        qkv_bias=has("blocks.0.attn.qkv.bias"),
        qk_norm=has("blocks.0.attn.q_norm.weight"),
        class_token=class_token,
        distill_token=distill_token,
        reg_tokens=reg_tokens,
        global_pool=global_pool,
        fc_norm=fc_norm,
        pre_norm=pre_norm,
        no_embed_class=no_embed_class,
        # Any value turns LayerScale on; the checkpoint's gamma replaces it.
        layer_scale_init=1e-5 if has("blocks.0.ls1.gamma") else None,
        **_eva_config(arrays, hints, width),
        **{key: hints[key] for key in _STATED_ONLY if key in hints},
    )
    if has("blocks.0.metric.weight") and "reduction" not in overrides:
        # A DTEM export (to_timm_state_dict of a DTEM model) carries its metric layers.
        config["reduction"] = reduce.DTEM(dim=arrays["blocks.0.metric.weight"].shape[0])
    return {**config, **overrides}, ((steps, *grid) if video else grid)


def _num_classes(arrays: Mapping[str, np.ndarray], projection: str | None, overrides: Mapping[str, Any]) -> int:
    """The head's outputs; 0 without a head, but a CLIP tower's missing projection must be asked for."""
    if "head.weight" in arrays:
        return _required(arrays, "head.weight", 2).shape[0]
    if projection is not None and "num_classes" not in overrides:
        raise ValueError(
            f"the CLIP checkpoint has no {projection!r}, the projection into CLIP's embedding space; pass "
            "num_classes=0 to read the tower without it (its pooled features, of the model's width)"
        )
    return 0


def _checkpoint_grid(
    checkpoint: Checkpoint, prefix: int, patch, stride, requested, steps: int
) -> tuple[tuple[int, int], bool]:
    """The patch grid the checkpoint was trained at and `no_embed_class`: from its position
    embeddings, or, for a rotary model without them or a fixed table (VideoMAE's, built
    for any size), from the stated or requested image size. Overlapping patches (AST's)
    are `stride` apart, which no tensor shows."""
    arrays, stated = checkpoint.arrays, checkpoint.hints.get("img_size")
    if "pos_embed" in arrays and checkpoint.hints.get("fixed_pos_embed") is None:
        positions = _required(arrays, "pos_embed", 3).shape[1]
        return _position_grid(positions, prefix, patch, stride, stated, requested, steps)
    size = stated if stated is not None else requested
    if size is None:
        raise ValueError("the checkpoint has no position embeddings to read its image size from; pass img_size=")
    return _patch_grid(size, patch, stride), False


def _eva_config(arrays: Mapping[str, np.ndarray], hints: Mapping[str, Any], width: int) -> dict[str, Any]:
    """The attributes of timm's Eva models (rotary ones among them) that its tensors or hints show.

    A rotary embedding shows in no tensor but RoPE-Mixed's learned `rope.freqs`: it comes
    from the source (a timm name or module) or the caller (`rope=tome_jax.rope.Rope(...)`).
    """
    config = dict(abs_pos_embed="pos_embed" in arrays, attn_inner_norm="blocks.0.attn.norm.weight" in arrays)
    if "attn_pool.mlp.fc1.weight" in arrays:
        config["pool_mlp_ratio"] = _mlp_ratio(width, arrays["attn_pool.mlp.fc1.weight"].shape[0])
    for key in ("rope", "pool_num_heads", "pool_include_prefix"):
        if key in hints:
            config[key] = hints[key]
    if "rope.freqs" in arrays and "rope" not in config:
        raise ValueError(
            "the checkpoint holds RoPE-Mixed frequencies (rope.freqs) but does not say its grid; "
            "pass rope=tome_jax.rope.Rope('mixed', temperature=..., grid_indexing=...) or load it by its timm name"
        )
    if "pos_embed" not in arrays and "rope" not in config:
        raise ValueError(
            "the checkpoint has no position embeddings, so it is a rotary model whose rotary embedding "
            "no tensor shows; pass rope=tome_jax.rope.Rope(...) or load it by its timm name or module"
        )
    return config


def _video_config(tubelet: int | None, hints: Mapping[str, Any]) -> dict[str, int]:
    """num_frames and tubelet_size of a video checkpoint ({} for an image one)."""
    if tubelet is None:
        return {}
    if hints.get("num_frames") is None:
        raise ValueError(
            f"a video checkpoint ({tubelet}-frame tubelets) does not say how many frames its "
            "position embeddings cover; pass num_frames="
        )
    return dict(num_frames=hints["num_frames"], tubelet_size=tubelet)
