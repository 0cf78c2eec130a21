"""Device mesh and shardings for training, the pjit way.

One `jax.jit` with `NamedSharding`s over a `("data", "fsdp")` device mesh. The
batch is split over both axes; with `fsdp > 1` every parameter and optimizer
moment is split over "fsdp" along its largest divisible dimension, and XLA
inserts the gathers and reductions. The same code runs on one device, on many,
and on many hosts (after `jax.distributed.initialize()`), each host feeding its
own share of the batch.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated: splitting them saves nothing.
MIN_FSDP_SIZE = 2**12


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (all devices of all processes by default)."""
    devices = list(devices if devices is not None else jax.devices())
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
    return jax.make_mesh(
        (len(devices) // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Splits the largest dimension divisible by `fsdp_size` over "fsdp"; else replicated."""
    if fsdp_size == 1 or math.prod(shape) < MIN_FSDP_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return P()


def shardings_for(tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs, by `fsdp_spec`."""
    size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def process_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """The rows [start, stop) of each global batch that this process's devices hold
    under `batch_sharding`: what `global_batch` expects its local rows to be."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,)).values()
    rows = sorted({index[0].indices(global_batch_size)[:2] for index in indices})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"this process's devices hold rows {rows} of each batch, not one run of rows")
    return start, stop


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays split over the mesh (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
