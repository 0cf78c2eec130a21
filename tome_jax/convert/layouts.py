"""Checkpoint layouts -> timm's names and tensor layouts.

timm's own names (and DeiT III's original ones), torchvision's, OpenAI CLIP's
(also OpenCLIP's) and Google's `.npz` layouts (AugReg, big_vision, SigLIP) are
each renamed, and where need be combined, into the timm state dict that
`tome_jax.convert` reads.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from tome_jax.convert.names import kernel_to_timm


def _same(x):
    return x


class Checkpoint(NamedTuple):
    """A checkpoint in timm's names and layouts.

    Attributes:
      arrays: timm key -> array; keys no layout rule recognised keep their own name
        (they are reported as unexpected).
      source_names: timm key -> the name(s) it was read from, where they differ.
      hints: ViT attributes the source states (num_heads, img_size, pre_norm, ...),
        and `projection`: the source's name of a CLIP tower's projection, which
        its head is read from (without it, the head is left out only on request).
      name_in_source: timm key -> the source's name for it, to name a tensor the
        checkpoint lacks in the checkpoint's own terms.
    """

    arrays: dict[str, np.ndarray]
    source_names: dict[str, str]
    hints: dict[str, Any]
    name_in_source: Callable[[str], str] = _same


# Each layout's names -> timm's: (their name, timm's) pairs of name templates,
# applied in order to every key (and backwards, last first, to name a missing
# tensor in the layout's terms). In a template `^` and `$` anchor it at the
# name's start and end, `{i}` is a number, and the rest is literal.
_TIMM_RENAMES = (
    (".gamma_{i}$", ".ls{i}.gamma$"),  # DeiT III's original checkpoints
)
_TORCHVISION_RENAMES = (
    ("^conv_proj.", "^patch_embed.proj."),
    ("^class_token$", "^cls_token$"),
    ("^encoder.pos_embedding$", "^pos_embed$"),
    ("^encoder.layers.encoder_layer_{i}.", "^blocks.{i}."),
    (".ln_{i}.", ".norm{i}."),
    (".self_attention.in_proj_weight$", ".attn.qkv.weight$"),
    (".self_attention.in_proj_bias$", ".attn.qkv.bias$"),
    (".self_attention.out_proj.", ".attn.proj."),
    # torchvision's legacy names, then its current ones, which the way back gives.
    (".mlp.linear_1.", ".mlp.fc1."),
    (".mlp.0.", ".mlp.fc1."),
    (".mlp.linear_2.", ".mlp.fc2."),
    (".mlp.3.", ".mlp.fc2."),
    ("^encoder.ln.", "^norm."),
    ("^heads.head.", "^head."),
)
# OpenAI CLIP's visual tower (OpenCLIP's too), without its `visual.` prefix.
_OPENAI_CLIP_RENAMES = (
    ("^conv1.", "^patch_embed.proj."),
    ("^class_embedding$", "^cls_token$"),
    ("^positional_embedding$", "^pos_embed$"),
    ("^ln_pre.", "^norm_pre."),
    ("^transformer.resblocks.{i}.", "^blocks.{i}."),
    (".ln_{i}.", ".norm{i}."),
    (".attn.in_proj_weight$", ".attn.qkv.weight$"),
    (".attn.in_proj_bias$", ".attn.qkv.bias$"),
    (".attn.out_proj.", ".attn.proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
    ("^ln_post.", "^norm."),
    ("^proj$", "^head.weight$"),
)
# big_vision numbers the block's modules differently from AugReg; same tensors.
_BIG_VISION_RENAMES = (
    ("^pos_embedding$", "^Transformer/posembed_input/pos_embedding$"),
    (
        "^Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/",
        "^Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/",
    ),
    ("^Transformer/encoderblock_{i}/LayerNorm_1/", "^Transformer/encoderblock_{i}/LayerNorm_2/"),
    ("^Transformer/encoderblock_{i}/MlpBlock_0/", "^Transformer/encoderblock_{i}/MlpBlock_3/"),
)


def _template_pattern(template: str) -> str:
    """A name template (see the rename tables) -> the regex it stands for."""
    body = re.escape(template.strip("^$")).replace(re.escape("{i}"), r"(\d+)")
    return ("^" if template.startswith("^") else "") + body + ("$" if template.endswith("$") else "")


def renamed(name: str, renames, *, backwards: bool = False) -> str:
    """`name` through a layout's renames: into timm's names, or `backwards` out of them."""
    rules = [(timm, theirs) for theirs, timm in reversed(renames)] if backwards else renames
    for before, after in rules:
        name = re.sub(_template_pattern(before), after.strip("^$").replace("{i}", r"\1"), name)
    return name
# Where the parameters sit in a `.npz`; anything outside that prefix (optimizer
# state) is ignored.
# (SigLIP keeps its image tower under `img/`, beside the text tower's `txt/`.)
_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/", "img/")


def rename(arrays: Mapping[str, np.ndarray], renames) -> tuple[dict, dict]:
    """Applies a layout's renames; returns (renamed arrays, new name -> old name)."""
    out, source_names = {}, {}
    for name, array in arrays.items():
        new = renamed(name, renames)
        if new in out:
            raise ValueError(f"{name!r} and {source_names.get(new, new)!r} both map to {new!r}")
        out[new] = array
        if new != name:
            source_names[new] = name
    return out, source_names


