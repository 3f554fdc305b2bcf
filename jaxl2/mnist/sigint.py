"""Ctrl-C (SIGINT) deferred to safe points, so that it never lands inside an import of jaxlib,
a JAX callback or a running XLA computation (any of which can crash the process or swallow
the interrupt).

Within :func:`deferred` (and for the whole ``jaxl2`` command, which calls :func:`install`
first), SIGINT only records itself; the application asks :func:`pending` between epochs and
:func:`check` between start-up phases, and stops there.

Example:
  >>> import os, signal
  >>> from jaxl2.mnist import sigint
  >>> with sigint.deferred():
  ...     os.kill(os.getpid(), signal.SIGINT)
  ...     sigint.pending()
  True
  >>> sigint.pending()  # leaving the block forgets it
  False
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["install", "allow", "deferred", "pending", "check", "clear"]

_state = {"pending": False}


def _record(*_: object) -> None:
    _state["pending"] = True


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """From now on, SIGINT only records itself (the ``jaxl2`` command's first step)."""
    if _main_thread():
        signal.signal(signal.SIGINT, _record)


def allow() -> None:
    """SIGINT raises ``KeyboardInterrupt`` again (Python's default), at once if one is pending:
    for work that writes nothing (evaluation, the benchmark), once its imports are done."""
    if _main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    check()


def pending() -> bool:
    """Whether SIGINT arrived and was not acted upon yet."""
    return _state["pending"]


def clear() -> None:
    _state["pending"] = False


def check() -> None:
    """Raises ``KeyboardInterrupt`` if SIGINT is pending: call it where stopping is safe."""
    if _state["pending"]:
        clear()
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT only records itself within the block; the previous handler comes back after it
    (a pending interrupt is forgotten unless the command installed deferral for good)."""
    if not _main_thread() or signal.getsignal(signal.SIGINT) is _record:
        yield  # handlers can only be set from the main thread; or deferral is already on
        return
    old = signal.signal(signal.SIGINT, _record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        clear()
