"""The token-reduction methods (tome_jax.reduce): equal to their PyTorch references on
random-weight timm ViTs (logits, and every merge/prune decision through the sources),
and shape-, size-, jit-, vmap- and grad-safe."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import torch_reduce as ref  # noqa: E402
from test_vit import SMALL, images_for, random_variables  # noqa: E402
from tome_jax import ViT, from_timm, merge, reduce, schedules, token_features  # noqa: E402

# A timm ViT-Ti/16 (or DeiT-Ti distilled) at 96 px with 4 blocks: 36 patches. This
# schedule leaves 27, 21, 17 and 14 tokens (with one prefix token), so every method
# removes up to about a third of its tokens in a layer, in both PiToMe matchings.
SCHEDULE = [10, 6, 4, 3]
IMAGE_SIZE = 96


@functools.cache
def timm_model(name, reg_tokens=0):
    """Random weights with noise on every parameter (timm's init leaves cls tokens near zero)."""
    torch.manual_seed(0)
    extra = dict(reg_tokens=reg_tokens) if reg_tokens else {}
    model = timm.create_model(name, pretrained=False, depth=4, img_size=IMAGE_SIZE, **extra)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@functools.cache
def converted(name, reg_tokens=0):
    return from_timm(timm_model(name, reg_tokens))


def torch_images(batch=3):
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))


def random_drop_draws(model, batch, seed=0):
    """The draws tome_jax's RandomDrop makes without an rng, for the reference: layer -> [batch, tokens - prefix]."""
    counts = schedules.tokens_per_layer(model.num_tokens, SCHEDULE, model.num_prefix_tokens)

    def draws(layer):
        key = jax.random.fold_in(jax.random.key(seed), layer)
        shape = (batch, counts[layer] - model.num_prefix_tokens)
        return torch.from_numpy(np.array(jax.random.uniform(key, shape)))

    return draws


# name: (the tome_jax method, the reference's method and settings)
CASES = {
    "pitome": (reduce.PiToMe(), "pitome", {}),
    "pitome_settings": (
        reduce.PiToMe(margin=0.5, alpha=0.5, bipartite_share=0.25),
        "pitome",
        dict(margin=0.5, alpha=0.5, bipartite_share=0.25),
    ),
    "tofu": (reduce.ToFu(), "tofu", {}),
    "tofu_merging_from_layer_2": (reduce.ToFu(merge_after=0.25), "tofu", dict(merge_after=0.25)),
    "evit": (reduce.EViT(), "evit", {}),
    "evit_without_fusion": (reduce.EViT(fuse=False), "evit", dict(fuse=False)),
    "mctf": (reduce.MCTF(), "mctf", {}),
    "mctf_one_way": (reduce.MCTF(bidirectional=False), "mctf", dict(bidirectional=False)),
    "mctf_recomputed_attention": (reduce.MCTF(one_step_ahead=False), "mctf", dict(one_step_ahead=False)),
    "mctf_similarity_only": (
        reduce.MCTF(tau_info=0, tau_size=0, tau_sim=2),
        "mctf",
        dict(tau_info=0, tau_size=0, tau_sim=2),
    ),
    "dct": (reduce.DCT(), "dct", {}),
    "random_drop": (reduce.RandomDrop(), "random_drop", {}),
}
DISTILLED = ["pitome", "tofu_merging_from_layer_2", "evit", "mctf", "dct", "random_drop"]


def outputs(model, variables, images, r, **kwargs):
    """Logits and the final tokens, sizes and sources (None for a method that mixes tokens)."""
    logits, state = model.apply(variables, images, r=r, mutable="intermediates", **kwargs)
    intermediates = state["intermediates"]
    if not model.reduction.tracks_sources:
        return logits, intermediates["tokens"][-1], intermediates["size"][-1], None
    return logits, *token_features(intermediates)


def check_against_reference(name, case, reg_tokens=0):
    method, ref_method, settings = CASES[case]
    model, variables = converted(name, reg_tokens)
    model = model.clone(reduction=method)
    images = torch_images()
    if ref_method == "random_drop":
        settings = dict(draws=random_drop_draws(model, images.shape[0]))
    want, want_source = ref.forward(timm_model(name, reg_tokens), images, SCHEDULE, ref_method, **settings)
    run = jax.jit(functools.partial(outputs, model, r=SCHEDULE))
    logits, tokens_out, _, source = run(variables, images.permute(0, 2, 3, 1).numpy())
    got, want = np.asarray(logits), want.numpy()
    difference = np.abs(got - want).max() / np.abs(want).max()
    assert difference < 1e-4, f"logits differ by {difference:.2e} of their largest"
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    if method.tracks_sources:  # every layer's decisions, composed
        np.testing.assert_array_equal(np.asarray(source), ref.as_numpy(want_source))
    tokens = schedules.tokens_per_layer(model.num_tokens, SCHEDULE, model.num_prefix_tokens)
    assert tokens_out.shape[1] == tokens[-1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case):
    check_against_reference("vit_tiny_patch16_224", case)