def _qkv_kernel(*kernels):
    """3 x [width, heads, head_dim] -> timm's fused [3 * width, width]."""
    return np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels])


def _qkv_bias(*biases):
    """3 x [heads, head_dim] -> [3 * width]."""
    return np.concatenate([b.reshape(-1) for b in biases])


def _out_kernel(kernel):
    """[heads, head_dim, width] -> timm's [width, heads * head_dim]."""
    return kernel.reshape(-1, kernel.shape[-1]).T


def _augreg_dense(timm_name: str, name: str, kernel=kernel_to_timm) -> dict:
    """timm's `{timm_name}.weight/.bias` <- Google's `{name}/kernel` and `/bias`."""
    return {
        f"{timm_name}.weight": ((f"{name}/kernel",), kernel),
        f"{timm_name}.bias": ((f"{name}/bias",), _same),
    }


def _augreg_norm(timm_name: str, name: str) -> dict:
    """timm's LayerNorm `{timm_name}.weight/.bias` <- Google's `{name}/scale` and `/bias`."""
    return {
        f"{timm_name}.weight": ((f"{name}/scale",), _same),
        f"{timm_name}.bias": ((f"{name}/bias",), _same),
    }


_MHA = "MultiHeadDotProductAttention_1"
_QKV = ("query", "key", "value")
_MAP = "MAPHead_0"
_MAP_MHA = f"{_MAP}/MultiHeadDotProductAttention_0"
# timm key <- (AugReg names, how they combine into timm's tensor). The MAP head
# (SigLIP's attention pooling) is timm's `attn_pool`: its query alone is `q`, its
# key and value together `kv`.
_AUGREG = {
    **_augreg_dense("patch_embed.proj", "embedding"),
    "cls_token": (("cls",), _same),
    "pos_embed": (("Transformer/posembed_input/pos_embedding",), _same),
    **_augreg_norm("norm", "Transformer/encoder_norm"),
    **_augreg_dense("head", "head"),
    "attn_pool.latent": ((f"{_MAP}/probe",), _same),
    "attn_pool.q.weight": ((f"{_MAP_MHA}/query/kernel",), _qkv_kernel),
    "attn_pool.q.bias": ((f"{_MAP_MHA}/query/bias",), _qkv_bias),
    "attn_pool.kv.weight": (tuple(f"{_MAP_MHA}/{n}/kernel" for n in _QKV[1:]), _qkv_kernel),
    "attn_pool.kv.bias": (tuple(f"{_MAP_MHA}/{n}/bias" for n in _QKV[1:]), _qkv_bias),
    **_augreg_dense("attn_pool.proj", f"{_MAP_MHA}/out", _out_kernel),
    **_augreg_norm("attn_pool.norm", f"{_MAP}/LayerNorm_0"),
    **_augreg_dense("attn_pool.mlp.fc1", f"{_MAP}/MlpBlock_0/Dense_0"),
    **_augreg_dense("attn_pool.mlp.fc2", f"{_MAP}/MlpBlock_0/Dense_1"),
}
# What a Google `.npz` leaves unsaid, as timm reads these files: exact GELU (the
# original code computes its tanh approximation; `act_layer="gelu_tanh"` follows
# it), Flax's LayerNorm epsilon.
_NPZ_HINTS = {"act_layer": "gelu", "norm_eps": 1e-6}
# The same for each block: `blocks.{i}.` <- `Transformer/encoderblock_{i}/`.
_AUGREG_BLOCK = {
    **_augreg_norm("norm1", "LayerNorm_0"),
    "attn.qkv.weight": (tuple(f"{_MHA}/{n}/kernel" for n in _QKV), _qkv_kernel),
    "attn.qkv.bias": (tuple(f"{_MHA}/{n}/bias" for n in _QKV), _qkv_bias),
    **_augreg_dense("attn.proj", f"{_MHA}/out", _out_kernel),
    **_augreg_norm("norm2", "LayerNorm_2"),
    **_augreg_dense("mlp.fc1", "MlpBlock_3/Dense_0"),
    **_augreg_dense("mlp.fc2", "MlpBlock_3/Dense_1"),
}


