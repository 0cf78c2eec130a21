"""PyTorch references of the token-reduction methods for timm ViTs (test-only).

Written from the papers and the authors' code (PiToMe: hchautran/PiToMe; MCTF:
mlvlab/MCTF; EViT: youweiliang/evit; ToFu and DCT: Westlake-AI/OpenToMe), batched,
with torch's sorts, top-k and scatters rather than tome_jax's rank counting and
plans. Each method is a block function; `forward` runs a timm model with one.

Conventions shared with tome_jax (docs/models.md, "Merging rules"): prefix tokens
(class, distillation) never merge and stay first; stable sorts (ties by
position); a token's `dest` is its output slot, -1 when pruned. A block function
returns (x, size, dest) with dest None when the tokens were mixed (DCT).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F

from tome_jax.torch_tome import merge_destinations, parse_r


def attend(attn, x, size=None):
    """timm Attention with `log(size)` added to the logits, the weights materialised.

    Returns (output [batch, tokens, dim], keys' mean over heads, weights
    [batch, heads, tokens, tokens], values [batch, heads, tokens, head_dim]).
    """
    batch, tokens, _ = x.shape
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    weights = logits.softmax(dim=-1)
    return project(attn, weights @ v), k.mean(dim=1), weights, v


def project(attn, heads_out):
    """[batch, heads, tokens, head_dim] -> timm's output projection."""
    batch, _, tokens, _ = heads_out.shape
    return attn.proj(attn.norm(heads_out.transpose(1, 2).reshape(batch, tokens, -1)))


def mlp(block, x):
    return x + block.ls2(block.mlp(block.norm2(x)))


def slot_sum(values, dest, tokens_out):
    """Sums [batch, tokens, ...] into [batch, tokens_out, ...] by dest (-1: left out)."""
    flat = values.reshape(*values.shape[:2], -1)
    out = flat.new_zeros(flat.shape[0], tokens_out + 1, flat.shape[-1])
    index = torch.where(dest < 0, tokens_out, dest)[..., None].expand_as(flat)
    out.scatter_add_(1, index, flat)
    return out[:, :tokens_out].reshape(flat.shape[0], tokens_out, *values.shape[2:])


def weighted_merge(x, weight, dest, tokens_out):
    """Per slot `sum(w x) / sum(w)`, and `sum(w)`."""
    total = slot_sum(weight[..., None] * x, dest, tokens_out)
    norm = slot_sum(weight, dest, tokens_out)
    return total / norm[..., None], norm


def prefixed(dest_rest, num_prefix):
    """dest of the non-prefix tokens -> dest of all, prefix token i in slot i."""
    prefix = torch.arange(num_prefix).expand(dest_rest.shape[0], -1)
    return torch.cat([prefix, dest_rest], dim=1)


def scatter_slots(batch, tokens, pieces):
    """dest [batch, tokens] from (token indices [batch, m], their slots [batch, m] or [m]) pieces."""
    dest = torch.full((batch, tokens), -1, dtype=torch.long)
    for index, slots in pieces:
        dest.scatter_(1, index, slots.expand_as(index))
    return dest


# --- ToMe-placed methods: attention, then the reduction, then the MLP ------------------------


def reduced_block(block, x, size, step, prop_attn):
    """A timm block with `step(x, size, metric, weights) -> (x, size, dest)` between attention and MLP."""
    y, metric, weights, _ = attend(block.attn, block.norm1(x), size if prop_attn else None)
    x = x + block.ls1(y)
    dest = None
    if step is not None:
        x, size, dest = step(x, size, metric, weights)
    return mlp(block, x), size, dest


