"""The per-token state: a new per-token field follows every method, and a new method carries
every field, each written in one place (here) without touching the model."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tome_jax
from tome_jax import merge, reduce, tokens

SMALL = dict(num_classes=5, img_size=24, patch_size=4, width=24, depth=3, num_heads=3, reg_tokens=2)


@dataclasses.dataclass(frozen=True)
class PatchRow(tome_jax.TokenField):
    """A toy field: each patch's grid row (prefix tokens -1), averaged as tokens merge."""

    name: ClassVar[str] = "row"
    rule: ClassVar[str] = tokens.MEAN

    def initial(self, model, batch):
        rows = np.repeat(np.arange(model.grid_size[0], dtype=np.float32), model.grid_size[1])
        value = np.concatenate([np.full(model.num_prefix_tokens, -1.0, np.float32), rows])
        return jnp.broadcast_to(value[:, None], (batch, model.num_tokens, 1))


@dataclasses.dataclass(frozen=True)
class Count(tome_jax.TokenField):
    """A toy field that sums: the patches a token holds, as its size."""

    name: ClassVar[str] = "count"
    rule: ClassVar[str] = tokens.SUM

    def initial(self, model, batch):
        return jnp.ones((batch, model.num_tokens))


@dataclasses.dataclass(frozen=True)
class Receiver(tome_jax.TokenField):
    """A toy field that stays with the receiving token: its first patch's index."""

    name: ClassVar[str] = "first"
    rule: ClassVar[str] = tokens.DEST

    def initial(self, model, batch):
        return jnp.broadcast_to(jnp.arange(model.num_tokens, dtype=jnp.float32), (batch, model.num_tokens))


FIELDS = (PatchRow(), Count(), Receiver())
# Methods whose sizes count the patches a token holds (DiffRate scales a merged size by a similarity).
COUNTING = ["tome", "pitome", "mctf", "tofu", "evit", "random_drop", "dtem"]


def run(method, r=(5, -1), train=False, fields=FIELDS, **changes):
    model = tome_jax.ViT(**{**SMALL, **changes}, reduction=method, token_fields=fields)
    images = jax.random.normal(jax.random.key(0), (2, *model.input_shape))
    variables = model.init(jax.random.key(1), images)
    apply = jax.jit(lambda v, x: model.apply(v, x, r=r, train=train, mutable="intermediates"))
    _, state = apply(variables, images)
    return model, state["intermediates"]


@pytest.mark.parametrize("name", COUNTING + ["diffrate"])
def test_a_new_field_follows_every_method_by_its_rule(name):
    model, intermediates = run(reduce.create(name))
    final = tome_jax.token_features(intermediates, block=-1)
    fields = intermediates[f"blocks_{model.depth - 1}"]["fields"][0]
    source, size = np.asarray(final.source), np.asarray(final.size)
    rows = np.asarray(PatchRow().initial(model, 2))[..., 0]
    for example in range(2):
        held = [source[example] == token for token in range(size.shape[1])]
        # MEAN: the mean of the rows of the patches a token holds (sizes start at one).
        want = [rows[example][patches].mean() for patches in held]
        if name != "diffrate":  # its sizes are scaled by a similarity, so its mean is weighted so
            np.testing.assert_allclose(np.asarray(fields["row"])[example, :, 0], want, rtol=1e-5, atol=1e-5)
            # SUM of ones: the patches each token holds, its size.
            np.testing.assert_allclose(np.asarray(fields["count"])[example], size[example], rtol=1e-6)
        # DEST: one of the token's own patches (the one it grew from).
        first = np.asarray(fields["first"])[example].astype(int)
        assert all(patches[index] for patches, index in zip(held, first))
    prefix = model.num_prefix_tokens
    np.testing.assert_array_equal(np.asarray(fields["row"])[:, :prefix, 0], -1.0)


def test_a_new_field_follows_the_soft_merge():
    """DTEM training keeps every token: a summed field of ones stays each token's size."""
    model, intermediates = run(reduce.DTEM(), train=True, fields=(Count(),), reg_tokens=0)  # a class token alone
    for block in range(model.depth):
        record = intermediates[f"blocks_{block}"]
        np.testing.assert_allclose(record["fields"][0]["count"], record["size"][0], rtol=1e-5, atol=1e-6)
    assert "plan" not in intermediates["blocks_0"]  # a soft merge has no hard plan to trace patches by


def test_methods_without_a_plan_refuse_fields():
    with pytest.raises(ValueError, match=r"DCT gives no plan .* field\(s\) count, first, row cannot follow it"):
        run(reduce.DCT())
    with pytest.raises(ValueError, match="DiffRateSearch gives no plan"):
        tome_jax.ViT(**{**SMALL, "reg_tokens": 0}, reduction=reduce.DiffRateSearch(0.001), token_fields=FIELDS).init(
            jax.random.key(0), jnp.zeros((1, 24, 24, 3))
        )


@dataclasses.dataclass(frozen=True)
class DropQuietest(reduce.Reduction):
    """A toy method: prune the `r` tokens of smallest feature norm; the rest keep their order."""

    name: ClassVar[str] = "drop_quietest"

    def __call__(self, step: reduce.Step) -> reduce.Reduced:
        prefix = step.num_prefix_tokens
        norms = jnp.linalg.norm(step.x[:, prefix:], axis=-1)
        dropped = merge.descending_rank(-norms) < step.r
        slot = prefix + merge.count_before(~dropped)
        rest = jnp.where(dropped, merge.DROPPED, slot)
        head = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (norms.shape[0], prefix))
        plan = merge.plan_from_dest(jnp.concatenate([head, rest], axis=1), step.x.shape[1] - step.r, 0)
        return reduce.Reduced(merge.gather_tokens(step.x, plan.kept), plan.sum(step.size), plan)


def test_a_new_method_runs_in_the_model_and_carries_every_field():
    model, intermediates = run(DropQuietest(), r=4)
    final = tome_jax.token_features(intermediates, block=-1)
    assert final.tokens.shape[1] == model.num_tokens - 4 * model.depth
    for block in range(model.depth):
        record = intermediates[f"blocks_{block}"]
        x, fields = np.asarray(record["tokens"][0]), record["fields"][0]
        np.testing.assert_array_equal(fields["count"], 1.0)  # pruning merges nothing
        assert x.shape[1] == fields["row"].shape[1] == model.num_tokens - 4 * (block + 1)
    source = np.asarray(final.source)
    assert (source == merge.DROPPED).sum(1).tolist() == [4 * model.depth] * 2
    rows = np.asarray(PatchRow().initial(model, 2))[..., 0]
    got = np.asarray(intermediates[f"blocks_{model.depth - 1}"]["fields"][0]["row"])[..., 0]
    for example in range(2):  # each kept token holds one patch, and its row
        kept = source[example] >= 0
        np.testing.assert_array_equal(got[example, source[example][kept]], rows[example][kept])
