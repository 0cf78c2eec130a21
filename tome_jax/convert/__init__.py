"""Weights from timm, and from the layouts timm reads, into `tome_jax.ViT`.

    model, variables = from_timm("vit_base_patch16_224.augreg_in21k_ft_in1k")
    apply = jax.jit(model.apply, static_argnames="r")
    logits = apply(variables, images_nhwc, r=13)

Sources: a timm model name (weights downloaded by timm), a timm or torchvision
ViT module, a state dict (a mapping of names to arrays), or a checkpoint file:
`.safetensors` (read without torch), `.pth`/`.pt`/`.bin` (torch state dicts),
`.npz` (Google's AugReg and big_vision layouts). Every layout is first renamed
into timm's names and tensor layouts; one rule then maps timm names onto the Flax
parameter tree, in both directions (`to_timm_state_dict` is the way back).

The architecture is read from the tensors. What they cannot tell (`num_heads`, a
non-square patch grid, token versus average pooling when there is no `fc_norm`)
comes from the model name, the module or the checkpoint's metadata, else from
keyword overrides, which win over everything.

torch and timm are imported only when a source needs them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tome_jax.vit import ViT, pair

# --- timm names <-> the Flax parameter tree ------------------------------------------

# Flax module names that differ from timm's (`blocks_{i}` is matched by pattern).
_TIMM_MODULE = {"ls_1": "ls1", "ls_2": "ls2", "patch_embed": "patch_embed.proj"}
_TIMM_LEAF = {"kernel": "weight", "scale": "weight"}
# timm stores Linear kernels [out, in] and Conv2d kernels [out, in, h, w] (a video
# ViT's Conv3d tubelet embedding, as VideoMAE's: [out, in, t, h, w]); Flax (and
# Google's checkpoints) [in, out], [h, w, in, out] and [t, h, w, in, out].
_KERNEL_TO_TIMM_AXES = {2: (1, 0), 4: (3, 2, 0, 1), 5: (4, 3, 0, 1, 2)}


def _timm_key(path: tuple[str, ...]) -> str:
    """Flax parameter path -> timm key: ('blocks_3', 'ls_1', 'gamma') -> 'blocks.3.ls1.gamma'."""
    *modules, leaf = path
    names = [_TIMM_MODULE.get(m, re.sub(r"^blocks_(\d+)$", r"blocks.\1", m)) for m in modules]
    return ".".join(names + [_TIMM_LEAF.get(leaf, leaf)])


def _timm_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
    """The transpose taking a Flax parameter of rank `ndim` at `path` to timm's layout."""
    if path[-1] == "kernel":
        return _KERNEL_TO_TIMM_AXES[ndim]
    return tuple(range(ndim))


def _kernel_to_timm(kernel: np.ndarray) -> np.ndarray:
    """[in, out] or [h, w, in, out] (Flax, JAX checkpoints) -> timm's [out, in(, h, w)]."""
    return kernel.transpose(_KERNEL_TO_TIMM_AXES[kernel.ndim])


def _flat_params(params) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(params))


def to_timm_state_dict(model: ViT, variables) -> dict[str, np.ndarray]:
    """The inverse of `from_timm`: timm's state dict (names and layouts) as NumPy arrays.

    `timm.create_model(...).load_state_dict({k: torch.from_numpy(v) ...})` accepts it
    for the timm model with the same architecture. Arrays keep the parameters' dtype.
    """
    if not isinstance(model, ViT):
        raise TypeError(f"model must be a tome_jax.ViT, got {type(model).__name__}")
    flat = _flat_params(variables["params"])
    expected = _flat_params(_param_shapes(model))
    if set(flat) != set(expected):
        names = lambda paths: sorted("/".join(p) for p in paths)  # noqa: E731
        raise ValueError(
            f"variables do not belong to this model: missing {names(set(expected) - set(flat))}, "
            f"unexpected {names(set(flat) - set(expected))}"
        )
    return {
        _timm_key(path): np.array(np.asarray(value).transpose(_timm_axes(path, np.ndim(value))), order="C")
        for path, value in flat.items()
    }


