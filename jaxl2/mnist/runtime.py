"""The machine under a run: its name, jaxl2's cache directory, JAX's compilation cache, arrays
placed on its devices and processes (one device, or the mesh of :mod:`jaxl2.mnist.parallel`), and
work done in the background.

Example:
  >>> from jaxl2.mnist import runtime
  >>> runtime.device_name().startswith(("cpu: ", "gpu: ", "cuda: ", "tpu: "))
  True
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "Background",
    "cache_dir",
    "device_name",
    "enable_compilation_cache",
    "put",
    "replicate",
    "host",
    "any_process",
]


def cache_dir() -> str:
    """jaxl2's cache directory: ``$JAXL2_CACHE_DIR``, else ``jaxl2`` under ``$XDG_CACHE_HOME``
    (default ``~/.cache/jaxl2``). It holds JAX's compilation cache (``jax/``) and the parsed
    mnist5k table; deleting it only costs start-up time."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.environ.get("JAXL2_CACHE_DIR") or os.path.join(xdg, "jaxl2")


def enable_compilation_cache(path: str | None = None) -> None:
    """Turns on JAX's persistent compilation cache for every compiled function, in ``path``
    (default ``jax/`` in :func:`cache_dir`: ``~/.cache/jaxl2/jax``). A cache entry that cannot be
    written (a full disk) is skipped in silence: the cache only saves compile time, and the run's
    own files report a full disk in one line."""
    warnings.filterwarnings("ignore", message="Error (writing|reading) persistent compilation cache entry")
    jax.config.update("jax_compilation_cache_dir", path or os.path.join(cache_dir(), "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def device_name() -> str:
    """``cpu: <model> (<n> cores)`` or ``<platform>: <device kind> × <count>``."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        model = ""
        try:
            with open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        except OSError:
            pass
        return f"cpu: {model or platform.processor() or 'unknown'} ({os.cpu_count()} cores)"
    return f"{d.platform}: {getattr(d, 'device_kind', '')} × {jax.device_count()}"


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


class Background:
    """``fn()`` run in a thread of its own from now on (``fn=None``: nothing), on the standard
    library's ``concurrent.futures``: :meth:`join` waits for it and raises what it raised,
    :meth:`result` also returns what ``fn()`` returned. For work that may overlap the device's
    (a run's plots while its refit trains, the refit compiled while the run trains).

    Example:
      >>> done = []
      >>> Background(lambda: done.append(1)).join(); done
      [1]
      >>> Background(lambda: 6 * 7).result()
      42
      >>> Background(lambda: 1 / 0).join()
      Traceback (most recent call last):
      ZeroDivisionError: division by zero
    """

    def __init__(self, fn: Callable[[], Any] | None):
        pool = concurrent.futures.ThreadPoolExecutor(1)
        self._future = pool.submit(fn or (lambda: None))
        pool.shutdown(wait=False)  # the thread ends with fn

    def join(self, reraise: bool = True) -> None:
        """Waits for ``fn``; raises its exception unless ``reraise`` is false (the caller is
        already raising its own)."""
        concurrent.futures.wait([self._future])
        if reraise:
            self._future.result()

    def result(self) -> Any:
        return self._future.result()
