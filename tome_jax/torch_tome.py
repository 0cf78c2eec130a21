"""ToMe in PyTorch for timm's VisionTransformer and timm's rotary `Eva` (EVA02, DINOv3,
PE, RoPE-ViT), written from the conventions docs/models.md states (its sections "The
ViT" and "Merging rules") and, for rotary models, the rules of ALGORITHMS.md's
"Rotary position embeddings under merging".

Optional: the only tome_jax module that needs torch (and timm), imported by the
tests and by `tome_jax.bench` alone, never by the library itself.

The reference tome_jax is checked against, and the PyTorch side of benchmarks, so
it is batched throughout (no Python loop over examples) and leaves the timm model
untouched: the model's own submodules (embedding, norms, attention projections,
MLPs of any kind, heads) are called in a ToMe-aware order.

    model = timm.create_model("deit_small_patch16_224").eval()
    logits = tome_forward(model, images_nchw, r=(8, -1))
    model = timm.create_model("vit_small_patch16_dinov3").eval()
    logits = tome_forward(model, images_nchw, 8, rope_position="dest", rope_metric="post")
    state = tome_tokens(model, images_nchw, 8, track_source=True)  # tokens, size, coord, source

Conventions, as tome_jax's: proportional attention on by default; the prefix
tokens (class, distillation, register tokens) never merge and stay first; ties in
the matching broken by position (a stable sort). Pooling counts patches: average
pooling weights each token by its size, and the attention pool (SigLIP's MAP
head) adds `log(size)` to its logits; token pooling is timm's own head.

Rotary models (timm's `Eva`, any `rope_type` but "base"; without a rope, as plain
EVA, the same code merges with no coordinates):

- Each patch token carries a coordinate `c`, two float32 numbers in the channel
  order and units timm's grid gives that kind (`patch_coordinates`), for the
  actual patch grid of the input (so any image size, rescaled as timm does):
  - "cat" (RotaryEmbeddingCat; EVA02, PE, timm's SBB RoPE ViTs): `_build_grid`'s
    "index" grid, `t = arange(n) + grid_offset`, times `ref / n` per axis when
    `ref_feat_shape` is set, i.e. `(arange(n) + offset) / n * ref` in float32;
  - "dinov3" (RotaryEmbeddingDinoV3): the "centered" grid,
    `2 * (arange(0.5, n) + grid_offset) / denom - 1` with `denom` n per axis
    ("separate"), or the min or max of the grid's sides;
  - "mixed" (RotaryEmbeddingMixed, RoPE-ViT): `get_mixed_grid`, the plain
    index grid `arange(n)` (no offset, no rescale);
  - "mrope" (RotaryEmbeddingMRope): the plain index grid, "ij" only.
  With `grid_indexing="ij"` c = (row, column) coordinates, with "xy"
  c = (column, row); tokens stay in row-major order either way.
  Prefix tokens carry none (`coord` covers the patch tokens only, in sequence
  order after the prefix) and are never rotated.
- In every block each token's rotation is computed from its current `c` with
  the kind's formula, in float32, from the rope module's own frequencies:
  "cat" angles `(c0 * bands, c1 * bands)`; "dinov3" `2 pi c / periods` per axis;
  "mixed" `c0 * freqs[0, layer] + c1 * freqs[1, layer]` (per head);
  "mrope" `[0, c0, c1][axis] * inv_freq`; then sin and cos in the module's
  layout (interleaved pairs, or halves for `rotate_half`) and
  `x cos + rot(x) sin` on q and k after the qk norm, as timm applies them.
  At r = 0 this is timm's forward.
- ToMe between attention and MLP. The metric is the mean over (key) heads of
  the keys after any qk norm and before rotation (`rope_metric="pre"`) or of
  the keys as attention compares them, rotated (`"post"`; prefix keys are
  unrotated in both). A/B alternate over the whole sequence, prefix included.
- Positions: `rope_position="mean"`: `c <- merge_sum(c * size) /
  merge_sum(size)` with the sizes before the merge (so a token's c is the mean
  of its patches' coordinates); `"dest"`: every output token keeps the c of
  the one input token that keeps its slot (the B token a merge joins, or an
  unmerged token), exactly.
- Everything else is the model's own: fused qkv with EVA's q/v biases (and
  `qkv_bias_separate`) or separate q/k/v projections, grouped-query key heads,
  the attention gate, qk norm, the sub-LN before `proj` (`scale_attn_inner`),
  any MLP with its inner norm (SwiGLU with `scale_mlp`), layer scale
  (`gamma_1`/`gamma_2` or `ls1`/`ls2`), pre-norm or post-norm blocks, with or
  without absolute position embeddings (`_pos_embed`, resampled as timm does
  for a dynamic size), `norm_pre`, `norm`, fc_norm, and the head: "token",
  size-weighted "avg", "max" (a max over tokens, merged ones as they are),
  "avgmax" (their mean), "" (per token) and "map", whose attention pool reads
  every token, prefix included, as Eva's `pool` does, with `log(size)` added.
- Not covered (refused): training mode (dropout, drop path, patch dropout,
  coordinate augmentation), the rope kind "base" and grids other than timm's
  Eva defaults ("pixel" cat grids), attention masks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def parse_r(num_layers: int, r) -> list[int]:
    """int -> that r in every layer; (r, inflection) -> a linear ramp from
    `int(r * (1 - inflection))` to `2r` minus that; list -> per layer, zero-padded."""
    if isinstance(r, list):
        return list(r) + [0] * (num_layers - len(r))
    r, inflection = r if isinstance(r, tuple) else (r, 0.0)
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    step = (hi - lo) / max(num_layers - 1, 1)
    return [int(lo + step * i) for i in range(num_layers)]


def attention_with_metric(attn, x: torch.Tensor, size: torch.Tensor | None):
    """timm Attention with `log(size)` added to the logits.

    x: [batch, tokens, dim]; size: [batch, tokens] or None (plain attention).
    Returns ([batch, tokens, dim], keys averaged over heads [batch, tokens, head_dim]).
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [batch, heads, tokens, head_dim]
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, tokens, -1)))
    return out, k.mean(dim=1)


