"""Data parallelism on JAX's own SPMD engine: a 1-D ``Mesh`` named ``data``.

The batch is split along ``data`` with ``NamedSharding``; params and optimizer state are
replicated (:func:`jaxl2.mnist.runtime.put` places them). Nothing in the step changes: ``jit``
partitions the same program, and the gradient of the mean loss becomes an all-reduce. The L2 penalty needs no change either: it
is computed on the replicated params, so every device adds the same ``λ·w``.

Example:
  >>> from jaxl2.mnist import parallel
  >>> mesh = parallel.make_mesh(1)
  >>> mesh.axis_names
  ('data',)
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

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