def _canonical_npz(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Google checkpoint variants -> AugReg names: drops the parameter prefix, splits
    big_vision's scanned blocks (one array with a leading depth axis) into one block
    each, renames big_vision's module numbers."""
    prefix = next((p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in arrays), "")
    unstacked = {}
    for name, array in arrays.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix) :]
        if name.startswith("Transformer/encoderblock/"):
            rest = name[len("Transformer/encoderblock/") :]
            unstacked.update({f"Transformer/encoderblock_{i}/{rest}": a for i, a in enumerate(array)})
        else:
            unstacked[name] = array
    return rename(unstacked, _BIG_VISION_RENAMES)[0]


def _augreg_to_timm(arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """Google's ViT `.npz` layouts -> timm's; `num_heads` is in the attention shapes."""
    left = _canonical_npz(arrays)
    depth = 1 + max(
        (int(m.group(1)) for n in left if (m := re.match(r"Transformer/encoderblock_(\d+)/", n))),
        default=-1,
    )
    table = dict(_AUGREG)
    for i in range(depth):
        for key, (names, combine) in _AUGREG_BLOCK.items():
            table[f"blocks.{i}.{key}"] = (tuple(f"Transformer/encoderblock_{i}/{n}" for n in names), combine)

    query = left.get(f"Transformer/encoderblock_0/{_MHA}/query/kernel")
    hints = {"num_heads": query.shape[1]} if query is not None and query.ndim == 3 else {}
    hints.update(_NPZ_HINTS)
    out, source_names = {}, {}
    for key, (names, combine) in table.items():
        source_names[key] = ", ".join(names)
        if not all(n in left for n in names):
            continue  # reported as missing if the model needs it; parts left are unexpected
        parts = [left.pop(n) for n in names]
        try:
            out[key] = combine(*parts)
        except ValueError as error:
            shapes = ", ".join(f"{n} {p.shape}" for n, p in zip(names, parts))
            raise ValueError(f"cannot combine {shapes} into {key}: {error}") from None
    return Checkpoint({**out, **left}, source_names, hints)


def _openai_clip_to_timm(arrays: Mapping[str, np.ndarray]) -> Checkpoint:
    """OpenAI CLIP's visual tower (and OpenCLIP's) -> timm's, as timm's
    `_convert_openai_clip` reads it.

    A whole CLIP state dict is read for its `visual.` entries (the text tower is
    left out). The class embedding and position embeddings gain timm's batch axes;
    `proj` [width, embed_dim] becomes the head [embed_dim, width] with a zero bias.
    CLIP's LayerNorms have PyTorch's epsilon, 1e-5; every CLIP tower has `ln_pre`.
    Tensors are named as the state dict names them, `visual.` included.
    """
    prefix = "visual." if "visual.conv1.weight" in arrays else ""
    arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    out, source_names = rename(arrays, _OPENAI_CLIP_RENAMES)
    if "cls_token" in out:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in out and out["pos_embed"].ndim == 2:
        out["pos_embed"] = out["pos_embed"][None]
    if "head.weight" in out:
        out["head.weight"] = out["head.weight"].T
        out["head.bias"] = np.zeros(out["head.weight"].shape[0], out["head.weight"].dtype)
        source_names["head.bias"] = "proj (no bias: zeros)"
    return Checkpoint(
        out,
        {key: prefix + source_names.get(key, key) for key in out},
        {"norm_eps": 1e-5, "pre_norm": True, "projection": f"{prefix}proj"},
        lambda key: prefix + renamed(key, _OPENAI_CLIP_RENAMES, backwards=True),
    )


def fused_attention(arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """timm's Eva attention -> its VisionTransformer's fused `qkv.weight` and `qkv.bias`.

    Eva keeps a bias-free `qkv` with `q_bias` and `v_bias` beside it (the keys have no
    bias), or separate `q_proj`, `k_proj`, `v_proj`; either computes the same as one
    fused projection with the biases concatenated (zeros for a missing one).
    """
    out, source_names = dict(arrays), {}
    for key in [k for k in arrays if re.search(r"\.attn\.(q_bias|q_proj\.weight)$", k)]:
        prefix = key[: key.index(".attn.") + len(".attn.")]
        if key.endswith("q_bias"):
            names = [f"{prefix}q_bias", None, f"{prefix}v_bias"]
            out[f"{prefix}qkv.bias"] = _concatenated_biases(out, names, out[f"{prefix}qkv.weight"].shape[0] // 3)
            source_names[f"{prefix}qkv.bias"] = f"{prefix}q_bias, {prefix}v_bias (keys: zeros)"
            continue
        weights = [f"{prefix}{part}_proj.weight" for part in "qkv"]
        out[f"{prefix}qkv.weight"] = np.concatenate([out.pop(name) for name in weights])
        source_names[f"{prefix}qkv.weight"] = ", ".join(weights)
        biases = [f"{prefix}{part}_proj.bias" if f"{prefix}{part}_proj.bias" in out else None for part in "qkv"]
        if any(biases):
            out[f"{prefix}qkv.bias"] = _concatenated_biases(out, biases, out[f"{prefix}qkv.weight"].shape[0] // 3)
            source_names[f"{prefix}qkv.bias"] = ", ".join(b or "zeros" for b in biases)
    return out, source_names


def _concatenated_biases(arrays: dict, names: list[str | None], width: int) -> np.ndarray:
    """The biases `names` (popped from `arrays`; None: zeros) end to end, in the first one's dtype."""
    present = next(arrays[n] for n in names if n is not None)
    return np.concatenate([arrays.pop(n) if n is not None else np.zeros(width, present.dtype) for n in names])


def to_timm_layout(arrays: Mapping[str, np.ndarray], hints: dict[str, Any]) -> Checkpoint:
    """Recognises the layout by its patch-embedding name and renames it into timm's."""
    if "patch_embed.proj.weight" in arrays:
        fused, fused_names = fused_attention(arrays)
        timm_named, source_names = rename(fused, _TIMM_RENAMES)
        return Checkpoint(timm_named, {**fused_names, **source_names}, hints)
    if "conv_proj.weight" in arrays:
        return Checkpoint(
            *rename(arrays, _TORCHVISION_RENAMES), hints, lambda key: renamed(key, _TORCHVISION_RENAMES, backwards=True)
        )
    if "conv1.weight" in arrays or "visual.conv1.weight" in arrays:
        checkpoint = _openai_clip_to_timm(arrays)
        return checkpoint._replace(hints={**checkpoint.hints, **hints})
    if any(f"{p}embedding/kernel" in arrays for p in _NPZ_PREFIXES):
        checkpoint = _augreg_to_timm(arrays)
        return checkpoint._replace(hints={**checkpoint.hints, **hints})
    sample = ", ".join(sorted(arrays)[:8])
    raise ValueError(
        "unrecognised checkpoint layout: expected timm's 'patch_embed.proj.weight', torchvision's "
        f"'conv_proj.weight', CLIP's '(visual.)conv1.weight' or Google's 'embedding/kernel'; got {sample}"
    )
