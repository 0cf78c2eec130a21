"""timm's names and layouts <-> the Flax parameter tree of `tome_jax.ViT`.

One rule maps a Flax parameter path onto timm's key and tensor layout; reading a
checkpoint and `to_timm_state_dict` (the way back) both use it.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from tome_jax.vit import ViT, init_params, require_vit


# Flax module names that differ from timm's (`blocks_{i}` is matched by pattern).
_TIMM_MODULE = {"ls_1": "ls1", "ls_2": "ls2", "patch_embed": "patch_embed.proj"}
_TIMM_LEAF = {"kernel": "weight", "scale": "weight"}
# timm stores Linear kernels [out, in] and Conv2d kernels [out, in, h, w] (a video
# ViT's Conv3d tubelet embedding, as VideoMAE's: [out, in, t, h, w]); Flax (and
# Google's checkpoints) [in, out], [h, w, in, out] and [t, h, w, in, out].
_KERNEL_TO_TIMM_AXES = {2: (1, 0), 4: (3, 2, 0, 1), 5: (4, 3, 0, 1, 2)}


def timm_key(path: tuple[str, ...]) -> str:
    """Flax parameter path -> timm key: ('blocks_3', 'ls_1', 'gamma') -> 'blocks.3.ls1.gamma'."""
    *modules, leaf = path
    names = [_TIMM_MODULE.get(m, re.sub(r"^blocks_(\d+)$", r"blocks.\1", m)) for m in modules]
    return ".".join(names + [_TIMM_LEAF.get(leaf, leaf)])


def timm_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
    """The transpose taking a Flax parameter of rank `ndim` at `path` to timm's layout."""
    if path[-1] == "kernel":
        return _KERNEL_TO_TIMM_AXES[ndim]
    return tuple(range(ndim))


def kernel_to_timm(kernel: np.ndarray) -> np.ndarray:
    """[in, out] or [h, w, in, out] (Flax, JAX checkpoints) -> timm's [out, in(, h, w)]."""
    return kernel.transpose(_KERNEL_TO_TIMM_AXES[kernel.ndim])


def flat_params(params) -> dict[tuple[str, ...], Any]:
    """A parameter tree -> {path: leaf}, paths as tuples of module names."""
    return traverse_util.flatten_dict(dict(params))


def param_shapes(model: ViT):
    """The model's parameter tree as ShapeDtypeStructs (nothing is computed)."""
    return jax.eval_shape(lambda: init_params(model))


def to_timm_state_dict(model: ViT, variables) -> dict[str, np.ndarray]:
    """The inverse of `from_timm`: timm's state dict (names and layouts) as NumPy arrays.

    `timm.create_model(...).load_state_dict({k: torch.from_numpy(v) ...})` accepts it
    for the timm model with the same architecture. Arrays keep the parameters' dtype.
    """
    require_vit(model, "to_timm_state_dict")
    flat = flat_params(variables["params"])
    expected = flat_params(param_shapes(model))
    if set(flat) != set(expected):
        names = lambda paths: sorted("/".join(p) for p in paths)  # noqa: E731
        raise ValueError(
            f"variables do not belong to this model: missing {names(set(expected) - set(flat))}, "
            f"unexpected {names(set(flat) - set(expected))}"
        )
    return {
        timm_key(path): np.array(np.asarray(value).transpose(timm_axes(path, np.ndim(value))), order="C")
        for path, value in flat.items()
    }
