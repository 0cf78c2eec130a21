"""timm-named arrays -> the model's parameter tree, and DTEM's metric layers.

Every name and shape is checked against the model; DTEM metric layers missing from
a plain timm checkpoint start as ToMe's metric.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tome_jax.convert.infer import infer_config
from tome_jax.convert.layouts import Checkpoint
from tome_jax.convert.names import flat_params, param_shapes, timm_axes, timm_key
from tome_jax.convert.readers import read_safetensors
from tome_jax.convert.resample import fit_patch_embed, fit_pos_embed
from tome_jax.reduce.dtem import metric_layers_file
from tome_jax.vit import ViT


def _listing(title: str, lines: list[str], limit: int = 20) -> str:
    more = [f"  ... and {len(lines) - limit} more"] if len(lines) > limit else []
    return "\n".join([f"{title}:"] + [f"  {line}" for line in lines[:limit]] + more)


def check_overrides(overrides) -> None:
    """Keyword overrides must name `tome_jax.ViT` attributes."""
    unknown = set(overrides) - set(ViT.__dataclass_fields__) - {"parent", "name"}
    if unknown:
        raise TypeError(f"unknown ViT attributes {sorted(unknown)}")


def model_from_checkpoint(checkpoint: Checkpoint, overrides, inflation: str = "average") -> tuple[ViT, dict]:
    """The ViT a timm-named checkpoint holds (its attributes inferred, `overrides` winning) and its variables."""
    config, old_grid = infer_config(checkpoint, overrides)
    model = ViT(**config)
    return model, {"params": params_from_timm(checkpoint, model, old_grid, inflation)}


def params_from_timm(checkpoint: Checkpoint, model: ViT, old_grid, inflation: str) -> dict:
    """timm-named arrays -> the model's parameter tree, checking every name and shape."""
    left = dict(checkpoint.arrays)
    source_name = lambda key: checkpoint.source_names.get(key) or checkpoint.name_in_source(key)  # noqa: E731
    named = lambda key: key if source_name(key) == key else f"{key} (from {source_name(key)})"  # noqa: E731
    params, missing, misshaped = {}, [], []
    for path, leaf in flat_params(param_shapes(model)).items():
        key = timm_key(path)
        if key not in left and path[-2] == "metric":
            # DTEM's metric layers are not part of timm: a DTEM model built from
            # plain timm weights starts them fresh, ready for training.
            params[path] = _fresh_metric_param(path, leaf.shape, model, checkpoint.arrays)
            continue
        if key not in left and path[-1] in ("diffrate_prune", "diffrate_merge"):
            # A DiffRate search's rate logits are not part of timm: they start uniform.
            params[path] = jnp.zeros(leaf.shape, jnp.float32)
            continue
        if key not in left:
            missing.append(named(key))
            continue
        value = left.pop(key)
        if key == "pos_embed":
            value = fit_pos_embed(value, model, old_grid, checkpoint.hints.get("fixed_pos_embed"))
        elif key == "patch_embed.proj.weight":
            value = fit_patch_embed(value, model, inflation)
        axes = timm_axes(path, len(leaf.shape))
        expected = tuple(leaf.shape[a] for a in axes)
        if value.shape != expected:
            misshaped.append(f"{named(key)}: expected {expected}, got {tuple(value.shape)}")
            continue
        params[path] = jnp.asarray(value.transpose(np.argsort(axes)), model.param_dtype)
    metric_layers = [k for k in left if re.fullmatch(r"blocks\.\d+\.metric\.(weight|bias)", k)]
    unexpected = [checkpoint.source_names.get(k, k) for k in sorted(left) if k not in metric_layers]
    problems = [
        _listing(title, lines)
        for title, lines in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if lines
    ]
    if metric_layers:  # first (on the first line when alone): it is the likely fix
        problems.insert(0, "it carries DTEM metric layers (blocks.*.metric) but the model's reduction is not "
                        "DTEM: build it with reduction=reduce.DTEM() (eval.py: --config.method=dtem)")
    if problems:
        separator = " " if len(problems) == 1 and metric_layers else "\n"
        raise ValueError(f"the checkpoint does not fit {_describe(model)}:{separator}" + "\n".join(problems))
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


def with_metric_layers(checkpoint: Checkpoint, path) -> Checkpoint:
    """Adds DTEM metric layers saved by `save_metric_layers` to a base checkpoint."""
    layers, _ = read_safetensors(path)
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
    if "metric" not in variables["params"].get("blocks_0", {}):
        raise ValueError("the model has no DTEM metric layers (its reduction is not reduce.DTEM)")
    pathlib.Path(path).write_bytes(metric_layers_file(variables["params"], model.depth))
