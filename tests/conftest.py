"""Test set-up: eight host devices for sharding tests, quiet TensorFlow, CPU only;
the `small_cifar` image folder."""

import os
import pathlib
import sys
import tarfile

import pytest

# torchvision (under timm's data transforms, the tests' reference) must load before
# TensorFlow: the other order registers LLVM options twice and aborts the process.
# Without the torch extra the tests that compare against PyTorch skip (importorskip).
try:
    import torchvision  # noqa: F401
except ImportError:
    pass

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests import their helpers, and the repository's examples/ and configs/.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def small_cifar(tmp_path_factory) -> pathlib.Path:
    """A real but small image folder: 24 train and 8 test JPEGs per CIFAR-10 class."""
    from tome_jax import data

    root = tmp_path_factory.mktemp("cifar_small")
    wanted = {"train": 24, "test": 8}
    with tarfile.open(data.BUNDLED_CIFAR10) as archive:
        for member in archive:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and int(parts[2][:4]) < wanted[parts[0]]:
                archive.extract(member, root, filter="data")
    return root


def pytest_collection_modifyitems(items):
    """The end-to-end runs (`slow`) first, in their order: with one worker per core, a minute-long
    run dealt out last keeps one worker busy while the other idles; dealt out first, the short
    tests fill in around it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
