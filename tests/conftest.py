"""Test set-up: eight host devices for sharding tests, quiet TensorFlow, CPU only."""

import os
import sys

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
