"""ToMe in PyTorch for timm's VisionTransformer, written from the conventions docs/models.md
states (its sections "The ViT" and "Merging rules").

Optional: the only tome_jax module that needs torch (and timm), imported by the
tests and by `tome_jax.bench` alone, never by the library itself.

The reference tome_jax is checked against, and the PyTorch side of benchmarks, so
it is batched throughout (no Python loop over examples) and leaves the timm model
untouched: the model's own submodules (embedding, norms, attention projections,
MLPs of any kind, heads) are called in a ToMe-aware order.

    model = timm.create_model("deit_small_patch16_224").eval()
    logits = tome_forward(model, images_nchw, r=(8, -1))

Conventions, as tome_jax's: proportional attention on by default; the prefix
tokens (class, distillation, register tokens) never merge and stay first; ties in
the matching broken by position (a stable sort). Pooling counts patches: average
pooling weights each token by its size, and the attention pool (SigLIP's MAP
head) adds `log(size)` to its logits; token pooling is timm's own head.
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
    return (out + pool.mlp(pool.norm(out)))[:, 0]


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
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = x.new_ones(x.shape[:2])
    for block, block_r in zip(model.blocks, parse_r(len(model.blocks), r)):
        x, size = tome_block(block, x, size, block_r, model.num_prefix_tokens, prop_attn)
    return forward_head(model, model.norm(x), size)