# --- source layouts -> timm names --------------------------------------------------


class _Checkpoint(NamedTuple):
    """A checkpoint in timm's names and layouts.

    Attributes:
      arrays: timm key -> array; keys no layout rule recognised keep their own name
        (they are reported as unexpected).
      source_names: timm key -> the name(s) it was read from, where they differ.
      hints: ViT attributes the source states (num_heads, img_size, ...).
    """

    arrays: dict[str, np.ndarray]
    source_names: dict[str, str]
    hints: dict[str, Any]


# Each layout's names -> timm's: regex substitutions applied in order to every key.
_TIMM_RENAMES = (
    (r"\.gamma_([12])$", r".ls\1.gamma"),  # DeiT III's original checkpoints
)
_TORCHVISION_RENAMES = (
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."),
    (r"\.ln_([12])\.", r".norm\1."),
    (r"\.self_attention\.in_proj_(weight|bias)$", r".attn.qkv.\1"),
    (r"\.self_attention\.out_proj\.", ".attn.proj."),
    (r"\.mlp\.(0|linear_1)\.", ".mlp.fc1."),  # torchvision's current and legacy names
    (r"\.mlp\.(3|linear_2)\.", ".mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
)
# big_vision numbers the block's modules differently from AugReg; same tensors.
_BIG_VISION_RENAMES = (
    (r"^pos_embedding$", "Transformer/posembed_input/pos_embedding"),
    (
        r"^(Transformer/encoderblock_\d+)/MultiHeadDotProductAttention_0/",
        r"\1/MultiHeadDotProductAttention_1/",
    ),
    (r"^(Transformer/encoderblock_\d+)/LayerNorm_1/", r"\1/LayerNorm_2/"),
    (r"^(Transformer/encoderblock_\d+)/MlpBlock_0/", r"\1/MlpBlock_3/"),
)
# Where the parameters sit in a `.npz`; anything outside that prefix (optimizer
# state) is ignored.
_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def _rename(arrays: Mapping[str, np.ndarray], renames) -> tuple[dict, dict]:
    """Applies a layout's renames; returns (renamed arrays, new name -> old name)."""
    out, source_names = {}, {}
    for name, array in arrays.items():
        new = name
        for pattern, replacement in renames:
            new = re.sub(pattern, replacement, new)
        if new in out:
            raise ValueError(f"{name!r} and {source_names.get(new, new)!r} both map to {new!r}")
        out[new] = array
        if new != name:
            source_names[new] = name
    return out, source_names


def _same(x):
    return x


def _qkv_kernel(*kernels):
    """3 x [width, heads, head_dim] -> timm's fused [3 * width, width]."""
    return np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels])


def _qkv_bias(*biases):
    """3 x [heads, head_dim] -> [3 * width]."""
    return np.concatenate([b.reshape(-1) for b in biases])


def _out_kernel(kernel):
    """[heads, head_dim, width] -> timm's [width, heads * head_dim]."""
    return kernel.reshape(-1, kernel.shape[-1]).T


def _augreg_dense(timm_name: str, name: str, kernel=_kernel_to_timm) -> dict:
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
# timm key <- (AugReg names, how they combine into timm's tensor).
_AUGREG = {
    **_augreg_dense("patch_embed.proj", "embedding"),
    "cls_token": (("cls",), _same),
    "pos_embed": (("Transformer/posembed_input/pos_embedding",), _same),
    **_augreg_norm("norm", "Transformer/encoder_norm"),
    **_augreg_dense("head", "head"),
}
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
    return _rename(unstacked, _BIG_VISION_RENAMES)[0]


def _augreg_to_timm(arrays: Mapping[str, np.ndarray]) -> _Checkpoint:
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
    return _Checkpoint({**out, **left}, source_names, hints)


