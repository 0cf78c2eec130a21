"""The merge functions: invariants, a NumPy reference, jit/vmap/grad, schedules."""

import json
import pathlib

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings

import numpy_tome as ref
from tome_jax import merge, schedules

# The official ToMe's top-1, schedule and tokens left at each r for the bundled CIFAR-10 model.
TOME_ACCURACY = pathlib.Path(__file__).resolve().parent / "data" / "tome_accuracy.json"


def random_inputs(seed, batch, tokens, channels, metric_kind="normal"):
    rng = np.random.default_rng(seed)
    if metric_kind == "zero":
        metric = np.zeros((batch, tokens, channels), np.float32)
    elif metric_kind == "duplicated":
        metric = np.broadcast_to(rng.normal(size=(batch, 1, channels)), (batch, tokens, channels))
    else:
        metric = rng.normal(size=(batch, tokens, channels))
    x = rng.normal(size=(batch, tokens, 5))
    size = rng.integers(1, 6, size=(batch, tokens)).astype(np.float32)
    return metric.astype(np.float32), x.astype(np.float32), size


def plan_and_wavg(metric, x, size, r, prefix=0):
    plan = merge.bipartite_soft_merge(metric, r, num_prefix_tokens=prefix)
    return plan, *merge.merge_wavg(plan, x, size)


# One compiled program per shape and prefix, instead of op-by-op dispatch.
bipartite_wavg = jax.jit(plan_and_wavg, static_argnames=("r", "prefix"))


def wavg_by_implementation(plan, x, size):
    """Every merge implementation applied to one plan."""
    return {
        impl: merge.merge_wavg(plan, x, size, implementation=impl)
        for impl in merge.MERGE_IMPLEMENTATIONS
    }


