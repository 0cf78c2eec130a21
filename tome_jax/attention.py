"""Multi-head self-attention with ToMe's proportional attention."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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
    weights (the README's Speed section has the measurement).
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

    On CPU, head-major einsums beat jax.nn.dot_product_attention (measured, see
    the README's Speed section), because XLA's batched matmuls then need no
    transposes and the softmax is normalised late; elsewhere JAX picks (cuDNN's
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


class Attention(nn.Module):
    """timm-layout attention (one fused `qkv` projection, then `proj`).

    Returns the attention output and the merge metric, the keys' mean over heads.
    """

    num_heads: int
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, size: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """x: [batch, tokens, dim]; size: [batch, tokens] or None.

        Returns ([batch, tokens, dim], metric [batch, tokens, head_dim]).
        """
        batch, tokens, dim = x.shape
        if dim % self.num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {self.num_heads}")
        head_dim = dim // self.num_heads
        dense = lambda features, name, bias=True: nn.Dense(  # noqa: E731
            features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        qkv = dense(3 * dim, "qkv", self.qkv_bias)(x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm:
            query = layer_norm("q_norm", self.dtype, self.param_dtype, self.norm_eps)(query)
            key = layer_norm("k_norm", self.dtype, self.param_dtype, self.norm_eps)(key)
        out = proportional_attention(query, key, value, size, implementation=self.implementation)
        out = dense(dim, "proj")(out.reshape(batch, tokens, dim))
        return out, key.mean(axis=2)
