"""The Flax ViT: r = 0 equals a plain ViT, merging behaves, configs and errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import tome_jax
from tome_jax import layers, schedules

SMALL = dict(num_classes=7, img_size=16, patch_size=4, width=24, depth=3, num_heads=3)


def layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def dense(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "quick_gelu": lambda x: x * sigmoid(1.702 * x),
    "silu": lambda x: x * sigmoid(x),
}


def softmax_attention(q, k, v):
    """[batch, heads, tokens, head_dim] each; keys may be fewer or more than queries."""
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def mlp(x, p, cfg, eps):
    act = ACTIVATIONS[cfg.get("act_layer", "gelu")]
    kind = cfg.get("mlp_layer", "mlp")
    if kind == "swiglu_packed":
        gate, value = np.split(dense(x, p["fc1"]), 2, axis=-1)
        h = act(gate) * value
    elif kind == "swiglu":
        h = act(dense(x, p["fc1_g"])) * dense(x, p["fc1_x"])
    else:
        h = act(dense(x, p["fc1"]))
    if "norm" in p:
        h = layer_norm(h, p["norm"], eps)
    return dense(h, p["fc2"])


def attention_pool(x, p, heads, cfg, eps):
    """SigLIP's MAP head: a learned query attends over x [batch, tokens, width]."""
    batch, tokens, width = x.shape
    q = dense(p["latent"], p["q"]).reshape(1, 1, heads, -1).transpose(0, 2, 1, 3)
    kv = dense(x, p["kv"]).reshape(batch, tokens, 2, heads, -1)
    k, v = (kv[:, :, j].transpose(0, 2, 1, 3) for j in range(2))
    y = softmax_attention(np.broadcast_to(q, (batch, *q.shape[1:])), k, v)
    y = dense(y.transpose(0, 2, 1, 3).reshape(batch, 1, width), p["proj"])
    return (y + mlp(layer_norm(y, p["norm"], eps), p["mlp"], {"act_layer": cfg.get("act_layer", "gelu")}, eps))[:, 0]


