"""Conversion with the core install alone: no torch, no timm (test_convert.py compares against them)."""

import json
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


ROPE_MODEL = ASSETS / "vit_tiny_p4_dinov3_cifar10.safetensors"
ROPE_PREDICTIONS = pathlib.Path(__file__).resolve().parent / "data" / "rope_cifar10_predictions.json"


def small_cifar_test_images(root: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """The small folder's test images, normalised as the CIFAR-10 models were trained, and labels
    (the class folders sort into CIFAR-10's label order)."""
    from PIL import Image

    from tome_jax.data import bundled

    paths = sorted((root / "test").glob("*/*.jpg"))
    classes = sorted({p.parent.name for p in paths})
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in paths])
    images = (images - np.float32(bundled.CIFAR10_MEAN)) / np.float32(bundled.CIFAR10_STD)
    return images, np.array([classes.index(p.parent.name) for p in paths])


def rope_predictions(images: np.ndarray) -> dict[str, list[int]]:
    """The shipped rotary model's labels for `images` under each position rule, at r 0 and (8, -1)."""
    from tome_jax import registry

    model, variables = from_timm(ROPE_MODEL)
    named = ViT(**registry.MODEL_CONFIGS["vit_tiny_patch4_dinov3_32"])
    assert model == named.clone(img_size=(32, 32), patch_size=(4, 4))
    labels = {}
    for rule in ("mean", "dest"):
        for r in (0, (8, -1)):
            logits = jax.jit(model.clone(rope_position=rule).apply, static_argnames="r")(variables, images, r=r)
            labels[f"{rule} {r}"] = np.asarray(logits.argmax(-1)).tolist()
    return labels


def test_the_shipped_rotary_model_classifies_as_when_it_was_shipped(small_cifar):
    """Its architecture is the registry's vit_tiny_patch4_dinov3_32, read from the file alone, and
    its labels for the 80 small-folder test images are those recorded when it was shipped (one in
    forty may flip where another CPU rounds differently)."""
    images, truth = small_cifar_test_images(small_cifar)
    recorded = json.loads(ROPE_PREDICTIONS.read_text())
    for setting, labels in rope_predictions(images).items():
        agree = np.mean(np.array(labels) == np.array(recorded[setting]))
        assert agree >= 0.975, (setting, agree)
    assert np.mean(np.array(recorded["mean 0"]) == truth) > 0.4  # a trained model, not chance (0.1)
