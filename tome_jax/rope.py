"""Rotary position embeddings (RoPE) computed from each token's coordinate, so positions can merge.

timm's rotary ViTs (its `Eva` class: EVA02, DINOv3, PE, RoPE-ViT) rotate queries and keys by
angles computed from each patch's grid coordinate. Every kind timm has for 2-D grids is linear
in the coordinate: the angles of a token at `c` (2 floats) are `c @ F`, with `F` [2, head_dim / 2]
the kind's frequencies (per head and block for RoPE-Mixed, learned). So a merged token, whose
coordinate is a size-weighted mean or its receiver's (`tome_jax.tokens`), has a well-defined
rotation, and at r = 0 this is timm exactly.

    coords = grid_coordinates(Rope("cat", ref_feat_shape=(16, 16)), (16, 16))   # [256, 2]
    angles = rotation_angles(coords[None], fixed_frequencies(Rope("cat"), 64))  # [1, 1, 256, 32]
    q = rotate(q, angles, half=False)                                           # [batch, 256, heads, 64]

Prefix tokens (class, registers) have the coordinate 0 and so an angle of 0: they are never
rotated, as in timm.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("cat", "dinov3", "mixed")
# How a merged token's position follows a merge (`ViT.rope_position`): the size-weighted mean of
# the merged coordinates, or the receiving token's own.
POSITION_RULES = ("mean", "dest")
# Which keys the merge metric averages (`ViT.rope_metric`): before rotation (content) or after.
METRICS = ("pre", "post")
# The per-token field the coordinates travel in (`tome_jax.tokens`).
POSITION_FIELD = "position"


@dataclasses.dataclass(frozen=True)
class Rope:
    """A rotary kind and its settings, as timm's `Eva` takes them (hashable: a `ViT` attribute).

    Attributes:
      kind: "cat" (timm's RotaryEmbeddingCat: EVA02, PE, RoPE-ViT axial), "dinov3" (cell centres
        normalised to [-1, 1], periods from the temperature) or "mixed" (RoPE-Mixed: learned
        frequencies per block and head).
      temperature: timm's `rope_temperature`.
      ref_feat_shape: "cat" only: the grid the frequencies were trained at; coordinates are
        scaled to it (EVA's rule for other image sizes). None: no scaling.
      grid_offset: added to each grid index ("cat", "dinov3").
      grid_indexing: "ij" (coordinate 0 is the row) or "xy" (coordinate 0 is the column).
      half: the "rotate half" layout (DINOv3's); else the interleaved one.
    """

    kind: str = "cat"
    temperature: float = 10000.0
    ref_feat_shape: tuple[int, int] | None = None
    grid_offset: float = 0.0
    grid_indexing: str = "ij"
    half: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rope kind must be one of {KINDS}, got {self.kind!r}")
        if self.grid_indexing not in ("ij", "xy"):
            raise ValueError(f"grid_indexing must be 'ij' or 'xy', got {self.grid_indexing!r}")
        if self.kind == "mixed" and self.half:
            raise ValueError("RoPE-Mixed uses the interleaved layout (half=False), as timm")
        if self.ref_feat_shape is not None:
            object.__setattr__(self, "ref_feat_shape", tuple(int(s) for s in self.ref_feat_shape))


def grid_coordinates(rope: Rope, grid: tuple[int, int]) -> np.ndarray:
    """[grid_h * grid_w, 2] float32: each patch's coordinate, row-major, as timm builds its grid."""
    shape, ref = list(grid), rope.ref_feat_shape
    if rope.grid_indexing == "xy":  # coordinate 0 runs along the columns
        shape, ref = shape[::-1], (None if ref is None else ref[::-1])
    if rope.kind == "dinov3":  # 0.5-centred, over each axis' size, mapped to [-1, 1]
        axes = [(np.arange(0.5, s, dtype=np.float32) + np.float32(rope.grid_offset)) / np.float32(s) for s in shape]
    else:
        offset = rope.grid_offset if rope.kind == "cat" else 0.0
        axes = [np.arange(s, dtype=np.float32) + np.float32(offset) for s in shape]
        if rope.kind == "cat" and ref is not None:
            axes = [a / np.float32(s) * np.float32(r) for a, s, r in zip(axes, shape, ref)]
    coords = np.stack(np.meshgrid(*axes, indexing=rope.grid_indexing), axis=-1).reshape(-1, 2)
    return (2 * coords - 1 if rope.kind == "dinov3" else coords).astype(np.float32)


def fixed_frequencies(rope: Rope, head_dim: int) -> np.ndarray:
    """[2, head_dim / 2]: the angles of a token at `c` are `c @ F` ("cat" and "dinov3").

    Each coordinate has a quarter of the head's channels: coordinate 0 the first half of
    the angles, coordinate 1 the second.
    """
    if head_dim % 4:
        raise ValueError(f"rotary embeddings need a head width divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    if rope.kind == "cat":
        bands = 1.0 / rope.temperature ** (np.arange(quarter, dtype=np.float32) / quarter)
    elif rope.kind == "dinov3":
        periods = rope.temperature ** (2.0 * np.arange(quarter, dtype=np.float32) / (head_dim // 2))
        bands = 2 * np.pi / periods
    else:
        raise ValueError("RoPE-Mixed learns its frequencies: see mixed_frequencies_init")
    frequencies = np.zeros((2, 2 * quarter), np.float32)
    frequencies[0, :quarter], frequencies[1, quarter:] = bands, bands
    return frequencies


def mixed_frequencies_init(depth: int, num_heads: int, head_dim: int, temperature: float):
    """A Flax initializer of RoPE-Mixed's learned frequencies [2, depth, num_heads, head_dim / 2]:
    timm's magnitudes, each head and block at a random angle."""

    def init(key, shape=None, dtype=jnp.float32):
        magnitude = 1.0 / temperature ** (jnp.arange(0, head_dim, 4, dtype=jnp.float32) / head_dim)
        angles = jax.random.uniform(key, (depth, num_heads, 1), jnp.float32) * 2 * jnp.pi
        x = jnp.concatenate([magnitude * jnp.cos(angles), magnitude * jnp.cos(angles + jnp.pi / 2)], axis=-1)
        y = jnp.concatenate([magnitude * jnp.sin(angles), magnitude * jnp.sin(angles + jnp.pi / 2)], axis=-1)
        return jnp.stack([x, y]).astype(dtype)

    return init


def rotation_angles(coords: jax.Array, frequencies: jax.Array) -> jax.Array:
    """[batch, tokens, 2] coordinates, [heads or 1, 2, head_dim / 2] -> [batch, heads or 1, tokens, head_dim / 2]."""
    coords = coords.astype(jnp.float32)
    return coords[:, None, :, 0, None] * frequencies[None, :, None, 0] + (
        coords[:, None, :, 1, None] * frequencies[None, :, None, 1]
    )


def rotate(x: jax.Array, angles: jax.Array, *, half: bool) -> jax.Array:
    """Rotates each channel pair of x [batch, tokens, heads, head_dim] by its angle.

    angles: [batch, heads or 1, tokens, head_dim / 2]. Pairs are (2i, 2i + 1) in the
    interleaved layout, (i, i + head_dim / 2) in the half one. Computed in float32,
    returned in x's dtype.
    """
    angles = angles.transpose(0, 2, 1, 3)  # [batch, tokens, heads, head_dim / 2]
    layout = (lambda a: jnp.concatenate([a, a], -1)) if half else (lambda a: jnp.repeat(a, 2, axis=-1))
    sin, cos = layout(jnp.sin(angles)), layout(jnp.cos(angles))
    x32 = x.astype(jnp.float32)
    if half:
        first, second = jnp.split(x32, 2, axis=-1)
        turned = jnp.concatenate([-second, first], axis=-1)
    else:
        turned = jnp.stack([-x32[..., 1::2], x32[..., ::2]], axis=-1).reshape(x32.shape)
    return (x32 * cos + turned * sin).astype(x.dtype)
