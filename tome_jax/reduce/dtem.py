"""DTEM (Lee & Hong, NeurIPS 2024) as a reduction method: ToMe's merge on a learned metric per block.

Each block owns a metric layer (`blocks_i/metric`, a Dense from the block's
normalised input, read detached) that replaces the keys as the merge metric.
Applied with `train=True` (the default `soft_merge="training"`), the block
merges with DTEM's differentiable soft merge (`tome_jax.dtem`), which keeps
every token and trains the metric; otherwise it merges hard, exactly as ToMe,
on the learned metric.

    model = tome_jax.create_model("deit_small_patch16_224", reduction=reduce.DTEM())
    model, variables = tome_jax.from_timm(base, metric_layers="metric_layers.safetensors")
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np
from flax import struct

from tome_jax import dtem, merge
from tome_jax.reduce.base import Reduced, Reduction, Step, setting
from tome_jax.reduce.tome import ToMe
from tome_jax.tokens import Tokens

SOFT_MERGE_MODES = ("training", "always", "never")


@struct.dataclass
class SoftMergeState:
    """The soft merge's count of tokens still taking part (static: it sets the shapes)."""

    participants: int = struct.field(pytree_node=False)


def metric_width(dim: int, width: int, head_dim: int) -> int:
    """The metric layer's width: `dim`, or by the paper's rule head_dim (2 * head_dim from width 1024)."""
    return dim or (head_dim if width < 1024 else 2 * head_dim)


@dataclasses.dataclass(frozen=True)
class DTEM(Reduction):
    """Decoupled token embedding for merging: a learned metric, a soft merge to learn it by.

    Settings:
      dim: the metric layers' width; 0 is the paper's rule (`metric_width`).
      soft_merge: when blocks merge softly: "training" (applied with
        `train=True`; the paper's), "always", or "never" (ToMe's hard merge on
        the learned metric, in training too).
      k2, tau1, tau2: the soft selection's candidates per A token and
        temperatures (`dtem.soft_khot`; the paper's 3, 0.1, 0.1).
      drop_residue: tokens sorted behind the participants get size 0
        (`dtem.dtem_soft_merge`; not in the paper).

    The soft merge leaves every prefix token out, as the official code leaves the class
    token out (`dtem.dtem_soft_merge`'s `prefix`).
    """

    name: ClassVar[str] = "dtem"
    dim: int = setting(0, low=0)
    soft_merge: str = setting("training", choices=SOFT_MERGE_MODES)
    k2: int = setting(3, low=1)
    tau1: float = setting(0.1, low=0, open_low=True)  # temperatures divide
    tau2: float = setting(0.1, low=0, open_low=True)
    drop_residue: bool = False

    def merges_softly(self, train: bool) -> bool:
        return self.soft_merge == "always" or (self.soft_merge == "training" and train)

    def start(self, tokens: Tokens, model, train: bool) -> Tokens:
        if not self.merges_softly(train):
            return tokens
        return tokens.replace(state=SoftMergeState(participants=tokens.x.shape[1]))

    def metric(self, keys: jax.Array | None, normed: jax.Array, block) -> jax.Array:
        """The block's metric layer on its normalised input, detached: learning how to merge
        never moves the ViT's own features through this path."""
        width = metric_width(self.dim, normed.shape[-1], keys.shape[-1])
        return block.dense(width, name="metric")(jax.lax.stop_gradient(normed))

    def __call__(self, step: Step) -> Reduced:
        if not self.merges_softly(step.train):
            return ToMe()(step)
        n = step.state.participants
        prefix = step.num_prefix_tokens
        r = merge.clamp_r(step.r, n, protected=prefix)
        if r == 0:  # nothing takes part any more
            return Reduced(step.x, step.size, merge.identity_plan(*step.size.shape), state=step.state)
        plan = dtem.soft_merge_plan(
            step.size,
            step.metric,
            r,
            n,
            k2=self.k2,
            tau1=self.tau1,
            tau2=self.tau2,
            drop_residue=self.drop_residue,
            prefix=prefix,
        )
        size = plan.sum(step.size)
        return Reduced(plan.mean(step.x, step.size), size, plan, state=SoftMergeState(n - r))

    def outputs(self, model, params, gflops) -> dict[str, bytes]:
        """The metric layers alone, `metric_layers.safetensors` (`metric_layers_file`)."""
        return {"metric_layers.safetensors": metric_layers_file(params, model.depth)}


def metric_layers_file(params, depth: int) -> bytes:
    """The blocks' metric layers in timm's layout (`blocks.i.metric.weight` [dim, width], `.bias`)
    as safetensors bytes, for `tome_jax.from_timm(base, metric_layers=path)`."""
    from safetensors.numpy import save

    layers = {}
    for i in range(depth):
        metric = params[f"blocks_{i}"]["metric"]
        layers[f"blocks.{i}.metric.weight"] = np.ascontiguousarray(np.asarray(metric["kernel"], np.float32).T)
        layers[f"blocks.{i}.metric.bias"] = np.asarray(metric["bias"], np.float32)
    dim = layers["blocks.0.metric.weight"].shape[0]
    return save(layers, metadata={"dtem_dim": str(dim), "depth": str(depth)})


def model_metric_width(method: Reduction, width: int, num_heads: int) -> int | None:
    """The metric layers' width of a model with `method` (None when it is not DTEM)."""
    return metric_width(method.dim, width, width // num_heads) if isinstance(method, DTEM) else None


def from_legacy(reduction: Reduction | None, dim: int | None, settings: dict) -> DTEM:
    """The method `ViT(dtem=True, dtem_dim=, dtem_soft_merge=)` meant (that spelling is deprecated)."""
    if reduction not in (None, ToMe()):
        raise ValueError(
            f"dtem=True with reduction={reduction!r}: DTEM is a reduction method of its own; "
            "pass reduction=reduce.DTEM(...) alone"
        )
    return DTEM(dim=dim or 0, **settings)


def with_soft_merge(method: Reduction, soft: bool) -> DTEM:
    """`ViT.__call__(soft_merge=)` (deprecated): a DTEM method that merges softly, or not, whatever `train`."""
    if not isinstance(method, DTEM):
        raise ValueError("soft_merge needs a DTEM model (reduction=reduce.DTEM())")
    return dataclasses.replace(method, soft_merge="always" if soft else "never")
