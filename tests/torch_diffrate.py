"""PyTorch reference of DiffRate for timm ViTs with a class token (test-only).

Written from the paper (Chen et al., ICCV 2023) and the authors' code
(OpenGVLab/DiffRate: DiffRate/ddp.py, merge.py, patch/deit.py), in the
authors' shapes: per-candidate loops for the kept probabilities, a sort by
class attention, `scatter_reduce` for the merges, Python control flow on the
counts. Two departures, both shared with tome_jax: the tokens alive in a block
are counted by rounding each mask entry (the authors truncate the mask's float
sum, which a straight-through mask can leave a hair under a whole number), and
the policy softmax's 1e-6 is a parameter (`eps`, 0 in the tests).
"""

from __future__ import annotations

import math

import torch


class SteCeil(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, g):
        return g


class SteMin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, prune_kept, merge_kept):
        return torch.minimum(tokens, torch.minimum(prune_kept, merge_kept))

    @staticmethod
    def backward(ctx, g):
        return None, g, g


def candidate_counts(patches, granularity, layer):
    """The first block has one candidate (all patches), as in the authors' apply_patch."""
    step = patches + 1 if layer == 0 else granularity
    return torch.arange(patches, 0, -step).float()


def kept_number(logits, candidates):
    """ceil(E[kept]) + 1 (the class token), straight-through."""
    return SteCeil.apply(candidates @ logits.softmax(-1)) + 1


def token_probability(logits, candidates, tokens):
    probability = torch.zeros(tokens)
    for count, p in zip(candidates, logits.softmax(-1)):
        probability[: int(count) + 1] += p
    return probability


def token_mask(logits, candidates, kept, end, tokens):
    probability = token_probability(logits, candidates, tokens)
    mask = torch.ones(tokens)
    mask[int(kept) : int(end)] = 0
    return mask - probability.detach() + probability


def softmax_with_policy(logits, policy, eps=0.0):
    batch, tokens = policy.shape
    policy = policy.reshape(batch, 1, 1, tokens)
    eye = torch.eye(tokens).view(1, 1, tokens, tokens)
    policy = policy + (1.0 - policy) * eye
    exp = (logits - logits.max(-1, keepdim=True)[0]).exp() * policy
    return (exp + eps / tokens) / (exp.sum(-1, keepdim=True) + eps)


def attention(attn, x, size, mask=None, eps=0.0):
    """timm Attention with log(size) on the logits; the policy softmax when a mask is given."""
    batch, tokens, dim = x.shape
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :]
    weights = logits.softmax(-1) if mask is None else softmax_with_policy(logits, mask, eps)
    out = attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))
    return out, weights


def merge_function(metric, kept):
    """The authors' get_merge_func: tokens from `kept` on merge into the most similar before it."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric[:, kept:] @ metric[:, :kept].transpose(-1, -2)
        similarity[..., 0] = -math.inf
        node_max, node_idx = similarity.max(dim=-1)

    def merge(x, mode, training):
        src, dst = x[:, kept:], x[:, :kept]
        index = node_idx[..., None].expand(*node_idx.shape, x.shape[-1])
        dst = dst.scatter_reduce(1, index, src, reduce=mode)
        return torch.cat([dst, src], dim=1) if training else dst

    return merge, node_max


def sort_by_class_attention(weights, *arrays):
    cls_attn = weights[:, :, 0, 1:].mean(1)
    order = torch.sort(cls_attn, dim=1, descending=True, stable=True)[1] + 1
    order = torch.cat([torch.zeros_like(order[:, :1]), order], dim=1)
    gathered = []
    for a in arrays:
        index = order.reshape(*order.shape, *(1,) * (a.ndim - 2)).expand_as(a)
        gathered.append(torch.gather(a, 1, index))
    return gathered


def embed(model, images):
    return model.norm_pre(model._pos_embed(model.patch_embed(images)))


def head(model, x):
    return model.forward_head(model.norm(x))


def flops(model, prune_kept, merge_kept):
    """The authors' calculate_flop_training (multiply-adds)."""
    width = model.embed_dim
    tokens = torch.tensor(float(model.patch_embed.num_patches + 1))
    patch = model.patch_embed.patch_size
    total = tokens * width * patch[0] * patch[1] * 3 + width * model.num_classes
    for pruned, merged in zip(prune_kept, merge_kept):
        total = total + 4 * tokens * width * width + 2 * tokens * tokens * width
        tokens = SteMin.apply(tokens, pruned.float(), merged.float())
        total = total + 8 * tokens * width * width
    return total


def search_forward(model, images, prune_logits, merge_logits, granularity, eps=0.0):
    """The authors' training forward. Returns (logits, flops, prune_kept, merge_kept)."""
    x = embed(model, images)
    batch, tokens, _ = x.shape
    patches = tokens - 1
    size, mask = torch.ones(batch, tokens, 1), torch.ones(batch, tokens)
    prune_counts, merge_counts = [], []
    for layer, (block, prune, merge_) in enumerate(zip(model.blocks, prune_logits, merge_logits)):
        candidates = candidate_counts(patches, granularity, layer)
        out, weights = attention(block.attn, block.norm1(x), size[..., 0], mask, eps)
        x = x + block.ls1(out)
        x, size, mask = sort_by_class_attention(weights, x, size, mask)

        last = int(mask[0].detach().round().sum())
        prune_kept = kept_number(prune, candidates)
        prune_counts.append(prune_kept)
        if prune_kept < last:
            mask = mask * token_mask(prune, candidates, prune_kept, last, tokens).expand(batch, -1)
        mid = min(last, int(prune_kept))

        merge_kept = kept_number(merge_, candidates)
        merge_counts.append(merge_kept)
        if merge_kept < mid:
            kept = int(merge_kept)
            merge_mask = token_mask(merge_, candidates, merge_kept, mid, tokens)
            merge, node_max = merge_function(x[:, :mid].detach(), kept)
            rest_x, rest_size = x[:, mid:], size[:, mid:]
            x = torch.cat([merge(x[:, :mid], "mean", True), rest_x], dim=1)
            scaled = torch.cat([size[:, :kept], size[:, kept:mid] * node_max[..., None]], dim=1).clamp(1)
            size = torch.cat([merge(scaled, "sum", True), rest_size], dim=1)
            mask = mask * merge_mask
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return head(model, x), flops(model, prune_counts, merge_counts), prune_counts, merge_counts


def inference_forward(model, images, prune_kept, merge_kept):
    """The authors' evaluation forward with fixed kept counts. Returns (logits, final sizes)."""
    x = embed(model, images)
    size = torch.ones(*x.shape[:2], 1)
    for block, pruned_to, merged_to in zip(model.blocks, prune_kept, merge_kept):
        out, weights = attention(block.attn, block.norm1(x), size[..., 0])
        x = x + block.ls1(out)
        x, size = sort_by_class_attention(weights, x, size)
        x, size = x[:, :pruned_to], size[:, :pruned_to]
        if merged_to < x.shape[1]:
            merge, node_max = merge_function(x.detach(), merged_to)
            x = merge(x, "mean", False)
            scaled = torch.cat([size[:, :merged_to], size[:, merged_to:] * node_max[..., None]], dim=1)
            size = merge(scaled, "sum", False)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return head(model, x), size[..., 0]
