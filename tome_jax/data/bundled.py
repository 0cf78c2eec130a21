"""The model and data the package ships: where they lie, CIFAR-10's normalisation, and the
extraction of the bundled CIFAR-10 (no TensorFlow here: the configs read this)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import tarfile

# The package's folder. Its assets/ holds the bundled model and data (package data: in a clone a
# link to the repository's assets/, in an installed wheel the files pyproject.toml names), its
# configs/ the commands' configs (the repository's configs/ links to it).
PACKAGE = pathlib.Path(__file__).resolve().parents[1]
ASSETS = PACKAGE / "assets"
SHIPPED_FOLDERS = ("assets", "configs")
BUNDLED_CIFAR10 = ASSETS / "cifar10-jpg.tar.gz"
BUNDLED_CIFAR10_SHA256 = "98d6573b2eb3a94d49785094465846f7dd26b797ddaa64b429b6317e6a74d5bd"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def cache_dir() -> pathlib.Path:
    """Where extracted data lives: $TOME_JAX_CACHE, else ~/.cache/tome_jax."""
    return pathlib.Path(os.environ.get("TOME_JAX_CACHE", "~/.cache/tome_jax")).expanduser()


def find_shipped(path: str) -> str:
    """`path` itself, unless it is a relative `assets/NAME` or `configs/NAME` missing from the
    current folder: then the installed package's copy (tome_jax/assets/NAME, tome_jax/configs/NAME),
    so that the commands' defaults and the documented `--config configs/...` run from any folder.

    Raises FileNotFoundError, naming both places, when neither holds it.
    """
    given = pathlib.Path(path)
    folder = given.parts[0] if given.parts else ""
    if given.is_absolute() or folder not in SHIPPED_FOLDERS or given.exists():
        return path
    shipped = PACKAGE / given
    if shipped.exists():
        return str(shipped)
    names = ", ".join(sorted(p.name for p in shipped.parent.glob("[!_]*"))) or "nothing"
    raise FileNotFoundError(
        f"no file {path} in the current folder ({given.absolute()}) nor in the installed package "
        f"({shipped}, whose {folder}/ holds {names}); give the file's full path"
    )


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_bundled_cifar10(target: pathlib.Path | None = None) -> pathlib.Path:
    """Extracts the bundled CIFAR-10 JPEG tree once and returns its root."""
    root = (target or cache_dir()) / "cifar10-jpg"
    done = root / ".complete"
    if done.exists():
        return root
    if not BUNDLED_CIFAR10.exists():
        raise FileNotFoundError(f"bundled CIFAR-10 archive missing: {BUNDLED_CIFAR10}")
    digest = _sha256(BUNDLED_CIFAR10)
    if digest != BUNDLED_CIFAR10_SHA256:
        raise ValueError(f"{BUNDLED_CIFAR10} is corrupt: sha256 {digest}")
    partial = root.with_name(root.name + f".partial-{os.getpid()}")
    with tarfile.open(BUNDLED_CIFAR10) as archive:
        archive.extractall(partial, filter="data")
    # A rename is atomic, so concurrent first uses never see half a tree.
    try:
        partial.rename(root)
    except OSError:
        if not done.exists():
            raise
    done.touch()
    return root
