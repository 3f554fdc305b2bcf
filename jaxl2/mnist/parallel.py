"""Data parallelism on JAX's own SPMD engine: a 1-D ``Mesh`` named ``data``.

The batch is split along ``data`` with ``NamedSharding``; params and optimizer state are
replicated. Nothing in the step changes: ``jit`` partitions the same program, and the
gradient of the mean loss becomes an all-reduce. The L2 penalty needs no change either: it
is computed on the replicated params, so every device adds the same ``λ·w``.

Example:
  >>> from jaxl2.mnist import parallel
  >>> mesh = parallel.make_mesh(1)
  >>> mesh.axis_names
  ('data',)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxl2.mnist.config import ConfigError, field


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``devices`` devices (default: all of them)."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise ConfigError(
            f"{field('devices')} {n} is invalid (between 1 and the {len(available)} devices visible)"
        )
    return Mesh(np.array(available[:n]), ("data",))


def check_batch(batch_size: int, devices: int) -> None:
    """The batch must split evenly; the error names the nearest valid sizes."""
    if batch_size % devices:
        lo = batch_size - batch_size % devices
        hi = lo + devices
        near = f"{lo} or {hi}" if lo > 0 else f"{hi}"
        raise ConfigError(
            f"{field('batch_size')} {batch_size} does not divide over {devices} devices (nearest valid: {near})"
        )


def put(x: np.ndarray, mesh: Mesh | None, split: bool = True) -> jax.Array:
    """A host array as a global array: split along ``data`` if ``split`` and its leading axis
    divides, else replicated. Each process materialises only its own devices' shards (so several
    hosts work); without a mesh, a plain ``device_put``."""
    if mesh is None:
        return jax.device_put(x)
    x = np.asarray(x)
    split = split and x.shape[0] % mesh.devices.size == 0
    sharding = NamedSharding(mesh, PartitionSpec("data") if split else PartitionSpec())
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every leaf of ``tree`` replicated over the mesh (params, optimizer state)."""
    if mesh is None:
        return tree
    return jax.tree_util.tree_map(lambda a: put(a, mesh, split=False), tree)


def host(tree: Any) -> Any:
    """NumPy copies of (replicated) arrays, also when other processes hold some of the devices."""

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree_util.tree_map(one, tree)


def any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true if it is true on any process: one decision that every process takes.

    A multi-process run must agree on when to checkpoint and when to stop, for orbax's save and
    every training step are collectives: a process that saves or stops alone leaves the others
    waiting in one. Each process's own clock (the 30 s rule) and Ctrl-C can differ, so the flags
    are gathered (a small collective) and OR-ed. With one process, the flags as they are.

    Example:
      >>> any_process(True, False)
      (True, False)
    """
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return tuple(bool(f) for f in np.asarray(np.asarray(gathered).reshape(-1, len(flags)).any(axis=0)))


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (one process: returns)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def initialize_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """``jax.distributed.initialize`` from flags, else from ``JAXL2_COORDINATOR``,
    ``JAXL2_NUM_PROCESSES`` and ``JAXL2_PROCESS_ID`` (or the cluster's own variables, which JAX
    detects when all three are unset)."""
    coordinator = coordinator or os.environ.get("JAXL2_COORDINATOR")
    if num_processes is None and "JAXL2_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXL2_NUM_PROCESSES"])
    if process_id is None and "JAXL2_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXL2_PROCESS_ID"])
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
