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


def _unreadable(path: pathlib.Path, kind: str, error: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable {kind} file (truncated, or another format): {error}")


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A .safetensors file's arrays and metadata; an unreadable file is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    try:
        arrays = load_file(path)
        with safe_open(path, framework="numpy") as handle:
            return arrays, handle.metadata() or {}
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


def _read_module(model) -> Checkpoint:
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        hints = _timm_module_hints(model)
    elif hasattr(model, "conv_proj") and hasattr(model, "encoder"):
        hints = _torchvision_module_hints(model)
    else:
        raise TypeError(f"{type(model).__name__} is neither timm's nor torchvision's VisionTransformer")
    return to_timm_layout(_state_dict_arrays(model.state_dict()), hints)


def is_timm_name(source) -> bool:
    """A string that names no file and does not look like a path."""
    if not isinstance(source, str) or pathlib.Path(source).exists():
        return False
    return os.sep not in source and not source.lower().endswith(_FILE_SUFFIXES)


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
        if not timm.is_model(source):
            raise ValueError(f"{source!r} is neither a checkpoint file nor a timm model name")
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
