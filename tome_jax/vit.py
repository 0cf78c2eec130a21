"""Vision Transformer (timm's ViT/DeiT family) with token merging in every block.

Parameter names follow timm (`patch_embed`, `cls_token`, `blocks_3/attn/qkv`, ...)
so converted checkpoints read naturally. Images are NHWC; videos [batch, frames,
height, width, channels], embedded in tubelets (a 3-D patch convolution); spectrograms
are one-channel images [batch, freq, time, 1]. Either way the blocks see one flat
token sequence and merge it the same way.

    model = create_model("vit_base_patch16_224")
    variables = model.init(jax.random.key(0), jnp.zeros((1, *model.input_shape)))
    logits = model.apply(variables, images, r=(16, -1))   # any r, same parameters
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tome_jax import dtem, merge, reduce, schedules
from tome_jax.attention import Attention, layer_norm


class MergeState(NamedTuple):
    """What the merges left behind at the end of the encoder.

    Attributes:
      tokens: [batch, tokens, width] final tokens (after the final norm).
      size: [batch, tokens] input tokens (patches and prefix tokens) each holds.
      source: [batch, input_tokens] the final token holding each input token, or
        None when not traced (`merge.source_matrix` gives the official matrix).
    """

    tokens: jax.Array
    size: jax.Array
    source: jax.Array | None


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
    """[batch, *spatial, channels] -> [batch, *grid, *kernel, channels], grid = spatial / kernel.

    Each patch's pixels end up contiguous, in the order of a convolution kernel.
    """
    batch, *spatial, channels = inputs.shape
    grid = [extent // k for extent, k in zip(spatial, kernel)]
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


class Mlp(nn.Module):
    hidden_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, tokens, dim] -> [batch, tokens, dim]."""
        width = x.shape[-1]
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = gelu(x)
        return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


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
        class_token: bool,
        distill_token: bool,
        prop_attn: bool | None,
        layer: int = 0,
        num_layers: int = 1,
        train: bool = False,
        soft_merge: SoftMergeSettings | None = None,
        n: int = 0,
    ) -> tuple[jax.Array, jax.Array, merge.MergePlan | None]:
        """Args: x [batch, tokens, dim]; size [batch, tokens]; r a static int.

        `prop_attn` None means the reduction method's default. `layer` and
        `num_layers` (this block's index, the model's depth) are handed to the
        method, which may act differently by depth (ToFu, PiToMe).

        With `metric_dim`, merging uses DTEM's decoupled embedding of the block's
        normalised input instead of the keys; with `soft_merge` (DTEM training) the
        merge is DTEM's soft merge over the first `n` tokens, which keeps the
        sequence length and fades merged tokens to size 0.

        Returns x [batch, tokens - r', dim], size [batch, tokens - r'] and the
        reduction's plan (None when nothing was hard-merged, or for a method that
        mixes tokens), r' being r after the clamp (0 for a soft merge, which
        removes no token).
        """
        method = self._method()
        prop_attn = method.prop_attn if prop_attn is None else prop_attn
        norm1 = layer_norm("norm1", self.dtype, self.param_dtype)
        attn = Attention(
            self.num_heads,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            implementation=self.attn_implementation,
            name="attn",
        )
        num_prefix_tokens = int(class_token) + int(distill_token)
        r = merge.clamp_r(r, x.shape[1], num_prefix_tokens)
        position = method.position if soft_merge is None and r > 0 else None
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
        if weights is not None:  # the method's own attention map (MCTF's one-step-ahead attention)
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
        elif position == reduce.AFTER_ATTENTION:
            x, size, plan, _ = method(step(x, size, metric, weights=weights))

        mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, self.param_dtype, name="mlp")
        x = self._residual(x, mlp(layer_norm("norm2", self.dtype, self.param_dtype)(x)), "2", train)
        if position == reduce.AFTER_MLP:
            x, size, plan, _ = method(step(x, size, metric))
        return x, size, plan