def _to_timm_layout(arrays: Mapping[str, np.ndarray], hints: dict[str, Any]) -> _Checkpoint:
    """Recognises the layout by its patch-embedding name and renames it into timm's."""
    if "patch_embed.proj.weight" in arrays:
        return _Checkpoint(*_rename(arrays, _TIMM_RENAMES), hints)
    if "conv_proj.weight" in arrays:
        return _Checkpoint(*_rename(arrays, _TORCHVISION_RENAMES), hints)
    if any(f"{p}embedding/kernel" in arrays for p in _NPZ_PREFIXES):
        checkpoint = _augreg_to_timm(arrays)
        return checkpoint._replace(hints={**checkpoint.hints, **hints})
    sample = ", ".join(sorted(arrays)[:8])
    raise ValueError(
        "unrecognised checkpoint layout: expected timm's 'patch_embed.proj.weight', "
        f"torchvision's 'conv_proj.weight' or Google's 'embedding/kernel'; got {sample}"
    )


# --- reading sources ---------------------------------------------------------------

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_FILE_SUFFIXES = (".safetensors", ".npz") + _TORCH_SUFFIXES
# Where training scripts nest the weights inside a torch checkpoint.
_NESTED_STATE_KEYS = ("model", "state_dict", "model_state")
# timm constructor arguments (metadata `config`) that no tensor reveals and that
# tome_jax.ViT does not implement, with the value ViT assumes.
_INVISIBLE_TIMM_OPTIONS = {
    "act_layer": None,
    "norm_layer": None,
    "block_fn": None,
    "attn_layer": None,
    "mlp_layer": None,
    "embed_layer": None,
    "pool_include_prefix": False,
    "final_norm": True,
}
# Attributes a `config` states that the tensors leave open.
_CONFIG_HINTS = ("num_heads", "img_size", "global_pool")


def _to_numpy(value) -> np.ndarray:
    """A torch tensor or array-like -> np.ndarray."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        # NumPy has no bfloat16.
        return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    return np.asarray(value)


def _state_dict_arrays(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwraps a training checkpoint to its weights, drops DDP's `module.` prefix."""
    for key in _NESTED_STATE_KEYS:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    not_arrays = [k for k, v in state.items() if not hasattr(v, "shape")]
    if not_arrays:
        raise ValueError(f"state dict entries {not_arrays[:8]} are not tensors")
    return {k: _to_numpy(v) for k, v in state.items()}


def _config_hints(config: Mapping[str, Any]) -> dict[str, Any]:
    """Hints from timm constructor arguments (a checkpoint's `config` metadata)."""
    unsupported = {
        k: config[k] for k, default in _INVISIBLE_TIMM_OPTIONS.items() if config.get(k, default) != default
    }
    if unsupported:
        raise ValueError(f"tome_jax.ViT does not implement the timm options {unsupported}")
    return {k: config[k] for k in _CONFIG_HINTS if k in config}


def _read_safetensors(path: pathlib.Path) -> _Checkpoint:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        arrays = load_file(path)
    except KeyError as error:  # a dtype NumPy lacks, e.g. BF16
        raise ValueError(
            f"{path}: safetensors cannot read dtype {error} into NumPy; load it with "
            "safetensors.torch and pass the state dict to from_timm"
        ) from None
    with safe_open(path, framework="numpy") as handle:
        metadata = handle.metadata() or {}
    hints = _config_hints(json.loads(metadata["config"])) if "config" in metadata else {}
    return _to_timm_layout(arrays, hints)


def _read_torch(path: pathlib.Path) -> _Checkpoint:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path.name} needs torch (pip install torch); .safetensors and .npz do not"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # objects beyond tensors and containers
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refused it ({error}). If you trust the "
            "file, load it yourself and pass the state dict to from_timm"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return _to_timm_layout(_state_dict_arrays(state), {})


def _read_file(path: pathlib.Path) -> _Checkpoint:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix == ".npz":
        with np.load(path) as npz:
            return _to_timm_layout(dict(npz), {})
    if suffix in _TORCH_SUFFIXES:
        return _read_torch(path)
    raise ValueError(f"{path}: unsupported checkpoint format {suffix!r}; expected {_FILE_SUFFIXES}")


