"""Weights from timm, and from the layouts timm reads, into `tome_jax.ViT`.

    model, variables = from_timm("vit_base_patch16_224.augreg_in21k_ft_in1k")
    apply = jax.jit(model.apply, static_argnames="r")
    logits = apply(variables, images_nhwc, r=13)

Sources: a timm model name (weights downloaded by timm), a timm or torchvision
ViT module, a state dict (a mapping of names to arrays: timm's, torchvision's, or
OpenAI CLIP's / OpenCLIP's visual tower), or a checkpoint file: `.safetensors`
(read without torch), `.pth`/`.pt`/`.bin` (torch state dicts), `.npz` (Google's
AugReg and big_vision layouts, SigLIP's image tower). Every layout is first
renamed into timm's names and tensor layouts; one rule then maps timm names onto
the Flax parameter tree, in both directions (`to_timm_state_dict` is the way back).

The architecture is read from the tensors. What they cannot tell (`num_heads`, a
non-square patch grid, token versus average pooling when there is no `fc_norm`,
the activation, the LayerNorm epsilon) comes from the model name, the module, the
layout or the checkpoint's metadata, else from keyword overrides, which win over
everything; where timm's own models differ on it (CLIP's activation, SigLIP's),
a checkpoint that does not say is an error naming the override.

torch and timm are imported only when a source needs them.

Hugging Face transformers checkpoints (a `save_pretrained` directory or a hub id) are
`from_hf`'s (`hf`): each `model_type` is one more layout (`hf_layouts`) into timm's names.

The modules, in the order a conversion runs: `readers` (a source -> a
`layouts.Checkpoint` in timm's names; `hf` for Hugging Face's), `infer` (the ViT
attributes), `resample` (position embeddings and patch kernels fitted to the model),
`params` (the parameter tree, checked), with `names` (timm names <-> Flax paths) under
them all.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from tome_jax.convert.hf import from_hf, hf_data_config, is_hf_source
from tome_jax.convert.names import to_timm_state_dict
from tome_jax.convert.params import check_overrides, model_from_checkpoint, save_metric_layers, with_metric_layers
from tome_jax.convert.readers import CONFIG_HINTS, import_timm, is_timm_name, read_source, safetensors_metadata
from tome_jax.convert.resample import INFLATIONS, resample_pos_embed
from tome_jax.layers import pair
from tome_jax.vit import ViT

__all__ = [
    "INFLATIONS",
    "from_hf",
    "from_timm",
    "is_hf_source",
    "pretrained_data_config",
    "resample_pos_embed",
    "save_checkpoint",
    "save_metric_layers",
    "to_timm_state_dict",
]


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
        VisionTransformer module; a state dict (timm's, torchvision's, or OpenAI
        CLIP's visual tower, with or without its `visual.` prefix); or a path to a
        `.safetensors`, `.pth`/`.pt`/`.bin`/`.ckpt` or `.npz` (AugReg / big_vision /
        SigLIP) checkpoint.
      pretrained: for a name only; False gives timm's random initialisation.
      metric_layers: a file from `save_metric_layers`: DTEM metric layers added to
        the weights of `source` (the model becomes a DTEM model).
      checkpoint_img_size: the image size the checkpoint was trained at, for files
        that do not say and whose position count fits more than one grid.
      inflation: how an image patch kernel becomes a video model's tubelet kernel,
        "average" or "central" (see `resample._inflate_patch_kernel`).
      **overrides: any `tome_jax.ViT` attribute, winning over what is inferred,
        e.g. `num_heads=16`, `act_layer="quick_gelu"`, `norm_eps=1e-5`,
        `dtype=jnp.bfloat16`, or `img_size=384`, which
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
    check_overrides(overrides)
    if inflation not in INFLATIONS:
        raise ValueError(f"inflation must be one of {INFLATIONS}, got {inflation!r}")
    checkpoint = read_source(source, pretrained)
    if checkpoint_img_size is not None:
        checkpoint = checkpoint._replace(hints={**checkpoint.hints, "img_size": checkpoint_img_size})
    if metric_layers is not None:
        checkpoint = with_metric_layers(checkpoint, metric_layers)
    return model_from_checkpoint(checkpoint, overrides, inflation)


# What a ViT is computed with, not what it is: a checkpoint does not hold these.
_HOW_IT_RUNS = {
    "parent", "name", "dtype", "param_dtype", "attn_implementation", "merge_implementation", "reduction",
    "token_fields", "rope_position", "rope_metric", "drop_path_rate",
}  # fmt: skip


def save_checkpoint(model: ViT, variables, path, **metadata) -> pathlib.Path:
    """Writes `variables` to a `.safetensors` file that `from_timm(path)` reads back as `model`.

    The tensors are `to_timm_state_dict`'s (timm's names and layouts); the metadata holds
    `config`, the attributes no tensor shows (as timm's hub files hold them, with the
    rotary embedding as a `rope` object), and `metadata`, each value a string or written
    as JSON (`pretrained_cfg={"mean": ..., "std": ...}` makes `pretrained_data_config`
    and `eval.py` find the preprocessing).

    The file is read back before it is kept: an architecture that does not survive the
    round trip is a ValueError naming the attributes that differ, and no file is left.
    """
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: save_checkpoint writes .safetensors files; name it {path.stem}.safetensors")
    config = {key: getattr(model, key) for key in CONFIG_HINTS}
    if model.rope is not None:
        config["rope"] = dataclasses.asdict(model.rope)
    entries = {"config": config, **metadata}
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in entries.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_timm_state_dict(model, variables), path, metadata=strings)
    read_back, _ = from_timm(path)
    # 32 and (32, 32) are one image size.
    sizes = ("img_size", "patch_size", "patch_stride")
    same = lambda key, a, b: pair(a) == pair(b) if key in sizes and a is not None else a == b  # noqa: E731
    differ = {
        key: (getattr(model, key), getattr(read_back, key))
        for key in ViT.__dataclass_fields__
        if key not in _HOW_IT_RUNS and not same(key, getattr(model, key), getattr(read_back, key))
    }
    if differ:
        path.unlink()
        raise ValueError(f"{path}: this model does not survive a checkpoint (saved, read back): {differ}")
    return path


# The preprocessing keys of timm's pretrained config.
_DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")


def pretrained_data_config(source) -> dict | None:
    """The preprocessing a checkpoint expects, else None.

    For a timm model name or module: timm's pretrained config, a dict with
    `input_size` (channels, height, width), `mean`, `std`, `crop_pct`,
    `interpolation` and `crop_mode`, as `timm.data.resolve_data_config`. For a
    `.safetensors` file: its `pretrained_cfg` metadata entry (a JSON object with
    at least `mean` and `std`, timm's keys), those keys. For a Hugging Face model
    directory or hub id: its preprocessor_config.json (`hf.hf_data_config`). Other files say nothing:
    pass the family's values yourself (docs/models.md, Pretrained weights).
    """
    if is_hf_source(source):
        return hf_data_config(source)
    path = pathlib.Path(source) if isinstance(source, (str, pathlib.PurePath)) else None
    if path is not None and path.suffix == ".safetensors" and path.is_file():
        entry = safetensors_metadata(path).get("pretrained_cfg")
        if entry is None:
            return None
        try:
            cfg = json.loads(entry)
        except ValueError as error:
            raise ValueError(
                f"{path}: its pretrained_cfg metadata is not JSON ({error}); rewrite it, or remove it and "
                "pass the preprocessing yourself (--config.preprocess=explicit, --config.mean, --config.std)"
            ) from None
        if not isinstance(cfg, dict) or "mean" not in cfg or "std" not in cfg:
            got = sorted(cfg) if isinstance(cfg, dict) else repr(cfg)
            raise ValueError(f"{path}: the pretrained_cfg metadata needs 'mean' and 'std', got {got}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in _DATA_CONFIG_KEYS}
    if is_timm_name(source):
        import_timm(source)
        import timm.data
        import timm.models

        cfg = timm.models.get_pretrained_cfg(source)
        return None if cfg is None else timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    if hasattr(source, "pretrained_cfg") and hasattr(source, "patch_embed"):
        import timm.data

        return timm.data.resolve_model_data_config(source)
    return None
