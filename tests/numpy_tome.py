"""A plain NumPy ToMe, one example at a time, written from the conventions docs/models.md states
(its sections "The ViT" and "Merging rules").

It is deliberately naive (Python loops, lists of groups) so that it shares no code
and no vectorisation trick with tome_jax.
"""

import numpy as np


def unit(metric):
    norm = np.linalg.norm(metric, axis=-1, keepdims=True)
    return metric / np.maximum(norm, np.finfo(np.float32).tiny)


def bipartite_groups(metric, r, num_prefix_tokens=0):
    """One example. metric: [tokens, c].

    Returns the output tokens as a list of groups, each group the list of input
    positions it holds, first element the token whose slot it is.
    """
    tokens = metric.shape[0]
    prefix = num_prefix_tokens
    r = min(r, (tokens - prefix) // 2)
    if r <= 0:
        return [[i] for i in range(tokens)]
    m = unit(metric.astype(np.float64))
    a_pos = list(range(0, tokens, 2))
    b_pos = list(range(1, tokens, 2))
    best = []
    for ai, a in enumerate(a_pos):
        # A prefix token in A proposes nothing; one in B receives nothing.
        scores = [-np.inf if a < prefix or b < prefix else m[a] @ m[b] for b in b_pos]
        j = int(np.argmax(scores))
        best.append((scores[j], ai, j))
    # Descending by score; ties by position (stable), as tome_jax documents.
    order = [ai for _, ai, _ in sorted(best, key=lambda e: (-e[0], e[1]))]
    merged, unmerged = order[:r], order[r:]
    b_groups = {b: [b] for b in b_pos}
    for ai in merged:
        b_groups[b_pos[best[ai][2]]].append(a_pos[ai])
    front = [[p] for p in range(prefix)]
    unmerged = [a_pos[ai] for ai in unmerged if a_pos[ai] >= prefix]
    if prefix:
        unmerged = sorted(unmerged)
    rest = [b_groups[b] for b in b_pos if b >= prefix]
    return front + [[a] for a in unmerged] + rest


def official_groups(metric, r, class_token=False, distill_token=False):
    """The official ToMe's bipartite matching, transcribed with its class and
    distillation flags (ALGORITHMS.md, steps 4-8); the same group lists as above."""
    tokens = metric.shape[0]
    r = min(r, (tokens - int(class_token) - int(distill_token)) // 2)
    if r <= 0:
        return [[i] for i in range(tokens)]
    m = unit(metric.astype(np.float64))
    a_pos, b_pos = list(range(0, tokens, 2)), list(range(1, tokens, 2))
    scores = np.array([[m[a] @ m[b] for b in b_pos] for a in a_pos])
    if class_token:
        scores[0, :] = -np.inf
    if distill_token:
        scores[:, 0] = -np.inf
    node_max, node_idx = scores.max(-1), scores.argmax(-1)
    edge_idx = np.argsort(-node_max, kind="stable")
    unm_idx, src_idx = edge_idx[r:], edge_idx[:r]
    if class_token:
        unm_idx = np.sort(unm_idx)
    dst = [[b] for b in b_pos]
    for ai in src_idx:
        dst[node_idx[ai]].append(a_pos[ai])
    unm = [[a_pos[ai]] for ai in unm_idx]
    if distill_token:
        return unm[:1] + dst[:1] + unm[1:] + dst[1:]
    return unm + dst


def groups_into_best(metric, a_pos, b_pos, prefix):
    """Every token of a_pos joins its most similar token of b_pos.

    Output: each of the `prefix` leading tokens alone, then the b_pos groups in sequence order.
    """
    m = unit(metric.astype(np.float64))
    groups = {b: [b] for b in b_pos}
    for a in a_pos:
        scores = [m[a] @ m[b] for b in b_pos]
        groups[b_pos[int(np.argmax(scores))]].append(a)
    return [[p] for p in range(prefix)] + [groups[b] for b in sorted(b_pos)]


def kth_groups(metric, k, num_prefix_tokens=0):
    tokens = metric.shape[0]
    p = num_prefix_tokens
    if k <= 1:
        return [[i] for i in range(tokens)]
    patches = list(range(p, tokens))
    b_pos = [pos for i, pos in enumerate(patches) if i % k == k - 1]
    a_pos = [pos for i, pos in enumerate(patches) if i % k != k - 1]
    return groups_into_best(metric, a_pos, b_pos, p)


def apply_groups(groups, x, size):
    """Size-weighted average per group. x: [tokens, c]; size: [tokens]."""
    x_out = np.stack([sum(size[i] * x[i] for i in g) / sum(size[i] for i in g) for g in groups])
    size_out = np.array([sum(size[i] for i in g) for g in groups])
    return x_out, size_out


def unmerge_groups(groups, y, tokens):
    out = np.zeros((tokens,) + y.shape[1:], y.dtype)
    for j, g in enumerate(groups):
        for i in g:
            out[i] = y[j]
    return out


def parse_r(num_layers, r):
    """The official parse_r, transcribed."""
    inflect = 0
    if isinstance(r, list):
        return list(r) + [0] * (num_layers - len(r))
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]
