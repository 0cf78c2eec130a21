"""DTEM in the ViT: metric layers, soft merge in training, modular training, saving alone."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import tiny_train_config
import tome_jax
from tome_jax import data, evaluate, optim, reduce, sharding, train_lib

SMALL = dict(num_classes=10, img_size=32, patch_size=8, width=48, depth=3, num_heads=3, reduction=reduce.DTEM())


def random_images(seed=0, batch=4):
    return jax.random.normal(jax.random.key(seed), (batch, 32, 32, 3))


def flat(tree):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def test_metric_layer_width_follows_the_paper():
    assert tome_jax.ViT(**SMALL).metric_dim == 16  # head_dim
    assert tome_jax.create_model("vit_large_patch16_224", reduction=reduce.DTEM()).metric_dim == 128  # 2 * head_dim
    assert tome_jax.create_model("vit_base_patch16_224", reduction=reduce.DTEM(dim=32)).metric_dim == 32
    assert tome_jax.create_model("vit_base_patch16_224").metric_dim is None
    model = tome_jax.ViT(**SMALL)
    params = model.init(jax.random.key(0), random_images())["params"]
    assert params["blocks_1"]["metric"]["kernel"].shape == (48, 16)


def test_soft_merge_in_training_keeps_shapes_and_size_hard_merge_at_inference():
    model = tome_jax.ViT(**SMALL)
    images = random_images()
    variables = model.init(jax.random.key(0), images)
    apply = jax.jit(model.apply, static_argnames=("r", "train", "mutable"))
    _, state = apply(variables, images, r=(3, -1), train=True, mutable="intermediates")
    tokens, sizes = (np.asarray(state["intermediates"][name][0]) for name in ("tokens", "size"))
    assert tokens.shape == (4, 17, 48)  # the soft merge removes no token
    np.testing.assert_allclose(sizes.sum(1), 17.0, rtol=1e-5)
    np.testing.assert_allclose(sizes[:, 0], 1.0)  # class token untouched
    assert ((sizes < 0.5).sum(1) >= 1).all() and (sizes.max(1) > 1.5).all(), "mass moved from A to B"
    with pytest.raises(ValueError, match="block 0 recorded no merge plan"):
        tome_jax.token_features(state["intermediates"])  # soft merges cannot be traced back
    _, state = apply(variables, images, r=(3, -1), train=False, mutable="intermediates")
    hard = tome_jax.token_features(state["intermediates"])
    assert hard.tokens.shape[1] < 17  # inference merges for real, on the learned metric
    np.testing.assert_array_equal(np.asarray(hard.size.sum(1)), 17.0)


def test_soft_merge_leaves_every_prefix_token_out():
    """With a class token and two registers the soft merge runs on the patches alone."""
    model = tome_jax.ViT(**SMALL, reg_tokens=2)
    images = random_images()
    variables = model.init(jax.random.key(0), images)
    apply = jax.jit(model.apply, static_argnames=("r", "train", "mutable"))
    _, state = apply(variables, images, r=(3, -1), train=True, mutable="intermediates")
    sizes = np.asarray(state["intermediates"]["size"][0])
    np.testing.assert_allclose(sizes[:, :3], 1.0)
    np.testing.assert_allclose(sizes.sum(1), 19.0, rtol=1e-5)
    assert (sizes.max(1) > 1.5).all(), "mass moved from A to B"


def test_metric_layers_read_a_detached_input():
    """The metric's own output has no gradient with respect to any ViT parameter."""
    model = tome_jax.ViT(**SMALL)
    images = random_images()
    params = model.init(jax.random.key(0), images)["params"]

    def metric_sum(params):
        _, state = model.apply(
            {"params": params}, images, r=0, capture_intermediates=lambda m, _: m.name == "metric",
            mutable=["intermediates"],
        )
        metric_outputs = [out for name, out in flat(state["intermediates"]).items() if "/metric/" in name]
        return sum(out[0].sum() for out in metric_outputs)

    grads = flat(jax.jit(jax.grad(metric_sum))(params))
    for name, grad in grads.items():
        if "/metric/" not in name:
            np.testing.assert_array_equal(np.asarray(grad), 0.0, err_msg=name)
    assert np.abs(np.asarray(grads["blocks_0/metric/kernel"])).max() > 0