def _unsupported_layers(model, activations) -> list[str]:
    """Activations other than exact GELU, LayerNorms with an eps other than 1e-6:
    what tome_jax.ViT computes, invisible in the tensors.

    activations: (name, module) pairs of the MLP activations.
    """
    import torch.nn as nn

    problems = [
        f"{name} is {act}, not exact GELU"
        for name, act in activations
        if not (isinstance(act, nn.GELU) and act.approximate == "none")
    ]
    return problems + [
        f"{name} has eps={m.eps}, not 1e-6"
        for name, m in model.named_modules()
        if isinstance(m, nn.LayerNorm) and m.eps != 1e-6
    ]


def _refuse_if(problems: list[str], kind: str):
    if problems:
        raise ValueError(f"tome_jax.ViT cannot run this {kind} model: {'; '.join(problems[:8])}")


def _timm_module_hints(model) -> dict[str, Any]:
    """What a timm VisionTransformer's tensors leave open; refuses what ViT cannot run."""
    problems = []
    if getattr(model, "num_reg_tokens", 0):
        problems.append(f"{model.num_reg_tokens} register tokens")
    if model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={model.global_pool!r}")
    if getattr(model, "pool_include_prefix", False):
        problems.append("pool_include_prefix=True")
    for i, block in enumerate(model.blocks):
        kinds = (type(block).__name__, type(block.attn).__name__, type(block.mlp).__name__)
        if kinds != ("Block", "Attention", "Mlp"):
            problems.append(f"blocks.{i} is {'/'.join(kinds)}, not timm's Block/Attention/Mlp")
    activations = [(f"blocks.{i}.mlp.act", getattr(b.mlp, "act", None)) for i, b in enumerate(model.blocks)]
    _refuse_if(problems + _unsupported_layers(model, activations), "timm")
    img_size = model.patch_embed.img_size
    return dict(
        num_heads=model.blocks[0].attn.num_heads,
        global_pool=model.global_pool,
        **({} if img_size is None else dict(img_size=tuple(img_size))),
    )


def _torchvision_module_hints(model) -> dict[str, Any]:
    """The same for torchvision's VisionTransformer (the layout SWAG ships in)."""
    layers = model.encoder.layers
    activations = [(f"encoder.layers.{i}.mlp.1", layer.mlp[1]) for i, layer in enumerate(layers)]
    _refuse_if(_unsupported_layers(model, activations), "torchvision")
    return dict(num_heads=layers[0].self_attention.num_heads, img_size=model.image_size)


def _read_module(model) -> _Checkpoint:
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        hints = _timm_module_hints(model)
    elif hasattr(model, "conv_proj") and hasattr(model, "encoder"):
        hints = _torchvision_module_hints(model)
    else:
        raise TypeError(f"{type(model).__name__} is neither timm's nor torchvision's VisionTransformer")
    return _to_timm_layout(_state_dict_arrays(model.state_dict()), hints)


def _is_timm_name(source) -> bool:
    """A string that names no file and does not look like a path."""
    if not isinstance(source, str) or pathlib.Path(source).exists():
        return False
    return os.sep not in source and not source.lower().endswith(_FILE_SUFFIXES)


def _read_source(source, pretrained: bool | None) -> _Checkpoint:
    if pretrained is not None and not _is_timm_name(source):
        raise TypeError("pretrained= only applies to a timm model name")
    if _is_timm_name(source):
        import timm

        model = timm.create_model(source, pretrained=True if pretrained is None else pretrained)
        return _read_module(model.eval())
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file at {path}")
        return _read_file(path)
    if isinstance(source, Mapping):
        return _to_timm_layout(_state_dict_arrays(source), {})
    if hasattr(source, "state_dict"):
        return _read_module(source)
    raise TypeError(
        "source must be a timm model name, a checkpoint path, a state dict or a timm/torchvision "
        f"VisionTransformer, got {type(source).__name__}"
    )