@pytest.mark.slow
@pytest.mark.parametrize("case", DISTILLED)
def test_matches_reference_with_distillation_token(case):
    check_against_reference("deit_tiny_distilled_patch16_224", case)


@pytest.mark.slow
@pytest.mark.parametrize("case", DISTILLED)
def test_matches_reference_with_register_tokens(case):
    check_against_reference("vit_tiny_patch16_224", case, reg_tokens=3)


# --- Every method on a tiny Flax ViT ---------------------------------------------------------

# The ways to run inference (the search is DiffRate's training, covered in test_diffrate.py).
METHODS = {name: method() for name, method in reduce.METHODS.items() if name != "diffrate_search"}
TINY = {**SMALL, "img_size": 24}  # 36 patches, 3 blocks: PiToMe's two matchings, ToFu's MLERP in the last


@functools.cache
def tiny(method=None, **prefix):
    """A tiny ViT with `method`, random variables (DTEM's metric layers among them) and images."""
    cfg = {**TINY, **prefix}
    model = ViT(**cfg, reduction=method)
    images = images_for(cfg, batch=3)
    return model, random_variables(model, images), images


def conserves_size(method):
    """Merging keeps every patch; pruning drops some (DCT spreads them evenly; DiffRate
    prunes, and scales a merged token's size by its similarity, as its authors)."""
    return method.name not in ("tofu", "random_drop", "diffrate") and method != reduce.EViT(fuse=False)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shapes_sizes_sources_and_vmap(name):
    # A class token and two registers: prefix tokens in both A (0, 2) and B (1) of the split.
    method = METHODS[name]
    model, variables, images = tiny(method, reg_tokens=2)
    r = (6, -1)
    prefix = model.num_prefix_tokens

    def run(x):
        return outputs(model, variables, x, r)

    logits, tokens_out, size, source = jax.jit(run)(images)
    schedule = schedules.parse_r(model.depth, r)
    tokens = schedules.tokens_per_layer(model.num_tokens, schedule, prefix)
    assert tokens_out.shape == (3, tokens[-1], TINY["width"])
    assert np.isfinite(np.asarray(logits)).all()
    size = np.asarray(size)
    np.testing.assert_array_equal(size[:, :prefix], 1)  # the prefix tokens, untouched
    if conserves_size(method):
        np.testing.assert_allclose(size.sum(1), model.num_tokens, rtol=1e-6)
    if method.tracks_sources:
        source = np.asarray(source)
        np.testing.assert_array_equal(source[:, :prefix], [list(range(prefix))] * 3)
        for example, example_size in zip(source, size):  # each token's size counts the patches it holds
            if method.name == "diffrate":  # but DiffRate's are scaled by similarity
                continue
            counts = np.bincount(example[example >= 0], minlength=tokens[-1])
            np.testing.assert_array_equal(counts, example_size)
    if name != "random_drop":  # its draws depend on the batch (one key, a draw per example), by design
        one_by_one = jax.jit(jax.vmap(lambda x: run(x[None])[0][0]))(images)
        np.testing.assert_allclose(np.asarray(one_by_one), np.asarray(logits), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradients_are_finite(name):
    model, variables, images = tiny(METHODS[name])
    loss = lambda v: jnp.sum(model.apply(v, images, r=5) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(variables)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert np.abs(np.asarray(grads["params"]["blocks_0"]["attn"]["qkv"]["kernel"])).max() > 0


def test_tome_method_is_the_default():
    model, variables, images = tiny()
    default = jax.jit(lambda v, x: model.apply(v, x, r=5))(variables, images)
    chosen = jax.jit(lambda v, x: model.clone(reduction=reduce.ToMe()).apply(v, x, r=5))(variables, images)
    np.testing.assert_array_equal(np.asarray(chosen), np.asarray(default))


def test_prop_attn_defaults_to_the_method_and_can_be_overridden():
    model, variables, images = tiny()
    model = model.clone(reduction=reduce.PiToMe())  # its authors run it without proportional attention
    run = jax.jit(lambda v, x, p: model.apply(v, x, r=5, prop_attn=p), static_argnums=2)
    np.testing.assert_array_equal(np.asarray(run(variables, images, None)), np.asarray(run(variables, images, False)))
    assert np.abs(np.asarray(run(variables, images, True)) - np.asarray(run(variables, images, False))).max() > 1e-4


def test_random_drop_draws_from_the_callers_rng():
    model, variables, images = tiny()
    model = model.clone(reduction=reduce.RandomDrop())
    run = jax.jit(lambda key: outputs(model, variables, images, 5, rngs={"reduction": key})[3])
    first, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert (np.asarray(first) != np.asarray(other)).any()


def test_dct_has_no_sources():
    model, variables, images = tiny()
    model = model.clone(reduction=reduce.DCT())
    record = jax.jit(lambda v, x: model.apply(v, x, r=2, mutable="intermediates")[1]["intermediates"])
    with pytest.raises(ValueError, match="block 0 recorded no merge plan"):
        token_features(record(variables, images))
    with pytest.raises(ValueError, match="DCT mixes tokens"):
        reduce.check_tracks_sources(model.reduction)


def test_bad_methods_say_what_to_do():
    model, variables, images = tiny()
    with pytest.raises(TypeError, match="reduction must be a tome_jax.reduce method"):
        model.clone(reduction=lambda step: step).apply(variables, images, r=2)
    no_class = ViT(**{**TINY, "class_token": False, "global_pool": "avg"}, reduction=reduce.EViT())
    with pytest.raises(ValueError, match="needs a class token"):
        no_class.init(jax.random.key(0), images[:1], r=2)
    with pytest.raises(ValueError, match="unknown token-reduction method 'pitom'"):
        reduce.create("pitom")
    with pytest.raises(ValueError, match="pitome has no setting marign; its settings: margin, alpha"):
        reduce.create("pitome", marign=0.5)


def test_methods_are_hashable_settings():
    assert reduce.create("pitome", margin=0.5) == reduce.PiToMe(margin=0.5)
    assert len({reduce.MCTF(), reduce.MCTF(), reduce.MCTF(tau_info=0)}) == 2
    settings = reduce.default_settings()
    assert settings["mctf"] == dict(tau_sim=1.0, tau_info=20.0, tau_size=40.0, bidirectional=True, one_step_ahead=True)
    assert "tome" not in settings and "dct" not in settings  # nothing to set beyond r


def test_eval_config_selects_the_method_and_its_settings():
    pytest.importorskip("ml_collections")
    from tome_jax import method_config
    from tome_jax.configs import eval_cifar10

    config = eval_cifar10.get_config()
    assert method_config.reduction(config) == reduce.ToMe()
    config.method = "pitome"
    config.pitome.margin = 0.6
    assert method_config.reduction(config) == reduce.PiToMe(margin=0.6)
    config.method = "dct"
    assert method_config.reduction(config) == reduce.DCT()


def test_plans_that_prune_and_merge_apply_alike_in_every_merge_implementation():
    # Token 0 alone, 2 joins 1, 3 and 5 are pruned, 6 joins 4 (DiffRate prunes and merges in one step).
    dest = jnp.array([[0, 1, 1, -1, 2, -1, 2], [2, -1, 0, 0, 1, 1, -1]])
    plan = merge.plan_from_dest(dest, 3, 2)
    groups = [[[0], [1, 2], [4, 6]], [[2, 3], [4, 5], [0]]]
    x = jax.random.normal(jax.random.key(1), (2, 7, 4))
    for implementation in merge.MERGE_IMPLEMENTATIONS:
        got = merge.merge_sum(plan, x, implementation=implementation)
        want = [[np.asarray(x)[b, group].sum(0) for group in groups[b]] for b in range(2)]
        np.testing.assert_allclose(np.asarray(got), np.array(want), rtol=1e-6, err_msg=implementation)
    dropped = np.asarray(dest) == merge.DROPPED
    np.testing.assert_array_equal(np.asarray(merge.unmerge(plan, got))[dropped], 0)
    source = merge.merge_source(plan, merge.initial_source(2, 7))
    np.testing.assert_array_equal(np.asarray(source), np.asarray(dest))
    pruned_before = merge.initial_source(2, 7).at[:, 1].set(merge.DROPPED)
    np.testing.assert_array_equal(np.asarray(merge.merge_source(plan, pruned_before))[:, 1], merge.DROPPED)
