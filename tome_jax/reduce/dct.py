"""DCT token reduction, as OpenToMe implements it (after the Fourier Transformer, He et al., ACL 2023).

After each block's MLP, the tokens after the prefix are low-pass filtered along
the sequence: an orthonormal DCT-II over the `n` tokens, the first `n - r`
coefficients kept, and an orthonormal inverse DCT of length `n - r`. Together
that is one fixed [n - r, n] matrix, applied here as a matmul.

Every output token mixes every input token, so no token holds particular
patches: there are no sources to draw, and sizes are not tracked (each output
token gets an equal share of the patches, so pooling is a plain mean).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from tome_jax.reduce.base import AFTER_MLP, Reduced, Reduction, Step


def dct_basis(n: int) -> np.ndarray:
    """[n, n] the orthonormal DCT-II: row k is frequency k over positions 0..n-1."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    basis = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    basis[0] /= np.sqrt(2.0)
    return basis


@functools.lru_cache(maxsize=None)
def dct_resampling(tokens_in: int, tokens_out: int) -> np.ndarray:
    """[tokens_out, tokens_in]: DCT, keep the lowest `tokens_out` frequencies, inverse DCT at that length."""
    return dct_basis(tokens_out).T @ dct_basis(tokens_in)[:tokens_out]


def dct_reduce(x: jax.Array, r: int, num_prefix_tokens: int) -> jax.Array:
    """[batch, tokens, channels] -> [batch, tokens - r, channels], prefix tokens untouched."""
    prefix, rest = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    resampling = jnp.asarray(dct_resampling(rest.shape[1], rest.shape[1] - r), jnp.float32)
    filtered = jnp.einsum(
        "oi,bic->boc", resampling, rest.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return jnp.concatenate([prefix, filtered.astype(x.dtype)], axis=1)


@dataclasses.dataclass(frozen=True)
class DCT(Reduction):
    """OpenToMe's DCT reduction, on the block's output; no settings beyond r."""

    name: ClassVar[str] = "dct"
    position: ClassVar[str] = AFTER_MLP
    tracks_sources: ClassVar[bool] = False
    prop_attn: ClassVar[bool] = False

    def __call__(self, step: Step) -> Reduced:
        p = step.num_prefix_tokens
        rest = step.size.shape[1] - p - step.r
        share = jnp.sum(step.size[:, p:], axis=1, keepdims=True) / rest
        size = jnp.concatenate([step.size[:, :p], jnp.broadcast_to(share, (share.shape[0], rest))], axis=1)
        return Reduced(dct_reduce(step.x, step.r, p), size, None)
