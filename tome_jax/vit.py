"""Vision Transformer (timm's ViT family) with token merging in every block.

The family: ViT/DeiT/AugReg/MAE, CLIP and OpenCLIP towers (pre-norm, QuickGELU,
LayerNorm eps 1e-5), SigLIP (attention pooling, the MAP head), DINOv2 (register
tokens, SwiGLU MLPs).

Parameter names follow timm (`patch_embed`, `cls_token`, `blocks_3/attn/qkv`, ...)
so converted checkpoints read naturally. Images are NHWC; videos [batch, frames,
height, width, channels], embedded in tubelets (a 3-D patch convolution); spectrograms
are one-channel images [batch, freq, time, 1]. Either way the blocks see one flat
token sequence and merge it the same way.

    model = create_model("vit_base_patch16_224")
    variables = {"params": init_params(model)}
    logits = model.apply(variables, images, r=(16, -1))   # any r, same parameters
    logits, state = model.apply(variables, images, r=8, mutable="intermediates")
    tokens = tome_jax.token_features(state["intermediates"]).tokens  # features, sizes, sources
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tome_jax import dtem, merge, reduce, schedules
from tome_jax.reduce import diffrate
from tome_jax.attention import Attention, layer_norm, proportional_attention


class SoftMergeSettings(NamedTuple):
    """DTEM's soft merge hyperparameters (see `dtem.dtem_soft_merge`)."""

    k2: int = 3
    tau1: float = 0.1
    tau2: float = 0.1
    drop_residue: bool = False


def pair(value) -> tuple[int, ...]:
    """A size as a tuple: an int is a square's side, (n, n); a sequence is kept as given."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _patchify(inputs: jax.Array, kernel: tuple[int, ...]) -> jax.Array:
    """[batch, *spatial, channels] -> [batch, *grid, *kernel, channels], grid = floor(spatial / kernel).

    Each patch's pixels end up contiguous, in the order of a convolution kernel.
    Pixels past the last whole patch are dropped, as a strided convolution drops
    them (timm's So400m/14 at 384 px reads 27 x 14 = 378 of them).
    """
    batch, *spatial, channels = inputs.shape
    grid = [extent // k for extent, k in zip(spatial, kernel)]
    inputs = inputs[(slice(None), *(slice(g * k) for g, k in zip(grid, kernel)))]
    split = inputs.reshape(batch, *[d for dims in zip(grid, kernel) for d in dims], channels)
    axes = len(kernel)
    grid_axes, kernel_axes = range(1, 2 * axes, 2), range(2, 2 * axes + 1, 2)
    return split.transpose(0, *grid_axes, *kernel_axes, 2 * axes + 1)


def gelu(x: jax.Array) -> jax.Array:
    """timm's exact GELU, `x * Phi(x)`, through erf as PyTorch computes it.

    flax's default is the tanh approximation, and `nn.gelu(approximate=False)` goes
    through erfc, whose XLA expansion (two branches, exp, divisions) makes the pass
    over the hidden activations several times slower on CPU (README, Speed).
    """
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation, `x * sigmoid(1.702 x)`."""
    return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)


# Activations by timm's `act_layer` names.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
}
# timm's MLPs (its `mlp_layer`): `Mlp`; `SwiGLUPacked` (a `GluMlp` whose one fc1
# holds the gate in its first half, the value in its second); `SwiGLU` (gate and
# value in separate layers, `fc1_g` and `fc1_x`).
MLP_LAYERS = ("mlp", "swiglu_packed", "swiglu")


class Mlp(nn.Module):
    """timm's MLPs: `fc2(act(fc1(x)))`, or gated, `fc2(act(gate) * value)`.

    `hidden_dim` is timm's `hidden_features`, fc1's width: for "swiglu_packed" the
    gate and value halves together. `norm_eps` adds a LayerNorm on the hidden
    features (timm's `scale_mlp_norm`).
    """

    hidden_dim: int
    act_layer: str = "gelu"
    mlp_layer: str = "mlp"
    norm_eps: float | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, tokens, dim] -> [batch, tokens, dim]."""
        width = x.shape[-1]
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        act = ACTIVATIONS[self.act_layer]
        if self.mlp_layer == "swiglu_packed":
            gate, value = jnp.split(dense(self.hidden_dim, "fc1")(x), 2, axis=-1)
            x = act(gate) * value
        elif self.mlp_layer == "swiglu":
            x = act(dense(self.hidden_dim, "fc1_g")(x)) * dense(self.hidden_dim, "fc1_x")(x)
        else:
            x = act(dense(self.hidden_dim, "fc1")(x))
        if self.norm_eps is not None:
            x = layer_norm("norm", self.dtype, self.param_dtype, self.norm_eps)(x)
        return dense(width, "fc2")(x)


class AttentionPool(nn.Module):
    """timm's `AttentionPoolLatent` as SigLIP's MAP head (big_vision's `MAPHead`).

    A learned query (`latent`) attends over the tokens (`q`, `kv`, `proj`), then a
    residual MLP after a LayerNorm. The keys' logits get `log(size)`: a merged
    token weighs as the patches it holds, as in proportional attention.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    act_layer: str = "gelu"
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, size: jax.Array) -> jax.Array:
        """x [batch, tokens, width], size [batch, tokens] -> [batch, width]."""
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        latent = self.param("latent", nn.initializers.normal(width**-0.5), (1, 1, width), self.param_dtype)
        query = dense(width, "q")(latent.astype(x.dtype))
        query = jnp.broadcast_to(query, (batch, 1, width)).reshape(batch, 1, self.num_heads, head_dim)
        kv = dense(2 * width, "kv")(x).reshape(batch, tokens, 2, self.num_heads, head_dim)
        out = proportional_attention(
            query, kv[:, :, 0], kv[:, :, 1], size, implementation=self.attn_implementation
        )
        out = dense(width, "proj")(out.reshape(batch, 1, width))
        mlp = Mlp(
            int(width * self.mlp_ratio), self.act_layer, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp"
        )
        out = out + mlp(layer_norm("norm", self.dtype, self.param_dtype, self.norm_eps)(out))
        return out[:, 0]


