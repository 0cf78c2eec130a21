"""Reading a source (timm name, module, state dict or file) into a `Checkpoint`.

torch, timm and safetensors are imported inside the functions that need them, so
`.npz` files and state dicts of NumPy arrays are read without them.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

from tome_jax.convert.layouts import Checkpoint, to_timm_layout
from tome_jax.layers import ACTIVATIONS
from tome_jax.registry import did_you_mean
from tome_jax.rope import Rope


_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
FILE_SUFFIXES = (".safetensors", ".npz") + _TORCH_SUFFIXES
# Where training scripts nest the weights inside a torch checkpoint.
_NESTED_STATE_KEYS = ("model", "state_dict", "model_state")
# timm constructor arguments (metadata `config`) that no tensor reveals and that
# tome_jax.ViT does not implement, with the value ViT assumes.
_INVISIBLE_TIMM_OPTIONS = {
    "norm_layer": None,
    "block_fn": None,
    "attn_layer": None,
    "mlp_layer": None,
    "embed_layer": None,
    "final_norm": True,
}
# Attributes a `config` states that the tensors leave open: timm's constructor
# arguments, and `norm_eps` (timm's `norm_layer` is a class, not JSON); `rope` (a JSON
# object of `rope.Rope`'s fields) is tome_jax's own, as timm's hub files give no rotary kind.
CONFIG_HINTS = (
    "num_heads", "img_size", "global_pool", "act_layer", "norm_eps", "pool_include_prefix", "head_act",
    "patch_stride", "fbank_input", "token_norm", "fc_norm_eps",
)  # fmt: skip
# timm's activation modules by class name -> `ViT.act_layer` (nn.GELU by its `approximate`).
_ACTIVATION_NAMES = {
    "GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "Swish": "silu"
}


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
    if config.get("act_layer", "gelu") not in ACTIVATIONS:
        unsupported["act_layer"] = config["act_layer"]
    if unsupported:
        raise ValueError(f"tome_jax.ViT does not implement the timm options {unsupported}")
    hints = {k: config[k] for k in CONFIG_HINTS if k in config}
    if "rope" in config:
        try:
            hints["rope"] = Rope(**config["rope"])
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"the checkpoint's config metadata holds a rope that is not a tome_jax.rope.Rope "
                f"({config['rope']!r}: {error}); fix it, or pass rope=tome_jax.rope.Rope(...)"
            ) from None
    return hints


def _unreadable(path: pathlib.Path, kind: str, error: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable {kind} file (truncated, or another format): {error}")


def safetensors_metadata(path) -> dict[str, str]:
    """A `.safetensors` file's metadata (string keys and values), read without its
    tensors; an unreadable file is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise _unreadable(pathlib.Path(path), "safetensors", error) from None


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A .safetensors file's arrays and metadata; an unreadable file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    metadata = safetensors_metadata(path)
    try:
        return load_file(path), metadata
    except KeyError as error:  # a dtype NumPy lacks, e.g. BF16
        raise ValueError(
            f"{path}: safetensors cannot read dtype {error} into NumPy; load it with "
            "safetensors.torch and pass the state dict to from_timm"
        ) from None
    except (SafetensorError, OSError) as error:
        raise _unreadable(path, "safetensors", error) from None


def _read_safetensors(path: pathlib.Path) -> Checkpoint:
    arrays, metadata = read_safetensors(path)
    try:
        config = json.loads(metadata["config"]) if "config" in metadata else {}
    except ValueError as error:
        raise _unreadable(path, "safetensors", f"its config metadata is not JSON ({error})") from None
    return to_timm_layout(arrays, _config_hints(config))


def _read_npz(path: pathlib.Path) -> Checkpoint:
    try:
        with np.load(path) as npz:
            arrays = dict(npz)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # ValueError: not a zip
        raise _unreadable(path, ".npz", error) from None
    return to_timm_layout(arrays, {})


def _read_torch(path: pathlib.Path) -> Checkpoint:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path.name} needs torch: pip install 'tome_jax[torch]' (.safetensors and .npz do not)"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # objects beyond tensors and containers, or no pickle
        reason = next((line for line in str(error).splitlines() if "Unpickler error" in line), str(error))
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refused it ({reason.strip()}). If it is a "
            "checkpoint you trust, load it yourself and pass the state dict to from_timm"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:  # RuntimeError: a broken zip archive
        raise _unreadable(path, "torch", error) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return to_timm_layout(_state_dict_arrays(state), {})


def _read_file(path: pathlib.Path) -> Checkpoint:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix == ".npz":
        return _read_npz(path)
    if suffix in _TORCH_SUFFIXES:
        return _read_torch(path)
    raise ValueError(f"{path}: unsupported checkpoint format {suffix!r}; expected {FILE_SUFFIXES}")


