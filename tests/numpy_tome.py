"""A plain NumPy ToMe, one example at a time, written from the conventions the README states
(its sections "The merge as a function" and "The ViT").

It is deliberately naive (Python loops, lists of groups) so that it shares no code
and no vectorisation trick with tome_jax.
"""

import numpy as np


def unit(metric):
    norm = np.linalg.norm(metric, axis=-1, keepdims=True)
    return metric / np.maximum(norm, np.finfo(np.float32).tiny)


def bipartite_groups(metric, r, class_token=False, distill_token=False):
    """One example. metric: [tokens, c].

    Returns the output tokens as a list of groups, each group the list of input
    positions it holds, first element the token whose slot it is.
    """
    tokens = metric.shape[0]
    protected = int(class_token) + int(distill_token)
    r = min(r, (tokens - protected) // 2)
    if r <= 0:
        return [[i] for i in range(tokens)]
    m = unit(metric.astype(np.float64))
    a_pos = list(range(0, tokens, 2))
    b_pos = list(range(1, tokens, 2))
    best = []
    for ai, a in enumerate(a_pos):
        scores = [m[a] @ m[b] for b in b_pos]
        if class_token and ai == 0:
            scores = [-np.inf] * len(b_pos)
        if distill_token:
            scores[0] = -np.inf
        j = int(np.argmax(scores))
        best.append((scores[j], ai, j))
    # Descending by score; ties by position (stable), as tome_jax documents.
    order = [ai for _, ai, _ in sorted(best, key=lambda e: (-e[0], e[1]))]
    merged, unmerged = order[:r], order[r:]
    if class_token:
        unmerged = sorted(unmerged)
    b_groups = [[b] for b in b_pos]
    for ai in merged:
        b_groups[best[ai][2]].append(a_pos[ai])
    a_groups = [[a_pos[ai]] for ai in unmerged]
    if distill_token:
        return a_groups[:1] + b_groups[:1] + a_groups[1:] + b_groups[1:]
    return a_groups + b_groups


def groups_into_best(metric, a_pos, b_pos, protected):
    """Every token of a_pos joins its most similar token of b_pos.

    Output: each protected token alone, then the b_pos groups in sequence order.
    """
    m = unit(metric.astype(np.float64))
    groups = {b: [b] for b in b_pos}
    for a in a_pos:
        scores = [m[a] @ m[b] for b in b_pos]
        groups[b_pos[int(np.argmax(scores))]].append(a)
    return [[p] for p in range(protected)] + [groups[b] for b in sorted(b_pos)]


def kth_groups(metric, k, class_token=False):
    tokens = metric.shape[0]
    p = int(class_token)
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