# --- architecture from tensors -----------------------------------------------------

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


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio with `int(width * ratio) == hidden`, as ViT's Mlp computes it."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _position_grid(
    pos_len: int, prefix: int, patch, stated, requested, steps: int = 1
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

    to_grid = lambda size: tuple(s // p for s, p in zip(pair(size), patch))  # noqa: E731
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


def _infer_config(checkpoint: _Checkpoint, overrides: Mapping[str, Any]):
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
    prefix = int(class_token) + int(distill_token)
    pos_len = _required(arrays, "pos_embed", 3).shape[1]
    grid, no_embed_class = _position_grid(
        pos_len, prefix, patch, checkpoint.hints.get("img_size"), overrides.get("img_size"), steps
    )
    fc_norm = has("fc_norm.weight")
    config = dict(
        num_classes=_required(arrays, "head.weight", 2).shape[0] if has("head.weight") else 0,
        img_size=tuple(g * p for g, p in zip(grid, patch)),
        patch_size=tuple(patch),
        in_chans=in_chans,
        **video,
        width=width,
        depth=depth,
        num_heads=_num_heads(width, hints),
        mlp_ratio=_mlp_ratio(width, _required(arrays, "blocks.0.mlp.fc1.weight", 2).shape[0]),
        qkv_bias=has("blocks.0.attn.qkv.bias"),
        qk_norm=has("blocks.0.attn.q_norm.weight"),
        class_token=class_token,
        distill_token=distill_token,
        global_pool="avg" if fc_norm or not class_token else "token",
        fc_norm=fc_norm,
        pre_norm=has("norm_pre.weight"),
        no_embed_class=no_embed_class,
        # Any value turns LayerScale on; the checkpoint's gamma replaces it.
        layer_scale_init=1e-5 if has("blocks.0.ls1.gamma") else None,
        # A DTEM export (to_timm_state_dict of a DTEM model) carries its metric layers.
        dtem=has("blocks.0.metric.weight"),
        dtem_dim=arrays["blocks.0.metric.weight"].shape[0] if has("blocks.0.metric.weight") else None,
    )
    if "global_pool" in checkpoint.hints:  # token or average pooling over a final `norm`
        config["global_pool"] = checkpoint.hints["global_pool"]
    return {**config, **overrides}, ((steps, *grid) if video else grid)


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


# --- the fit -----------------------------------------------------------------------


def _param_shapes(model: ViT):
    """The model's parameter tree as ShapeDtypeStructs (nothing is computed)."""
    images = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def _resample_weights(old: int, new: int) -> np.ndarray:
    """[new, old] interpolation matrix of torch's antialiased bicubic resize.

    PIL's scheme, which torch follows for `antialias=True`: the cubic kernel with
    a = -0.5, stretched by the scale when shrinking, truncated at the borders and
    renormalised; pixel centres at half-integers (align_corners=False).
    """
    scale = old / new
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    weights = np.zeros((new, old))
    for i in range(new):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), old)
        x = np.abs((np.arange(lo, hi) - centre + 0.5) / stretch)
        a = -0.5
        w = np.where(
            x < 1,
            ((a + 2) * x - (a + 3)) * x * x + 1,
            np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0),
        )
        weights[i, lo:hi] = w / w.sum()
    return weights


