"""ToMe in PyTorch for timm's VisionTransformer, written from the conventions the README states
(its sections "The merge as a function" and "The ViT").

Optional: the only tome_jax module that needs torch (and timm), imported by the
tests and by `tome_jax.bench` alone, never by the library itself.

The reference tome_jax is checked against, and the PyTorch side of benchmarks, so
it is batched throughout (no Python loop over examples) and leaves the timm model
untouched: the blocks' own submodules are called in a ToMe-aware order.

    model = timm.create_model("deit_small_patch16_224").eval()
    logits = tome_forward(model, images_nchw, r=(8, -1))

Conventions: proportional attention on by default, class and distillation tokens
never merge, ties in the matching broken by position (a stable sort). The head is
timm's own, as in the official ToMe: an average-pooled model averages the final
tokens without weighting them by size (tome_jax weights them).
"""

from __future__ import annotations

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


def merge_destinations(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """Bipartite soft matching as a map from input tokens to output slots.

    metric: [batch, tokens, channels]. Returns (dest [batch, tokens] int64, the
    number of output tokens). Even positions (A) each pick their most similar odd
    position (B); the `r` best-matched A tokens join their partner's slot. Slots:
    unmerged A tokens (in sequence order with a class token, else by score), then
    B; with a distillation token `[A0, B0, A1.., B1..]`.
    """
    batch, tokens, _ = metric.shape
    r = min(r, (tokens - int(class_token) - int(distill_token)) // 2)
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # [batch, A, B]
    if class_token:
        scores[:, 0, :] = -torch.inf
    if distill_token:
        scores[:, :, 0] = -torch.inf
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged, kept = order[:, :r], order[:, r:]
    if class_token:
        kept = kept.sort(dim=-1).values

    num_a, num_b = scores.shape[1:]
    kept_slot = torch.arange(num_a - r, device=metric.device)
    b_slot = torch.arange(num_b, device=metric.device) + (num_a - r)
    if distill_token:
        kept_slot = kept_slot + (kept_slot > 0)  # room for B0 at slot 1
        b_slot[0] = 1
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


def tome_block(block, x, size, r: int, class_token: bool, distill_token: bool, prop_attn: bool):
    """One timm Block with ToMe between attention and MLP (eval mode: no drop path)."""
    y, metric = attention_with_metric(block.attn, block.norm1(x), size if prop_attn else None)
    x = x + block.ls1(y)
    if r > 0:
        dest, tokens_out = merge_destinations(metric, r, class_token, distill_token)
        x, size = merge_wavg(x, size, dest, tokens_out)
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return x, size


@torch.no_grad()
def tome_forward(model, images: torch.Tensor, r, prop_attn: bool = True) -> torch.Tensor:
    """Logits of a timm VisionTransformer (or its distilled variant) under ToMe.

    Args:
      model: in eval mode.
      images: [batch, 3, height, width], already normalised.
      r: int, (r, inflection) or a per-layer list.
      prop_attn: proportional attention (off for off-the-shelf MAE models).
    """
    if model.training:
        raise ValueError("call model.eval() first: ToMe here skips dropout and drop path")
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = x.new_ones(x.shape[:2])
    for block, block_r in zip(model.blocks, parse_r(len(model.blocks), r)):
        x, size = tome_block(block, x, size, block_r, class_token, distill_token, prop_attn)
    return model.forward_head(model.norm(x))