def assert_matches_groups(outputs, groups_per_example, x, size):
    """Each implementation's (x, size) against the NumPy reference's groups."""
    for impl, (x_out, size_out) in outputs.items():
        for b, groups in enumerate(groups_per_example):
            want_x, want_size = ref.apply_groups(groups, x[b].astype(np.float64), size[b])
            np.testing.assert_allclose(np.asarray(x_out[b]), want_x, rtol=1e-5, atol=1e-6, err_msg=impl)
            np.testing.assert_array_equal(np.asarray(size_out[b]), want_size, err_msg=impl)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 33),
    r=st.integers(0, 40),
    seed=st.integers(0, 2**16),
    metric_kind=st.sampled_from(["normal", "zero", "duplicated"]),
)
def test_merge_invariants(data, batch, tokens, r, seed, metric_kind):
    prefix = data.draw(st.integers(0, min(tokens, 5)), "prefix")  # class, distillation, registers
    metric, x, size = random_inputs(seed, batch, tokens, 4, metric_kind)
    _, x_out, size_out = bipartite_wavg(metric, x, size, r, prefix)
    x_out, size_out = np.asarray(x_out), np.asarray(size_out)

    r_eff = min(r, (tokens - prefix) // 2)
    assert x_out.shape == (batch, tokens - r_eff, 5)
    assert size_out.shape == (batch, tokens - r_eff)
    np.testing.assert_allclose(size_out.sum(1), size.sum(1))  # total size conserved
    assert (size_out > 0).all()
    assert np.isfinite(x_out).all()
    # The size-weighted sum of features is conserved too.
    np.testing.assert_allclose(
        (x_out * size_out[..., None]).sum(1), (x * size[..., None]).sum(1), rtol=1e-4, atol=1e-4
    )
    for i in range(prefix):  # prefix tokens first, in order, untouched
        np.testing.assert_allclose(x_out[:, i], x[:, i], rtol=1e-6)  # x * s / s rounds
        np.testing.assert_array_equal(size_out[:, i], size[:, i])
    if r == 0:
        np.testing.assert_array_equal(x_out, x)
        np.testing.assert_array_equal(size_out, size)


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(2, 30), r=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_merging_identical_tokens_is_exact(tokens, r, seed):
    metric, _, size = random_inputs(seed, 2, tokens, 4)
    value = np.random.default_rng(seed).normal(size=(2, 1, 5)).astype(np.float32)
    x = np.broadcast_to(value, (2, tokens, 5))
    _, x_out, _ = bipartite_wavg(metric, x, size, r)
    np.testing.assert_allclose(np.asarray(x_out), np.broadcast_to(value, x_out.shape), rtol=1e-6)


PREFIXES = [0, 1, 2, 5]  # none, class, class + distillation, class + 4 registers


class MergeFunctionsTest(chex.TestCase):
    """The pure functions of tome_jax.merge against the NumPy reference and pooling's gradients,
    each run twice by chex.variants: compiled by jax.jit and op by op."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(prefix=PREFIXES, tokens_r=[(2, 1), (9, 2), (16, 8), (17, 3), (31, 15), (40, 100)])
    def test_bipartite_matches_numpy_reference(self, prefix, tokens_r):
        tokens, r = tokens_r
        if prefix > tokens:
            self.skipTest("more prefix tokens than tokens")
        metric, x, size = random_inputs(tokens * 31 + r, 3, tokens, 6)
        apply = self.variant(plan_and_wavg, static_argnames=("r", "prefix"))
        plan, x_out, size_out = apply(metric, x, size, r, prefix)
        y = np.random.default_rng(0).normal(size=(3, plan.tokens_out, 2)).astype(np.float32)
        unmerged = np.asarray(self.variant(merge.unmerge)(plan, jnp.asarray(y)))
        source = np.asarray(self.variant(merge.merge_source)(plan, merge.initial_source(3, tokens)))
        groups = [ref.bipartite_groups(metric[b], r, prefix) for b in range(3)]
        outputs = {"default": (x_out, size_out), **self.variant(wavg_by_implementation)(plan, x, size)}
        assert_matches_groups(outputs, groups, x, size)
        for b in range(3):
            np.testing.assert_array_equal(unmerged[b], ref.unmerge_groups(groups[b], y[b], tokens))
            for j, group in enumerate(groups[b]):
                assert sorted(np.flatnonzero(source[b] == j)) == sorted(group)

    @chex.variants(with_jit=True, without_jit=True)
    def test_merges_chain_and_unmerge_inverts_the_chain(self):
        """Two merges: sources compose, and unmerging both restores full resolution."""
        metric, x, _ = random_inputs(7, 2, 21, 4)

        @self.variant
        def chain(metric, x):
            plan1 = merge.bipartite_soft_merge(metric, 5, num_prefix_tokens=1)
            x1, size1 = merge.merge_wavg(plan1, x)
            plan2 = merge.bipartite_soft_merge(x1[..., :4], 4, num_prefix_tokens=1)
            x2, size2 = merge.merge_wavg(plan2, x1, size1)
            source = merge.merge_source(plan2, merge.merge_source(plan1, merge.initial_source(2, 21)))
            restored = merge.unmerge(plan1, merge.unmerge(plan2, x2))
            return x2, size2, source, merge.source_matrix(source, x2.shape[1]), restored

        x2, size2, source, matrix, restored = (np.asarray(a) for a in chain(jnp.asarray(metric), jnp.asarray(x)))
        np.testing.assert_array_equal(matrix.sum(-1), size2)  # group sizes agree
        np.testing.assert_array_equal(restored, np.take_along_axis(x2, source[..., None], axis=1))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(prefix=[0, 1, 5], tokens_k=[(12, 2), (13, 3), (20, 4), (9, 1)])
    def test_kth_matches_numpy_reference(self, prefix, tokens_k):
        tokens, k = tokens_k
        metric, x, size = random_inputs(tokens + k, 2, tokens, 5)
        plan = self.variant(merge.kth_bipartite_merge, static_argnames=("k", "num_prefix_tokens"))(
            jnp.asarray(metric), k, num_prefix_tokens=prefix
        )
        groups = [ref.kth_groups(metric[b], k, prefix) for b in range(2)]
        assert_matches_groups(self.variant(wavg_by_implementation)(plan, x, size), groups, x, size)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*PREFIXES)
    def test_random_matcher_matches_numpy_reference(self, prefix):
        tokens, r = 19, 6
        metric, x, size = random_inputs(3, 4, tokens, 5)
        plan = self.variant(merge.random_bipartite_merge, static_argnames=("r", "num_prefix_tokens"))(
            jnp.asarray(metric), r, jax.random.key(1), num_prefix_tokens=prefix
        )
        merged = np.asarray(plan.merged)
        assert len({tuple(sorted(m)) for m in merged}) > 1  # each example draws its own set
        groups = []
        for b in range(4):
            a_pos = sorted(merged[b])
            assert len(a_pos) == r and min(a_pos) >= prefix
            b_pos = [i for i in range(prefix, tokens) if i not in a_pos]
            groups.append(ref.groups_into_best(metric[b], a_pos, b_pos, prefix))
        assert_matches_groups(self.variant(wavg_by_implementation)(plan, x, size), groups, x, size)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*merge.MERGE_IMPLEMENTATIONS)
    def test_gradients_flow_like_pooling(self, implementation):
        """d(sum of merged)/dx_i = size_i / size of its group; the matching gets none."""
        metric, x, size = random_inputs(5, 2, 15, 4)

        def total(x, metric):
            plan = merge.bipartite_soft_merge(metric, 5, num_prefix_tokens=1)
            return merge.merge_wavg(plan, x, jnp.asarray(size), implementation=implementation)[0].sum()

        grads = self.variant(jax.grad(total, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(metric))
        grad_x, grad_metric = (np.asarray(g) for g in grads)
        plan = merge.bipartite_soft_merge(jnp.asarray(metric), 5, num_prefix_tokens=1)
        group_size = np.asarray(merge.merge_sum(plan, jnp.asarray(size)))
        want = size / np.take_along_axis(group_size, np.asarray(plan.dest), axis=1)
        np.testing.assert_allclose(grad_x, np.broadcast_to(want[..., None], x.shape), rtol=1e-6)
        np.testing.assert_array_equal(grad_metric, 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_implementations_agree_in_values_and_gradients(self):
        """Weighted sums of the outputs, differentiated in x and in size, by every implementation."""
        metric, x, size = random_inputs(9, 3, 23, 4)
        plan = merge.bipartite_soft_merge(jnp.asarray(metric), 7, num_prefix_tokens=2)
        weights = np.random.default_rng(1).normal(size=(3, plan.tokens_out, 5)).astype(np.float32)

        @self.variant
        def value_and_grads(x, size):
            def loss(x, size, implementation):
                x_out, size_out = merge.merge_wavg(plan, x, size, implementation=implementation)
                summed = merge.merge_sum(plan, x, implementation=implementation)
                return (x_out * weights).sum() + (summed * weights).sum() + (size_out * weights[..., 0]).sum()

            return {
                impl: jax.value_and_grad(loss, argnums=(0, 1))(x, size, impl)
                for impl in merge.MERGE_IMPLEMENTATIONS
            }

        results = value_and_grads(jnp.asarray(x), jnp.asarray(size))
        want_value, want_grads = results["scatter"]
        for impl, (value, grads) in results.items():
            np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6, err_msg=impl)
            chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-6, custom_message=impl)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_are_finite_for_degenerate_metrics(self):
        @self.variant
        @jax.grad
        def total_grad(metric):
            plan = merge.bipartite_soft_merge(metric, 4)
            return merge.merge_wavg(plan, metric)[0].sum()

        for metric in (jnp.zeros((1, 10, 3)), jnp.ones((1, 10, 3))):
            chex.assert_tree_all_finite(total_grad(metric))


@pytest.mark.parametrize("class_token,distill_token", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("tokens,r", [(9, 2), (16, 8), (17, 3), (40, 100)])
def test_prefix_rule_is_the_official_one_for_class_and_distillation_tokens(class_token, distill_token, tokens, r):
    """The general rule's reference equals the official flags' transcription."""
    metric = random_inputs(tokens + r, 3, tokens, 6)[0]
    prefix = int(class_token) + int(distill_token)
    for b in range(3):
        assert ref.bipartite_groups(metric[b], r, prefix) == ref.official_groups(
            metric[b], r, class_token, distill_token
        )


def test_kth_rejects_a_stride_longer_than_the_sequence():
    with pytest.raises(ValueError, match="k=9 exceeds the 5 mergeable tokens"):
        merge.kth_bipartite_merge(jnp.ones((1, 6, 3)), 9, num_prefix_tokens=1)


def test_jit_vmap_and_eager_agree():
    metric, x, size = random_inputs(11, 2, 25, 4)
    stacked = np.stack([metric, metric[::-1]]), np.stack([x, x[::-1]]), np.stack([size, size[::-1]])

    def step(m, x, s):
        return merge.merge_wavg(merge.bipartite_soft_merge(m, 7, num_prefix_tokens=1), x, s)

    eager = [step(*(jnp.asarray(a[i]) for a in stacked)) for i in range(2)]
    jitted = jax.jit(jax.vmap(step))(*(jnp.asarray(a) for a in stacked))
    for i in range(2):
        np.testing.assert_allclose(np.asarray(jitted[0][i]), np.asarray(eager[i][0]), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(jitted[1][i]), np.asarray(eager[i][1]))


def test_unknown_merge_implementation_is_named():
    plan = merge.bipartite_soft_merge(jnp.ones((1, 6, 2)), 2)
    with pytest.raises(ValueError, match="unknown merge implementation 'gather'; expected one of scatter"):
        merge.merge_sum(plan, jnp.ones((1, 6, 3)), implementation="gather")


def test_one_compilation_serves_every_batch():
    step = jax.jit(
        lambda m, x: merge.merge_wavg(merge.bipartite_soft_merge(m, 6, num_prefix_tokens=1), x)
    )
    for seed in range(4):
        metric, x, _ = random_inputs(seed, 2, 20, 4)
        step(jnp.asarray(metric), jnp.asarray(x))
    assert step._cache_size() == 1


def test_r_is_clamped_at_trace_time():
    metric = jnp.asarray(random_inputs(0, 1, 11, 3)[0])
    assert merge.bipartite_soft_merge(metric, 100).tokens_out == 11 - 5
    assert merge.bipartite_soft_merge(metric, 100, num_prefix_tokens=1).tokens_out == 11 - 5
    assert merge.bipartite_soft_merge(metric, 100, num_prefix_tokens=2).tokens_out == 11 - 4
    assert merge.bipartite_soft_merge(metric, 100, num_prefix_tokens=5).tokens_out == 11 - 3
    assert merge.clamp_r(3, 11, 1) == 3
    assert merge.clamp_r(9, 11, 1) == 5
    assert merge.clamp_r(9, 1, 1) == 0
    with pytest.raises(ValueError, match="r must be >= 0, got -1"):
        merge.bipartite_soft_merge(metric, -1)
    with pytest.raises(TypeError, match="r must be a Python int"):
        merge.bipartite_soft_merge(metric, 2.5)
    with pytest.raises(TypeError, match="r must be a Python int"):
        merge.bipartite_soft_merge(metric, jnp.int32(2))
    with pytest.raises(ValueError, match=r"num_prefix_tokens must be in \[0, 11\] for 11 tokens, got 12"):
        merge.bipartite_soft_merge(metric, 2, num_prefix_tokens=12)
    with pytest.raises(TypeError, match="num_prefix_tokens must be a Python int"):
        merge.bipartite_soft_merge(metric, 2, num_prefix_tokens=True)


def test_parse_r_reproduces_the_official_schedules():
    table = json.loads(TOME_ACCURACY.read_text())
    for key, row in table.items():
        r = eval(key)  # "4" or "(8, -1.0)", the official spec that made the row
        assert list(schedules.parse_r(12, r)) == row["schedule"], key
        tokens = schedules.tokens_per_layer(65, row["schedule"], protected=1)
        assert tokens[-1] == row["tokens_left"], key
    for r in [0, 3, (5, -1), (5, 0.5), (7, 1), (4, 0), [1, 2, 3]]:
        assert list(schedules.parse_r(12, r)) == ref.parse_r(12, r), r
    assert schedules.parse_r(3, [4, 2]) == (4, 2, 0)
    assert schedules.parse_r(1, (6, -1)) == (12,)


@pytest.mark.parametrize(
    "r,error,message",
    [
        (-2, ValueError, "r must be >= 0"),
        ([1, -1], ValueError, r"r\[1\] must be >= 0"),
        ([1] * 5, ValueError, "r lists 5 layers but the model has 4"),
        ((4, 2.0), ValueError, r"inflection must be a number in \[-1, 1\]"),
        ((4, 0.5, 1), TypeError, r"r\[1\] must be an int"),
        ("8", TypeError, "r must be an int, an"),
        (True, TypeError, "r must be an int, an"),
    ],
)
def test_parse_r_errors_name_the_problem(r, error, message):
    with pytest.raises(error, match=message):
        schedules.parse_r(4, r)


def test_schedule_for_token_budget():
    full = 197 * 12
    assert schedules.schedule_for_token_budget(197, 12, full, protected=1) == (0,) * 12
    schedule = schedules.schedule_for_token_budget(197, 12, full // 2, protected=1)
    assert sum(schedules.tokens_per_layer(197, schedule, 1)[:-1]) <= full // 2
    smaller = schedules.parse_r(12, schedule[0] - 1)
    assert sum(schedules.tokens_per_layer(197, smaller, 1)[:-1]) > full // 2  # fewest merges
    decreasing = schedules.schedule_for_token_budget(197, 12, full // 2, protected=1, inflection=-1)
    assert decreasing[0] > decreasing[-1]
    assert sum(schedules.tokens_per_layer(197, decreasing, 1)[:-1]) <= full // 2
    with pytest.raises(ValueError, match="out of reach"):
        schedules.schedule_for_token_budget(197, 12, 100, protected=1)
