"""Multi-head self-attention with ToMe's proportional attention."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tome_jax import rope


def layer_norm(name: str, dtype: Any, param_dtype: Any, epsilon: float = 1e-6) -> nn.LayerNorm:
    """LayerNorm, by default with timm's ViT epsilon (1e-6; CLIP's is 1e-5)."""
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


def size_bias(size: jax.Array) -> jax.Array:
    """[batch, tokens] sizes -> [batch, 1, 1, tokens] additive logit bias `log(size)`.

    A token faded to size 0 by the soft merge gets a very negative but finite bias
    (log of the smallest normal float), so it vanishes from the softmax without
    sending infinities into the gradient.
    """
    size = jnp.maximum(size.astype(jnp.float32), jnp.finfo(jnp.float32).tiny)
    return jnp.log(size)[:, None, None, :]


def _head_major_attention(query, key, value, bias):
    """Attention on [batch, heads, tokens, head_dim] inputs; the output likewise.

    Logits and softmax in float32 whatever the input dtype. The softmax is
    normalised after the product with the values, on [.., tokens, head_dim]
    instead of [.., tokens, tokens]: on CPU that saves XLA a pass over the
    weights (docs/benchmarks.md, Where the time goes).
    """
    scaled = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    logits = jnp.einsum("bhqd,bhkd->bhqk", scaled, key, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    # The max is a shift that cancels; no gradient flows through it (as in jax.nn.softmax).
    shift = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    unnormalised = jnp.exp(logits - shift)
    out = jnp.einsum(
        "bhqk,bhkd->bhqd", unnormalised.astype(value.dtype), value, preferred_element_type=jnp.float32
    )
    return (out / unnormalised.sum(axis=-1, keepdims=True)).astype(value.dtype)


def default_implementation() -> str:
    """The attention implementation measured fastest on the default backend.

    On CPU, head-major einsums beat jax.nn.dot_product_attention, because XLA's
    batched matmuls then need no transposes and the softmax is normalised late; elsewhere JAX picks (cuDNN's
    fused attention on GPU where it applies).
    """
    return "einsum" if jax.default_backend() == "cpu" else "auto"


def _check_implementation(implementation: str | None) -> str:
    implementation = implementation or default_implementation()
    if implementation not in ("einsum", "xla", "cudnn", "auto"):
        raise ValueError(f"unknown attention implementation {implementation!r}")
    return implementation


def _fused_attention(query, key, value, bias, implementation):
    """jax.nn.dot_product_attention on [batch, tokens, heads, head_dim]."""
    bias = None if bias is None else bias.astype(query.dtype)
    chosen = None if implementation == "auto" else implementation
    return jax.nn.dot_product_attention(query, key, value, bias=bias, implementation=chosen)


def proportional_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    size: jax.Array | None = None,
    *,
    implementation: str | None = None,
) -> jax.Array:
    """`softmax(q k^T / sqrt(d) + log size_key) v`.

    Args:
      query, key, value: [batch, tokens, heads, head_dim].
      size: [batch, tokens] patches held by each key token; None is plain attention.
      implementation: "einsum" (head-major XLA matmuls, fastest on CPU), or one of
        jax.nn.dot_product_attention's: "xla", "cudnn" (fused flash attention on
        GPU, bias included), "auto" (JAX chooses); None: `default_implementation()`.

    Returns:
      [batch, tokens, heads, head_dim].
    """
    implementation = _check_implementation(implementation)
    bias = None if size is None else size_bias(size)
    if implementation != "einsum":
        return _fused_attention(query, key, value, bias, implementation)
    head_major = (t.transpose(0, 2, 1, 3) for t in (query, key, value))
    return _head_major_attention(*head_major, bias).transpose(0, 2, 1, 3)


def attention_weights(query: jax.Array, key: jax.Array, size: jax.Array | None = None) -> jax.Array:
    """`softmax(q k^T / sqrt(d) + log size_key)`, materialised: [batch, heads, tokens, tokens].

    For the token-reduction methods that read the attention map (EViT's and
    DiffRate's class attention, MCTF's informativeness and one-step-ahead
    attention); plain attention never builds it (see `proportional_attention`).

    Args:
      query, key: [batch, tokens, heads, head_dim].
      size: [batch, tokens] or None.
    """
    scaled = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", scaled, key, preferred_element_type=jnp.float32)
    if size is not None:
        logits = logits + size_bias(size)
    return jax.nn.softmax(logits, axis=-1)


def attend(weights: jax.Array, value: jax.Array) -> jax.Array:
    """[batch, heads, tokens, tokens] weights, [batch, tokens, heads, head_dim] values -> like values."""
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    return out.astype(value.dtype)


class FusedQKV(nn.Module):
    """timm's fused `qkv` projection (an `nn.Dense`'s parameters), computing only the parts asked for.

    Plain attention takes all three in one matmul; a reduction step that needs
    only the attention map skips the values, and one that brings its own
    attention map (MCTF's one-step-ahead attention) projects only the values.
    XLA does not narrow a matmul whose output is sliced, so the parts are
    separate products of the kernel's columns.
    """

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, parts: str = "qkv") -> jax.Array:
        """x: [batch, tokens, dim] -> [batch, tokens, len(parts) * features / 3], parts in "qkv" order."""
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if parts != "qkv":
            width = self.features // 3
            columns = [slice("qkv".index(p) * width, ("qkv".index(p) + 1) * width) for p in parts]
            kernel = jnp.concatenate([kernel[:, c] for c in columns], axis=1)
            bias = None if bias is None else jnp.concatenate([bias[c] for c in columns])
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else y + bias


class Attended(NamedTuple):
    """What `Attention` returns.

    Attributes:
      out: [batch, tokens, dim] the attention's output, after `proj`.
      metric: [batch, tokens, head_dim] the keys' mean over heads (ToMe's merge
        metric), or None when the weights were given.
      weights: [batch, heads, tokens, tokens] the weights attended with, when
        they were materialised (asked for, adjusted or given); else None.
    """

    out: jax.Array
    metric: jax.Array | None
    weights: jax.Array | None = None


class Attention(nn.Module):
    """timm-layout attention (one fused `qkv` projection, then `proj`) with proportional attention.

    For timm's rotary ViTs (`Eva`): queries and keys rotated by per-token angles
    (`rope.rotate`, after any qk-norm), a LayerNorm on the output before `proj`
    (`inner_norm`, timm's `scale_attn_inner`), and the merge metric from the keys
    before rotation or after it (`rotated_metric`).
    """

    num_heads: int
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    inner_norm: bool = False
    rope_half: bool = False
    rotated_metric: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        size: jax.Array | None = None,
        *,
        weights: jax.Array | None = None,
        return_weights: bool = False,
        adjust_weights: Callable[[jax.Array], jax.Array] | None = None,
        rope_angles: jax.Array | None = None,
    ) -> Attended:
        """x: [batch, tokens, dim]; size: [batch, tokens] or None (plain attention).

        Args:
          weights: [batch, heads, tokens, tokens] attention weights to use instead
            of computing them (MCTF's one-step-ahead attention): only the values
            are projected, and there is no metric.
          return_weights: materialise the weights and return them (the output is
            then computed from them, whatever `implementation`).
          adjust_weights: a function of the weights that gives the ones to
            attend with (DiffRate's search masks keys); implies `return_weights`.
          rope_angles: [batch, heads or 1, tokens, head_dim / 2] the rotation of each
            token's query and key (`rope.rotation_angles`); None: no rotation.
        """
        batch, tokens, dim = x.shape
        if dim % self.num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {self.num_heads}")
        head_dim = dim // self.num_heads
        qkv = FusedQKV(3 * dim, self.qkv_bias, self.dtype, self.param_dtype, name="qkv")
        heads = lambda t: t.reshape(batch, tokens, -1, self.num_heads, head_dim)  # noqa: E731
        metric = None
        if weights is not None:
            out = attend(weights, heads(qkv(x, "v"))[:, :, 0])
        elif return_weights or adjust_weights is not None:
            # The values apart: a step that reads only the map leaves them unused, for XLA to drop.
            query_key, value = heads(qkv(x, "qk")), heads(qkv(x, "v"))[:, :, 0]
            query, key, metric = self._positioned(query_key[:, :, 0], query_key[:, :, 1], rope_angles)
            weights = attention_weights(query, key, size)
            if adjust_weights is not None:
                weights = adjust_weights(weights)
            out = attend(weights, value)
        else:
            qkv_heads = heads(qkv(x))
            query, key, metric = self._positioned(qkv_heads[:, :, 0], qkv_heads[:, :, 1], rope_angles)
            out = proportional_attention(query, key, qkv_heads[:, :, 2], size, implementation=self.implementation)
        out = out.reshape(batch, tokens, dim)
        if self.inner_norm:
            out = layer_norm("norm", self.dtype, self.param_dtype, self.norm_eps)(out)
        out = nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)
        return Attended(out, metric, weights)

    def _positioned(self, query, key, rope_angles):
        """Query and key after qk-norm and rotation, and the merge metric (the keys' mean over heads)."""
        if self.qk_norm:
            query = layer_norm("q_norm", self.dtype, self.param_dtype, self.norm_eps)(query)
            key = layer_norm("k_norm", self.dtype, self.param_dtype, self.norm_eps)(key)
        metric = key.mean(axis=2)
        if rope_angles is not None:
            query, key = (rope.rotate(t, rope_angles, half=self.rope_half) for t in (query, key))
            metric = key.mean(axis=2) if self.rotated_metric else metric
        return query, key, metric
