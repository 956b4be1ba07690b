"""Data parallelism with JAX's own SPMD machinery: a mesh over all devices, batches sharded, the rest replicated.

Nothing here is hand-written communication: arrays carry a ``NamedSharding``, the jitted train step constrains the
gathered batch to ``P(None, …, "data")`` (``jax.lax.with_sharding_constraint``) and XLA's SPMD partitioner splits
the forward and backward pass across devices and inserts the gradient all-reduce. With one device the mesh has one
entry and the very same program runs.

Multi-host (one process per host, every process runs the same command)::

    python -m experiments.imp --flagfile=… \\
        --coordinator_address=host0:1234 --num_processes=4 --process_id=$RANK

:func:`initialize` calls ``jax.distributed.initialize`` with those three settings (``local_device_ids`` optional);
on SLURM, Open MPI or Cloud TPU leave them empty and set ``--distributed`` (auto-detection). The mesh then spans
every device of every host; every process loads the same data and derives the same batch order from the seed, and
:func:`put` builds each global array from the host-local copy (``jax.make_array_from_callback``).

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before jax is imported) gives 8 devices to try
all of this on one machine.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
AXIS = "data"

def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0, *,
               auto: bool = False, local_device_ids: Sequence[int] | None = None) -> bool:
    """Join a multi-host run (``jax.distributed.initialize``); a no-op for a single host. Returns whether it joined.

    Must be called before any other JAX call in the process.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes}: expected >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id}: expected 0 <= process_id < num_processes ({num_processes})")
    if num_processes > 1 and not coordinator_address:
        raise ValueError(f"coordinator_address={coordinator_address!r}: expected 'host:port' when "
                         f"num_processes={num_processes} > 1")
    if auto:
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return True
    if num_processes == 1:
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    return True


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device of every process)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("devices: expected at least one device")
    return Mesh(np.array(devs), (AXIS,))


def num_shards(mesh: Mesh) -> int:
    return int(mesh.shape[AXIS])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, lead: int = 0) -> NamedSharding:
    """Sharding of an array whose axis ``lead`` is the batch (``lead`` leading axes, e.g. replicas or steps)."""
    return NamedSharding(mesh, P(*([None] * lead), AXIS))


def check_divisible(size: int, mesh: Mesh, name: str = "batch_size") -> None:
    d = num_shards(mesh)
    if size % d:
        raise ValueError(f"{name}={size}: expected a multiple of the number of devices ({d}) for data-parallel "
                         f"training; use e.g. {name}={max(d, size // d * d)}")


def put(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """Place host or device arrays with ``sharding`` (no copy when already placed so). Works across hosts as long
    as every process passes the same global values."""

    def one(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(one, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf on every device of ``mesh``."""
    return put(tree, replicated(mesh))


def shard_batch(x: PyTree, mesh: Mesh, lead: int = 0) -> PyTree:
    """Split axis ``lead`` of every leaf across the devices; it must divide evenly."""
    for leaf in jax.tree_util.tree_leaves(x):
        check_divisible(int(np.shape(leaf)[lead]), mesh, "batch axis")
    return put(x, batch_sharding(mesh, lead))


def constrain_batch(x: PyTree, mesh: Mesh | None, lead: int = 0) -> PyTree:
    """Inside jit: ask the partitioner to split axis ``lead`` over the mesh (identity when ``mesh`` is None)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, lead))


def shard_samples(acts: jax.Array | np.ndarray, mesh: Mesh | None = None) -> jax.Array:
    """Place activations ``acts: (n, p)`` with the sample axis split across devices, for similarity measures over
    many samples (any jitted function of ``acts`` then runs sharded; sums over ``n`` become all-reduces).
    ``n`` must be a multiple of the device count: padding rows would change the statistics."""
    mesh = data_mesh() if mesh is None else mesh
    if np.ndim(acts) != 2:
        raise ValueError(f"acts: expected an (n, p) array of activations, got shape {np.shape(acts)}")
    check_divisible(int(np.shape(acts)[0]), mesh, "acts.shape[0] (number of samples)")
    return put(acts, batch_sharding(mesh))