def pitome_dest(metric, r, num_prefix, margin, alpha, bipartite):
    """PiToMe's matching (authors' `pitome_bsm` and `pitome`), prefix tokens aside."""
    unit = F.normalize(metric[:, num_prefix:].double(), dim=-1)
    batch, n, _ = unit.shape
    sim = unit @ unit.transpose(1, 2)
    energy = F.elu(sim - margin, alpha=alpha).mean(dim=-1)
    order = energy.argsort(dim=-1, descending=True, stable=True)
    p = num_prefix
    if bipartite:
        a, b = order[:, ::2], order[:, 1::2]
        scores = sim.gather(1, a[..., None].expand(-1, -1, n)).gather(2, b[:, None, :].expand(-1, a.shape[1], -1))
        best, partner = scores.max(dim=-1)
        edges = best.argsort(dim=-1, descending=True, stable=True)
        unmerged, merged = edges[:, r:], edges[:, :r]
        num_a, num_b = a.shape[1], b.shape[1]
        rest = scatter_slots(batch, n, [
            (a.gather(1, unmerged), p + torch.arange(num_a - r)),
            (b, p + num_a - r + torch.arange(num_b)),
            (a.gather(1, merged), p + num_a - r + partner.gather(1, merged)),
        ])
    else:
        a, b, kept = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2], order[:, 2 * r :]
        scores = sim.gather(1, a[..., None].expand(-1, -1, n)).gather(2, b[:, None, :].expand(-1, r, -1))
        partner = scores.argmax(dim=-1)
        rest = scatter_slots(batch, n, [
            (kept, p + torch.arange(n - 2 * r)),
            (b, p + n - 2 * r + torch.arange(r)),
            (a, p + n - 2 * r + partner),
        ])
    return prefixed(rest, num_prefix)


def pitome_step(layer, num_layers, r, num_prefix, margin=0.75, alpha=1.0, bipartite_share=0.5):
    def step(x, size, metric, weights):
        layer_margin = margin - margin * layer / num_layers
        bipartite = layer < math.ceil(num_layers * bipartite_share)
        dest = pitome_dest(metric, r, num_prefix, layer_margin, alpha, bipartite)
        x, size = weighted_merge(x, size, dest, x.shape[1] - r)
        return x, size, dest

    return step


def bipartite_merged(dest, num_prefix):
    """Which tokens ToMe's dest merges into another's slot: those sharing a slot with a B (odd) token."""
    a_dest, b_dest = dest[:, ::2], dest[:, 1::2]
    merged_a = (a_dest[:, :, None] == b_dest[:, None, :]).any(-1)
    merged = torch.zeros_like(dest, dtype=torch.bool)
    merged[:, ::2] = merged_a
    return merged


def tofu_step(layer, num_layers, r, num_prefix, merge_after=0.5):
    def step(x, size, metric, weights):
        dest, tokens_out = merge_destinations(metric, r, num_prefix)
        if layer > merge_after * num_layers:  # MLERP: the mean's direction at the largest norm
            ones = torch.ones_like(size)
            mean, _ = weighted_merge(x, ones, dest, tokens_out)
            norms = x.norm(dim=-1)
            largest = norms.new_zeros(x.shape[0], tokens_out).scatter_reduce(1, dest, norms, reduce="amax")
            return F.normalize(mean, dim=-1) * largest[..., None], slot_sum(size, dest, tokens_out), dest
        dest = torch.where(bipartite_merged(dest, num_prefix), -1, dest)
        return slot_sum(x, dest, tokens_out), slot_sum(size, dest, tokens_out), dest

    return step


def evit_step(r, num_prefix, fuse=True):
    """EViT's block (youweiliang/evit): top-k by class attention, the rest fused by attention."""

    def step(x, size, metric, weights):
        cls_attn = weights[:, :, 0, num_prefix:].mean(dim=1)
        rest = x.shape[1] - num_prefix
        left = rest - r - int(fuse)
        _, idx = cls_attn.topk(left, dim=1, largest=True, sorted=True)
        p = num_prefix
        pieces = [(idx, p + torch.arange(left))]
        if fuse:
            others = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
            compl = others.nonzero()[:, 1].reshape(x.shape[0], -1)
            pieces.append((compl, torch.tensor(p + left)))
        dest = prefixed(scatter_slots(x.shape[0], rest, pieces), p)
        weight = torch.cat([torch.ones_like(size[:, :p]), torch.where(dest[:, p:] == p + left, cls_attn, 1.0)], 1)
        tokens_out = p + rest - r
        return slot_sum(weight[..., None] * x, dest, tokens_out), slot_sum(size, dest, tokens_out), dest

    return step