def _activation_name(act) -> str | None:
    """A torch activation module -> its `ViT.act_layer` name, None if ViT lacks it."""
    if type(act).__name__ == "GELU" and getattr(act, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return _ACTIVATION_NAMES.get(type(act).__name__)


def _layer_hints(model, activations, problems: list[str], kind: str) -> dict[str, Any]:
    """The activation and LayerNorm epsilon a module computes, invisible in its
    tensors; refuses (with `problems` found before) what ViT cannot run.

    activations: (name, module) pairs of every activation, the MLPs' and the head's.
    """
    import torch.nn as nn

    acts = {name: _activation_name(act) for name, act in activations}
    problems = problems + [
        f"{name} is {type(act).__name__}, not one of {sorted(ACTIVATIONS)}"
        for name, act in activations
        if acts[name] is None
    ]
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(set(acts.values())) > 1:
        problems.append(f"the MLPs mix activations {sorted(set(acts.values()))}")
    if len(eps) > 1:
        problems.append(f"the LayerNorms mix epsilons {sorted(eps)}")
    if problems:
        raise ValueError(f"tome_jax.ViT cannot run this {kind} model: {'; '.join(problems[:8])}")
    return dict(act_layer=next(iter(acts.values())), **({"norm_eps": eps.pop()} if eps else {}))


def _map_head_problems(model) -> list[str]:
    """What in timm's AttentionPoolLatent differs from SigLIP's MAP head (`layers.AttentionPool`)."""
    pool = model.attn_pool
    if type(pool).__name__ != "AttentionPoolLatent":
        return [f"attn_pool is {type(pool).__name__}, not AttentionPoolLatent"]
    checks = {
        "one latent query": pool.latent_len == 1,
        "no position embedding": pool.pos_embed is None,
        "token pooling": pool.pool == "token",
        "a query projection": type(pool.q).__name__ == "Linear",
        "no qk-norm": type(pool.q_norm).__name__ == "Identity",
        "an MLP": type(pool.mlp).__name__ == "Mlp",
    }
    return [f"attn_pool lacks {what}" for what, holds in checks.items() if not holds]


def _timm_module_hints(model) -> dict[str, Any]:
    """What a timm VisionTransformer's tensors leave open; refuses what ViT cannot run."""
    problems = []
    if model.global_pool not in ("token", "avg", "map"):
        problems.append(f"global_pool={model.global_pool!r}")
    if getattr(model, "pool_include_prefix", False) and model.global_pool != "map":
        problems.append(f"pool_include_prefix=True with global_pool={model.global_pool!r}")
    activations = []
    for i, block in enumerate(model.blocks):
        kinds = (type(block).__name__, type(block.attn).__name__, type(block.mlp).__name__)
        if kinds[:2] != ("Block", "Attention") or kinds[2] not in ("Mlp", "GluMlp", "SwiGLU"):
            problems.append(
                f"blocks.{i} is {'/'.join(kinds)}, not timm's Block/Attention/Mlp, GluMlp or SwiGLU"
            )
        elif kinds[2] == "GluMlp" and block.mlp.gate_last:
            problems.append(
                f"blocks.{i}.mlp is a GluMlp gating its second half (gate_last=True), not SwiGLUPacked"
            )
        activations.append((f"blocks.{i}.mlp.act", block.mlp.act))
    if model.global_pool == "map":
        problems += _map_head_problems(model)
        activations.append(("attn_pool.mlp.act", model.attn_pool.mlp.act))
    hints = _layer_hints(model, activations, problems, "timm")
    img_size = model.patch_embed.img_size
    if model.global_pool == "map":
        hints.update(pool_num_heads=model.attn_pool.num_heads, pool_include_prefix=model.pool_include_prefix)
    return dict(
        num_heads=model.blocks[0].attn.num_heads,
        global_pool=model.global_pool,
        **hints,
        **({} if img_size is None else dict(img_size=tuple(img_size))),
    )


# timm's rotary embedding classes -> `rope.Rope.kind`.
_ROPE_KINDS = {"RotaryEmbeddingCat": "cat", "RotaryEmbeddingDinoV3": "dinov3", "RotaryEmbeddingMixed": "mixed"}


def _rope_hint(model, problems: list[str]) -> Rope | None:
    """The rotary embedding of a timm Eva model as a `rope.Rope`, None without one."""
    module = model.rope
    if module is None:
        return None
    kind = _ROPE_KINDS.get(type(module).__name__)
    if kind is None:
        problems.append(f"rope is {type(module).__name__}, not one of {sorted(_ROPE_KINDS)}")
        return None
    unsupported = {
        "pixel grids": kind == "cat" and (module.in_pixels or module.grid_type != "index"),
        "normalize_coords other than 'separate'": getattr(module, "normalize_coords", "separate") != "separate",
        "min/max periods": getattr(module, "min_period", None) is not None,
    }
    problems += [f"rope uses {what}" for what, uses in unsupported.items() if uses]
    ref = getattr(module, "ref_feat_shape", None)
    return Rope(
        kind=kind,
        temperature=float(module.temperature),
        ref_feat_shape=None if ref is None else tuple(ref),
        grid_offset=float(getattr(module, "grid_offset", 0.0)),
        grid_indexing=module.grid_indexing,
        half=bool(model.blocks[0].attn.rotate_half),
    )


def _eva_module_hints(model) -> dict[str, Any]:
    """What a timm Eva model (EVA02, DINOv3, PE, RoPE-ViT) leaves open; refuses what ViT cannot run."""
    problems, activations = [], []
    if model.global_pool not in ("token", "avg", "map"):
        problems.append(f"global_pool={model.global_pool!r}")
    for i, block in enumerate(model.blocks):
        attn, kinds = block.attn, (type(block).__name__, type(block.attn).__name__, type(block.mlp).__name__)
        if kinds[:2] not in (("EvaBlock", "EvaAttention"), ("EvaBlock", "AttentionRope")):
            problems.append(f"blocks.{i} is {'/'.join(kinds[:2])}, not timm's EvaBlock/EvaAttention or AttentionRope")
        elif attn.gate is not None or getattr(attn, "num_kv_groups", 1) != 1:
            problems.append(f"blocks.{i}.attn has a gate or grouped key/value heads")
        elif attn.head_dim * attn.num_heads != model.embed_dim:
            problems.append(f"blocks.{i}.attn has heads of {attn.head_dim}, not width / num_heads")
        if (block.gamma_1 is None) != (block.gamma_2 is None):
            problems.append(f"blocks.{i} scales one residual branch only (attn_only_layer_scale)")
        activations.append((f"blocks.{i}.mlp.act", block.mlp.act))
    if model.global_pool == "map":
        problems += _map_head_problems(model)
        activations.append(("attn_pool.mlp.act", model.attn_pool.mlp.act))
    rope = _rope_hint(model, problems)
    hints = _layer_hints(model, activations, problems, "timm Eva")
    # Eva's MAP head reads every token, the prefix ones too.
    pool = dict(pool_num_heads=model.attn_pool.num_heads, pool_include_prefix=True) if model.global_pool == "map" else {}
    return dict(
        num_heads=model.blocks[0].attn.num_heads,
        global_pool=model.global_pool,
        img_size=tuple(model.patch_embed.img_size),
        **({"rope": rope} if rope is not None else {}),
        **pool,
        **hints,
    )


def _torchvision_module_hints(model) -> dict[str, Any]:
    """The same for torchvision's VisionTransformer (the layout SWAG ships in)."""
    layers = model.encoder.layers
    activations = [(f"encoder.layers.{i}.mlp.1", layer.mlp[1]) for i, layer in enumerate(layers)]
    hints = _layer_hints(model, activations, [], "torchvision")
    return dict(num_heads=layers[0].self_attention.num_heads, img_size=model.image_size, **hints)


def _read_module(model) -> Checkpoint:
    if type(model).__name__ == "Eva":
        hints = _eva_module_hints(model)
    elif hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        hints = _timm_module_hints(model)
    elif hasattr(model, "conv_proj") and hasattr(model, "encoder"):
        hints = _torchvision_module_hints(model)
    else:
        raise TypeError(f"{type(model).__name__} is neither timm's VisionTransformer or Eva nor torchvision's ViT")
    return to_timm_layout(_state_dict_arrays(model.state_dict()), hints)


def is_timm_name(source) -> bool:
    """A string that names no file and does not look like a path."""
    if not isinstance(source, str) or pathlib.Path(source).exists():
        return False
    return os.sep not in source and not source.lower().endswith(FILE_SUFFIXES)


def import_timm(source: str):
    """timm, or an ImportError that says how to install it."""
    try:
        import timm
    except ImportError:
        raise ImportError(
            f"{source!r} is a timm model name, which needs timm and torch: pip install 'tome_jax[torch]'"
        ) from None
    return timm


def read_source(source, pretrained: bool | None) -> Checkpoint:
    """Any source `from_timm` takes (see there) -> its arrays in timm's layout, with hints."""
    if pretrained is not None and not is_timm_name(source):
        raise TypeError("pretrained= only applies to a timm model name")
    if is_timm_name(source):
        timm = import_timm(source)
        known = timm.list_models(pretrained="." in source)  # with a tag: the names with their tags
        if source not in known:
            hint = did_you_mean(source, known)
            raise ValueError(f"{source!r} is neither a checkpoint file nor a timm model name{'; ' + hint if hint else ''}")
        model = timm.create_model(source, pretrained=True if pretrained is None else pretrained)
        return _read_module(model.eval())
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file at {path}")
        return _read_file(path)
    if isinstance(source, Mapping):
        return to_timm_layout(_state_dict_arrays(source), {})
    if hasattr(source, "state_dict"):
        return _read_module(source)
    raise TypeError(
        "source must be a timm model name, a checkpoint path, a state dict or a timm/torchvision "
        f"VisionTransformer, got {type(source).__name__}"
    )
