"""A plain PyTorch DTEM soft merge, one example at a time, written from the conventions
docs/methods.md states (its section "DTEM's soft merge").

Deliberately naive (Python loops over tokens, float64, autograd for gradients) so
that it shares no code and no vectorisation trick with tome_jax.dtem.
"""

import numpy as np
import torch

EPS = float(np.finfo(np.float32).eps)


def candidates(row, k2):
    """The k2 best columns of one score row, best first, ties by lower column."""
    row = row.detach()
    return sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:k2]


def soft_khot(scores, r, k2, tau1, tau2):
    """scores: [num_a, num_b] tensor -> [num_a, num_b] soft assignment."""
    num_a, num_b = scores.shape
    columns = [candidates(scores[i], k2) for i in range(num_a)]
    logits = torch.stack([scores[i, columns[i]] for i in range(num_a)]) / tau1
    khot = torch.zeros_like(logits)
    for _ in range(r):
        p = torch.softmax(logits.reshape(-1) / tau2, dim=0).reshape(logits.shape)
        khot = khot + p
        logits = logits + torch.log(torch.clamp(1 - p.sum(dim=1, keepdim=True), min=EPS))
    khot = khot / torch.clamp(khot.sum(dim=1, keepdim=True).detach(), min=1.0)
    rows = []
    for i in range(num_a):
        row = [torch.zeros((), dtype=scores.dtype)] * num_b
        for m, j in enumerate(columns[i]):
            row[j] = row[j] + khot[i, m]
        rows.append(torch.stack(row))
    return torch.stack(rows)


def clip_straight_through(value):
    return value + (torch.clamp(value, 0.0, 1.0) - value).detach()


def merge_assigned(x, size, assign, n):
    """One example. x: [tokens, c], size: [tokens], assign: [num_a, num_b].

    Returns x [tokens, c], size [tokens]; A, B sorted by size descending (stable).
    """
    a_pos, b_pos = list(range(1, n, 2)), list(range(2, n, 2))
    new = []  # (size, features) of every A then every B token
    for i, a in enumerate(a_pos):
        kept = 1 - sum(assign[i, j] for j in range(len(b_pos)))
        new.append((size[a] * clip_straight_through(kept), x[a]))
    for j, b in enumerate(b_pos):
        total_size, total_x = size[b], size[b] * x[b]
        for i, a in enumerate(a_pos):
            total_size = total_size + assign[i, j] * size[a]
            total_x = total_x + assign[i, j] * size[a] * x[a]
        new.append((total_size, total_x / total_size))
    # The sort sees float32 sizes, as tome_jax does, so float64 noise cannot reorder ties.
    order = sorted(range(len(new)), key=lambda t: -np.float32(new[t][0].detach()))
    tokens = [(size[0], x[0])] + [new[t] for t in order]
    tokens += [(size[t], x[t]) for t in range(n, x.shape[0])]
    return torch.stack([t[1] for t in tokens]), torch.stack([t[0] for t in tokens])


def soft_merge(x, size, metric, r, n, k2=3, tau1=0.1, tau2=0.1):
    """One example: returns x [tokens, c], size [tokens], the new n and the assignment."""
    r = min(r, max(n - 1, 0) // 2)
    if r == 0:
        return x, size, n, None
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a_pos, b_pos = list(range(1, n, 2)), list(range(2, n, 2))
    scores = torch.stack([torch.stack([unit[a] @ unit[b] for b in b_pos]) for a in a_pos])
    assign = soft_khot(scores, r, k2, tau1, tau2)
    x, size = merge_assigned(x, size, assign, n)
    return x, size, n - r, assign