def random_drop_step(r, num_prefix, draws):
    """Drops the r tokens with the largest `draws` ([batch, tokens - prefix]); the rest keep their order."""

    def step(x, size, metric, weights):
        dropped = torch.zeros_like(draws, dtype=torch.bool).scatter(1, draws.topk(r, dim=1).indices, True)
        slots = (~dropped).cumsum(dim=1) - 1 + num_prefix
        dest = prefixed(torch.where(dropped, -1, slots), num_prefix)
        tokens_out = x.shape[1] - r
        return slot_sum(x, dest, tokens_out), slot_sum(size, dest, tokens_out), dest

    return step


# --- DCT: after the MLP ---------------------------------------------------------------


def dct_block(block, x, size, r, num_prefix):
    """OpenToMe's DCT block: the block, then the tokens low-passed along the sequence (float64 SciPy)."""
    y, _, _, _ = attend(block.attn, block.norm1(x))
    x = mlp(block, x + block.ls1(y))
    if r == 0:
        return x, size, None
    rest = x[:, num_prefix:].double().numpy()
    kept = rest.shape[1] - r
    coefficients = scipy.fft.dct(rest, type=2, norm="ortho", axis=1)[:, :kept]
    filtered = torch.from_numpy(scipy.fft.idct(coefficients, type=2, norm="ortho", axis=1)).float()
    return torch.cat([x[:, :num_prefix], filtered], dim=1), size[:, : num_prefix + kept], None


# --- MCTF: before attention ------------------------------------------------------------


