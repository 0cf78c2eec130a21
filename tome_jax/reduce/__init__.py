"""Token-reduction methods: each a frozen dataclass of its settings, usable as `ViT(reduction=...)`.

    model = tome_jax.create_model("deit_small_patch16_224", reduction=reduce.PiToMe(margin=0.5))
    logits = model.apply(variables, images, r=8)

`METHODS` maps the command-line names (`--config.method=`) to the classes;
`create` builds one by name, `default_settings` lists every method's settings.
Each method declares its settings' types and ranges beside them (`setting`),
checked whenever one is built (`check_settings`).
Two methods train something and leave files behind: `DTEM` (its metric layers,
learned through a soft merge) and `DiffRateSearch` (a per-block schedule that
`DiffRate` then runs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tome_jax.reduce.base import (
    AFTER_ATTENTION,
    AFTER_MLP,
    BEFORE_ATTENTION,
    POSITIONS,
    Reduced,
    Reduction,
    Step,
    Valid,
    check_method,
    check_settings,
    check_tracks_sources,
    class_attention,
    setting,
)
from tome_jax.reduce.dct import DCT
from tome_jax.reduce.diffrate import DiffRate, DiffRateSearch
from tome_jax.reduce.dtem import DTEM
from tome_jax.reduce.mctf import MCTF
from tome_jax.reduce.pitome import PiToMe
from tome_jax.reduce.prune import EViT, RandomDrop
from tome_jax.reduce.tofu import ToFu
from tome_jax.reduce.tome import ToMe

METHODS: dict[str, type[Reduction]] = {
    method.name: method
    for method in (ToMe, PiToMe, MCTF, ToFu, DCT, EViT, RandomDrop, DiffRate, DiffRateSearch, DTEM)
}


def create(name: str, **settings: Any) -> Reduction:
    """The method called `name` (a `METHODS` key) with `settings`, the rest at their defaults."""
    if name not in METHODS:
        raise ValueError(f"unknown token-reduction method {name!r}; known: {', '.join(METHODS)}")
    check_settings(METHODS[name], settings)  # a setting it lacks, before the constructor's TypeError
    return METHODS[name](**settings)


def default_settings() -> dict[str, dict[str, Any]]:
    """{method name: {setting: default}} for every method that has settings (for configs)."""
    return {
        name: {field.name: field.default for field in dataclasses.fields(method)}
        for name, method in METHODS.items()
        if dataclasses.fields(method)
    }


__all__ = [
    "AFTER_ATTENTION",
    "AFTER_MLP",
    "BEFORE_ATTENTION",
    "DCT",
    "DTEM",
    "DiffRate",
    "DiffRateSearch",
    "EViT",
    "MCTF",
    "METHODS",
    "PiToMe",
    "POSITIONS",
    "RandomDrop",
    "Reduced",
    "Reduction",
    "Step",
    "ToFu",
    "ToMe",
    "Valid",
    "check_method",
    "check_settings",
    "check_tracks_sources",
    "class_attention",
    "create",
    "default_settings",
    "setting",
]