class LayerScale(nn.Module):
    init_value: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param(
            "gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), self.param_dtype
        )
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block with a token-reduction step (ToMe's by default).

    The step runs where its method says (`reduce.POSITIONS`): between attention
    and MLP (ToMe), on the block's input (MCTF) or on its output (DCT). The
    attention weights are materialised only for a method that reads them.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale_init: float | None = None
    drop_path: float = 0.0
    act_layer: str = "gelu"
    mlp_layer: str = "mlp"
    scale_mlp_norm: bool = False
    norm_eps: float = 1e-6
    metric_dim: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_implementation: str | None = None
    merge_implementation: str | None = None
    reduction: reduce.Reduction | None = None

    def _residual(self, x, branch, name, train):
        if self.layer_scale_init is not None:
            branch = LayerScale(self.layer_scale_init, self.param_dtype, name=f"ls_{name}")(branch)
        # Stochastic depth: drop the whole branch per example.
        branch = nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(branch, deterministic=not train)
        return x + branch

    def _method(self) -> reduce.Reduction:
        method = reduce.ToMe() if self.reduction is None else self.reduction
        if not isinstance(method, reduce.Reduction):
            raise TypeError(
                f"reduction must be a tome_jax.reduce method (e.g. reduce.PiToMe()), got {method!r}"
            )
        if method.position not in reduce.POSITIONS:
            raise ValueError(f"{type(method).__name__}.position must be one of {reduce.POSITIONS}")
        return method

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        size: jax.Array,
        *,
        r: int,
        num_prefix_tokens: int,
        prop_attn: bool | None,
        layer: int = 0,
        num_layers: int = 1,
        train: bool = False,
        soft_merge: SoftMergeSettings | None = None,
        n: int = 0,
        search: diffrate.SearchState | None = None,
    ) -> tuple[jax.Array, ...]:
        """Args: x [batch, tokens, dim]; size [batch, tokens]; r a static int; the
        first `num_prefix_tokens` tokens (class, distillation, registers) never merge.

        `prop_attn` None means the reduction method's default. `layer` and
        `num_layers` (this block's index, the model's depth) are handed to the
        method, which may act differently by depth (ToFu, PiToMe).

        With `metric_dim`, merging uses DTEM's decoupled embedding of the block's
        normalised input instead of the keys; with `soft_merge` (DTEM training) the
        merge is DTEM's soft merge over the first `n` tokens, which keeps the
        sequence length and fades merged tokens to size 0.

        With `search` (a DiffRate search, `diffrate.search_step`) the attention
        sees only the alive keys and the block's rate logits (parameters
        `diffrate_prune`, `diffrate_merge`) choose what it masks; the sequence
        keeps its length, and the block also returns the next `SearchState`.

        Returns x [batch, tokens - r', dim] and size [batch, tokens - r'], r' being
        r after the clamp (0 for a soft merge, which removes no token). With the
        "intermediates" collection mutable, also records x, size and where each
        input token went (`_sow_intermediates`, from the plan the method returned).
        """
        method = self._method()
        prop_attn = method.prop_attn if prop_attn is None else prop_attn
        norm = lambda name: layer_norm(name, self.dtype, self.param_dtype, self.norm_eps)  # noqa: E731
        norm1 = norm("norm1")
        attn = Attention(
            self.num_heads,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            norm_eps=self.norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            implementation=self.attn_implementation,
            name="attn",
        )
        tokens_in = x.shape[1]
        r = merge.clamp_r(r, tokens_in, num_prefix_tokens, method.max_r(tokens_in, num_prefix_tokens))
        position = method.position if soft_merge is None and search is None and r > 0 else None
        rng = self.make_rng("reduction") if method.needs_rng and self.has_rng("reduction") else None
        step = functools.partial(
            reduce.Step,
            r=r,
            num_prefix_tokens=num_prefix_tokens,
            layer=layer,
            num_layers=num_layers,
            rng=rng,
            implementation=self.merge_implementation,
        )

        plan = weights = None
        if position == reduce.BEFORE_ATTENTION:
            metric = None
            if method.needs_weights:  # the map of the unreduced tokens; the output goes unused
                _, metric, weights = attn(norm1(x), size if prop_attn else None, return_weights=True)
            x, size, plan, weights = method(step(x, size, metric, weights=weights))
        h = norm1(x)
        if search is not None:  # the map of the alive keys (a weights override: the mask multiplies)
            _, _, weights = attn(h, size, return_weights=True)
            weights = diffrate.policy_weights(weights, search.mask)
            y, metric = attn(h, weights=weights)
        elif weights is not None:  # the method's own attention map (MCTF's one-step-ahead attention)
            y, metric = attn(h, weights=weights)
        elif position == reduce.AFTER_ATTENTION and method.needs_weights:
            y, metric, weights = attn(h, size if prop_attn else None, return_weights=True)
        else:
            y, metric = attn(h, size if prop_attn else None)
        if self.metric_dim is not None:
            # The decoupled embedding reads a detached input: learning how to merge
            # never moves the ViT's own features through this path.
            metric = nn.Dense(
                self.metric_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="metric"
            )(jax.lax.stop_gradient(h))
        x = self._residual(x, y, "1", train)

        if soft_merge is not None:
            soft = dtem.dtem_soft_merge(x, size, metric, r, n, **soft_merge._asdict())
            x, size = soft.x, soft.size
        elif search is not None:
            x, size, search = self._search_step(method, x, size, search, weights, layer, num_prefix_tokens)
        elif position == reduce.AFTER_ATTENTION:
            x, size, plan, _ = method(step(x, size, metric, weights=weights))

        mlp = Mlp(
            int(x.shape[-1] * self.mlp_ratio),
            self.act_layer,
            self.mlp_layer,
            self.norm_eps if self.scale_mlp_norm else None,
            self.dtype,
            self.param_dtype,
            name="mlp",
        )
        x = self._residual(x, mlp(norm("norm2")(x)), "2", train)
        if position == reduce.AFTER_MLP:
            x, size, plan, _ = method(step(x, size, metric))
        if self.is_mutable_collection("intermediates"):
            keeps_all = soft_merge is not None or search is not None  # no plan: every token stays
            self._sow_intermediates(x, size, plan, tokens_in, soft=keeps_all)
        return (x, size) if search is None else (x, size, search)

    def _search_step(self, method, x, size, search, weights, layer, num_prefix_tokens):
        """DiffRate's search step with this block's rate logits (the first block keeps every token)."""
        patches = x.shape[1] - num_prefix_tokens
        count = 1 if layer == 0 else diffrate.num_candidates(patches, method.granularity)
        logits = [
            self.param(f"diffrate_{kind}", nn.initializers.zeros, (count,), jnp.float32)
            for kind in ("prune", "merge")
        ]
        return diffrate.search_step(
            x, size, search.mask, weights, *logits,
            granularity=method.granularity, num_prefix_tokens=num_prefix_tokens,
        )

    def _sow_intermediates(self, x, size, plan, tokens_in: int, *, soft: bool):
        """Records the block's output for downstream models (`tome_jax.features`).

        The `plan` (a `merge.MergePlan`, the identity when nothing merged) says where
        each input token went. It is left out where no plan says so: after a soft
        merge, which keeps every token, and after a reduction that removed tokens
        without returning a plan.
        """
        self.sow("intermediates", "tokens", x)
        self.sow("intermediates", "size", size)
        if plan is None and not soft and x.shape[1] == tokens_in:
            plan = merge.identity_plan(x.shape[0], tokens_in)
        if plan is not None:
            self.sow("intermediates", "plan", plan)


