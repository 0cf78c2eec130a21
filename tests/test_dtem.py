"""DTEM's soft merge: invariants, the hard merge as its limit, a PyTorch reference, gradients."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import tome_jax
from tome_jax import dtem, merge, schedules


def random_inputs(seed, batch, tokens, metric_kind="normal", channels=5, feat=4):
    """metric [batch, tokens, feat], x [batch, tokens, channels], size [batch, tokens].

    Sizes are drawn from [0.5, 4), not integers as in test_merge, so that the sort by
    size rarely meets a tie, which float32 and float64 could order differently.
    """
    rng = np.random.default_rng(seed)
    if metric_kind == "zero":
        metric = np.zeros((batch, tokens, feat))
    elif metric_kind == "duplicated":
        metric = np.broadcast_to(rng.normal(size=(batch, 1, feat)), (batch, tokens, feat))
    else:
        metric = rng.normal(size=(batch, tokens, feat))
    x = rng.normal(size=(batch, tokens, channels))
    size = rng.uniform(0.5, 4.0, size=(batch, tokens))
    return tuple(np.asarray(a, np.float32) for a in (metric, x, size))


@functools.partial(jax.jit, static_argnames=("r", "n", "k2", "tau1", "tau2"))
def soft_merge(x, size, metric, r, n, k2=3, tau1=0.1, tau2=0.1):
    """One compiled program per shape and setting, instead of op-by-op dispatch."""
    return dtem.dtem_soft_merge(x, size, metric, r, n, k2=k2, tau1=tau1, tau2=tau2)


merge_assigned = jax.jit(dtem.merge_assigned, static_argnames=("n",))
hard_plan = jax.jit(merge.bipartite_soft_merge, static_argnames=("r",))
hard_merge = jax.jit(merge.merge_wavg)


def token_loss(x, size, weights, xp):
    """A scalar loss that ignores token order (tied sizes may sort either way).

    Non-linear in size and features: the size-weighted feature sum is conserved by
    the merge, so a linear loss would give the metric no gradient. `xp`: jnp or torch.
    """
    proj = x @ weights
    return (size**2 * xp.cos(proj[..., 0]) + xp.sin(proj[..., 1])).sum()


@functools.partial(jax.jit, static_argnames=("r", "n", "k2", "tau1", "tau2"))
def soft_merge_grads(x, size, metric, weights, r, n, k2=3, tau1=0.1, tau2=0.1):
    """Gradients of `token_loss` after one soft merge, w.r.t. (x, size, metric)."""

    def loss(x, size, metric):
        out = dtem.dtem_soft_merge(x, size, metric, r, n, k2=k2, tau1=tau1, tau2=tau2)
        return token_loss(out.x, out.size, weights, jnp)

    return jax.grad(loss, argnums=(0, 1, 2))(x, size, metric)


def assert_same_tokens(x1, size1, x2, size2, atol):
    """The two [tokens, c], [tokens] outputs hold the same (size, features) rows, any order."""
    rows1 = np.concatenate([size1[:, None], x1], axis=1)
    rows2 = np.concatenate([size2[:, None], x2], axis=1)
    assert rows1.shape == rows2.shape
    distance = np.abs(rows1[:, None] - rows2[None]).max(-1)
    nearest = distance.argmin(axis=1)
    assert len(set(nearest)) == len(nearest), "two tokens matched the same one"
    assert distance[np.arange(len(rows1)), nearest].max() <= atol


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 2),
    tokens=st.integers(1, 20),
    r=st.integers(0, 12),
    k2=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    metric_kind=st.sampled_from(["normal", "zero", "duplicated"]),
)
def test_soft_merge_invariants(data, batch, tokens, r, k2, seed, metric_kind):
    n = data.draw(st.integers(0, tokens), "n")
    metric, x, size = random_inputs(seed, batch, tokens, metric_kind)
    x_out, size_out, n_out, assign = (np.asarray(a) for a in soft_merge(x, size, metric, r, n, k2))
    r_eff = min(r, max(n - 1, 0) // 2)
    assert n_out == n - r_eff

    assert x_out.shape == x.shape and size_out.shape == size.shape
    assert assign.shape == (batch, len(range(1, n, 2)), len(range(2, n, 2)))
    assert np.isfinite(x_out).all() and (size_out >= 0).all()
    np.testing.assert_allclose(size_out.sum(1), size.sum(1), rtol=1e-5)  # size conserved
    np.testing.assert_allclose(  # and so is the size-weighted feature sum
        (x_out * size_out[..., None]).sum(1), (x * size[..., None]).sum(1), rtol=1e-4, atol=1e-4
    )
    untouched = [0, *range(max(n, 1), tokens)]
    np.testing.assert_array_equal(x_out[:, untouched], x[:, untouched])
    np.testing.assert_array_equal(size_out[:, untouched], size[:, untouched])
    assert (assign >= 0).all() and (assign.sum(-1) <= 1 + 1e-6).all()
    assert (assign.sum((1, 2)) <= r_eff + 1e-4).all()
    if r_eff == 0:
        np.testing.assert_array_equal(x_out, x)
        np.testing.assert_array_equal(size_out, size)
    else:
        assert (np.diff(size_out[:, 1:n], axis=1) <= 0).all()  # largest first


def hard_plan_and_assignment(metric, r, n):
    """ToMe's plan on tokens 1..n-1 (its A/B split is then DTEM's) and its one-hot assignment."""
    plan = hard_plan(metric[:, 1:n], r=r)
    num_a, num_b = dtem.num_a_b(n)
    assign = np.zeros((metric.shape[0], num_a, num_b), np.float32)
    kept, dest = np.asarray(plan.kept), np.asarray(plan.dest)
    for example, merged in enumerate(np.asarray(plan.merged)):
        partners = kept[example, dest[example, merged]]  # odd sub-positions, B tokens
        assign[example, merged // 2, (partners - 1) // 2] = 1.0
    return plan, assign


@pytest.mark.parametrize("tokens,n,r", [(9, 9, 4), (17, 17, 5), (20, 15, 3), (12, 12, 1)])
def test_one_hot_assignment_is_the_hard_merge(tokens, n, r):
    metric, x, size = random_inputs(tokens + r, 2, tokens)
    plan, assign = hard_plan_and_assignment(metric, r, n)
    hard_x, hard_size = (np.asarray(a) for a in hard_merge(plan, x[:, 1:n], size[:, 1:n]))
    soft_x, soft_size = (np.asarray(a) for a in merge_assigned(x, size, assign, n))
    # With a low temperature the soft selection makes ToMe's choice. A tau1 of 1 keeps
    # the scores' range below the log(eps) that pushes a chosen row down.
    low_x, low_size, _, low_assign = soft_merge(x, size, metric, r, n, k2=2, tau1=1.0, tau2=1e-5)
    np.testing.assert_allclose(np.asarray(low_assign), assign, atol=1e-5)

    for out_x, out_size in ((soft_x, soft_size), (np.asarray(low_x), np.asarray(low_size))):
        np.testing.assert_array_equal(out_x[:, [0, *range(n, tokens)]], x[:, [0, *range(n, tokens)]])
        np.testing.assert_allclose(out_size[:, n - r : n], 0.0, atol=1e-5)  # merged: last, faded
        for b in range(2):
            assert_same_tokens(
                out_x[b, 1 : n - r], out_size[b, 1 : n - r], hard_x[b], hard_size[b], atol=1e-4
            )


REFERENCE_CASES = [  # batch, tokens, n, r, k2, tau1, tau2
    (2, 9, 9, 2, 3, 0.1, 0.1),
    (2, 9, 9, 4, 3, 0.1, 0.1),  # r = every B token: rows get capped
    (2, 17, 17, 8, 3, 0.1, 0.1),
    (1, 20, 14, 4, 1, 0.1, 0.1),
    (2, 25, 25, 6, 5, 0.5, 0.2),
    (2, 16, 11, 100, 2, 0.1, 0.1),  # r clamped to (n - 1) // 2
    (1, 30, 30, 10, 3, 1.0, 1.0),
]


def reference_merge(metric, x, size, weights, r, n, k2, tau1, tau2):
    """Per example, float64: outputs, assignment and `token_loss` gradients."""
    import torch
    import torch_dtem as ref

    torch.set_num_threads(1)  # tiny tensors, one example at a time
    outputs = []
    for b in range(x.shape[0]):
        inputs = [torch.tensor(a[b], dtype=torch.float64, requires_grad=True) for a in (x, size, metric)]
        out_x, out_size, out_n, assign = ref.soft_merge(*inputs, r, n, k2, tau1, tau2)
        token_loss(out_x, out_size, torch.tensor(weights, dtype=torch.float64), torch).backward()
        grads = [t.grad.numpy() for t in inputs]
        outputs.append((out_x.detach().numpy(), out_size.detach().numpy(), out_n, assign.detach().numpy(), grads))
    return outputs


def relative_error(got, want):
    """Largest error over the batch, relative to the largest value over the batch.

    Per example would be unfair: an example whose selection is saturated has a tiny
    metric gradient made mostly of float32 rounding (float32 PyTorch is no closer).
    """
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


@pytest.mark.parametrize("batch,tokens,n,r,k2,tau1,tau2", REFERENCE_CASES)
def test_agrees_with_torch_reference(batch, tokens, n, r, k2, tau1, tau2):
    pytest.importorskip("torch", reason="the DTEM reference is PyTorch: pip install -e '.[torch]'")
    metric, x, size = random_inputs(tokens * 7 + r, batch, tokens)
    weights = np.random.default_rng(r).normal(size=(5, 2)).astype(np.float32)
    settings_ = dict(r=r, n=n, k2=k2, tau1=tau1, tau2=tau2)
    out_x, out_size, out_n, assign = (np.asarray(a) for a in soft_merge(x, size, metric, **settings_))
    grads = [np.asarray(g) for g in soft_merge_grads(x, size, metric, weights, **settings_)]
    want = reference_merge(metric, x, size, weights, **settings_)
    assert out_n == want[0][2]

    np.testing.assert_allclose(assign, np.stack([w[3] for w in want]), atol=2e-4)
    assert relative_error(out_size, np.stack([w[1] for w in want])) < 3e-5
    for b, (want_x, want_size, *_) in enumerate(want):
        assert_same_tokens(out_x[b], out_size[b], want_x, want_size, atol=3e-4)
    for i, name in enumerate(("x", "size", "metric")):
        assert relative_error(grads[i], np.stack([w[4][i] for w in want])) < 3e-4, name


def test_gradients_reach_metric_x_and_size():
    metric, x, size = random_inputs(3, 2, 21)
    weights = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    grad_x, grad_size, grad_metric = soft_merge_grads(x, size, metric, weights, r=6, n=21)
    for grad in (grad_x, grad_size, grad_metric):
        assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 1e-3
    # Only tokens that take part give the metric a gradient.
    grad_metric = soft_merge_grads(x, size, metric, weights, r=6, n=13)[2]
    np.testing.assert_array_equal(np.asarray(grad_metric)[:, 13:], 0.0)


def test_drop_residue_zeroes_the_sizes_behind_n_only():
    metric, x, size = (jnp.asarray(a, jnp.float32) for a in random_inputs(5, 2, 21))
    kept = dtem.dtem_soft_merge(x, size, metric, r=6, n=17)
    dropped = dtem.dtem_soft_merge(x, size, metric, r=6, n=17, drop_residue=True)
    assert kept.n == dropped.n == 11
    np.testing.assert_array_equal(np.asarray(dropped.size[:, :11]), np.asarray(kept.size[:, :11]))
    np.testing.assert_array_equal(np.asarray(dropped.size[:, 11:]), 0.0)
    np.testing.assert_array_equal(np.asarray(dropped.x), np.asarray(kept.x))
    assert float(kept.size[:, 11:17].sum()) > 0  # the residue the official merge keeps
    grad = jax.grad(lambda m: dtem.dtem_soft_merge(x, size, m, r=6, n=17, drop_residue=True).size[:, :11].sum())
    assert np.abs(np.asarray(grad(metric))).max() > 0  # the metric still learns


@pytest.mark.parametrize("metric_kind", ["zero", "duplicated"])
def test_gradients_are_finite_for_degenerate_inputs(metric_kind):
    metric, x, size = random_inputs(4, 2, 15, metric_kind)
    size[:, 2:8] = 0.0  # faded tokens, as earlier soft merges leave them
    weights = np.ones((5, 2), np.float32)
    for grad in soft_merge_grads(x, size, metric, weights, r=5, n=15):
        assert np.isfinite(np.asarray(grad)).all()
    assert np.isfinite(np.asarray(soft_merge(x, size, metric, 5, 15)[0])).all()


def test_clip_is_straight_through():
    """An assignment row summing over 1 leaves size 0, yet the gradient is the unclipped one."""
    x, size = jnp.ones((1, 5, 2)), jnp.array([[1.0, 2.0, 1.0, 3.0, 1.0]])
    assign = jnp.array([[[0.9, 0.6], [0.0, 0.0]]])  # A tokens 1, 3; B tokens 2, 4
    total_size = lambda a: merge_assigned(x, size, a, 5)[1].sum()  # noqa: E731
    assert np.asarray(merge_assigned(x, size, assign, 5)[1]).min() == 0.0
    # B gained 1.5 x 2 but A lost only its 2: the clip adds size, as in the official code.
    assert float(total_size(assign)) == float(size.sum()) + 1.0
    # Unclipped, total size does not depend on the assignment at all.
    np.testing.assert_array_equal(np.asarray(jax.grad(total_size)(assign)), 0.0)


def test_bfloat16_features_accumulate_in_float32():
    metric, x, size = random_inputs(5, 2, 17)
    want_x, want_size, *_ = soft_merge(x, size, metric, 5, 17)
    got_x, got_size, *_ = soft_merge(jnp.asarray(x, jnp.bfloat16), size, metric, 5, 17)
    assert got_x.dtype == jnp.bfloat16 and got_size.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got_size), np.asarray(want_size), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_x, np.float32), np.asarray(want_x), atol=3e-2)


def test_one_compilation_serves_every_batch():
    step = jax.jit(lambda x, s, m: dtem.dtem_soft_merge(x, s, m, 4, 17))
    spread = lambda x, s, m: dtem.dtem_soft_merge(x, s, m, 4, 17).size.var()  # noqa: E731
    grad = jax.jit(jax.grad(spread, argnums=2))
    for seed in range(4):
        metric, x, size = random_inputs(seed, 2, 19)
        step(x, size, metric)
        grad(x, size, metric)
    assert step._cache_size() == 1 and grad._cache_size() == 1


def test_r_is_clamped_and_n_follows_tokens_per_layer():
    metric, x, size = random_inputs(0, 1, 13)
    step = jax.jit(dtem.dtem_soft_merge, static_argnames=("r", "n"))
    schedule, n, ns = (4, 4, 4, 4, 4), 13, [13]
    for r in schedule:
        out = step(x, size, metric, r=r, n=n)
        x, size, n = out.x, out.size, int(out.n)
        ns.append(n)
    assert tuple(ns) == schedules.tokens_per_layer(13, schedule, protected=1) == (13, 9, 5, 3, 2, 2)
    # Nothing left to merge: the inputs come back, sizes as float32.
    out = dtem.dtem_soft_merge(x, size.astype(jnp.float16), metric, 3, 2)
    assert out.n == 2 and out.assign.shape == (1, 1, 0) and out.size.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.x), np.asarray(x))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(r=-1), ValueError, "r must be >= 0, got -1"),
        (dict(r=2.5), TypeError, "r must be a Python int"),
        (dict(n=12), ValueError, r"n must be in \[0, 11\], got 12"),
        (dict(n=-1), ValueError, r"n must be in \[0, 11\], got -1"),
        (dict(k2=0), ValueError, "k2 must be >= 1, got 0"),
        (dict(tau1=0.0), ValueError, "tau1 must be > 0, got 0.0"),
        (dict(tau2=-0.1), ValueError, "tau2 must be > 0, got -0.1"),
        (dict(r=0, tau2=-0.1), ValueError, "tau2 must be > 0"),
        (dict(size=np.ones((2, 10))), ValueError, r"agree on \[batch, tokens\]"),
        (dict(metric=np.ones((2, 11))), ValueError, r"agree on \[batch, tokens\]"),
    ],
)
def test_errors_name_the_problem(kwargs, error, message):
    metric, x, size = random_inputs(0, 2, 11)
    args = dict(x=x, size=size, metric=metric, r=3, n=11) | kwargs
    with pytest.raises(error, match=message):
        dtem.dtem_soft_merge(**args)


def test_more_prefix_tokens_shift_the_split_past_them():
    """prefix=3 merges what prefix=1 merges on the tokens from the third on, the first two untouched."""
    metric, x, size = random_inputs(7, batch=2, tokens=19)
    wide = dtem.dtem_soft_merge(x, size, metric, 4, 17, prefix=3)
    narrow = dtem.dtem_soft_merge(x[:, 2:], size[:, 2:], metric[:, 2:], 4, 15, prefix=1)
    np.testing.assert_array_equal(np.asarray(wide.x[:, :2]), x[:, :2])
    np.testing.assert_allclose(np.asarray(wide.x[:, 2:]), np.asarray(narrow.x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(wide.size[:, 2:]), np.asarray(narrow.size), rtol=1e-6, atol=1e-6)
    assert wide.assign.shape == narrow.assign.shape == (2, *dtem.num_a_b(17, prefix=3))


def test_merge_assigned_rejects_a_mismatched_assignment():
    _, x, size = random_inputs(0, 2, 11)
    with pytest.raises(ValueError, match=r"assign has shape \(2, 5, 5\), expected \(2, 4, 4\) for n=9"):
        dtem.merge_assigned(x, size, np.zeros((2, 5, 5), np.float32), 9)


def test_public_functions_are_exported():
    for name in ("SoftMerge", "dtem_soft_merge", "merge_assigned", "soft_khot", "soft_merge_scores"):
        assert getattr(tome_jax, name) is getattr(dtem, name)