def plain_vit(params, images, cfg):
    """A textbook ViT forward in float64 NumPy: no sizes, no merging, no sharing with tome_jax."""
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    images = np.asarray(images, np.float64)
    batch, height, width, chans = images.shape
    ph, pw = cfg["patch_size"] if isinstance(cfg["patch_size"], tuple) else (cfg["patch_size"],) * 2
    patches = images.reshape(batch, height // ph, ph, width // pw, pw, chans).transpose(0, 1, 3, 2, 4, 5)
    kernel = params["patch_embed"]["kernel"]  # [ph, pw, chans, dim]
    x = np.einsum("bhwijc,ijcd->bhwd", patches, kernel) + params["patch_embed"].get("bias", 0.0)
    x = x.reshape(batch, -1, kernel.shape[-1])
    prefix = [
        np.broadcast_to(params[k], (batch, *params[k].shape[1:]))
        for k in ("cls_token", "dist_token", "reg_token")
        if k in params
    ]
    eps = cfg.get("norm_eps", 1e-6)
    if cfg.get("no_embed_class"):
        x = np.concatenate(prefix + [x + params["pos_embed"]], 1)
    else:
        x = np.concatenate(prefix + [x], 1) + params["pos_embed"]
    if cfg.get("pre_norm"):
        x = layer_norm(x, params["norm_pre"], eps)
    heads = cfg["num_heads"]
    for i in range(cfg["depth"]):
        p = params[f"blocks_{i}"]
        h = layer_norm(x, p["norm1"], eps)
        tokens, dim = h.shape[1:]
        qkv = dense(h, p["attn"]["qkv"]).reshape(batch, tokens, 3, heads, dim // heads)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        if "q_norm" in p["attn"]:
            q, k = layer_norm(q, p["attn"]["q_norm"], eps), layer_norm(k, p["attn"]["k_norm"], eps)
        y = dense(softmax_attention(q, k, v).transpose(0, 2, 1, 3).reshape(batch, tokens, dim), p["attn"]["proj"])
        x = x + y * p["ls_1"]["gamma"] if "ls_1" in p else x + y
        h = mlp(layer_norm(x, p["norm2"], eps), p["mlp"], cfg, eps)
        x = x + h * p["ls_2"]["gamma"] if "ls_2" in p else x + h
    prefix_len = sum(p.shape[1] for p in prefix)
    if cfg.get("global_pool") == "avg":
        pooled = x[:, prefix_len:].mean(1)
        pooled = layer_norm(pooled, params["fc_norm"], eps) if "fc_norm" in params else pooled
    elif cfg.get("global_pool") == "map":
        x = layer_norm(x, params["norm"], eps)
        pooled = attention_pool(x[:, prefix_len:], params["attn_pool"], heads, cfg, eps)
    else:
        x = layer_norm(x, params["norm"], eps)
        pooled = x[:, 0]
    if "head_dist" in params:
        return (dense(pooled, params["head"]) + dense(x[:, 1], params["head_dist"])) / 2
    return dense(pooled, params["head"])


STATIC = ("r", "train", "prop_attn", "mutable")


def jit_apply(model):
    """model.apply compiled once per static option set (eager Flax dispatches op by op)."""
    return jax.jit(model.apply, static_argnames=STATIC)


def random_variables(model, images, seed=0):
    """Every leaf drawn at random, so that no zero-initialised head hides a bug. Only the
    shapes come from `init`, traced abstractly, and NumPy draws the values: running `init`
    and JAX's generator op by op compiles each op alone, which takes long."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(seed), images)
    draw = lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape) + (leaf.ndim == 1) * 0.5, jnp.float32)  # noqa: E731
    return jax.tree_util.tree_map(draw, shapes)


def images_for(cfg, batch=2, seed=0):
    size = cfg["img_size"] if isinstance(cfg["img_size"], tuple) else (cfg["img_size"],) * 2
    return jax.random.normal(jax.random.key(seed), (batch, *size, 3))


VARIANTS = {
    "class_token": {},
    "distilled": dict(distill_token=True),
    "gap_no_class_token": dict(class_token=False, global_pool="avg"),
    "gap_fc_norm_layer_scale": dict(global_pool="avg", layer_scale_init=0.1),
    "deit3_no_embed_class": dict(no_embed_class=True, layer_scale_init=1e-1),
    "pre_norm": dict(pre_norm=True),
    "qk_norm": dict(qk_norm=True),
    "non_square": dict(img_size=(16, 24), patch_size=(4, 8)),
    "clip_quick_gelu_eps": dict(pre_norm=True, act_layer="quick_gelu", norm_eps=1e-5),
    "siglip_map_gelu_tanh": dict(class_token=False, global_pool="map", act_layer="gelu_tanh"),
    "registers": dict(reg_tokens=4, no_embed_class=True, layer_scale_init=0.1),
    "registers_in_pos_embed": dict(reg_tokens=2),
    "map_registers_no_class_token": dict(class_token=False, reg_tokens=3, global_pool="map"),
    "swiglu_packed": dict(mlp_layer="swiglu_packed", act_layer="silu"),
    "swiglu_norm": dict(mlp_layer="swiglu", act_layer="silu", scale_mlp_norm=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_r0_equals_plain_vit(variant):
    cfg = {**SMALL, **VARIANTS[variant]}
    model = tome_jax.ViT(**cfg)
    images = images_for(cfg)
    variables = random_variables(model, images)
    want = plain_vit(variables["params"], images, cfg)
    for prop_attn in (True, False):  # sizes are all 1 at r = 0: log 1 = 0
        got = jit_apply(model)(variables, images, r=0, prop_attn=prop_attn)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "variant", ["class_token", "distilled", "gap_no_class_token", "registers", "map_registers_no_class_token"]
)
def test_merging_keeps_protected_tokens_and_conserves_size(variant):
    cfg = {**SMALL, **VARIANTS[variant], "depth": 4}
    model = tome_jax.ViT(**cfg)
    images = images_for(cfg)
    variables = random_variables(model, images)
    for r in (2, (3, -1), (5, 0, 1)):  # a per-layer tuple is hashable, so jit-static
        logits, state = jit_apply(model)(variables, images, r=r, mutable="intermediates")
        final = tome_jax.token_features(state["intermediates"])
        schedule = schedules.parse_r(cfg["depth"], r)
        tokens = schedules.tokens_per_layer(model.num_tokens, schedule, model.num_prefix_tokens)
        assert final.tokens.shape == (2, tokens[-1], cfg["width"])
        np.testing.assert_array_equal(np.asarray(final.size.sum(1)), model.num_tokens)
        assert logits.shape == (2, cfg["num_classes"]) and np.isfinite(np.asarray(logits)).all()
        source = np.asarray(final.source)
        for i in range(model.num_prefix_tokens):
            np.testing.assert_array_equal(np.asarray(final.size[:, i]), 1)
            np.testing.assert_array_equal(source[:, i], i)
        counts = np.stack([np.bincount(s, minlength=tokens[-1]) for s in source])
        np.testing.assert_array_equal(counts, np.asarray(final.size))


def test_gap_pooling_weights_merged_tokens_by_size():
    cfg = {**SMALL, **VARIANTS["gap_no_class_token"], "num_classes": 0}
    model = tome_jax.ViT(**cfg)
    images = images_for(cfg)
    variables = random_variables(model, images)
    pooled, state = jit_apply(model)(variables, images, r=3, mutable="intermediates")
    final = tome_jax.token_features(state["intermediates"])
    weights = np.asarray(final.size)[..., None]
    want = (np.asarray(final.tokens, np.float64) * weights).sum(1) / weights.sum(1)
    fc_norm = jax.tree_util.tree_map(np.asarray, variables["params"]["fc_norm"])
    np.testing.assert_allclose(np.asarray(pooled), layer_norm(want, fc_norm), rtol=1e-4, atol=1e-4)


def test_attention_pool_counts_patches():
    """`log(size)` in the MAP head's logits is the pool over every token repeated once
    per patch it holds: a merged token weighs as its patches did unmerged."""
    pool = layers.AttentionPool(num_heads=3, act_layer="gelu_tanh")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32)
    size = jnp.asarray(rng.integers(1, 4, size=(2, 5)), jnp.float32)
    variables = pool.init(jax.random.key(0), x, size)
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables = jax.tree_util.tree_unflatten(tree, [0.3 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    pooled = np.asarray(pool.apply(variables, x, size))
    for b in range(2):
        repeated = np.repeat(np.asarray(x[b]), np.asarray(size[b]).astype(int), axis=0)[None]
        want = pool.apply(variables, jnp.asarray(repeated), jnp.ones(repeated.shape[:2]))
        np.testing.assert_allclose(pooled[b], np.asarray(want)[0], rtol=1e-5, atol=1e-5)
    plain = np.asarray(pool.apply(variables, x, jnp.ones(size.shape)))
    assert np.abs(plain - pooled).max() > 1e-3  # the sizes matter


@pytest.mark.parametrize("variant", ["distilled", "gap_no_class_token"])
def test_block_features_equal_a_model_cut_after_the_block(variant):
    cfg = {**SMALL, **VARIANTS[variant], "depth": 4}
    model = tome_jax.ViT(**cfg)
    images = images_for(cfg)
    variables = random_variables(model, images)
    schedule = schedules.parse_r(4, (3, -1))
    _, state = jit_apply(model)(variables, images, r=schedule, mutable="intermediates")
    intermediates = state["intermediates"]
    counts = schedules.tokens_per_layer(model.num_tokens, schedule, model.num_prefix_tokens)
    for k in range(4):
        assert intermediates[f"blocks_{k}"]["tokens"][0].shape == (2, counts[k + 1], cfg["width"])

    # Block 2's output is the output of the same model cut after block 2.
    cut = model.clone(depth=3)
    params = {k: v for k, v in variables["params"].items() if k != "blocks_3"}
    _, cut_state = jit_apply(cut)({"params": params}, images, r=schedule[:3], mutable="intermediates")
    want = tome_jax.token_features(cut_state["intermediates"], block=-1)
    for block in (2, -2):
        got = tome_jax.token_features(intermediates, block)
        np.testing.assert_allclose(np.asarray(got.tokens), np.asarray(want.tokens), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(got.size), np.asarray(want.size))
        np.testing.assert_array_equal(np.asarray(got.source), np.asarray(want.source))

    # The final tokens are the last block's after the final norm (none with fc_norm).
    last, final = tome_jax.token_features(intermediates, -1), tome_jax.token_features(intermediates)
    norm = variables["params"].get("norm")
    want = np.asarray(last.tokens) if norm is None else layer_norm(np.asarray(last.tokens, np.float64), norm)
    np.testing.assert_allclose(np.asarray(final.tokens), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(final.size), np.asarray(last.size))
    np.testing.assert_array_equal(np.asarray(final.source), np.asarray(last.source))


def test_features_refuse_what_they_cannot_read():
    """Checked while tracing, as under `jax.jit`: `jax.eval_shape` runs nothing."""
    model = tome_jax.ViT(**SMALL)
    images = images_for(SMALL)
    variables = random_variables(model, images)
    logits = jax.eval_shape(functools.partial(model.apply, r=2), variables, images)
    assert logits.shape == (2, SMALL["num_classes"])  # without the collection: logits alone
    apply = functools.partial(model.apply, r=2, mutable="intermediates")
    intermediates = jax.eval_shape(apply, variables, images)[1]["intermediates"]
    patches = lambda model: jax.eval_shape(functools.partial(tome_jax.patch_features, model), intermediates)  # noqa: E731
    assert patches(model).shape == (2, 4, 4, SMALL["width"])
    with pytest.raises(ValueError, match=r"no blocks in these intermediates: pass state\['intermediates'\]"):
        tome_jax.token_features({"intermediates": intermediates})
    with pytest.raises(ValueError, match="block 3 is out of range for a ViT of 3 blocks"):
        tome_jax.token_features(intermediates, block=3)
    with pytest.raises(ValueError, match="trace 17 input tokens, but the model has 5"):
        patches(model.clone(img_size=8))


def test_r_is_chosen_per_call_and_compiles_once_per_schedule():
    model = tome_jax.ViT(**SMALL)
    images = images_for(SMALL)
    variables = random_variables(model, images)
    apply = jit_apply(model)
    outputs = {}
    for r in (0, 3, (3, -1), 0, 3):
        for seed in range(3):
            outputs[r, seed] = apply(variables, images_for(SMALL, seed=seed), r=r)
    assert apply._cache_size() == 3
    assert not np.allclose(np.asarray(outputs[0, 0]), np.asarray(outputs[3, 0]))


def test_gradients_with_merging_and_stochastic_depth_are_finite():
    cfg = {**SMALL, "drop_path_rate": 0.2}
    model = tome_jax.ViT(**cfg)
    images = images_for(cfg)
    variables = random_variables(model, images)

    def loss(params):
        logits = model.apply(
            {"params": params}, images, r=(4, -1), train=True, rngs={"dropout": jax.random.key(3)}
        )
        return jax.nn.log_softmax(logits)[:, 0].mean()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])
    assert np.isfinite(flat).all() and np.abs(flat).max() > 0


def test_gelu_is_exact_with_its_derivative_over_the_whole_range():
    x = np.linspace(-12, 12, 4801)
    got = np.asarray(jax.jit(layers.gelu)(jnp.asarray(x, jnp.float32)), np.float64)
    cdf = 0.5 * (1 + erf(x / math.sqrt(2)))
    np.testing.assert_allclose(got, x * cdf, rtol=1e-6, atol=1e-6)
    slope = np.asarray(jax.jit(jax.vmap(jax.grad(layers.gelu)))(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(slope, cdf + x * np.exp(-(x**2) / 2) / math.sqrt(2 * math.pi), atol=1e-6)


def test_attention_implementations_agree():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 9, 3, 8)), jnp.float32) for _ in range(3))
    size = jnp.asarray(rng.integers(1, 5, size=(2, 9)), jnp.float32)
    outputs = {
        impl: np.asarray(tome_jax.proportional_attention(q, k, v, size, implementation=impl))
        for impl in ("einsum", "xla")
    }
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8) + np.log(np.asarray(size))[:, None, None, :]
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)
    for impl, got in outputs.items():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        tome_jax.proportional_attention(q, k, v, implementation="flash")


def test_bfloat16_compute_tracks_float32():
    images = images_for(SMALL)
    model32 = tome_jax.ViT(**SMALL)
    variables = random_variables(model32, images)
    model16 = tome_jax.ViT(**SMALL, dtype=jnp.bfloat16)
    got = jit_apply(model16)(variables, images, r=2)
    assert got.dtype == jnp.bfloat16
    want = jit_apply(model32)(variables, images, r=2)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=0.1, atol=0.3)


def test_pixels_past_the_last_whole_patch_are_dropped():
    """As a strided convolution drops them: 18 x 19 px in 4 px patches is the 16 x 16
    model on the top-left 16 x 16 pixels (timm's So400m/14 at 384 px reads 378)."""
    uneven = tome_jax.ViT(**{**SMALL, "img_size": (18, 19)})
    assert uneven.grid_size == (4, 4) and uneven.num_tokens == 17
    images = images_for({"img_size": (18, 19)})
    variables = random_variables(uneven, images)
    for r in (0, 2):
        got = jit_apply(uneven)(variables, images, r=r)
        want = jit_apply(tome_jax.ViT(**SMALL))(variables, images[:, :16, :16], r=r)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "overrides,shape,message",
    [
        ({}, (1, 18, 16, 3), r"image size \(18, 16\) differs from the model's img_size \(16, 16\)"),
        ({}, (1, 20, 20, 3), r"image size \(20, 20\) differs from the model's img_size \(16, 16\)"),
        (dict(img_size=3), (1, 3, 3, 3), r"image size \(3, 3\) is smaller than one patch \(4, 4\)"),
        (dict(class_token=False), (1, 16, 16, 3), "global_pool='token' needs a class token"),
        (dict(class_token=False, distill_token=True, global_pool="avg"), (1, 16, 16, 3), "distillation token needs a class token"),
        (dict(global_pool="max"), (1, 16, 16, 3), r"global_pool must be one of \('token', 'avg', 'map', 'token_avg', 'cls_distill_avg'\)"),
        (dict(act_layer="relu"), (1, 16, 16, 3), r"act_layer must be one of \['gelu', 'gelu_tanh', 'quick_gelu', 'silu', 'tanh'\]"),
        (dict(mlp_layer="glu"), (1, 16, 16, 3), "mlp_layer must be one of"),
        (dict(mlp_layer="swiglu_packed", mlp_ratio=0.125), (1, 16, 16, 3), "width \\* mlp_ratio is even"),
        (dict(norm_eps=0.0), (1, 16, 16, 3), "norm_eps must be > 0"),
        (dict(reg_tokens=-1), (1, 16, 16, 3), "reg_tokens must be an int >= 0"),
        (dict(reg_tokens=2, distill_token=True), (1, 16, 16, 3), "register tokens with a distillation token"),
        (dict(num_heads=5), (1, 16, 16, 3), "width 24 is not divisible by num_heads 5"),
        ({}, (16, 16, 3), r"images must be \[batch, height, width, channels\]"),
    ],
)
def test_bad_input_gets_a_clear_error(overrides, shape, message):
    model = tome_jax.ViT(**{**SMALL, **overrides})
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), jnp.zeros(shape))


