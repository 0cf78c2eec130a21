"""Vision Transformer (timm's ViT family) with token reduction in every block.

The family: ViT/DeiT/AugReg/MAE, CLIP and OpenCLIP towers (pre-norm, QuickGELU,
LayerNorm eps 1e-5), SigLIP (attention pooling, the MAP head), DINOv2 (register
tokens, SwiGLU MLPs); `tome_jax.registry` names them as timm does.

Parameter names follow timm (`patch_embed`, `cls_token`, `blocks_3/attn/qkv`, ...)
so converted checkpoints read naturally. Images are NHWC; videos [batch, frames,
height, width, channels], embedded in tubelets (a 3-D patch convolution); spectrograms
are one-channel images [batch, freq, time, 1]. Either way the blocks see one flat
token sequence (`tome_jax.tokens.Tokens`) and reduce it the same way.

    model = create_model("vit_base_patch16_224")
    variables = {"params": init_params(model)}
    logits = model.apply(variables, images, r=(16, -1))   # any r, same parameters
    logits, state = model.apply(variables, images, r=8, mutable="intermediates")
    tokens = tome_jax.token_features(state["intermediates"]).tokens  # features, sizes, sources
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tome_jax import reduce, rope, schedules
from tome_jax.attention import Attention, layer_norm
from tome_jax.layers import ACTIVATIONS, MLP_LAYERS, AttentionPool, Block, LayerScale, Mlp, RopeFrequencies, pair, patchify
from tome_jax.reduce import dtem as dtem_method
from tome_jax.rope import Rope
from tome_jax.tokens import DEST, MEAN, Field, TokenField, Tokens


# Pooling before the head (`ViT.global_pool`): the class token, the mean of the patch
# tokens, attention pooling (SigLIP's MAP head), the class token beside the patches' mean
# (DINOv2's classifier), the mean of the class and distillation tokens (AST).
GLOBAL_POOLS = ("token", "avg", "map", "token_avg", "cls_distill_avg")


class SoftMergeSettings(NamedTuple):
    """Deprecated: DTEM's soft merge settings are `reduce.DTEM`'s (`k2`, `tau1`, `tau2`, `drop_residue`)."""

    k2: int = 3
    tau1: float = 0.1
    tau2: float = 0.1
    drop_residue: bool = False


class ViT(nn.Module):
    """timm's VisionTransformer (and DeiT's distilled variant) with token reduction, ToMe by default.

    Attributes follow timm's constructor: `width` is timm's `embed_dim`,
    `layer_scale_init` its `init_values`; `fc_norm=None` means "norm after pooling
    when `global_pool == 'avg'`", as in timm. `act_layer` (a key of `ACTIVATIONS`),
    `mlp_layer` (one of `MLP_LAYERS`) and `reg_tokens` take timm's names;
    `norm_eps` is the epsilon of every LayerNorm (timm's `norm_layer`).
    `global_pool="map"` is SigLIP's attention pooling (`AttentionPool`); "token_avg" the
    class token beside the patches' mean, [batch, 2 * width] (DINOv2's classifier input).
    `head_act` (a key of `ACTIVATIONS`) follows the head: "tanh" makes it Hugging Face's
    pooler (ViTModel's `pooler_output`).

    Token order: class token, distillation token, register tokens, then patches;
    these prefix tokens never merge. Pooling ("avg", "map") reads the patch tokens,
    weighting each by the patches it holds.

    `img_size` need not be a multiple of `patch_size`: the grid is `img_size //
    patch_size` and the pixels past the last whole patch are dropped, as timm's
    strided patch convolution drops them. `patch_stride` below `patch_size` makes
    the patches overlap (AST's): the grid is then `(img_size - patch_size) //
    patch_stride + 1`.

    `in_chans` is the input's channels (1 for spectrograms [batch, freq, time, 1]).
    `num_frames` makes it a video ViT (VideoMAE's tubelet embedding): inputs are
    [batch, num_frames, height, width, in_chans], cut into tubelets of
    `tubelet_size` frames x `patch_size`, and the tokens (one position embedding
    each) are flattened time first, then rows, then columns.

    `fbank_input` takes AST's input, filter-bank features [batch, time, mel bins],
    and reads them as the one-channel image [batch, mel bins, time, 1] (rows are
    frequency, columns time, as AST's patch convolution reads them): `img_size`
    is (mel bins, time frames), `in_chans` 1.

    `token_norm` None is timm's rule, a final LayerNorm on the tokens unless
    `fc_norm`; True or False forces it (AST's classifier has both norms, a bare
    VideoMAE with mean pooling neither). `fc_norm_eps` is fc_norm's epsilon
    (None: `norm_eps`; VideoMAE's classifier has PyTorch's 1e-5 there).
    `global_pool="cls_distill_avg"` is AST's pooling: the mean of the class and
    distillation tokens, one head.
    """

    num_classes: int = 1000
    # An activation after the head (a key of `ACTIVATIONS`); None: the logits as they are.
    head_act: str | None = None
    img_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    # The patch convolution's stride; None: patch_size (patches side by side).
    patch_stride: int | tuple[int, int] | None = None
    in_chans: int = 3
    fbank_input: bool = False
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
    fc_norm_eps: float | None = None
    token_norm: bool | None = None
    pre_norm: bool = False
    no_embed_class: bool = False
    # Learned absolute position embeddings (timm's `use_abs_pos_emb`); rotary models may go without.
    abs_pos_embed: bool = True
    layer_scale_init: float | None = None
    act_layer: str = "gelu"
    mlp_layer: str = "mlp"
    scale_mlp_norm: bool = False
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    # The MAP head's own heads and MLP ratio (timm's `attn_pool_num_heads`, `attn_pool_mlp_ratio`);
    # None: the blocks'.
    pool_num_heads: int | None = None
    pool_mlp_ratio: float | None = None
    # The MAP head reads the prefix tokens too (timm's Eva always, its VisionTransformer when
    # `pool_include_prefix`); else the patch tokens only.
    pool_include_prefix: bool = False
    # A LayerNorm on the attention's output before its projection (timm's `scale_attn_inner`).
    attn_inner_norm: bool = False
    # Rotary position embeddings (`rope.Rope`: timm's Eva models); None: none. Each patch
    # token's grid coordinate follows the merges by `rope_position` ("mean": size-weighted, or
    # "dest": the receiving token's), and the merge metric is the keys before rotation or after
    # (`rope_metric`: "pre" or "post"). The defaults are the pair that merged best when measured
    # (docs/models.md, Which rule).
    rope: Rope | None = None
    rope_position: str = "mean"
    rope_metric: str = "post"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_implementation: str | None = None
    # How merge plans are applied (see `merge.merge_sum`); None: the backend's default.
    merge_implementation: str | None = None
    # How each block removes its r tokens (a `tome_jax.reduce` method); None: ToMe.
    reduction: reduce.Reduction | None = None
    # Per-token quantities carried through the blocks besides features and sizes
    # (`tome_jax.tokens.TokenField`s), each following every merge by its rule.
    token_fields: tuple[TokenField, ...] = ()
    # Deprecated: DTEM is `reduction=reduce.DTEM(dim=dtem_dim, ...)`.
    dtem: bool = False
    dtem_dim: int | None = None
    dtem_soft_merge: SoftMergeSettings = SoftMergeSettings()

    @property
    def image_hw(self) -> tuple[int, int]:
        """The input (height, width) the position embeddings are built for."""
        return pair(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid, ((height - patch) // stride + 1, same for width), (height //
        patch, width // patch) without a stride: the pixels past the last whole patch
        are dropped, as timm's strided patch convolution drops them."""
        (h, w), (ph, pw), (sh, sw) = pair(self.img_size), pair(self.patch_size), self.patch_strides[-2:]
        if h < ph or w < pw:
            raise ValueError(f"image size {(h, w)} is smaller than one patch {(ph, pw)}")
        return (h - ph) // sh + 1, (w - pw) // sw + 1

    @property
    def token_grid(self) -> tuple[int, ...]:
        """The grid the patch tokens are flattened from: (gh, gw) for images,
        (num_frames // tubelet_size, gh, gw) for videos."""
        if self.num_frames is None:
            return self.grid_size
        return (self.num_frames // self.tubelet_size, *self.grid_size)

    @property
    def patch_kernel(self) -> tuple[int, ...]:
        """The patch embedding's kernel: (ph, pw) or (tubelet, ph, pw)."""
        patch = pair(self.patch_size)
        return patch if self.num_frames is None else (self.tubelet_size, *patch)

    @property
    def patch_strides(self) -> tuple[int, ...]:
        """The patch embedding's stride, `patch_kernel` but where `patch_stride` says otherwise."""
        if self.patch_stride is None:
            return self.patch_kernel
        return (*self.patch_kernel[:-2], *pair(self.patch_stride))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example: (height, width, in_chans), (num_frames, height, width, in_chans),
        or with `fbank_input` (time frames, mel bins)."""
        if self.fbank_input:
            mel_bins, frames = self.image_hw
            return (frames, mel_bins)
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
    def method(self) -> reduce.Reduction:
        """The reduction method every block runs: `reduction`, ToMe when None."""
        if self.dtem:
            warnings.warn(
                "ViT(dtem=True, dtem_dim=, dtem_soft_merge=) is deprecated; pass reduction=reduce.DTEM(dim=, ...)",
                DeprecationWarning,
                stacklevel=2,
            )
            return dtem_method.from_legacy(self.reduction, self.dtem_dim, self.dtem_soft_merge._asdict())
        return reduce.check_method(reduce.ToMe() if self.reduction is None else self.reduction)

    def effective_schedule(self, r: schedules.RSpec) -> tuple[int, ...]:
        """Each block's `r` after the clamp to its method's `max_r`, for this model's tokens."""
        schedule = schedules.parse_r(self.depth, r)
        return schedules.effective_schedule(self.num_tokens, schedule, self.num_prefix_tokens, self.method.max_r)

    def describe_r(self, r: schedules.RSpec) -> str:
        """One line: `r`, the tokens it leaves at the head, and any clamp (`schedules.describe_r`)."""
        return schedules.describe_r(r, self.num_tokens, self.depth, self.num_prefix_tokens, self.method.max_r)

    @property
    def metric_dim(self) -> int | None:
        """Width of the DTEM metric layers (None without DTEM)."""
        return dtem_method.model_metric_width(self.method, self.width, self.num_heads)

    def _validate(self):
        self.grid_size  # an image smaller than one patch is an error
        if self.distill_token and not self.class_token:
            raise ValueError("a distillation token needs a class token")
        if isinstance(self.reg_tokens, bool) or not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be an int >= 0, got {self.reg_tokens!r}")
        if self.reg_tokens and self.distill_token:
            raise ValueError("register tokens with a distillation token: no timm model has both; pick one")
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.global_pool == "cls_distill_avg" and not self.distill_token:
            raise ValueError(
                "global_pool='cls_distill_avg' averages the class and distillation tokens; it needs distill_token=True"
            )
        if self.act_layer not in ACTIVATIONS:
            raise ValueError(f"act_layer must be one of {sorted(ACTIVATIONS)}, got {self.act_layer!r}")
        if self.head_act is not None and self.head_act not in ACTIVATIONS:
            raise ValueError(f"head_act must be None or one of {sorted(ACTIVATIONS)}, got {self.head_act!r}")
        if self.mlp_layer not in MLP_LAYERS:
            raise ValueError(f"mlp_layer must be one of {MLP_LAYERS}, got {self.mlp_layer!r}")
        if self.mlp_layer == "swiglu_packed" and int(self.width * self.mlp_ratio) % 2:
            raise ValueError(
                f"mlp_layer='swiglu_packed' splits fc1's {int(self.width * self.mlp_ratio)} features "
                "into gate and value halves; choose mlp_ratio so that width * mlp_ratio is even"
            )
        for name in ("norm_eps", "fc_norm_eps"):
            eps = getattr(self, name)
            if eps is not None and not eps > 0:
                raise ValueError(f"{name} must be > 0, got {eps!r}")
        self._validate_patches()
        if self.global_pool in ("token", "token_avg") and not self.class_token:
            raise ValueError(f"global_pool={self.global_pool!r} needs a class token")
        if self.global_pool == "token_avg" and self.distill_token:
            raise ValueError("global_pool='token_avg' pools the class token alone; a distilled model pools 'token'")
        if self.pool_include_prefix and self.global_pool != "map":
            raise ValueError("pool_include_prefix is the MAP head's (global_pool='map'); average pooling skips the prefix")
        if self.num_frames is None and self.tubelet_size != 1:
            raise ValueError("tubelet_size needs num_frames (a video model); images have no time axis")
        if self.num_frames is not None and (
            self.num_frames < 1 or self.tubelet_size < 1 or self.num_frames % self.tubelet_size
        ):
            raise ValueError(
                f"num_frames {self.num_frames} is not a positive multiple of "
                f"tubelet_size {self.tubelet_size}"
            )
        self.method.check_depth(self.depth)
        self._validate_rope()

    def _validate_patches(self):
        stride = () if self.patch_stride is None else pair(self.patch_stride)
        if any(s < 1 or s > p for s, p in zip(stride, pair(self.patch_size))):
            raise ValueError(
                f"patch_stride {self.patch_stride} must be between 1 and patch_size {self.patch_size} "
                "(a larger stride would skip pixels)"
            )
        if self.fbank_input and (self.in_chans != 1 or self.num_frames is not None):
            raise ValueError("fbank_input reads [batch, time, mel bins] spectrograms: in_chans=1, no num_frames")

    def _validate_rope(self):
        if self.rope_position not in rope.POSITION_RULES:
            raise ValueError(f"rope_position must be one of {rope.POSITION_RULES}, got {self.rope_position!r}")
        if self.rope_metric not in rope.METRICS:
            raise ValueError(f"rope_metric must be one of {rope.METRICS}, got {self.rope_metric!r}")
        if self.rope is None:
            return
        if not isinstance(self.rope, Rope):
            raise TypeError(f"rope must be a tome_jax.rope.Rope, got {self.rope!r}")
        if self.num_frames is not None:
            raise ValueError("rotary position embeddings are for 2-D patch grids; a video ViT (num_frames) has none")
        if (self.width // self.num_heads) % 4:
            raise ValueError(f"rotary embeddings need a head width divisible by 4, got {self.width // self.num_heads}")

    def _check_input(self, shape: tuple[int, ...]):
        """Clear errors for inputs that do not fit `input_shape` (batch first)."""
        if self.fbank_input:
            layout = "spectrograms must be [batch, time, mel bins]"
        elif self.num_frames is None:
            layout = "images must be [batch, height, width, channels]"
        else:
            layout = "videos must be [batch, frames, height, width, channels]"
        if len(shape) != len(self.input_shape) + 1:
            raise ValueError(f"{layout}, got {tuple(shape)}")
        if shape[0] == 0:
            raise ValueError(f"an empty batch: inputs of shape {tuple(shape)}; pass at least one")
        if self.fbank_input:
            if tuple(shape[1:]) != self.input_shape:
                raise ValueError(
                    f"{layout}: got {tuple(shape[1:])} (time, mel bins), the model's are {self.input_shape}"
                )
            return
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
        if self.fbank_input:  # [batch, time, mel] -> the image [batch, mel, time, 1]
            images = images.transpose(0, 2, 1)[..., None]
        kernel = self.patch_kernel
        # A matmul over each patch's pixels: the strided convolution's arithmetic, and
        # its [*kernel, in_chans, width] parameter, at matmul speed (XLA's CPU
        # convolution is slower on these shapes; docs/benchmarks.md).
        x = nn.DenseGeneral(
            self.width,
            axis=tuple(range(-len(kernel) - 1, 0)),
            use_bias=not self.pre_norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embed",
        )(patchify(images, kernel, self.patch_strides))
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
        pos_embed = 0.0
        if self.abs_pos_embed:
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

        "avg" pools the tokens after the prefix, as timm does, and so does "map" unless
        `pool_include_prefix`. Both count patches rather than merged tokens: a
        size-weighted mean, or `log(size)` added to the attention pool's logits.
        "token_avg" puts that mean after the class token ([batch, 2 * width]).
        """
        patches, patch_size = x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :]
        if self.global_pool == "map":
            return AttentionPool(
                self.pool_num_heads or self.num_heads,
                mlp_ratio=self.pool_mlp_ratio or self.mlp_ratio,
                act_layer=self.act_layer,
                norm_eps=self.norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attn_implementation=self.attn_implementation,
                name="attn_pool",
            )(*((x, size) if self.pool_include_prefix else (patches, patch_size)))
        if self.global_pool in ("avg", "token_avg"):
            weights = patch_size[..., None].astype(jnp.float32)
            mean = ((patches.astype(jnp.float32) * weights).sum(1) / weights.sum(1)).astype(x.dtype)
            return mean if self.global_pool == "avg" else jnp.concatenate([x[:, 0], mean], axis=-1)
        if self.global_pool == "cls_distill_avg":
            return (x[:, 0] + x[:, 1]) / 2
        if self.distill_token:
            return x[:, :2]
        return x[:, 0]

    @property
    def distill_heads(self) -> bool:
        """DeiT's two heads, one on the class token and one on the distillation token."""
        return self.distill_token and self.global_pool == "token"

    def _head(self, pooled: jax.Array) -> jax.Array:
        """timm's heads: zero classes gives the pooled features."""
        if self.num_classes == 0:
            return pooled.mean(1) if self.distill_heads else pooled
        head = lambda name: nn.Dense(  # noqa: E731
            self.num_classes,
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        if self.distill_heads:
            # DeiT's inference rule: the mean of the class and distillation heads.
            logits = (head("head")(pooled[:, 0]) + head("head_dist")(pooled[:, 1])) / 2
        else:
            logits = head("head")(pooled)
        return logits if self.head_act is None else ACTIVATIONS[self.head_act](logits)

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
        """Classifies images (or videos), reducing tokens in every block.

        Applied with `mutable="intermediates"` it returns `(logits, {"intermediates":
        ...})`, what downstream models take (Flax's `sow`: a tuple, one entry per
        call): under `blocks_i` the block's output `tokens` [batch, tokens_i, width]
        (before any norm), their `size` [batch, tokens_i], the `fields` (with
        `token_fields`) and the merge `plan` (left out where a method gave no hard
        plan, as DTEM's soft merge); at the top the final `tokens` (after the final
        norm, as timm's `forward_features`) and `size`. `tome_jax.token_features`
        and `tome_jax.patch_features` read them. Otherwise nothing is recorded.

        Args:
          images: [batch, height, width, in_chans], or [batch, num_frames, height,
            width, in_chans] for a video model; already normalised.
          r: tokens removed per block: int, `(r, inflection)` or per-layer list;
            static (a new `r` is a new compilation, the parameters are the same).
          train: enables stochastic depth (needs a 'dropout' rng), and tells the
            method it is training (DTEM then merges softly).
          prop_attn: proportional attention (on for supervised models and for
            training with merging; off for off-the-shelf MAE models); None: the
            reduction method's default (on for ToMe).
          soft_merge: deprecated; a DTEM model's `reduce.DTEM(soft_merge=...)`.

        Returns:
          logits [batch, num_classes] (pooled features [batch, width] when
          num_classes == 0).
        """
        self._validate()
        method = self.method
        if soft_merge is not None:
            warnings.warn(
                "ViT.__call__(soft_merge=) is deprecated; set reduce.DTEM(soft_merge='always' or 'never')",
                DeprecationWarning,
                stacklevel=2,
            )
            method = dtem_method.with_soft_merge(method, soft_merge)
        schedule = schedules.parse_r(self.depth, r)
        x = self._embed(images)
        tokens = Tokens(x, jnp.ones(x.shape[:2], jnp.float32), self._initial_fields(x.shape[0]))
        tokens = method.start(tokens, self, train)
        block, frequencies = self._block(method), self._rope_frequencies()
        for i, block_r in enumerate(schedule):
            tokens = block(layer=i, drop_path=self.drop_path_rate * i / max(self.depth - 1, 1), name=f"blocks_{i}")(
                tokens, r=block_r, train=train, prop_attn=prop_attn, rope_freqs=frequencies[i]
            )
        method.finish(tokens, self)
        return self._head(self._pool_features(tokens))

    def _block(self, method: reduce.Reduction):
        """Block, its parts configured from the model's attributes (a partial: the block's own come per block)."""
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = functools.partial(
            Attention, self.num_heads, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, norm_eps=self.norm_eps,
            implementation=self.attn_implementation, inner_norm=self.attn_inner_norm,
            rope_half=self.rope is not None and self.rope.half, rotated_metric=self.rope_metric == "post", **kinds,
        )  # fmt: skip
        mlp_norm = self.norm_eps if self.scale_mlp_norm else None
        hidden = int(self.width * self.mlp_ratio)
        mlp = functools.partial(Mlp, hidden, self.act_layer, self.mlp_layer, mlp_norm, **kinds)
        layer_scale = None
        if self.layer_scale_init is not None:
            layer_scale = functools.partial(LayerScale, self.layer_scale_init, self.param_dtype)
        return functools.partial(
            Block,
            attn=attn,
            mlp=mlp,
            norm=functools.partial(nn.LayerNorm, epsilon=self.norm_eps, **kinds),
            dense=functools.partial(nn.Dense, **kinds),
            reduction=method,
            num_prefix_tokens=self.num_prefix_tokens,
            num_layers=self.depth,
            layer_scale=layer_scale,
            merge_implementation=self.merge_implementation,
        )

    def _initial_fields(self, batch: int) -> dict[str, Field]:
        names = [field.name for field in self.token_fields]
        if len(set(names)) != len(names) or not all(names) or rope.POSITION_FIELD in names:
            raise ValueError(f"token_fields need distinct names, none empty or {rope.POSITION_FIELD!r}; got {names}")
        fields = {field.name: Field(field.initial(self, batch), field.rule) for field in self.token_fields}
        if self.rope is not None:  # the patches' grid coordinates; the prefix tokens' are 0: never rotated
            coords = rope.grid_coordinates(self.rope, self.grid_size)
            coords = jnp.concatenate([jnp.zeros((self.num_prefix_tokens, 2), jnp.float32), coords])
            rule = MEAN if self.rope_position == "mean" else DEST
            fields[rope.POSITION_FIELD] = Field(jnp.broadcast_to(coords, (batch, *coords.shape)), rule)
        return fields

    def _rope_frequencies(self) -> list[jax.Array | None]:
        """Each block's rotary frequencies [heads or 1, 2, head_dim / 2], or None without rotation."""
        if self.rope is None:
            return [None] * self.depth
        head_dim = self.width // self.num_heads
        if self.rope.kind != "mixed":
            return [jnp.asarray(rope.fixed_frequencies(self.rope, head_dim))[None]] * self.depth
        learned = RopeFrequencies(self.depth, self.num_heads, head_dim, self.rope.temperature, name="rope")()
        return [learned[:, i].transpose(1, 0, 2) for i in range(self.depth)]

    def _pool_features(self, tokens: Tokens) -> jax.Array:
        """The final norm, recorded (`tokens`, `size`), then pooling (with fc_norm after it)."""
        x, size = tokens.x, tokens.size
        use_fc_norm = self.global_pool == "avg" if self.fc_norm is None else self.fc_norm
        if (not use_fc_norm) if self.token_norm is None else self.token_norm:
            x = self._norm("norm")(x)
        self.sow("intermediates", "tokens", x)
        self.sow("intermediates", "size", size)
        pooled = self._pool(x, size)
        if not use_fc_norm:
            return pooled
        eps = self.norm_eps if self.fc_norm_eps is None else self.fc_norm_eps
        return layer_norm("fc_norm", self.dtype, self.param_dtype, eps)(pooled)


def init_params(model: ViT, rng: jax.Array | None = None) -> Any:
    """The model's parameters, initialised (jitted) from one zero example of `model.input_shape`.

    Under `jax.eval_shape` it gives their shapes without computing anything.
    """
    rng = jax.random.key(0) if rng is None else rng
    return jax.jit(model.init)(rng, jnp.zeros((1, *model.input_shape), jnp.float32))["params"]


def require_vit(model, user: str) -> ViT:
    """`model` when it is a `ViT`, else a TypeError saying what `user` (a function's name) takes.

    An NNX module is the likely mistake (the merge works in NNX models, the ViT is
    Linen), so the message says how to get a ViT out of one, or what to do instead.
    """
    if isinstance(model, ViT):
        return model
    # flax.nnx is looked up, not imported: an NNX module means its user imported it already.
    nnx = sys.modules.get("flax.nnx")
    bridged = isinstance(model, nnx.bridge.ToNNX) if nnx is not None else False
    # The wrapped module's attribute is `to_nnx__module` since Flax 0.11, `module` before.
    if bridged and isinstance(getattr(model, "to_nnx__module", None) or model.module, ViT):
        hint = "pass the ViT that the nnx.bridge.ToNNX wrapper holds (its to_nnx__module) with its Linen variables"
    elif nnx is not None and isinstance(model, nnx.Module):
        hint = (
            "an NNX module; tome_jax's ViT is Linen (tome_jax.create_model or tome_jax.from_timm), and an NNX "
            "model of your own merges with tome_jax.merge in its blocks (examples/nnx_encoder.py)"
        )
    else:
        hint = "build one with tome_jax.create_model or tome_jax.from_timm"
    raise TypeError(f"{user} takes a Linen tome_jax.ViT, got {type(model).__name__}: {hint}")