def merge_destinations(metric: torch.Tensor, r: int, num_prefix_tokens: int):
    """Bipartite soft matching as a map from input tokens to output slots.

    metric: [batch, tokens, channels]. Returns (dest [batch, tokens] int64, the
    number of output tokens). Even positions (A) each pick their most similar odd
    position (B); the `r` best-matched A tokens join their partner's slot. The
    first `num_prefix_tokens` never merge (-inf rows in A, -inf columns in B).
    Slots: the prefix tokens, the unmerged A tokens (in sequence order when there
    is a prefix, else by score), then the other B tokens.
    """
    batch, tokens, _ = metric.shape
    prefix = num_prefix_tokens
    r = min(r, (tokens - prefix) // 2)
    if r == 0:  # under two tokens past the prefix (merging reached one): no pair, every token stays
        return torch.arange(tokens, device=metric.device).expand(batch, -1), tokens
    prefix_a, prefix_b = (prefix + 1) // 2, prefix // 2
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # [batch, A, B]
    scores[:, :prefix_a, :] = -torch.inf
    scores[:, :, :prefix_b] = -torch.inf
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged, kept = order[:, :r], order[:, r:]  # prefix A tokens (-inf) are kept, last
    if prefix:
        kept = kept.sort(dim=-1).values  # sequence order: the prefix A tokens first

    num_a, num_b = scores.shape[1:]
    position = torch.arange(num_a - r, device=metric.device)
    kept_slot = position if not prefix else torch.where(
        position < prefix_a, 2 * position, prefix + position - prefix_a
    )
    j = torch.arange(num_b, device=metric.device)
    b_slot = torch.where(j < prefix_b, 2 * j + 1, prefix + (num_a - prefix_a - r) + j - prefix_b)
    a_slot = torch.empty(batch, num_a, dtype=torch.long, device=metric.device)
    a_slot.scatter_(1, kept, kept_slot.expand(batch, -1))
    a_slot.scatter_(1, merged, b_slot[partner.gather(1, merged)])
    dest = torch.empty(batch, tokens, dtype=torch.long, device=metric.device)
    dest[:, ::2], dest[:, 1::2] = a_slot, b_slot.expand(batch, -1)
    return dest, tokens - r


def merge_wavg(x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, tokens_out: int):
    """Size-weighted average of the tokens sharing a slot.

    x: [batch, tokens, dim]; size, dest: [batch, tokens].
    Returns x [batch, tokens_out, dim] and size [batch, tokens_out].
    """
    batch, _, dim = x.shape
    total = x.new_zeros(batch, tokens_out, dim).scatter_add_(
        1, dest[..., None].expand(-1, -1, dim), x * size[..., None]
    )
    new_size = size.new_zeros(batch, tokens_out).scatter_add_(1, dest, size)
    return total / new_size[..., None], new_size


def tome_block(block, x, size, r: int, num_prefix_tokens: int, prop_attn: bool):
    """One timm Block with ToMe between attention and MLP (eval mode: no drop path)."""
    y, metric = attention_with_metric(block.attn, block.norm1(x), size if prop_attn else None)
    x = x + block.ls1(y)
    if r > 0:
        dest, tokens_out = merge_destinations(metric, r, num_prefix_tokens)
        x, size = merge_wavg(x, size, dest, tokens_out)
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return x, size


def attention_pool(pool, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """timm's AttentionPoolLatent with `log(size)` added to its logits.

    x: [batch, tokens, dim]; size: [batch, tokens]. Returns [batch, dim].
    """
    if pool.pos_embed is not None or pool.pool != "token":
        raise ValueError("only the MAP head's form of AttentionPoolLatent (no pos_embed, token pool)")
    batch, tokens, _ = x.shape
    shape = (pool.num_heads, pool.head_dim)
    q = pool.q(pool.latent.expand(batch, -1, -1)).reshape(batch, pool.latent_len, *shape).transpose(1, 2)
    k, v = pool.kv(x).reshape(batch, tokens, 2, *shape).permute(2, 0, 3, 1, 4)
    q, k = pool.q_norm(q), pool.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=size.log()[:, None, None, :].to(q.dtype))
    out = pool.proj(out.transpose(1, 2).reshape(batch, pool.latent_len, -1))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    return out[:, 0]


def forward_head(model, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """timm's `forward_head`, with average and attention pooling counting patches."""
    if model.global_pool not in ("avg", "map"):
        return model.forward_head(x)  # the class token (DeiT: class and distillation heads)
    if model.pool_include_prefix:
        raise ValueError("pool_include_prefix=True: the pools here read the patch tokens only")
    x, size = x[:, model.num_prefix_tokens :], size[:, model.num_prefix_tokens :]
    if model.global_pool == "map":
        x = attention_pool(model.attn_pool, x, size)
    else:
        x = (x * size[..., None]).sum(1) / size.sum(1, keepdim=True)
    return model.head(model.head_drop(model.fc_norm(x)))


def is_eva(model) -> bool:
    """Whether `model` is timm's `Eva` (the rotary ViTs: EVA02, DINOv3, PE, RoPE-ViT)."""
    from timm.models.eva import Eva

    return isinstance(model, Eva)


@torch.no_grad()
def tome_forward(
    model, images: torch.Tensor, r, prop_attn: bool = True, rope_position: str = "mean", rope_metric: str = "post"
) -> torch.Tensor:
    """Logits of a timm VisionTransformer (or its distilled variant) or a timm Eva under ToMe.

    Args:
      model: in eval mode.
      images: [batch, 3, height, width], already normalised.
      r: int, (r, inflection) or a per-layer list.
      prop_attn: proportional attention (off for off-the-shelf MAE models).
      rope_position: "mean" or "dest", where a merged token sits (rotary models).
      rope_metric: "pre" or "post", the keys before or after rotation as the metric (rotary models).
    """
    if is_eva(model):
        state = tome_tokens(model, images, r, prop_attn, rope_position, rope_metric)
        return eva_forward_head(model, state.tokens, state.size)
    if model.training:
        raise ValueError("call model.eval() first: ToMe here skips dropout and drop path")
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = x.new_ones(x.shape[:2])
    for block, block_r in zip(model.blocks, parse_r(len(model.blocks), r)):
        x, size = tome_block(block, x, size, block_r, model.num_prefix_tokens, prop_attn)
    return forward_head(model, model.norm(x), size)


# --- timm's Eva: rotary position embeddings whose positions follow the merge -------------


class TomeState(NamedTuple):
    """The tokens after the last block (and the model's final `norm`).

    tokens: [batch, tokens, dim]; size: [batch, tokens] (patches per token).
    coord: [batch, tokens - prefix, 2] float32, the patch tokens' coordinates (in
      sequence order after the prefix), or None for a model without rotary embedding.
    source: [batch, tokens, input tokens] float, 1 where an output token holds an
      input token (prefix first, then the patches in row-major order), or None.
    """

    tokens: torch.Tensor
    size: torch.Tensor
    coord: torch.Tensor | None
    source: torch.Tensor | None


def rope_kind(rope) -> str | None:
    """"cat", "dinov3", "mixed", "mrope" or None (no rotary embedding), from the module's class."""
    if rope is None:
        return None
    kinds = {
        "RotaryEmbeddingCat": "cat",
        "RotaryEmbeddingDinoV3": "dinov3",
        "RotaryEmbeddingMixed": "mixed",
        "RotaryEmbeddingMRope": "mrope",
    }
    kind = kinds.get(type(rope).__name__)
    if kind is None:
        raise ValueError(f"rotary embedding {type(rope).__name__} is not covered (cat, dinov3, mixed, mrope are)")
    if kind == "cat" and rope.grid_type != "index":
        raise ValueError(f"a RotaryEmbeddingCat on a {rope.grid_type!r} grid (Eva builds 'index' grids)")
    return kind


def patch_coordinates(rope, grid: tuple[int, int]) -> torch.Tensor:
    """The patches' coordinates for a (rows, columns) grid, row-major: [rows * columns, 2] float32.

    Channel order (row, column) for grid_indexing "ij", (column, row) for "xy",
    in the units timm's `_build_grid` gives the rope kind (see the module docstring).
    """
    kind = rope_kind(rope)
    rows, cols = grid
    f32 = {"dtype": torch.float32}
    if kind == "cat":
        offset = rope.grid_offset
        y = torch.arange(rows, dtype=torch.int64).to(torch.float32) + offset
        x = torch.arange(cols, dtype=torch.int64).to(torch.float32) + offset
        if rope.ref_feat_shape is not None:
            ref_rows, ref_cols = rope.ref_feat_shape
            y, x = y / rows * ref_rows, x / cols * ref_cols
    elif kind == "dinov3":
        if rope.normalize_coords == "separate":
            denom_y, denom_x = float(rows), float(cols)
        elif rope.normalize_coords in ("min", "max"):
            denom_y = denom_x = float((min if rope.normalize_coords == "min" else max)(rows, cols))
        else:
            raise ValueError(f"normalize_coords={rope.normalize_coords!r}")
        y = (torch.arange(0.5, rows, **f32) + rope.grid_offset) / denom_y
        x = (torch.arange(0.5, cols, **f32) + rope.grid_offset) / denom_x
    else:  # "mixed", "mrope": the plain index grid
        y = torch.arange(rows, dtype=torch.int64).to(torch.float32)
        x = torch.arange(cols, dtype=torch.int64).to(torch.float32)
    ys, xs = y[:, None].expand(rows, cols), x[None, :].expand(rows, cols)
    if rope.grid_indexing == "ij":
        coord = torch.stack([ys, xs], dim=-1)
    elif rope.grid_indexing == "xy":
        if kind == "mrope":
            raise ValueError("RotaryEmbeddingMRope is 'ij' only")
        coord = torch.stack([xs, ys], dim=-1)
    else:
        raise ValueError(f"grid_indexing={rope.grid_indexing!r}")
    if kind == "dinov3":
        coord = 2.0 * coord - 1.0  # [0, 1] -> [-1, 1], after the grid is stacked, as timm
    return coord.reshape(rows * cols, 2)


def rope_sin_cos(rope, coord: torch.Tensor, layer: int):
    """Sine and cosine of each token's rotation in block `layer`.

    coord: [batch, tokens, 2]. Returns two [batch, heads or 1, tokens, head_dim]
    float32 tensors in the layout `rotate` expects (the rope module's own).
    """
    kind = rope_kind(rope)
    coord = coord.float()
    if kind == "cat":
        angles = (coord[..., None] * rope.bands.float()).flatten(-2)[:, None]  # [batch, 1, tokens, head_dim / 2]
        half = rope.rotate_half
    elif kind == "dinov3":
        angles = (2 * math.pi * coord[..., None] / rope.periods.float()).flatten(-2)[:, None]
        half = rope.rotate_half
    elif kind == "mixed":
        freqs = rope.freqs[:, layer].float()  # [2, heads, head_dim / 2]
        c0, c1 = coord[:, None, :, 0, None], coord[:, None, :, 1, None]  # [batch, 1, tokens, 1]
        angles = c0 * freqs[0][None, :, None] + c1 * freqs[1][None, :, None]  # [batch, heads, tokens, head_dim / 2]
        half = False
    else:  # "mrope": height and width channels interleaved with inert temporal ones
        position = torch.cat([torch.zeros_like(coord[..., :1]), coord], dim=-1).index_select(-1, rope.axis)
        angles = (position * rope.inv_freq.float())[:, None]
        half = True
    layout = (lambda a: torch.cat([a, a], dim=-1)) if half else (lambda a: a.repeat_interleave(2, dim=-1))
    return layout(angles.sin()), layout(angles.cos())


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, num_prefix_tokens: int, half: bool):
    """Rotate the non-prefix tokens of x [batch, heads, tokens, head_dim]; the prefix is left as it is.

    sin, cos: [batch, heads or 1, tokens - prefix, head_dim]. `half`: pairs (i, i + d/2)
    (timm's rotate_half layout), else neighbouring pairs (2i, 2i + 1).
    """
    prefix, patches = x[:, :, :num_prefix_tokens], x[:, :, num_prefix_tokens:]
    if half:
        first, second = patches.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    else:
        turned = torch.stack([-patches[..., 1::2], patches[..., ::2]], dim=-1).reshape(patches.shape)
    rotated = (patches * cos + turned * sin).to(x.dtype)
    return torch.cat([prefix, rotated], dim=2)


def eva_attention(attn, x: torch.Tensor, size: torch.Tensor | None, sin_cos, num_prefix_tokens: int):
    """timm's EvaAttention or AttentionRope with `log(size)` added to the logits.

    x: [batch, tokens, dim]; size: [batch, tokens] or None; sin_cos: `rope_sin_cos`'s pair or None.
    Returns ([batch, tokens, dim], keys before rotation, keys after it), the keys
    averaged over the key heads: [batch, tokens, head_dim] each.
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    heads = attn.num_heads
    kv_heads = getattr(attn, "num_kv_heads", heads)
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            separate = getattr(attn, "qkv_bias_separate", False)
            qkv = attn.qkv(x) + bias if separate else F.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(batch, tokens, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(batch, tokens, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(batch, tokens, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    k_pre = k
    if sin_cos is not None:
        half = getattr(attn, "rotate_half", False)
        q = rotate(q, *sin_cos, num_prefix_tokens, half).type_as(v)
        k = rotate(k, *sin_cos, num_prefix_tokens, half).type_as(v)
    k_post = k
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    bias = None if size is None else size.log()[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, -1))
    if gate is not None:
        out = out * gate
    return attn.proj(out), k_pre.mean(dim=1), k_post.mean(dim=1)


def _layer_scale(block, gamma: str, ls: str, y: torch.Tensor) -> torch.Tensor:
    if getattr(block, gamma, None) is not None:
        return getattr(block, gamma) * y
    if getattr(block, ls, None) is not None:
        return getattr(block, ls)(y)
    return y


def merge_state(x, size, coord, source, dest, tokens_out: int, num_prefix_tokens: int, rope_position: str):
    """Apply one merge (a `merge_destinations` map) to every per-token field.

    coord: [batch, tokens - prefix, 2] or None; source: [batch, tokens, inputs] or None.
    """
    if coord is not None:
        patch_dest, patch_size = dest[:, num_prefix_tokens:] - num_prefix_tokens, size[:, num_prefix_tokens:]
        if rope_position == "mean":
            weight = patch_size
        else:  # "dest": the one token per slot that keeps it, exactly (a weight of 1, the others 0)
            count = torch.zeros_like(dest).scatter_add_(1, dest, torch.ones_like(dest))
            odd = (torch.arange(dest.shape[1], device=dest.device) % 2 == 1)[None]  # B in the A/B split
            weight = (odd | (count.gather(1, dest) == 1))[:, num_prefix_tokens:].to(coord.dtype)
        total = coord.new_zeros(coord.shape[0], tokens_out - num_prefix_tokens, 2).scatter_add_(
            1, patch_dest[..., None].expand(-1, -1, 2), coord * weight[..., None].to(coord.dtype)
        )
        weights = weight.new_zeros(coord.shape[0], tokens_out - num_prefix_tokens).scatter_add_(1, patch_dest, weight)
        coord = total / weights[..., None].to(coord.dtype)
    if source is not None:
        source = source.new_zeros(source.shape[0], tokens_out, source.shape[2]).scatter_reduce_(
            1, dest[..., None].expand(-1, -1, source.shape[2]), source, reduce="amax"
        )
    x, size = merge_wavg(x, size, dest, tokens_out)
    return x, size, coord, source


def eva_tome_block(block, layer: int, state: TomeState, rope, r: int, num_prefix_tokens: int,
                   prop_attn: bool, rope_position: str, rope_metric: str) -> TomeState:
    """One timm EvaBlock (or EvaBlockPostNorm) with ToMe between attention and MLP (eval mode)."""
    x, size, coord, source = state
    sin_cos = None if rope is None else rope_sin_cos(rope, coord, layer)
    post_norm = type(block).__name__ == "EvaBlockPostNorm"
    attn_in = x if post_norm else block.norm1(x)
    y, k_pre, k_post = eva_attention(block.attn, attn_in, size if prop_attn else None, sin_cos, num_prefix_tokens)
    x = x + (block.norm1(y) if post_norm else _layer_scale(block, "gamma_1", "ls1", y))
    if r > 0:
        dest, tokens_out = merge_destinations(k_post if rope_metric == "post" else k_pre, r, num_prefix_tokens)
        x, size, coord, source = merge_state(x, size, coord, source, dest, tokens_out, num_prefix_tokens, rope_position)
    if post_norm:
        x = x + block.norm2(block.mlp(x))
    else:
        x = x + _layer_scale(block, "gamma_2", "ls2", block.mlp(block.norm2(x)))
    return TomeState(x, size, coord, source)


@torch.no_grad()
def tome_tokens(model, images: torch.Tensor, r, prop_attn: bool = True, rope_position: str = "mean",
                rope_metric: str = "post", track_source: bool = False) -> TomeState:
    """The final tokens of a timm Eva under ToMe, with their sizes, coordinates and (optionally) sources.

    Arguments as `tome_forward`'s; `track_source`: also return which input tokens
    each output token holds. `eva_forward_head(model, state.tokens, state.size)` gives
    the logits `tome_forward` returns.
    """
    if not is_eva(model):
        raise ValueError("tome_tokens reads timm's Eva; for a VisionTransformer use tome_forward")
    if model.training:
        raise ValueError("call model.eval() first: ToMe here skips dropout, drop path and coordinate augmentation")
    if rope_position not in ("mean", "dest"):
        raise ValueError(f"rope_position={rope_position!r}: 'mean' or 'dest'")
    if rope_metric not in ("pre", "post"):
        raise ValueError(f"rope_metric={rope_metric!r}: 'pre' or 'post'")
    x = model.patch_embed(images)
    grid = tuple(x.shape[1:3]) if x.ndim == 4 else model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
    x, _ = model._pos_embed(x)  # class and register tokens, absolute positions (resampled as timm does)
    x = model.norm_pre(x)
    batch, tokens, _ = x.shape
    prefix = model.num_prefix_tokens
    rope = model.rope
    coord = None
    if rope is not None:
        coord = patch_coordinates(rope, grid).to(x.device)[None].expand(batch, -1, -1).contiguous()
    source = None
    if track_source:
        source = torch.eye(tokens, dtype=x.dtype, device=x.device)[None].expand(batch, -1, -1).contiguous()
    state = TomeState(x, x.new_ones(batch, tokens), coord, source)
    for layer, (block, block_r) in enumerate(zip(model.blocks, parse_r(len(model.blocks), r))):
        state = eva_tome_block(block, layer, state, rope, block_r, prefix, prop_attn, rope_position, rope_metric)
    return state._replace(tokens=model.norm(state.tokens))


@torch.no_grad()
def eva_forward_head(model, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """timm Eva's `forward_head`, with average and attention pooling counting patches."""
    if model.attn_pool is not None:  # Eva's MAP head reads every token, prefix included
        x = attention_pool(model.attn_pool, x, size)
    elif model.global_pool == "token":
        x = x[:, 0]
    elif model.global_pool in ("avg", "max", "avgmax"):
        x, size = x[:, model.num_prefix_tokens :], size[:, model.num_prefix_tokens :]
        mean = (x * size[..., None]).sum(1) / size.sum(1, keepdim=True)
        if model.global_pool == "avg":
            x = mean
        else:
            x = x.amax(1) if model.global_pool == "max" else 0.5 * (x.amax(1) + mean)
    elif model.global_pool:
        raise ValueError(f"global_pool={model.global_pool!r}")
    return model.head(model.head_drop(model.fc_norm(x)))
