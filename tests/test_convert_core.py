"""Conversion with the core install alone: no torch, no timm (test_convert.py compares against them)."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tome_jax import ViT, convert, from_timm, to_timm_state_dict

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
CIFAR_MODEL = ASSETS / "vit_tiny_p4_cifar10.safetensors"


def test_safetensors_loads_without_torch():
    code = f"""
import sys
import tome_jax
assert "torch" not in sys.modules and "timm" not in sys.modules, "imported by tome_jax"
sys.modules["torch"] = sys.modules["timm"] = None  # any import of them now fails
model, variables = tome_jax.from_timm({str(CIFAR_MODEL)!r})
assert (model.num_heads, model.img_size, model.patch_size, model.num_classes) == (3, (32, 32), (4, 4), 10)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ASSETS.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_pth_without_torch_says_so(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"reading weights.pth needs torch"):
        from_timm(path)


def test_a_new_grid_with_as_many_positions_is_still_resampled():
    """16x16 patches of 4 (a 4x4 grid) asked at 8x32 (a 2x8 grid, also 16 positions):
    ambiguous without the checkpoint's size, resampled once it is given."""
    model = ViT(num_classes=3, img_size=16, patch_size=4, width=24, depth=1, num_heads=2)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    state = to_timm_state_dict(model, variables)
    with pytest.raises(ValueError, match=r"fit a 4x4 grid and the requested img_size \(8, 32\); pass checkpoint_img_size="):
        from_timm(state, img_size=(8, 32), num_heads=2)
    resized, converted = from_timm(state, img_size=(8, 32), num_heads=2, checkpoint_img_size=16)
    assert resized.grid_size == (2, 8)
    want = convert.resample_pos_embed(np.asarray(variables["params"]["pos_embed"]), (2, 8), (4, 4), 1)
    np.testing.assert_allclose(np.asarray(converted["params"]["pos_embed"]), want, rtol=1e-6)
