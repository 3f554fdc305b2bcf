"""The machine under a run: its name, jaxl2's cache directory, JAX's compilation cache, and
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

__all__ = ["Background", "cache_dir", "device_name", "enable_compilation_cache"]


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