class ViT(nn.Module):
    """timm's VisionTransformer (and DeiT's distilled variant) with ToMe.

    Attributes follow timm's constructor: `width` is timm's `embed_dim`,
    `layer_scale_init` its `init_values`; `fc_norm=None` means "norm after pooling
    when `global_pool == 'avg'`", as in timm.

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
    global_pool: str = "token"
    fc_norm: bool | None = None
    pre_norm: bool = False
    no_embed_class: bool = False
    layer_scale_init: float | None = None
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
        (h, w), (ph, pw) = pair(self.img_size), pair(self.patch_size)
        _check_divisible((h, w), (ph, pw))
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
        return int(self.class_token) + int(self.distill_token)

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
        if self.distill_token and not self.class_token:
            raise ValueError("a distillation token needs a class token")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
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

    def _soft_merge_settings(self, soft: bool, trace_source: bool) -> SoftMergeSettings | None:
        if not soft:
            return None
        if not self.dtem:
            raise ValueError("soft_merge needs a DTEM model (dtem=True)")
        if self.distill_token or not self.class_token:
            raise ValueError("DTEM's soft merge expects exactly one prefix token, a class token")
        if trace_source:
            raise ValueError("source tracking needs hard merges; the soft merge keeps every token")
        return self.dtem_soft_merge

    def _check_input(self, shape: tuple[int, ...]):
        """Clear errors for inputs that do not fit `input_shape` (batch first)."""
        if self.num_frames is None:
            layout = "images must be [batch, height, width, channels]"
        else:
            layout = "videos must be [batch, frames, height, width, channels]"
        if len(shape) != len(self.input_shape) + 1:
            raise ValueError(f"{layout}, got {tuple(shape)}")
        *frames, height, width, channels = shape[1:]
        _check_divisible((height, width), pair(self.patch_size))
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
        prefix = [jnp.broadcast_to(p, (batch, 1, self.width)).astype(x.dtype) for p in prefix]

        pos_len = x.shape[1] + (0 if self.no_embed_class else len(prefix))
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
        return layer_norm(name, self.dtype, self.param_dtype)

    def _pool(self, x: jax.Array, size: jax.Array) -> jax.Array:
        """[batch, tokens, width] -> [batch, width] (or [batch, 2, width] distilled)."""
        if self.global_pool == "avg":
            # Weighting by size averages over patches, not over merged tokens.
            weights = size[:, self.num_prefix_tokens :, None].astype(jnp.float32)
            tokens = x[:, self.num_prefix_tokens :].astype(jnp.float32)
            return ((tokens * weights).sum(1) / weights.sum(1)).astype(x.dtype)
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
        trace_source: bool = False,
        return_state: bool = False,
        soft_merge: bool | None = None,
    ):
        """Classifies images (or videos), merging tokens in every block.

        Args:
          images: [batch, height, width, in_chans], or [batch, num_frames, height,
            width, in_chans] for a video model; already normalised.
          r: tokens merged per block: int, `(r, inflection)` or per-layer list;
            static (a new `r` is a new compilation, the parameters are the same).
          train: enables stochastic depth (needs a 'dropout' rng).
          prop_attn: proportional attention (on for supervised models and for
            training with merging; off for off-the-shelf MAE models); None: the
            reduction method's default (on for ToMe).
          trace_source: record which final token holds each input token.
          return_state: also return a `MergeState`.
          soft_merge: DTEM's differentiable soft merge instead of the hard one;
            None means "when training a DTEM model" (its inference is hard).

        Returns:
          logits [batch, num_classes] (pooled features when num_classes == 0),
          and the `MergeState` when `return_state`.
        """
        self._validate()
        schedule = schedules.parse_r(self.depth, r)
        x = self._embed(images)
        batch, tokens, _ = x.shape
        size = jnp.ones((batch, tokens), jnp.float32)
        if trace_source:
            reduce.check_tracks_sources(self.reduction)
        source = merge.initial_source(batch, tokens) if trace_source else None
        soft = self._soft_merge_settings(
            (train and self.dtem) if soft_merge is None else soft_merge, trace_source
        )
        # The soft merge keeps every token; block i lets the first participants[i] take part.
        participants = schedules.tokens_per_layer(tokens, schedule, protected=1)

        rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        for i, block_r in enumerate(schedule):
            x, size, plan = Block(
                self.num_heads,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias,
                qk_norm=self.qk_norm,
                layer_scale_init=self.layer_scale_init,
                drop_path=rates[i],
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
                class_token=self.class_token,
                distill_token=self.distill_token,
                prop_attn=prop_attn,
                layer=i,
                num_layers=self.depth,
                train=train,
                soft_merge=soft,
                n=participants[i],
            )
            if plan is not None and source is not None:
                source = merge.merge_source(plan, source)

        use_fc_norm = self.global_pool == "avg" if self.fc_norm is None else self.fc_norm
        if not use_fc_norm:
            x = self._norm("norm")(x)
        pooled = self._pool(x, size)
        if use_fc_norm:
            pooled = self._norm("fc_norm")(pooled)
        logits = self._head(pooled)
        if return_state:
            return logits, MergeState(tokens=x, size=size, source=source)
        return logits


def _check_divisible(image_hw, patch_hw):
    if any(s % p for s, p in zip(image_hw, patch_hw)):
        raise ValueError(
            f"image size {tuple(image_hw)} is not divisible by patch size {tuple(patch_hw)}"
        )


# timm architecture names -> ViT attributes. Pretrained tags (".augreg_in21k", ...)
# select weights, not architecture, and are stripped by `create_model`.
_TI, _S, _B = dict(width=192, num_heads=3), dict(width=384, num_heads=6), dict(width=768, num_heads=12)
_L, _H = dict(width=1024, depth=24, num_heads=16), dict(width=1280, depth=32, num_heads=16)
_DEIT3 = dict(no_embed_class=True, layer_scale_init=1e-6)
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
    # MAE fine-tuned checkpoints: global average pooling with fc_norm.
    "vit_base_patch16_224_mae": dict(**_B, patch_size=16, global_pool="avg"),
    "vit_large_patch16_224_mae": dict(**_L, patch_size=16, global_pool="avg"),
    "vit_huge_patch14_224_mae": dict(**_H, patch_size=14, global_pool="avg"),
    # The bundled CIFAR-10 model (../shared/models/vit_tiny_p4_cifar10.safetensors).
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


def create_model(name: str, **overrides) -> ViT:
    """A ViT by timm architecture name, e.g. `create_model("deit_small_patch16_224")`."""
    return ViT(**model_config(name, **overrides))