def test_r_errors_surface_from_the_model():
    model = tome_jax.ViT(**SMALL)
    images = images_for(SMALL)
    variables = model.init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="r lists 4 layers but the model has 3"):
        model.apply(variables, images, r=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="r must be >= 0"):
        model.apply(variables, images, r=-1)


# Parameter counts of timm's models with these names (timm.create_model(name).num_params).
TIMM_PARAM_COUNTS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit3_small_patch16_224": 22_059_496,
    "vit_large_patch16_224": 304_326_632,
    "vit_tiny_patch4_32": 5_362_762,
    "vit_base_patch16_clip_quickgelu_224": 86_193_152,
    "vit_base_patch16_clip_224": 86_568_424,
    "vit_base_patch16_siglip_224": 92_884_224,
    "vit_so400m_patch14_siglip_224": 427_680_704,
    "vit_so400m_patch14_siglip_384": 428_225_600,
    "vit_small_patch14_reg4_dinov2": 22_057_344,
    "vit_giant_patch14_dinov2": 1_136_479_232,
}


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_named_configs_have_timm_parameter_counts(name):
    model = tome_jax.create_model(name)
    size = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == TIMM_PARAM_COUNTS[name]


def test_create_model_rejects_unknown_names_and_attributes():
    with pytest.raises(ValueError, match="unknown model 'vit_gigantic'"):
        tome_jax.create_model("vit_gigantic")
    with pytest.raises(ValueError, match="did you mean vit_small_patch16_224, .*?"):
        tome_jax.create_model("vit_smal_patch16_224")
    with pytest.raises(TypeError, match=r"unknown ViT attributes \['embed_dims'\]"):
        tome_jax.create_model("vit_base_patch16_224", embed_dims=3)
    assert tome_jax.create_model("vit_base_patch16_224.augreg_in21k_ft_in1k").width == 768
