"""DiffRate (tome_jax.reduce.diffrate): the search's pure functions, the searching model and
the hard schedule equal the PyTorch reference (torch_diffrate.py, itself checked against the
authors' code); a tiny search through train.py writes a schedule that eval.py runs."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import torch_diffrate as ref  # noqa: E402
from test_train import tiny_config  # noqa: E402
from tome_jax import evaluate, from_timm, reduce, schedules, train_lib  # noqa: E402
from tome_jax.configs import diffrate_search_cifar10, eval_cifar10  # noqa: E402
from tome_jax.reduce import diffrate  # noqa: E402

GRANULARITY = 8
PATCHES = 64  # 32 px images in 4 px patches, as the bundled model
DEPTH = 4


def as_torch(array, grad=False):
    return torch.tensor(np.asarray(array), requires_grad=grad)


def random_logits(seed, layer):
    count = 1 if layer == 0 else diffrate.num_candidates(PATCHES, GRANULARITY)
    return (2 * np.random.default_rng(seed).normal(size=count)).astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_rate_functions_match_the_reference(seed):
    logits = random_logits(seed, layer=1)
    candidates = ref.candidate_counts(PATCHES, GRANULARITY, layer=1)
    np.testing.assert_array_equal(diffrate.candidates(len(logits), PATCHES, GRANULARITY), candidates.numpy())

    kept = diffrate.expected_kept(jnp.asarray(logits), PATCHES, GRANULARITY, 1)
    assert float(kept) == float(ref.kept_number(as_torch(logits), candidates))
    grad = jax.grad(lambda l: diffrate.expected_kept(l, PATCHES, GRANULARITY, 1))(jnp.asarray(logits))
    torch_logits = as_torch(logits, grad=True)
    ref.kept_number(torch_logits, candidates).backward()
    np.testing.assert_allclose(grad, torch_logits.grad.numpy(), rtol=1e-5, atol=1e-6)

    tokens, end = PATCHES + 1, 50
    want_probability = ref.token_probability(as_torch(logits), candidates, tokens)
    got_probability = diffrate.kept_probability(jnp.asarray(logits), tokens, GRANULARITY, 1)
    np.testing.assert_allclose(got_probability, want_probability.numpy(), rtol=1e-6, atol=1e-6)

    weights = np.random.default_rng(seed + 10).normal(size=tokens).astype(np.float32)
    got_mask, mask_grad = jax.value_and_grad(
        lambda l: diffrate.rate_mask(l, kept, end, GRANULARITY, 1, tokens) @ weights
    )(jnp.asarray(logits))
    torch_logits = as_torch(logits, grad=True)
    want_mask = ref.token_mask(torch_logits, candidates, int(kept), end, tokens) @ torch.tensor(weights)
    want_mask.backward()
    np.testing.assert_allclose(got_mask, want_mask.item(), rtol=1e-5)
    np.testing.assert_allclose(mask_grad, torch_logits.grad.numpy(), rtol=1e-5, atol=1e-6)
    hard = diffrate.rate_mask(jnp.asarray(logits), kept, end, GRANULARITY, 1, tokens)
    np.testing.assert_allclose(hard, (np.arange(tokens) < int(kept)) | (np.arange(tokens) >= end), atol=1e-6)


def test_policy_weights_and_flops_match_the_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 9, 9)).astype(np.float32)
    mask = (rng.random((2, 9)) > 0.4).astype(np.float32)
    got = diffrate.policy_weights(jax.nn.softmax(jnp.asarray(logits), -1), jnp.asarray(mask))
    want = ref.softmax_with_policy(torch.tensor(logits), torch.tensor(mask))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-7)

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=32, patch_size=4)
    prune = [float(k) for k in (65, 50, 40)]
    merged = [float(k) for k in (65, 45, 44)]
    prune_t, merge_t = [as_torch(k, grad=True) for k in prune], [as_torch(k, grad=True) for k in merged]
    want_flops = ref.flops(model, prune_t, merge_t)
    want_flops.backward()
    flops_fn = functools.partial(
        diffrate.schedule_flops, tokens=65, width=192, patch_pixels=4 * 4 * 3, num_classes=model.num_classes
    )
    got_flops, (prune_grad, merge_grad) = jax.value_and_grad(flops_fn, argnums=(0, 1))(
        [jnp.float32(k) for k in prune], [jnp.float32(k) for k in merged]
    )
    np.testing.assert_allclose(got_flops, want_flops.item(), rtol=1e-6)
    np.testing.assert_allclose(prune_grad, [t.grad.item() for t in prune_t], rtol=1e-6)
    np.testing.assert_allclose(merge_grad, [t.grad.item() for t in merge_t], rtol=1e-6)


@functools.cache
def timm_model():
    """Random weights with noise on every parameter (timm's init leaves the class token near zero)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=DEPTH, img_size=32, patch_size=4
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def images(batch=3):
    torch.manual_seed(2)
    return torch.randn(batch, 3, 32, 32)


def with_logits(params, prune, merge):
    params = dict(params)
    for i in range(DEPTH):
        logits = {"diffrate_prune": prune[i], "diffrate_merge": merge[i]}
        params[f"blocks_{i}"] = {**params[f"blocks_{i}"], **logits}
    return params


def test_search_forward_matches_the_reference_with_gradients():
    """Logits, FLOPs and the rate logits' gradients of the masked search, against the reference."""
    prune = [random_logits(i, i) for i in range(DEPTH)]
    merge = [random_logits(10 + i, i) for i in range(DEPTH)]
    target = 0.05
    prune_t, merge_t = [as_torch(p, grad=True) for p in prune], [as_torch(m, grad=True) for m in merge]
    logits_t, flops_t, prune_kept, merge_kept = ref.search_forward(
        timm_model(), images(), prune_t, merge_t, GRANULARITY
    )
    assert [int(k) for k in prune_kept][1:] != [65] * (DEPTH - 1)  # the search prunes
    (logits_t.logsumexp(-1).sum() + 5 * (flops_t / 1e9 - target) ** 2).backward()

    model, variables = from_timm(timm_model())
    model = model.clone(reduction=reduce.DiffRateSearch(target_gflops=target, granularity=GRANULARITY))
    x = jnp.asarray(images().permute(0, 2, 3, 1).numpy())

    def loss(prune, merge):
        logits, sown = model.apply(
            {"params": with_logits(variables["params"], prune, merge)}, x, mutable=["losses", "metrics"]
        )
        return jax.nn.logsumexp(logits, -1).sum() + sown["losses"]["diffrate_flops"], (logits, sown)

    (_, (logits, sown)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(prune, merge)
    want = logits_t.detach().numpy()
    assert np.abs(np.asarray(logits) - want).max() < 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(sown["metrics"]["diffrate_gmacs"], flops_t.item() / 1e9, rtol=1e-6)
    for got_grads, want_tensors in zip(grads, (prune_t, merge_t)):
        for got, want in zip(got_grads[1:], want_tensors[1:]):  # the first block has one candidate
            want = want.grad.numpy()
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize(
    "prune_kept, merge_kept",
    [
        ((65, 40, 30, 20), (65, 30, 25, 10)),  # both in a block
        ((65, 65, 50, 20), (60, 40, 45, 20)),  # merging only; counts above the tokens left
        ((65, 20, 3, 3), (65, 10, 20, 2)),  # down to one patch
    ],
)
def test_hard_schedule_matches_the_reference(prune_kept, merge_kept):
    with torch.no_grad():
        want, want_size = ref.inference_forward(timm_model(), images(), prune_kept, merge_kept)
    schedule = diffrate.schedule(prune_kept, merge_kept, PATCHES + 1)
    model, variables = from_timm(timm_model())
    model = model.clone(reduction=reduce.DiffRate(prune=schedule.prune))
    logits = jax.jit(functools.partial(model.apply, r=list(schedule.r)))(
        variables, images().permute(0, 2, 3, 1).numpy()
    )
    want = want.numpy()
    assert np.abs(np.asarray(logits) - want).max() < 1e-5 * np.abs(want).max()
    assert sum(schedule.r) == PATCHES + 1 - want_size.shape[1]


def test_schedule_from_counts():
    found = diffrate.schedule((65, 70, 30, 31), (60, 50, 40, 25), 65)
    assert found.r == (5, 10, 20, 5) and found.prune == (0, 0, 20, 0)


def test_bad_schedules_say_what_to_do():
    model, variables = from_timm(timm_model())
    model = model.clone(reduction=reduce.DiffRate(prune=(0, 9, 0, 0)))
    with pytest.raises(ValueError, match="prunes 9 tokens in block 1"):
        model.apply(variables, np.zeros((1, 32, 32, 3), np.float32), r=[0, 4, 0, 0])
    with pytest.raises(ValueError, match="one class token"):
        model.clone(class_token=False, global_pool="avg", reduction=reduce.DiffRateSearch(target_gflops=0.1)).init(
            jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)
        )


@pytest.mark.slow
def test_a_tiny_search_writes_a_schedule_that_eval_runs(small_cifar, tmp_path):  # noqa: F811
    search = diffrate_search_cifar10.get_config()
    config = tiny_config(f"folder:{small_cifar}", num_steps=4, eval_every=4, eval_limit=16, train_limit=64)
    config.method, config.diffrate_search = "diffrate_search", search.diffrate_search
    config.diffrate_search.target_gflops = 0.0003  # the tiny model has 0.00056 unreduced
    for key in ("trainable", "r", "eval_r", "weight_decay", "grad_clip"):
        config[key] = search[key]
    config.learning_rate = 0.1
    train_lib.train_and_evaluate(config, str(tmp_path))
    found = json.loads((tmp_path / "diffrate_schedule.json").read_text())
    assert len(found["r"]) == len(found["prune"]) == tiny_train_config_depth(config)
    assert found["xla_gflops"] > 0 and found["eval"].startswith("python eval.py --config.method=diffrate")
    assert sum(found["r"]) > 0  # a target below the unreduced model's GFLOPs makes it reduce

    eval_config = eval_cifar10.get_config()
    eval_config.update(model=config.model, pretrained=False, model_overrides=dict(config.model_overrides))
    eval_config.update(dataset=f"folder:{small_cifar}", limit=16, batch_size=8, timing_runs=1)
    eval_config.workdir = str(tmp_path / "eval")
    eval_config.method, eval_config.r = "diffrate", str(found["r"])
    eval_config.diffrate.prune = tuple(found["prune"])
    (row,) = evaluate.run(eval_config)
    assert row["r"] == str(found["r"]) and 0 <= row["top1"] <= 100
    assert row["tokens_left"] == (32 // 8) ** 2 + 1 - sum(found["r"])


def test_the_old_search_spelling_gives_the_search_and_says_what_replaces_it():
    with pytest.warns(DeprecationWarning, match=r"reduce.DiffRateSearch\(target_gflops=...\)"):
        old = reduce.DiffRate(search_gflops=0.2, granularity=2)
    assert old == reduce.DiffRateSearch(target_gflops=0.2, granularity=2)
    with pytest.warns(DeprecationWarning):
        assert reduce.create("diffrate", search_gflops=0.2, flops_weight=7.0) == reduce.DiffRateSearch(0.2, 7.0)
    assert reduce.DiffRate((1, 2)) == reduce.DiffRate(prune=(1, 2))  # the schedule, as before
    with pytest.raises(ValueError, match=r"diffrate_search.target_gflops=0.0: must be > 0"):
        reduce.DiffRateSearch()


def test_schedules_clamp_at_diffrates_limit_not_half():
    """A DiffRate block may keep one token after the class token; eval's table and r lines say so."""
    most = reduce.DiffRate().max_r
    assert schedules.tokens_per_layer(17, [0, 12, 9], 1) == (17, 17, 9, 5)  # ToMe's half
    assert schedules.tokens_per_layer(17, [0, 12, 9], 1, most) == (17, 17, 5, 2)
    assert schedules.describe_r([0, 12, 9], 17, 3, 1, most) == (
        "r=[0, 12, 9]: 17 tokens -> 2; clamped to [0, 12, 3] per layer (the most the method removes per layer)"
    )


def tiny_train_config_depth(config):
    return config.model_overrides["depth"]
