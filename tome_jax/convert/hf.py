"""Hugging Face checkpoints into `tome_jax.ViT`, read without torch.

    model, variables = from_hf("google/vit-base-patch16-224")   # or a save_pretrained directory
    logits = model.apply(variables, images_nhwc, r=8)            # transformers' NCHW: x.transpose(0, 2, 3, 1)

A `save_pretrained` directory (config.json beside model.safetensors, or shards listed in
model.safetensors.index.json) is read with `safetensors.numpy`; a hub id is downloaded
first (`huggingface_hub.snapshot_download`, the `hf` extra). config.json's `model_type`
picks the layout (`hf_layouts.LAYOUTS`), which renames the tensors into timm's names;
from there the conversion is `from_timm`'s.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import numpy as np

from tome_jax.convert.hf_layouts import LAYOUTS
from tome_jax.convert.layouts import Checkpoint
from tome_jax.convert.params import check_overrides, model_from_checkpoint
from tome_jax.convert.readers import FILE_SUFFIXES, read_safetensors
from tome_jax.vit import ViT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# "owner/name", as the hub spells repositories.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# PIL's resampling filters (image processors' `resample`) -> `data.Preprocess.interpolation`.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def is_hf_source(source) -> bool:
    """A directory holding a config.json, or a string shaped like a hub id ("owner/name")
    that names no local path."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = pathlib.Path(source)
    if path.exists():
        return (path / CONFIG_FILE).is_file()
    return isinstance(source, str) and bool(_HUB_ID.fullmatch(source)) and not source.lower().endswith(FILE_SUFFIXES)


def hf_directory(source) -> pathlib.Path:
    """The local directory of a `save_pretrained` directory or a hub id (downloaded: its
    JSON and safetensors files only)."""
    path = pathlib.Path(source)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ValueError(f"{path} has no {CONFIG_FILE}: not a Hugging Face save_pretrained directory")
        return path
    if path.exists() or not _HUB_ID.fullmatch(str(source)):
        raise ValueError(f"{source}: neither a Hugging Face model directory nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(
            f"{source!r} is a Hugging Face hub id, which needs huggingface_hub: pip install 'tome_jax[hf]'"
        ) from None
    return pathlib.Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors"]))


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not JSON ({error})") from None


def read_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """A `save_pretrained` directory's tensors: one file, or the shards its index lists."""
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE)[0]
    if (directory / WEIGHTS_INDEX_FILE).is_file():
        shards = sorted(set(_read_json(directory / WEIGHTS_INDEX_FILE).get("weight_map", {}).values()))
        arrays = {}
        for shard in shards:
            arrays.update(read_safetensors(directory / shard)[0])
        return arrays
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".h5", ".msgpack"))
    found = f" (it has {', '.join(others)})" if others else ""
    raise ValueError(
        f"{directory} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}{found}; tome_jax reads safetensors: "
        "load the model with transformers and save_pretrained it again"
    )


def hf_checkpoint(source) -> Checkpoint:
    """A Hugging Face model directory or hub id -> its vision tower in timm's names, with hints."""
    directory = hf_directory(source)
    config = _read_json(directory / CONFIG_FILE)
    model_type = config.get("model_type")
    if model_type not in LAYOUTS:
        raise ValueError(
            f"{directory / CONFIG_FILE}: model_type {model_type!r} is not supported; tome_jax reads {sorted(LAYOUTS)}"
        )
    return LAYOUTS[model_type](config, read_weights(directory))


def from_hf(source, **overrides) -> tuple[ViT, dict]:
    """A `tome_jax.ViT` and its variables from a Hugging Face transformers checkpoint.

    `model.apply(variables, images, r=...)` gives what the transformers class returns:
    logits for a classifier, the projected embedding for a CLIP projection
    (get_image_features), the pooled output of a bare model (`hf_layouts` lists the
    classes). Images are NHWC (transformers takes NCHW: `x.transpose(0, 2, 3, 1)`).

    Args:
      source: a `save_pretrained` directory, or a hub id ("google/vit-base-patch16-224").
      **overrides: any `tome_jax.ViT` attribute, as for `from_timm` (e.g. `img_size=`
        resamples the position embeddings).

    Raises:
      ValueError: a model_type tome_jax does not read (naming those it does), or a
        checkpoint that does not fit (naming every missing, unexpected or mis-shaped tensor).
    """
    check_overrides(overrides)
    return model_from_checkpoint(hf_checkpoint(source), overrides)


def _size(value, key: str, path: pathlib.Path) -> tuple[int, int]:
    """An image processor's size: an int, {"height", "width"} or {"shortest_edge"} (square)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and {"height", "width"} <= set(value):
        return value["height"], value["width"]
    if isinstance(value, dict) and "shortest_edge" in value:
        return value["shortest_edge"], value["shortest_edge"]
    raise ValueError(f"{path}: {key} {value!r} is not a size tome_jax reads; pass the preprocessing yourself")


def hf_data_config(source) -> dict | None:
    """The preprocessing of a Hugging Face model's preprocessor_config.json, in timm's
    keys (`input_size`, `mean`, `std`, `crop_pct`, `interpolation`, `crop_mode`); None
    without that file.

    Resize then centre crop: `crop_pct` is the crop over the resized shorter side
    (a processor resizing to a fixed height and width is, for square images, the same).
    """
    path = hf_directory(source) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    processor = _read_json(path)
    resized = _size(processor.get("size", 224), "size", path) if processor.get("do_resize", True) else None
    crop = _size(processor["crop_size"], "crop_size", path) if processor.get("do_center_crop") else resized
    if crop is None:
        raise ValueError(f"{path}: neither resizes nor crops; pass the preprocessing yourself")
    resample = processor.get("resample", 3)
    if resample not in _RESAMPLE:
        raise ValueError(
            f"{path}: resample={resample} (a PIL filter) is none of {_RESAMPLE}; "
            "pass the preprocessing yourself (--config.preprocess=explicit, --config.interpolation)"
        )
    mean, std = processor.get("image_mean", (0.5,) * 3), processor.get("image_std", (0.5,) * 3)
    return {
        "input_size": (3, *crop),
        "mean": tuple(mean),
        "std": tuple(std),
        "crop_pct": min(crop) / min(resized) if resized else 1.0,
        "interpolation": _RESAMPLE[resample],
        "crop_mode": "center",
    }