def mctf_block(
    block, x, size, r, num_prefix, *, tau_sim=1.0, tau_info=20.0, tau_size=40.0,
    bidirectional=True, one_step_ahead=True, prop_attn=True,
):  # fmt: skip
    """MCTF's block (mlvlab/MCTF `Block_DEIT` with `mctf` and `merge_wavg`, pooling type 1)."""
    if r == 0:
        return reduced_block(block, x, size, None, prop_attn)
    _, _, weights, _ = attend(block.attn, block.norm1(x), size if prop_attn else None)
    unit = F.normalize(x, dim=-1)
    scores = torch.ones(x.shape[0], (x.shape[1] + 1) // 2, x.shape[1] // 2)
    if tau_sim:
        scores = scores * ((unit[:, ::2] @ unit[:, 1::2].transpose(1, 2) + 1) / 2) ** (1 / tau_sim)
    received = weights.mean(dim=(1, 2))
    for value, tau in ((received, tau_info), (size, tau_size)):
        if tau:
            inverse = 1 / value
            inverse = inverse / inverse.max(dim=1, keepdim=True).values
            scores = scores * (inverse[:, ::2, None] * inverse[:, None, 1::2]) ** (1 / tau)
    scores[:, : (num_prefix + 1) // 2, :] = -math.inf
    scores[:, :, : num_prefix // 2] = -math.inf
    dest, tokens_out = mctf_dest(scores, r, num_prefix, bidirectional)

    received_weight = received * size / size.max(dim=1, keepdim=True).values
    x, norm = weighted_merge(x, received_weight, dest, tokens_out)
    size = slot_sum(size, dest, tokens_out)
    if one_step_ahead:
        by_key = slot_sum(weights.permute(0, 3, 1, 2), dest, tokens_out)  # [b, k', h, q]
        by_query = by_key.permute(0, 3, 2, 1) * received_weight[:, :, None, None]  # [b, q, h, k']
        fused = (slot_sum(by_query, dest, tokens_out) / norm[:, :, None, None]).permute(0, 2, 1, 3)
        h = block.norm1(x)
        batch, tokens, dim = h.shape
        v = F.linear(h, block.attn.qkv.weight[2 * dim :], block.attn.qkv.bias[2 * dim :])
        v = v.reshape(batch, tokens, block.attn.num_heads, -1).transpose(1, 2)
        y = project(block.attn, fused @ v)
    else:
        y, _, _, _ = attend(block.attn, block.norm1(x), size if prop_attn else None)
    return mlp(block, x + block.ls1(y)), size, dest


def mctf_dest(scores, r, num_prefix, bidirectional):
    """MCTF's bidirectional matching as destinations: (dest [batch, tokens], tokens_out)."""
    batch, num_a, num_b = scores.shape
    tokens = num_a + num_b
    r_a = r // 2 if bidirectional else r
    best, partner = scores.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True, stable=True)
    unmerged, merged = edges[:, r_a:], edges[:, :r_a]
    if num_prefix:
        unmerged = unmerged.sort(dim=1).values
    a_pos = lambda i: 2 * i  # noqa: E731
    b_pos = lambda j: 2 * j + 1  # noqa: E731
    if bidirectional:
        # B tokens (with what they received) into the unmerged A tokens, on the same scores.
        scores2 = scores.gather(1, unmerged[..., None].expand(-1, -1, num_b)).transpose(1, 2)
        best2, partner2 = scores2.max(dim=-1)
        edges2 = best2.argsort(dim=-1, descending=True, stable=True)
        b_kept, b_merged = edges2[:, r - r_a :], edges2[:, : r - r_a]
    else:
        b_kept = torch.arange(num_b).expand(batch, -1)
        b_merged = b_kept[:, :0]
    # Final order: prefix tokens, unmerged A, kept B (in those orders).
    order = torch.cat([a_pos(unmerged), b_pos(b_kept)], dim=1)
    is_prefix = order < num_prefix
    order = torch.cat([order.masked_select(is_prefix).reshape(batch, -1), order.masked_select(~is_prefix).reshape(batch, -1)], 1)
    dest = scatter_slots(batch, tokens, [(order, torch.arange(tokens - r))])
    if bidirectional:
        b_into = a_pos(unmerged.gather(1, partner2.gather(1, b_merged)))
        dest.scatter_(1, b_pos(b_merged), dest.gather(1, b_into))
    dest.scatter_(1, a_pos(merged), dest.gather(1, b_pos(partner.gather(1, merged))))
    return dest, tokens - r


# --- Running a model -------------------------------------------------------------------


@torch.no_grad()
def forward(model, images, r, method, prop_attn=None, **settings):
    """Logits and sources of a timm VisionTransformer under a method.

    Args:
      model: in eval mode.
      images: [batch, 3, height, width], already normalised.
      r: int, (r, inflection) or a per-layer list.
      method: "pitome", "tofu", "evit", "random_drop" (settings: `draws(layer)`
        giving [batch, tokens - prefix] numbers), "dct" or "mctf".
      prop_attn: None: the method's default (on for MCTF only).
      settings: the method's settings.

    Returns:
      (logits, source [batch, input_tokens] the final token holding each input
      token (-1: pruned), or None for DCT).
    """
    num_prefix = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = x.new_ones(x.shape[:2])
    source = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    depth = len(model.blocks)
    prop_attn = (method == "mctf") if prop_attn is None else prop_attn
    for layer, (block, block_r) in enumerate(zip(model.blocks, parse_r(depth, r))):
        block_r = min(block_r, (x.shape[1] - num_prefix) // 2)
        if method == "dct":
            x, size, dest = dct_block(block, x, size, block_r, num_prefix)
        elif method == "mctf":
            x, size, dest = mctf_block(block, x, size, block_r, num_prefix, prop_attn=prop_attn, **settings)
        else:
            step = None
            if block_r > 0:
                step = {
                    "pitome": lambda: pitome_step(layer, depth, block_r, num_prefix, **settings),
                    "tofu": lambda: tofu_step(layer, depth, block_r, num_prefix, **settings),
                    "evit": lambda: evit_step(block_r, num_prefix, **settings),
                    "random_drop": lambda: random_drop_step(block_r, num_prefix, settings["draws"](layer)),
                }[method]()
            x, size, dest = reduced_block(block, x, size, step, prop_attn)
        if dest is None:
            source = None if method == "dct" else source
        elif source is not None:
            source = torch.where(source < 0, -1, dest.gather(1, source.clamp(min=0)))
    return model.forward_head(model.norm(x)), source


def as_numpy(tensor):
    return None if tensor is None else np.asarray(tensor)