def build(config, total_steps=4):
    """Model, mesh, state and train step, from a "trained" ViT: random non-zero weights,
    since a zero-initialised head would give every other parameter a zero gradient."""
    model, _, _ = evaluate.load_model(config)
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree_util.tree_leaves(params))))
    params = jax.tree_util.tree_map(lambda p: p + 0.2 * jax.random.normal(next(keys), p.shape), params)
    tx, schedule = optim.make_optimizer(config, params, total_steps)
    state, shardings = train_lib.create_state(
        model, tx, mesh, rng=jax.random.key(0), params=params
    )
    return model, mesh, state, train_lib.make_train_step(model, tx, schedule, config, mesh, shardings)


def dtem_config(**changes):
    config = tiny_train_config.get_config()
    config.model_overrides = dict(tiny_train_config.TINY)
    config.method = "dtem"
    config.r = "(4, -1)"
    config.learning_rate = 1e-2
    config.weight_decay = 0.0  # so only a gradient can move a parameter
    config.warmup_steps = 0  # the first step already has a learning rate
    config.update(changes)
    return config


@pytest.mark.parametrize("drop_residue", [False, True])
def test_modular_training_moves_only_the_metric_layers_and_compiles_once(drop_residue):
    config = dtem_config(trainable="metric", r="3")  # every block merges
    config.dtem.drop_residue = drop_residue
    model, mesh, state, step = build(config)
    assert model.method == reduce.DTEM(drop_residue=drop_residue)
    before = flat(jax.device_get(state.params))
    rng = np.random.default_rng(0)
    for i in range(3):  # new data every step, one compilation
        batch = {"images": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                 "labels": rng.integers(0, 10, 16).astype(np.int32)}
        state, metrics = step(state, sharding.global_batch(batch, mesh), jax.random.key(1))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert step._cache_size() == 1
    after = flat(jax.device_get(state.params))
    for name in before:
        moved = not np.array_equal(before[name], after[name])
        assert moved == learns_a_merge(name, model.depth), name


def learns_a_merge(name: str, depth: int) -> bool:
    """Metric layers whose merge reaches the output: with token pooling, the last
    block merges after its attention, so nothing reads its merged tokens."""
    return "/metric/" in name and not name.startswith(f"blocks_{depth - 1}/")


def test_end_to_end_training_moves_everything():
    model, mesh, state, step = build(dtem_config())
    before = flat(jax.device_get(state.params))
    rng = np.random.default_rng(0)
    batch = {"images": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
             "labels": rng.integers(0, 10, 16).astype(np.int32)}
    state, _ = step(state, sharding.global_batch(batch, mesh), jax.random.key(1))
    after = flat(jax.device_get(state.params))
    for name in before:
        moved = not np.array_equal(before[name], after[name])
        assert moved == ("/metric/" not in name or learns_a_merge(name, model.depth)), name


def test_metric_layers_save_alone_and_load_onto_the_timm_model(tmp_path):
    base = str(data.ASSETS / "vit_tiny_p4_cifar10.safetensors")
    model, variables = tome_jax.from_timm(base, reduction=reduce.DTEM())
    noisy = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.1 if "metric" in jax.tree_util.keystr(p) else v, variables
    )
    path = tmp_path / "metric_layers.safetensors"
    tome_jax.save_metric_layers(model, noisy, path)
    assert path.stat().st_size < 700_000  # the metric layers only, not the 21 MB ViT
    loaded_model, loaded = tome_jax.from_timm(base, metric_layers=path)
    assert loaded_model.method == reduce.DTEM(dim=64) and loaded_model.metric_dim == 64
    chex.assert_trees_all_equal(loaded, noisy)
    with pytest.raises(ValueError, match="already has metric layers"):
        tome_jax.from_timm(tome_jax.to_timm_state_dict(model, noisy), metric_layers=path)
    with pytest.raises(ValueError, match="has no DTEM metric layers"):
        tome_jax.save_metric_layers(*tome_jax.from_timm(base), path)
    one_line = r"^the checkpoint does not fit [^\n]*: it carries DTEM metric layers \(blocks.\*.metric\) but the model.s"
    with pytest.raises(ValueError, match=one_line + r" reduction is not DTEM: [^\n]*--config.method=dtem\)$"):
        tome_jax.from_timm(base, metric_layers=path, reduction=reduce.ToMe())