class ViT(nn.Module):
    """timm's VisionTransformer (and DeiT's distilled variant) with ToMe.

    Attributes follow timm's constructor: `width` is timm's `embed_dim`,
    `layer_scale_init` its `init_values`; `fc_norm=None` means "norm after pooling
    when `global_pool == 'avg'`", as in timm. `act_layer` (a key of `ACTIVATIONS`),
    `mlp_layer` (one of `MLP_LAYERS`) and `reg_tokens` take timm's names;
    `norm_eps` is the epsilon of every LayerNorm (timm's `norm_layer`).
    `global_pool="map"` is SigLIP's attention pooling (`AttentionPool`).

    Token order: class token, distillation token, register tokens, then patches;
    these prefix tokens never merge. Pooling ("avg", "map") reads the patch tokens,
    weighting each by the patches it holds.

    `img_size` need not be a multiple of `patch_size`: the grid is `img_size //
    patch_size` and the pixels past the last whole patch are dropped, as timm's
    strided patch convolution drops them.

    `in_chans` is the input's channels (1 for spectrograms [batch, freq, time, 1]).
    `num_frames` makes it a video ViT (VideoMAE's tubelet embedding): inputs are
    [batch, num_frames, height, width, in_chans], cut into tubelets of
    `tubelet_size` frames x `patch_size`, and the tokens (one position embedding
    each) are flattened time first, then rows, then columns.
    """

    num_classes: int = 1000
    img_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    in_chans: int = 3
    num_frames: int | None = None
    tubelet_size: int = 1
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    class_token: bool = True
    distill_token: bool = False
    reg_tokens: int = 0
    global_pool: str = "token"
    fc_norm: bool | None = None
    pre_norm: bool = False
    no_embed_class: bool = False
    layer_scale_init: float | None = None
    act_layer: str = "gelu"
    mlp_layer: str = "mlp"
    scale_mlp_norm: bool = False
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    # DTEM: a learned merge metric per block (`blocks_i/metric`), of width
    # `dtem_dim` (None: head_dim, or 2 * head_dim from width 1024, as the paper).
    dtem: bool = False
    dtem_dim: int | None = None
    dtem_soft_merge: SoftMergeSettings = SoftMergeSettings()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_implementation: str | None = None
    # How merge plans are applied (see `merge.merge_sum`); None: the backend's default.
    merge_implementation: str | None = None
    # How each block removes its r tokens (a `tome_jax.reduce` method); None: ToMe.
    reduction: reduce.Reduction | None = None

    @property
    def image_hw(self) -> tuple[int, int]:
        """The input (height, width) the position embeddings are built for."""
        return pair(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid, (height // patch, width // patch): the pixels past the
        last whole patch are dropped, as timm's strided patch convolution drops them."""
        (h, w), (ph, pw) = pair(self.img_size), pair(self.patch_size)
        if h < ph or w < pw:
            raise ValueError(f"image size {(h, w)} is smaller than one patch {(ph, pw)}")
        return h // ph, w // pw

    @property
    def token_grid(self) -> tuple[int, ...]:
        """The grid the patch tokens are flattened from: (gh, gw) for images,
        (num_frames // tubelet_size, gh, gw) for videos."""
        if self.num_frames is None:
            return self.grid_size
        return (self.num_frames // self.tubelet_size, *self.grid_size)

    @property
    def patch_kernel(self) -> tuple[int, ...]:
        """The patch embedding's kernel, also its stride: (ph, pw) or (tubelet, ph, pw)."""
        patch = pair(self.patch_size)
        return patch if self.num_frames is None else (self.tubelet_size, *patch)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example: (height, width, in_chans), or (num_frames, height, width, in_chans)."""
        frames = () if self.num_frames is None else (self.num_frames,)
        return (*frames, *self.image_hw, self.in_chans)

    @property
    def num_prefix_tokens(self) -> int:
        """Class, distillation and register tokens: first in the sequence, never merged."""
        return int(self.class_token) + int(self.distill_token) + self.reg_tokens

    @property
    def num_tokens(self) -> int:
        """Sequence length entering the first block."""
        return math.prod(self.token_grid) + self.num_prefix_tokens

    @property
    def metric_dim(self) -> int | None:
        """Width of the DTEM metric layers (None without DTEM)."""
        if not self.dtem:
            return None
        head_dim = self.width // self.num_heads
        return self.dtem_dim or (head_dim if self.width < 1024 else 2 * head_dim)

    def _validate(self):
        self.grid_size  # an image smaller than one patch is an error
        if self.distill_token and not self.class_token:
            raise ValueError("a distillation token needs a class token")
        if isinstance(self.reg_tokens, bool) or not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be an int >= 0, got {self.reg_tokens!r}")
        if self.reg_tokens and self.distill_token:
            raise ValueError("register tokens with a distillation token: no timm model has both; pick one")
        if self.global_pool not in ("token", "avg", "map"):
            raise ValueError(f"global_pool must be 'token', 'avg' or 'map', got {self.global_pool!r}")
        if self.act_layer not in ACTIVATIONS:
            raise ValueError(f"act_layer must be one of {sorted(ACTIVATIONS)}, got {self.act_layer!r}")
        if self.mlp_layer not in MLP_LAYERS:
            raise ValueError(f"mlp_layer must be one of {MLP_LAYERS}, got {self.mlp_layer!r}")
        if self.mlp_layer == "swiglu_packed" and int(self.width * self.mlp_ratio) % 2:
            raise ValueError(
                f"mlp_layer='swiglu_packed' splits fc1's {int(self.width * self.mlp_ratio)} features "
                "into gate and value halves; choose mlp_ratio so that width * mlp_ratio is even"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs a class token")
        if self.num_frames is None and self.tubelet_size != 1:
            raise ValueError("tubelet_size needs num_frames (a video model); images have no time axis")
        if self.num_frames is not None and (
            self.num_frames < 1 or self.tubelet_size < 1 or self.num_frames % self.tubelet_size
        ):
            raise ValueError(
                f"num_frames {self.num_frames} is not a positive multiple of "
                f"tubelet_size {self.tubelet_size}"
            )

    def _soft_merge_settings(self, soft: bool) -> SoftMergeSettings | None:
        if not soft:
            return None
        if not self.dtem:
            raise ValueError("soft_merge needs a DTEM model (dtem=True)")
        if self.num_prefix_tokens != 1 or not self.class_token:
            raise ValueError("DTEM's soft merge expects exactly one prefix token, a class token")
        return self.dtem_soft_merge

    def _search_state(self, batch: int, tokens: int) -> diffrate.SearchState | None:
        """The first block's DiffRate search state (every token alive), or None when not searching."""
        if not isinstance(self.reduction, reduce.DiffRate) or not self.reduction.searching:
            return None
        if self.num_prefix_tokens != 1 or not self.class_token:
            raise ValueError("the DiffRate search ranks tokens by class attention: it needs one class token")
        if self.dtem:
            raise ValueError("a DiffRate search keeps every token (masked): it does not combine with DTEM")
        return diffrate.SearchState(jnp.ones((batch, tokens), jnp.float32))

    def _sow_search_loss(self, searched: list[diffrate.SearchState]) -> None:
        """Sows the search's FLOPs penalty in "losses" (train.py adds it) and its GFLOPs in "metrics"."""
        method = self.reduction
        gflops = self.diffrate_gflops([s.prune_kept for s in searched], [s.merge_kept for s in searched])
        keep = dict(reduce_fn=lambda _, value: value, init_fn=lambda: 0.0)
        penalty = method.flops_weight * (gflops - method.search_gflops) ** 2
        self.sow("losses", "diffrate_flops", penalty, **keep)
        self.sow("metrics", "diffrate_gflops", gflops, **keep)

    def diffrate_gflops(self, prune_kept, merge_kept) -> jax.Array:
        """The authors' GFLOPs of per-block kept counts (`diffrate.schedule_flops`), for this model."""
        return diffrate.schedule_flops(
            prune_kept,
            merge_kept,
            tokens=self.num_tokens,
            width=self.width,
            patch_pixels=math.prod(self.patch_kernel) * self.in_chans,
            num_classes=self.num_classes,
        ) / 1e9

    def _check_input(self, shape: tuple[int, ...]):
        """Clear errors for inputs that do not fit `input_shape` (batch first)."""
        if self.num_frames is None:
            layout = "images must be [batch, height, width, channels]"
        else:
            layout = "videos must be [batch, frames, height, width, channels]"
        if len(shape) != len(self.input_shape) + 1:
            raise ValueError(f"{layout}, got {tuple(shape)}")
        if shape[0] == 0:
            raise ValueError(f"an empty batch: inputs of shape {tuple(shape)}; pass at least one")
        if shape[-1] != self.in_chans and shape[1] == self.in_chans:
            order = (0, *range(2, len(shape)), 1)
            last = "NHWC" if self.num_frames is None else "NTHWC"
            raise ValueError(
                f"{layout}, got {tuple(shape)}: channels first; transpose to {last}: x.transpose{order}"
            )
        *frames, height, width, channels = shape[1:]
        if (height, width) != self.image_hw:
            raise ValueError(
                f"image size {(height, width)} differs from the model's img_size "
                f"{self.image_hw}; build the model for this size (tome_jax.from_timm "
                "resamples position embeddings when given img_size)"
            )
        if frames and frames[0] != self.num_frames:
            raise ValueError(
                f"videos of {frames[0]} frames, but the model's num_frames is {self.num_frames}"
            )
        if channels != self.in_chans:
            raise ValueError(f"inputs have {channels} channels, the model's in_chans is {self.in_chans}")

    def _embed(self, images: jax.Array) -> jax.Array:
        """[batch, *input_shape] -> [batch, tokens, width], prefix tokens first."""
        self._check_input(images.shape)
        kernel = self.patch_kernel
        # A matmul over each patch's pixels: the strided convolution's arithmetic, and
        # its [*kernel, in_chans, width] parameter, at matmul speed (XLA's CPU
        # convolution is slower on these shapes; README, Speed).
        x = nn.DenseGeneral(
            self.width,
            axis=tuple(range(-len(kernel) - 1, 0)),
            use_bias=not self.pre_norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embed",
        )(_patchify(images, kernel))
        # [batch, (frames,) gh, gw, width]: row-major flattening puts time first.
        batch = x.shape[0]
        x = x.reshape(batch, -1, self.width)

        prefix = []
        init = nn.initializers.normal(1e-6)
        if self.class_token:
            prefix.append(self.param("cls_token", init, (1, 1, self.width), self.param_dtype))
        if self.distill_token:
            prefix.append(self.param("dist_token", init, (1, 1, self.width), self.param_dtype))
        if self.reg_tokens:
            prefix.append(self.param("reg_token", init, (1, self.reg_tokens, self.width), self.param_dtype))
        prefix = [jnp.broadcast_to(p, (batch, *p.shape[1:])).astype(x.dtype) for p in prefix]

        pos_len = x.shape[1] + (0 if self.no_embed_class else self.num_prefix_tokens)
        pos_embed = self.param(
            "pos_embed", nn.initializers.normal(0.02), (1, pos_len, self.width), self.param_dtype
        ).astype(x.dtype)
        if self.no_embed_class:
            x = jnp.concatenate(prefix + [x + pos_embed], axis=1)
        else:
            x = jnp.concatenate(prefix + [x], axis=1) + pos_embed
        if self.pre_norm:
            x = self._norm("norm_pre")(x)
        return x

    def _norm(self, name):
        return layer_norm(name, self.dtype, self.param_dtype, self.norm_eps)

    def _pool(self, x: jax.Array, size: jax.Array) -> jax.Array:
        """[batch, tokens, width] -> [batch, width] (or [batch, 2, width] distilled).

        "avg" and "map" pool the tokens after the prefix, as timm does, counting
        patches rather than merged tokens: a size-weighted mean, or `log(size)`
        added to the attention pool's logits.
        """
        patches, patch_size = x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :]
        if self.global_pool == "map":
            return AttentionPool(
                self.num_heads,
                mlp_ratio=self.mlp_ratio,
                act_layer=self.act_layer,
                norm_eps=self.norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attn_implementation=self.attn_implementation,
                name="attn_pool",
            )(patches, patch_size)
        if self.global_pool == "avg":
            weights = patch_size[..., None].astype(jnp.float32)
            return ((patches.astype(jnp.float32) * weights).sum(1) / weights.sum(1)).astype(x.dtype)
        if self.distill_token:
            return x[:, :2]
        return x[:, 0]

    def _head(self, pooled: jax.Array) -> jax.Array:
        """timm's heads: zero classes gives the pooled features."""
        if self.num_classes == 0:
            return pooled.mean(1) if self.distill_token else pooled
        head = lambda name: nn.Dense(  # noqa: E731
            self.num_classes,
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        if self.distill_token:
            # DeiT's inference rule: the mean of the class and distillation heads.
            return (head("head")(pooled[:, 0]) + head("head_dist")(pooled[:, 1])) / 2
        return head("head")(pooled)

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        r: schedules.RSpec = 0,
        train: bool = False,
        prop_attn: bool | None = None,
        soft_merge: bool | None = None,
    ) -> jax.Array:
        """Classifies images (or videos), merging tokens in every block.

        Applied with `mutable="intermediates"` it returns `(logits, {"intermediates":
        ...})`, what downstream models take (Flax's `sow`: a tuple, one entry per
        call): under `blocks_i` the block's output `tokens` [batch, tokens_i, width]
        (before any norm), their `size` [batch, tokens_i] and the merge `plan` (left
        out after DTEM's soft merge); at the top the final `tokens` (after the final
        norm, as timm's `forward_features`) and `size`. `tome_jax.token_features`
        and `tome_jax.patch_features` read them. Otherwise nothing is recorded.

        Args:
          images: [batch, height, width, in_chans], or [batch, num_frames, height,
            width, in_chans] for a video model; already normalised.
          r: tokens merged per block: int, `(r, inflection)` or per-layer list;
            static (a new `r` is a new compilation, the parameters are the same).
          train: enables stochastic depth (needs a 'dropout' rng).
          prop_attn: proportional attention (on for supervised models and for
            training with merging; off for off-the-shelf MAE models); None: the
            reduction method's default (on for ToMe).
          soft_merge: DTEM's differentiable soft merge instead of the hard one;
            None means "when training a DTEM model" (its inference is hard).

        Returns:
          logits [batch, num_classes] (pooled features [batch, width] when
          num_classes == 0).
        """
        self._validate()
        schedule = schedules.parse_r(self.depth, r)
        x = self._embed(images)
        batch, tokens, _ = x.shape
        size = jnp.ones((batch, tokens), jnp.float32)
        soft = self._soft_merge_settings((train and self.dtem) if soft_merge is None else soft_merge)
        # The soft merge keeps every token; block i lets the first participants[i] take part.
        participants = schedules.tokens_per_layer(tokens, schedule, protected=1)
        search = self._search_state(batch, tokens)
        searched = []

        rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        for i, block_r in enumerate(schedule):
            outputs = Block(
                self.num_heads,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias,
                qk_norm=self.qk_norm,
                layer_scale_init=self.layer_scale_init,
                drop_path=rates[i],
                act_layer=self.act_layer,
                mlp_layer=self.mlp_layer,
                scale_mlp_norm=self.scale_mlp_norm,
                norm_eps=self.norm_eps,
                metric_dim=self.metric_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attn_implementation=self.attn_implementation,
                merge_implementation=self.merge_implementation,
                reduction=self.reduction,
                name=f"blocks_{i}",
            )(
                x,
                size,
                r=block_r,
                num_prefix_tokens=self.num_prefix_tokens,
                prop_attn=prop_attn,
                layer=i,
                num_layers=self.depth,
                train=train,
                soft_merge=soft,
                n=participants[i],
                search=search,
            )
            x, size = outputs[:2]
            if search is not None:
                search = outputs[2]
                searched.append(search)

        if search is not None:
            self._sow_search_loss(searched)
        use_fc_norm = self.global_pool == "avg" if self.fc_norm is None else self.fc_norm
        if not use_fc_norm:
            x = self._norm("norm")(x)
        self.sow("intermediates", "tokens", x)
        self.sow("intermediates", "size", size)
        pooled = self._pool(x, size)
        if use_fc_norm:
            pooled = self._norm("fc_norm")(pooled)
        return self._head(pooled)


# timm architecture names -> ViT attributes. Pretrained tags (".augreg_in21k", ...)
# select weights, not architecture, and are stripped by `create_model`.
_TI, _S, _B = dict(width=192, num_heads=3), dict(width=384, num_heads=6), dict(width=768, num_heads=12)
_L, _H = dict(width=1024, depth=24, num_heads=16), dict(width=1280, depth=32, num_heads=16)
_DEIT3 = dict(no_embed_class=True, layer_scale_init=1e-6)
# CLIP towers (OpenAI and OpenCLIP): LayerNorm before the blocks, eps 1e-5; the
# head is CLIP's projection to the joint embedding (timm's default tags' widths).
_CLIP = dict(pre_norm=True, norm_eps=1e-5)
_QUICKGELU = dict(_CLIP, act_layer="quick_gelu")
# SigLIP (big_vision): no class token, attention pooling; feature extractors.
_SIGLIP = dict(class_token=False, global_pool="map", num_classes=0)
_SO400M = dict(width=1152, depth=27, num_heads=16, mlp_ratio=3.7362, **_SIGLIP)
# DINOv2: LayerScale, 518 px; with registers the position embeddings skip the
# prefix tokens; the giant's MLP is a packed SwiGLU (fc1 of 2 x 4096 features).
_DINOV2 = dict(patch_size=14, img_size=518, layer_scale_init=1e-5, num_classes=0)
_REG4 = dict(reg_tokens=4, no_embed_class=True)
_G_DINOV2 = dict(
    width=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed", act_layer="silu"
)
_VIDEO = dict(
    num_frames=16, tubelet_size=2, class_token=False, global_pool="avg", num_classes=400
)
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": dict(**_TI, patch_size=16),
    "vit_tiny_patch16_384": dict(**_TI, patch_size=16, img_size=384),
    "vit_small_patch16_224": dict(**_S, patch_size=16),
    "vit_small_patch32_224": dict(**_S, patch_size=32),
    "vit_small_patch16_384": dict(**_S, patch_size=16, img_size=384),
    "vit_base_patch8_224": dict(**_B, patch_size=8),
    "vit_base_patch16_224": dict(**_B, patch_size=16),
    "vit_base_patch32_224": dict(**_B, patch_size=32),
    "vit_base_patch16_384": dict(**_B, patch_size=16, img_size=384),
    "vit_large_patch16_224": dict(**_L, patch_size=16),
    "vit_large_patch16_384": dict(**_L, patch_size=16, img_size=384),
    "vit_huge_patch14_224": dict(**_H, patch_size=14),
    "deit_tiny_patch16_224": dict(**_TI, patch_size=16),
    "deit_small_patch16_224": dict(**_S, patch_size=16),
    "deit_base_patch16_224": dict(**_B, patch_size=16),
    "deit_base_patch16_384": dict(**_B, patch_size=16, img_size=384),
    "deit_tiny_distilled_patch16_224": dict(**_TI, patch_size=16, distill_token=True),
    "deit_small_distilled_patch16_224": dict(**_S, patch_size=16, distill_token=True),
    "deit_base_distilled_patch16_224": dict(**_B, patch_size=16, distill_token=True),
    "deit_base_distilled_patch16_384": dict(
        **_B, patch_size=16, img_size=384, distill_token=True
    ),
    "deit3_small_patch16_224": dict(**_S, patch_size=16, **_DEIT3),
    "deit3_base_patch16_224": dict(**_B, patch_size=16, **_DEIT3),
    "deit3_large_patch16_224": dict(**_L, patch_size=16, **_DEIT3),
    "vit_base_patch32_clip_224": dict(**_B, patch_size=32, **_CLIP),
    "vit_base_patch16_clip_224": dict(**_B, patch_size=16, **_CLIP),
    "vit_base_patch16_clip_384": dict(**_B, patch_size=16, img_size=384, **_CLIP),
    "vit_large_patch14_clip_224": dict(**_L, patch_size=14, **_CLIP),
    "vit_large_patch14_clip_336": dict(**_L, patch_size=14, img_size=336, **_CLIP),
    "vit_huge_patch14_clip_224": dict(**_H, patch_size=14, **_CLIP),
    "vit_base_patch16_clip_quickgelu_224": dict(**_B, patch_size=16, num_classes=512, **_QUICKGELU),
    "vit_large_patch14_clip_quickgelu_224": dict(**_L, patch_size=14, num_classes=768, **_QUICKGELU),
    "vit_large_patch14_clip_quickgelu_336": dict(
        **_L, patch_size=14, img_size=336, num_classes=768, **_QUICKGELU
    ),
    "vit_base_patch16_siglip_224": dict(**_B, patch_size=16, **_SIGLIP),
    "vit_base_patch16_siglip_256": dict(**_B, patch_size=16, img_size=256, **_SIGLIP),
    "vit_base_patch16_siglip_384": dict(**_B, patch_size=16, img_size=384, **_SIGLIP),
    "vit_so400m_patch14_siglip_224": dict(patch_size=14, **_SO400M),
    "vit_so400m_patch14_siglip_378": dict(patch_size=14, img_size=378, **_SO400M),
    # 384 px in 14 px patches: 27 x 27 patches, the last 6 pixel rows and columns unread.
    "vit_so400m_patch14_siglip_384": dict(patch_size=14, img_size=384, **_SO400M),
    "vit_so400m_patch16_siglip_256": dict(patch_size=16, img_size=256, act_layer="gelu_tanh", **_SO400M),
    "vit_small_patch14_dinov2": dict(**_S, **_DINOV2),
    "vit_base_patch14_dinov2": dict(**_B, **_DINOV2),
    "vit_large_patch14_dinov2": dict(**_L, **_DINOV2),
    "vit_giant_patch14_dinov2": dict(**_G_DINOV2, **_DINOV2),
    "vit_small_patch14_reg4_dinov2": dict(**_S, **_DINOV2, **_REG4),
    "vit_base_patch14_reg4_dinov2": dict(**_B, **_DINOV2, **_REG4),
    "vit_large_patch14_reg4_dinov2": dict(**_L, **_DINOV2, **_REG4),
    "vit_giant_patch14_reg4_dinov2": dict(**_G_DINOV2, **_DINOV2, **_REG4),
    # MAE fine-tuned checkpoints: global average pooling with fc_norm.
    "vit_base_patch16_224_mae": dict(**_B, patch_size=16, global_pool="avg"),
    "vit_large_patch16_224_mae": dict(**_L, patch_size=16, global_pool="avg"),
    "vit_huge_patch14_224_mae": dict(**_H, patch_size=14, global_pool="avg"),
    # The bundled CIFAR-10 model (assets/vit_tiny_p4_cifar10.safetensors).
    "vit_tiny_patch4_32": dict(**_TI, patch_size=4, img_size=32, num_classes=10),
    # Video (Kinetics-400), the ToMe paper's video setting (MAE-ST; VideoMAE alike):
    # 16 frames of 224x224 in 2x16x16 tubelets, 8 x 14 x 14 = 1568 tokens with joint
    # space-time attention, average pooling with fc_norm, no class token. One learned
    # position embedding per space-time token (MAE-ST's separable space + time
    # embeddings and VideoMAE's fixed sinusoids are special cases of this table).
    "video_vit_base_patch16_tubelet2_16x224": dict(**_B, patch_size=16, **_VIDEO),
    "video_vit_large_patch16_tubelet2_16x224": dict(**_L, patch_size=16, **_VIDEO),
    # Audio (AudioSet's 527 classes) after AST: log-mel spectrograms of 128 bins x 1024
    # frames as one-channel images [batch, 128, 1024, 1], class token. The 16x16
    # patches do not overlap (8 x 64 = 512 tokens); AST's overlap them (stride 10).
    "audio_vit_base_patch16_128x1024": dict(
        **_B, patch_size=16, img_size=(128, 1024), in_chans=1, num_classes=527
    ),
}


def model_config(name: str, **overrides) -> dict[str, Any]:
    """The ViT attributes of a named architecture, with `overrides` applied."""
    arch = name.split(".")[0]
    if arch not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_CONFIGS))}")
    unknown = set(overrides) - set(ViT.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown ViT attributes {sorted(unknown)} for {name!r}")
    return {**MODEL_CONFIGS[arch], **overrides}


def init_params(model: ViT, rng: jax.Array | None = None) -> Any:
    """The model's parameters, initialised (jitted) from one zero example of `model.input_shape`.

    Under `jax.eval_shape` it gives their shapes without computing anything.
    """
    rng = jax.random.key(0) if rng is None else rng
    return jax.jit(model.init)(rng, jnp.zeros((1, *model.input_shape), jnp.float32))["params"]


def create_model(name: str, **overrides) -> ViT:
    """A ViT by timm architecture name, e.g. `create_model("deit_small_patch16_224")`."""
    return ViT(**model_config(name, **overrides))
