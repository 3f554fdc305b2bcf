"""Ctrl-C (SIGINT) and a scheduler's SIGTERM deferred to safe points, so that neither lands
inside an import of jaxlib, a JAX callback or a running XLA computation (any of which can crash
the process or swallow the interrupt), and a stopped run saves first.

Within :func:`deferred` (and for the whole ``jaxl2`` command, which calls :func:`install`
first), both signals only record themselves; the application asks :func:`pending` between
epochs and :func:`check` between start-up phases, and stops there. :func:`last_signal` says
which one came (the command exits 130 for SIGINT, 143 for SIGTERM).

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
from typing import Any

__all__ = ["SIGNALS", "install", "allow", "deferred", "pending", "check", "clear", "last_signal", "name"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict[str, Any] = {"pending": False, "signal": signal.SIGINT}


def _record(signum: int, _frame: object = None) -> None:
    _state["pending"], _state["signal"] = True, signum


def _main_thread() -> bool:  # handlers can only be set from the main thread
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """From now on, SIGINT and SIGTERM only record themselves (the ``jaxl2`` command's first step)."""
    if _main_thread():
        for s in SIGNALS:
            signal.signal(s, _record)


def allow() -> None:
    """Python's defaults again (SIGINT raises ``KeyboardInterrupt``, SIGTERM terminates), at once if
    a signal is pending: for work that writes nothing (evaluation, the benchmark)."""
    if _main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    check()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT and SIGTERM only record themselves within the block; the previous handlers come
    back after it (a pending signal is forgotten unless the command installed deferral for good)."""
    if not _main_thread() or signal.getsignal(signal.SIGINT) is _record:
        yield  # deferral is already on, or cannot be set here
        return
    old = {s: signal.signal(s, _record) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        clear()


def pending() -> bool:
    """Whether SIGINT or SIGTERM arrived and was not acted upon yet."""
    return bool(_state["pending"])


def clear() -> None:
    _state["pending"] = False


def check() -> None:
    """Raises ``KeyboardInterrupt`` if a signal is pending: call it where stopping is safe."""
    if pending():
        clear()
        raise KeyboardInterrupt


def last_signal() -> int:
    """The signal that came last (``signal.SIGINT`` when none did)."""
    return int(_state["signal"])


def name() -> str:
    """How messages call the last signal: ``interrupted`` (Ctrl-C) or ``stopped by SIGTERM``."""
    return "stopped by SIGTERM" if last_signal() == signal.SIGTERM else "interrupted"