def test_metric_layers_from_timm_weights_start_as_tomes_metric():
    """Fresh metric layers hold the keys' mean over heads: the merges are ToMe's."""
    base = str(data.ASSETS / "vit_tiny_p4_cifar10.safetensors")
    images = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))

    def logits(model, variables, r=(8, -1)):  # compiled: 12 blocks op by op take longer
        return np.asarray(jax.jit(model.apply, static_argnames="r")(variables, images, r=r))

    expected = logits(*tome_jax.from_timm(base))
    for dim in (0, 96):  # head_dim (64), and wider: zero features past it
        np.testing.assert_allclose(
            logits(*tome_jax.from_timm(base, reduction=reduce.DTEM(dim=dim))), expected, atol=1e-5, err_msg=str(dim)
        )
    narrow, variables = tome_jax.from_timm(base, reduction=reduce.DTEM(dim=16))  # cannot hold a head
    assert variables["params"]["blocks_0"]["metric"]["kernel"].shape == (192, 16)
    assert not np.allclose(logits(narrow, variables), expected, atol=1e-3)
    # Without a qkv bias (the bias starts at zero) and with several heads.
    timm_vit = pytest.importorskip("timm.models.vision_transformer", reason="a timm module: pip install -e '.[torch]'")
    no_bias = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                         qkv_bias=False, num_classes=10).eval()
    (plain, plain_variables), (learned, learned_variables) = (
        tome_jax.from_timm(no_bias, reduction=method) for method in (reduce.ToMe(), reduce.DTEM())
    )
    np.testing.assert_allclose(logits(learned, learned_variables, r=3), logits(plain, plain_variables, r=3), atol=1e-5)


def test_the_old_dtem_spelling_still_works_and_says_what_replaces_it():
    """`ViT(dtem=True, dtem_dim=, dtem_soft_merge=)` and `apply(soft_merge=)` (before DTEM was a method)."""
    images = random_images()
    one_block = {**SMALL, "depth": 1}  # the spellings meet in every block alike
    new = tome_jax.ViT(**{**one_block, "reduction": reduce.DTEM(dim=8, drop_residue=True)})
    old = tome_jax.ViT(**{**one_block, "reduction": None}, dtem=True, dtem_dim=8,
                       dtem_soft_merge=tome_jax.SoftMergeSettings(drop_residue=True))
    variables = new.init(jax.random.key(0), images)
    with pytest.warns(DeprecationWarning, match=r"reduction=reduce.DTEM\(dim="):
        assert old.metric_dim == 8
        chex.assert_trees_all_equal_shapes(old.init(jax.random.key(0), images), variables)
    for train in (False, True):
        want = new.apply(variables, images, r=3, train=train)
        with pytest.warns(DeprecationWarning):
            got = old.apply(variables, images, r=3, train=train)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # soft_merge= forces the soft merge (or the hard one) whatever `train`.
    with pytest.warns(DeprecationWarning, match="soft_merge='always' or 'never'"):
        forced = new.apply(variables, images, r=3, soft_merge=True)
    np.testing.assert_array_equal(np.asarray(forced), np.asarray(new.apply(variables, images, r=3, train=True)))
    with pytest.raises(ValueError, match="soft_merge needs a DTEM model"), pytest.warns(DeprecationWarning):
        tome_jax.ViT(**{**one_block, "reduction": None}).apply(variables, images, r=2, soft_merge=True)
    with pytest.raises(ValueError, match="DTEM is a reduction method of its own"), pytest.warns(DeprecationWarning):
        tome_jax.ViT(**{**one_block, "reduction": reduce.PiToMe()}, dtem=True).apply(variables, images, r=2)