def resample_pos_embed(
    pos_embed: np.ndarray, new_grid, old_grid, num_prefix_tokens: int
) -> np.ndarray:
    """Resizes position embeddings to another patch grid, like timm's
    `resample_abs_pos_embed` (bicubic, antialiased); prefix positions are kept.

    Video grids add time: each axis is resized alike. An image grid is one step
    of time, so image embeddings resized to a video grid repeat in every step.

    Args:
      pos_embed: [1, num_prefix_tokens + prod(old_grid), width], grid positions
        flattened time first, then rows, then columns.
      new_grid, old_grid: (rows, columns) of patches, or (time, rows, columns).

    Returns:
      [1, num_prefix_tokens + prod(new_grid), width] in pos_embed's dtype.
    """
    old, new = _space_time(old_grid), _space_time(new_grid)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if grid.shape[1] != math.prod(old):
        given = "x".join(map(str, pair(old_grid)))
        raise ValueError(f"pos_embed has {grid.shape[1]} grid positions, not {given}={math.prod(old)}")
    grid = grid.reshape(*old, -1).astype(np.float64)
    weights = [_resample_weights(o, n) for o, n in zip(old, new)]
    resized = np.einsum("it,jh,kw,thwc->ijkc", *weights, grid)
    resized = resized.reshape(1, math.prod(new), -1).astype(pos_embed.dtype)
    return np.concatenate([prefix, resized], axis=1)


def _space_time(grid) -> tuple[int, int, int]:
    """A side, (rows, columns) or (time, rows, columns) -> (time, rows, columns)."""
    grid = pair(grid)
    return grid if len(grid) == 3 else (1, *grid)


def _fit_pos_embed(pos_embed: np.ndarray, model: ViT, old_grid) -> np.ndarray:
    if tuple(old_grid) == model.token_grid:
        return pos_embed
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    return resample_pos_embed(pos_embed, model.token_grid, old_grid, prefix)


# --- image checkpoints for video and audio models ---------------------------------

INFLATIONS = ("average", "central")


