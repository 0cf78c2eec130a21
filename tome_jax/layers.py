"""The layers of tome_jax's ViT: patches, activations, MLPs, LayerScale, the MAP head and the block.

Parameter names follow timm's where they can (`fc1`, `fc2`, `attn_pool/latent`, `gamma`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tome_jax import merge, reduce, rope
from tome_jax.attention import layer_norm, proportional_attention
from tome_jax.tokens import Tokens


def pair(value) -> tuple[int, ...]:
    """A size as a tuple: an int is a square's side, (n, n); a sequence is kept as given."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def patchify(inputs: jax.Array, kernel: tuple[int, ...], stride: tuple[int, ...] | None = None) -> jax.Array:
    """[batch, *spatial, channels] -> [batch, *grid, *kernel, channels], grid = (spatial - kernel) // stride + 1.

    Each patch's pixels end up contiguous, in the order of a convolution kernel.
    Pixels past the last whole patch are dropped, as a strided convolution drops
    them (timm's So400m/14 at 384 px reads 27 x 14 = 378 of them). `stride`
    (None: the kernel) below the kernel gives overlapping patches (AST's 16 x 16
    patches every 10 pixels), each pixel then copied into every patch that reads it.
    """
    stride = kernel if stride is None else stride
    batch, *spatial, channels = inputs.shape
    grid = [(extent - k) // s + 1 for extent, k, s in zip(spatial, kernel, stride)]
    axes = len(kernel)
    if tuple(stride) != tuple(kernel):
        # One strided slice per kernel offset and axis: [batch, *grid, *kernel, channels] directly.
        for axis, (g, k, s) in enumerate(zip(grid, kernel, stride)):
            at = 1 + axis
            offsets = [jax.lax.slice_in_dim(inputs, i, i + (g - 1) * s + 1, s, axis=at) for i in range(k)]
            inputs = jnp.stack(offsets, axis=inputs.ndim - 1)
        return inputs
    inputs = inputs[(slice(None), *(slice(g * k) for g, k in zip(grid, kernel)))]
    split = inputs.reshape(batch, *[d for dims in zip(grid, kernel) for d in dims], channels)
    grid_axes, kernel_axes = range(1, 2 * axes, 2), range(2, 2 * axes + 1, 2)
    return split.transpose(0, *grid_axes, *kernel_axes, 2 * axes + 1)


def gelu(x: jax.Array) -> jax.Array:
    """timm's exact GELU, `x * Phi(x)`, through erf as PyTorch computes it.

    flax's default is the tanh approximation, and `nn.gelu(approximate=False)` goes
    through erfc, whose XLA expansion (two branches, exp, divisions) makes the pass
    over the hidden activations slower on CPU (docs/benchmarks.md, Where the time goes).
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
    "tanh": jnp.tanh,  # Hugging Face's pooler (ViTModel, DeiTModel): a head activation, `ViT.head_act`
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


class RopeFrequencies(nn.Module):
    """RoPE-Mixed's learned frequencies, `freqs` [2, depth, num_heads, head_dim / 2] (timm's `rope.freqs`)."""

    depth: int
    num_heads: int
    head_dim: int
    temperature: float

    @nn.compact
    def __call__(self) -> jax.Array:
        init = rope.mixed_frequencies_init(self.depth, self.num_heads, self.head_dim, self.temperature)
        return self.param("freqs", init, (2, self.depth, self.num_heads, self.head_dim // 2), jnp.float32)


class LayerScale(nn.Module):
    """timm's LayerScale: a learned per-channel factor on a residual branch (`gamma`)."""

    init_value: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param(
            "gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), self.param_dtype
        )
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: attention, the reduction method's step at its position, MLP.

    The block is given its parts, configured: `attn` (an `attention.Attention`),
    `mlp` (an `Mlp`), `norm` (a LayerNorm), `dense` (an `nn.Dense`, for layers a
    method owns, as DTEM's metric) and `layer_scale` (a `LayerScale`, or None);
    each is called with its parameter name only.

    `reduction` removes the block's `r` tokens at its `position`
    (`reduce.POSITIONS`): between attention and MLP (ToMe), on the block's input
    (MCTF) or on its output (DCT). The attention weights are materialised only
    for a method that reads them (`needs_weights`).
    """

    attn: Callable[..., nn.Module]
    mlp: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    dense: Callable[..., nn.Module]
    reduction: reduce.Reduction
    num_prefix_tokens: int
    layer: int = 0
    num_layers: int = 1
    layer_scale: Callable[..., nn.Module] | None = None
    drop_path: float = 0.0
    merge_implementation: str | None = None

    @nn.compact
    def __call__(
        self, tokens: Tokens, *, r: int, train: bool = False, prop_attn: bool | None = None, rope_freqs=None
    ) -> Tokens:
        """Args: tokens of [batch, tokens, width]; r a static int; `prop_attn` None: the method's default;
        `rope_freqs` [heads or 1, 2, head_dim / 2] a rotary model's frequencies in this block
        (`rope.rotation_angles` of the tokens' `rope.POSITION_FIELD`), None for no rotation.

        Returns the tokens after the block: [batch, tokens - r', width], r' being r
        after the clamp to the method's `max_r` (0 for a step that keeps every
        token). With the "intermediates" collection mutable, also records the
        output (`tokens`, `size`, the `fields`) and the plan the method applied
        (`plan`; the identity where it did not run, none where it gave no hard
        plan), which `tome_jax.features` reads.
        """
        method, norm1 = self.reduction, self.norm(name="norm1")
        prop_attn = method.prop_attn if prop_attn is None else prop_attn
        attend = functools.partial(self._attend, self.attn(name="attn"), prop_attn=prop_attn, rope_freqs=rope_freqs)
        tokens_in = tokens.x.shape[1]
        r = merge.clamp_r(r, tokens_in, self.num_prefix_tokens, method.max_r(tokens_in, self.num_prefix_tokens))
        acts = method.acts(r)
        step = functools.partial(self._step, r=r, train=train)
        plan = weights = None
        if acts and method.position == reduce.BEFORE_ATTENTION:
            # The map of the unreduced tokens, for a method that reads it (its output goes unused).
            seen = attend(norm1(tokens.x), tokens, return_weights=True).weights if method.needs_weights else None
            tokens, plan, weights = step(tokens, None, seen)
        normed = norm1(tokens.x)
        adjust = functools.partial(method.adjust_weights, tokens=tokens)
        reads_weights = acts and method.needs_weights and method.position == reduce.AFTER_ATTENTION
        attended = attend(normed, tokens, weights=weights, adjust_weights=adjust if reads_weights else None)
        metric = method.metric(attended.metric, normed, self)
        tokens = tokens.replace(x=self._residual(tokens.x, attended.out, "1", train))
        if acts and method.position == reduce.AFTER_ATTENTION:
            tokens, plan, _ = step(tokens, metric, attended.weights)
        branch = self.mlp(name="mlp")(self.norm(name="norm2")(tokens.x))
        tokens = tokens.replace(x=self._residual(tokens.x, branch, "2", train))
        if acts and method.position == reduce.AFTER_MLP:
            tokens, plan, _ = step(tokens, metric, None)
        self._sow(tokens, merge.identity_plan(tokens.x.shape[0], tokens_in) if not acts else plan)
        return tokens

    def _attend(self, attn, normed: jax.Array, tokens: Tokens, *, prop_attn: bool, rope_freqs, **options):
        """The attention on `normed` (the normalised `tokens`): their sizes under proportional
        attention, and their positions' rotation in a rotary model."""
        angles = None
        if rope_freqs is not None:
            angles = rope.rotation_angles(tokens.fields[rope.POSITION_FIELD].value, rope_freqs)
        return attn(normed, tokens.size if prop_attn else None, rope_angles=angles, **options)

    def _step(self, tokens: Tokens, metric, weights, *, r: int, train: bool):
        """The method's step on `tokens`: (the tokens after it, its plan, attention weights it gives)."""
        method = self.reduction
        rng = self.make_rng("reduction") if method.needs_rng and self.has_rng("reduction") else None
        reduced = method(
            reduce.Step(
                tokens, metric, r, self.num_prefix_tokens, self.layer, self.num_layers,
                weights=weights, rng=rng, implementation=self.merge_implementation, train=train, block=self,
            )
        )  # fmt: skip
        after = tokens.replace(state=reduced.state).follow(
            reduced.plan, reduced.x, reduced.size, method=type(method).__name__
        )
        return after, reduced.plan, reduced.weights

    def _residual(self, x: jax.Array, branch: jax.Array, name: str, train: bool) -> jax.Array:
        if self.layer_scale is not None:
            branch = self.layer_scale(name=f"ls_{name}")(branch)
        # Stochastic depth: drop the whole branch per example.
        branch = nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(branch, deterministic=not train)
        return x + branch

    def _sow(self, tokens: Tokens, plan) -> None:
        """Records the block's output for downstream models (`tome_jax.features`): the
        tokens, sizes and fields, and the plan when it is a hard one (`merge.MergePlan`)."""
        if not self.is_mutable_collection("intermediates"):
            return
        self.sow("intermediates", "tokens", tokens.x)
        self.sow("intermediates", "size", tokens.size)
        if tokens.fields:
            self.sow("intermediates", "fields", {name: field.value for name, field in tokens.fields.items()})
        if isinstance(plan, merge.MergePlan):
            self.sow("intermediates", "plan", plan)