def _inflate_patch_kernel(kernel: np.ndarray, tubelet: int, inflation: str) -> np.ndarray:
    """An image patch kernel [width, c, ph, pw] -> a tubelet's [width, c, tubelet, ph, pw].

    "average" spreads it evenly over the tubelet's frames (I3D's inflation), so a
    still clip embeds exactly as its frame; "central" puts it on frame
    `tubelet // 2` and zeros on the others (ViViT's choice, which it found to
    fine-tune better), so a clip embeds as its tubelets' central frames.
    """
    if inflation == "average":
        return np.repeat(kernel[:, :, None] / tubelet, tubelet, axis=2)
    inflated = np.zeros((*kernel.shape[:2], tubelet, *kernel.shape[2:]), kernel.dtype)
    inflated[:, :, tubelet // 2] = kernel
    return inflated


def _fit_patch_embed(kernel: np.ndarray, model: ViT, inflation: str) -> np.ndarray:
    """An image checkpoint's patch kernel [width, c, ph, pw] -> the model's.

    For a one-channel model (spectrograms) the RGB kernels are summed, as AST and
    timm's `adapt_input_conv` do: a grey image replicated to RGB embeds exactly as
    the one-channel image does. For a video model the kernel is inflated to tubelets.
    """
    if model.in_chans == 1 and kernel.shape[1] == 3:
        kernel = kernel.sum(axis=1, keepdims=True)
    if model.num_frames is not None and kernel.ndim == 4:
        kernel = _inflate_patch_kernel(kernel, model.tubelet_size, inflation)
    return kernel


def _listing(title: str, lines: list[str], limit: int = 20) -> str:
    more = [f"  ... and {len(lines) - limit} more"] if len(lines) > limit else []
    return "\n".join([f"{title}:"] + [f"  {line}" for line in lines[:limit]] + more)


def _params_from_timm(checkpoint: _Checkpoint, model: ViT, old_grid, inflation: str) -> dict:
    """timm-named arrays -> the model's parameter tree, checking every name and shape."""
    left = dict(checkpoint.arrays)
    named = lambda key: (  # noqa: E731
        f"{key} (from {checkpoint.source_names[key]})" if key in checkpoint.source_names else key
    )
    params, missing, misshaped = {}, [], []
    for path, leaf in _flat_params(_param_shapes(model)).items():
        key = _timm_key(path)
        if key not in left and path[-2] == "metric":
            # DTEM's metric layers are not part of timm: a DTEM model built from
            # plain timm weights starts them fresh, ready for training.
            params[path] = _fresh_metric_param(path, leaf.shape, model, checkpoint.arrays)
            continue
        if key not in left:
            missing.append(named(key))
            continue
        value = left.pop(key)
        if key == "pos_embed":
            value = _fit_pos_embed(value, model, old_grid)
        elif key == "patch_embed.proj.weight":
            value = _fit_patch_embed(value, model, inflation)
        axes = _timm_axes(path, len(leaf.shape))
        expected = tuple(leaf.shape[a] for a in axes)
        if value.shape != expected:
            misshaped.append(f"{named(key)}: expected {expected}, got {tuple(value.shape)}")
            continue
        params[path] = jnp.asarray(value.transpose(np.argsort(axes)), model.param_dtype)
    unexpected = [checkpoint.source_names.get(k, k) for k in sorted(left)]
    problems = [
        _listing(title, lines)
        for title, lines in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if lines
    ]
    if problems:
        raise ValueError(f"the checkpoint does not fit {_describe(model)}:\n" + "\n".join(problems))
    return traverse_util.unflatten_dict(params)


def _fresh_metric_param(path: tuple[str, ...], shape, model: ViT, arrays) -> jax.Array:
    """A DTEM metric layer's kernel [width, metric_dim] or bias that starts as ToMe's metric.

    The keys are a linear map of the block's normalised input, the metric layer's
    own input, so their mean over heads is a [width, head_dim] layer: modular
    training starts from ToMe's merges rather than random ones (from random ones,
    390 steps on the bundled model still merged worse than ToMe). Features past
    head_dim start at zero, which leaves the cosine similarity as it is. With
    qk-norm the keys are not linear, and a metric narrower than a head cannot hold
    them: there Flax's Dense initialisation (LeCun normal, zero bias), seeded by
    the block, is used.
    """
    block = path[0].split("_")[1]
    width, head_dim = model.width, model.width // model.num_heads
    if model.qk_norm or shape[-1] < head_dim:
        if path[-1] == "bias":
            return jnp.zeros(shape, model.param_dtype)
        return jax.nn.initializers.lecun_normal()(jax.random.key(int(block)), shape, model.param_dtype)
    qkv = f"blocks.{block}.attn.qkv"
    if path[-1] == "bias":
        bias = arrays.get(f"{qkv}.bias")
        keys = np.zeros(width) if bias is None else np.asarray(bias)[width : 2 * width]
        mean = keys.reshape(model.num_heads, head_dim).mean(0)
    else:  # timm's qkv weight is [3 * width, width], keys in the middle third
        keys = np.asarray(arrays[f"{qkv}.weight"])[width : 2 * width]
        mean = keys.reshape(model.num_heads, head_dim, width).mean(0).T
    padding = [(0, 0)] * (mean.ndim - 1) + [(0, shape[-1] - head_dim)]
    return jnp.asarray(np.pad(mean, padding), model.param_dtype)


def _describe(model: ViT) -> str:
    fields = ("width", "depth", "num_heads", "patch_size", "img_size", "num_classes")
    if model.in_chans != 3:
        fields += ("in_chans",)
    if model.num_frames is not None:
        fields += ("num_frames", "tubelet_size")
    return "tome_jax.ViT(" + ", ".join(f"{f}={getattr(model, f)!r}" for f in fields) + ")"


def _with_metric_layers(checkpoint: _Checkpoint, path) -> _Checkpoint:
    """Adds DTEM metric layers saved by `save_metric_layers` to a base checkpoint."""
    from safetensors.numpy import load_file

    layers = load_file(pathlib.Path(path))
    foreign = sorted(k for k in layers if not re.fullmatch(r"blocks\.\d+\.metric\.(weight|bias)", k))
    if foreign:
        raise ValueError(f"{path} should hold DTEM metric layers only, but also holds {foreign[:5]}")
    clash = sorted(set(layers) & set(checkpoint.arrays))
    if clash:
        raise ValueError(f"the base checkpoint already has metric layers {clash[:5]}; pass one of the two")
    return checkpoint._replace(arrays={**checkpoint.arrays, **layers})


def save_metric_layers(model: ViT, variables, path) -> None:
    """Saves a DTEM model's metric layers alone (timm layout, safetensors), for
    `from_timm(base_source, metric_layers=path)`; the ViT itself is not repeated."""
    from safetensors.numpy import save_file

    if not model.dtem:
        raise ValueError("the model has no DTEM metric layers (dtem=False)")
    state = to_timm_state_dict(model, variables)
    layers = {k: v for k, v in state.items() if ".metric." in k}
    save_file(layers, str(path), metadata={"dtem_dim": str(model.metric_dim), "depth": str(model.depth)})


def from_timm(
    source,
    *,
    pretrained: bool | None = None,
    metric_layers=None,
    inflation: str = "average",
    checkpoint_img_size=None,
    **overrides,
) -> tuple[ViT, dict]:
    """A `tome_jax.ViT` and its variables from timm weights.

    Args:
      source: a timm model name ("vit_base_patch16_224.augreg_in21k_ft_in1k", weights
        downloaded by `timm.create_model(name, pretrained=True)`); a timm
        VisionTransformer / VisionTransformerDistilled or torchvision
        VisionTransformer module; a state dict; or a path to a `.safetensors`,
        `.pth`/`.pt`/`.bin`/`.ckpt` or `.npz` (AugReg / big_vision) checkpoint.
      pretrained: for a name only; False gives timm's random initialisation.
      metric_layers: a file from `save_metric_layers`: DTEM metric layers added to
        the weights of `source` (the model becomes a DTEM model).
      checkpoint_img_size: the image size the checkpoint was trained at, for files
        that do not say and whose position count fits more than one grid.
      inflation: how an image patch kernel becomes a video model's tubelet kernel,
        "average" or "central" (see `_inflate_patch_kernel`).
      **overrides: any `tome_jax.ViT` attribute, winning over what is inferred,
        e.g. `num_heads=16`, `dtype=jnp.bfloat16`, or `img_size=384`, which
        resamples the position embeddings (bicubic, as timm does). From an image
        checkpoint, `num_frames=` (with `tubelet_size=`) makes a video ViT: the
        patch kernel is inflated and the position embeddings resampled to the
        frame grid and repeated over time; `in_chans=1` a spectrogram ViT: the
        RGB patch kernels are summed. A video checkpoint needs `num_frames=`.

    Returns:
      (model, {"params": ...}), parameters in `model.param_dtype`.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped tensor (with
        expected and actual timm-layout shapes), or an architecture ViT lacks.
    """
    unknown = set(overrides) - set(ViT.__dataclass_fields__) - {"parent", "name"}
    if unknown:
        raise TypeError(f"unknown ViT attributes {sorted(unknown)}")
    if inflation not in INFLATIONS:
        raise ValueError(f"inflation must be one of {INFLATIONS}, got {inflation!r}")
    checkpoint = _read_source(source, pretrained)
    if checkpoint_img_size is not None:
        checkpoint = checkpoint._replace(hints={**checkpoint.hints, "img_size": checkpoint_img_size})
    if metric_layers is not None:
        checkpoint = _with_metric_layers(checkpoint, metric_layers)
    config, old_grid = _infer_config(checkpoint, overrides)
    model = ViT(**config)
    return model, {"params": _params_from_timm(checkpoint, model, old_grid, inflation)}


def pretrained_data_config(source) -> dict | None:
    """timm's preprocessing for a timm model name or module, else None.

    Returns a dict with `input_size` (channels, height, width), `mean`, `std`,
    `crop_pct`, `interpolation` and `crop_mode`, as `timm.data.resolve_data_config`.
    """
    if _is_timm_name(source):
        import timm.data
        import timm.models

        cfg = timm.models.get_pretrained_cfg(source)
        return None if cfg is None else timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    if hasattr(source, "pretrained_cfg") and hasattr(source, "patch_embed"):
        import timm.data

        return timm.data.resolve_model_data_config(source)
    return None
