"""Fused multi-epoch calls, a feature beside the training loop: several epochs, each validated,
in one compiled call (``lax.scan``), the next call dispatched before the last one's metrics are
read, and the executable compiled, with its one-time set-up paid, before the first epoch (a
refit's in the background while the run trains: :mod:`~jaxl2.mnist.run`). They carry the run's
speed: ``jaxl2 train``, ``jaxl2 sweep`` and the refit use them; :func:`jaxl2.mnist.train.fit`
on its own runs one epoch per call.

:func:`fused_epochs` is the loop's way to run epochs (:data:`jaxl2.mnist.train.EpochRunner`)
that ``jaxl2 train`` hands to :class:`~jaxl2.mnist.train.Run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.mnist import runtime
from jaxl2.mnist.train import Best, Diverged, Epoch, EpochRunner

__all__ = [
    "epochs_per_call",
    "calls",
    "epochs_program",
    "compile_epochs",
    "run_epochs",
    "runner",
    "fused_epochs",
]

CALL_EXAMPLES = {"cpu": 32_768}  # training examples per compiled call (other backends: 262,144)
MAX_EPOCHS_PER_CALL = 32


def epochs_per_call(num_train: int, members: int = 1, backend: str | None = None) -> int:
    """How many epochs one compiled call runs: enough that one call trains about 32k examples
    on a CPU (256k elsewhere; an epoch of mnist5k is ~30 ms on 2 CPU cores, ~1 ms on an H100,
    while the host's work per call is some ms), at most 32, at least 1. It depends only on the
    data and the backend, so every process of a run chooses the same.

    Example:
      >>> epochs_per_call(3500, backend="cpu"), epochs_per_call(55000, backend="cpu")
      (10, 1)
      >>> epochs_per_call(3500, backend="gpu"), epochs_per_call(3500, members=16, backend="cpu")
      (32, 1)
    """
    target = CALL_EXAMPLES.get(backend or jax.default_backend(), 262_144)
    return int(min(MAX_EPOCHS_PER_CALL, max(1, -(-target // (num_train * members)))))


def calls(epochs: Sequence[int], size: int, every: int | None = None) -> list[tuple[int, int]]:
    """``(first epoch, count)`` of each call over consecutive ``epochs``: a call ends at a
    multiple of ``size``, of ``every`` (where checkpoints are due) and at the last epoch. The
    ends depend on the epoch numbers alone, so a resumed run makes the same calls.

    Example:
      >>> calls(range(1, 11), 4), calls(range(6, 11), 4, every=3)
      ([(1, 4), (5, 4), (9, 2)], [(6, 1), (7, 2), (9, 1), (10, 1)])
    """
    out: list[tuple[int, int]] = []
    epochs = list(epochs)
    for e in epochs:
        if not out or out[-1][0] + out[-1][1] != e:
            out.append((e, 0))
        out[-1] = (out[-1][0], out[-1][1] + 1)
        if e % size == 0 or (every and e % every == 0):
            out.append((e + 1, 0))
    return [c for c in out if c[1]]


def epochs_program(
    epoch_fn: Callable[..., tuple[Any, Any]], evaluate_fn: Callable[..., Any], size: int, latest: bool = False
) -> Callable[..., Any]:
    """The compiled unit of the run loop: ``program(state, n, *args)`` runs ``n ≤ size`` epochs
    (``epoch_fn(state, *args) -> (state, metrics)``), each followed by validation
    (``evaluate_fn(state.params, *args)``), in one call (``lax.scan`` of ``size``; epochs past
    ``n`` are skipped by ``lax.cond``, so one executable serves every ``n``).

    Returns ``(state, metrics, val, best)``: metrics and val stacked ``[size, ...]``, and the
    best epoch of the call by validation accuracy among the finite ones (ties: the later; with
    ``latest``, the last finite one, whatever its accuracy), ``best = {"index", "val", "params"}``,
    per member when the accuracy is ``[K]``.
    """

    def program(state, n, *args):
        def one(st):
            new, m = epoch_fn(st, *args)
            return new, (m, evaluate_fn(new.params, *args))

        shapes = jax.eval_shape(one, state)[1]

        def skip(st):
            return st, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        def body(carry, i):
            st, alive, best = carry
            st, (m, val) = jax.lax.cond(i < n, one, skip, st)
            finite = jnp.all((m["nonfinite_step"] < 0) & jnp.isfinite(m["loss"]))
            alive = alive & (finite | (i >= n))
            better = alive & (i < n) & ((val["accuracy"] >= best["val"]) | latest)

            def pick(new, old):
                return jnp.where(better.reshape(better.shape + (1,) * (new.ndim - better.ndim)), new, old)

            best = {
                "index": jnp.where(better, i, best["index"]),
                "val": jnp.where(better, val["accuracy"], best["val"]),
                "params": jax.tree_util.tree_map(pick, st.params, best["params"]),
            }
            return (st, alive, best), (m, val)

        acc = shapes[1]["accuracy"]
        best = {
            "index": jnp.full(acc.shape, -1, jnp.int32),
            "val": jnp.full(acc.shape, -jnp.inf, acc.dtype),
            "params": state.params,
        }
        (state, _, best), (m, val) = jax.lax.scan(body, (state, jnp.bool_(True), best), jnp.arange(size))
        return state, m, val, best

    return program


def compile_epochs(
    epoch_fn: Callable[..., tuple[Any, Any]],
    evaluate_fn: Callable[..., Any],
    size: int,
    state: Any,
    *args: Any,
    latest: bool = False,
) -> Callable[[Any, int], tuple[Any, Any, Any, Any]]:
    """:func:`epochs_program` compiled for ``state`` and ``args`` (``latest`` as there), bound
    to ``args``: ``program(state, n)`` for :func:`run_epochs`. It also runs one call of 0
    epochs here, so the executable's one-time set-up (~18 ms of a first call on 2 CPU cores)
    is paid with compiling; the epoch's own kernels, which that call skips, still set
    themselves up in the first epoch (~15–35 ms of mnist5k's first 10-epoch call)."""
    fn = jax.jit(epochs_program(epoch_fn, evaluate_fn, size, latest))
    compiled = fn.lower(state, 1, *args).compile()
    jax.block_until_ready(compiled(state, 0, *args))
    return lambda st, n: compiled(st, n, *args)


def run_epochs(
    program: Callable[[Any, int], tuple[Any, Any, Any, Any]],
    state: Any,
    epochs: range,
    best: Best,
    diverged: Callable[[int, np.ndarray, np.ndarray], str],
    size: int = 1,
    every: int | None = None,
) -> Iterator[Epoch]:
    """Runs ``epochs`` in calls of :func:`epochs_program` (``program(state, n)``, its data
    bound; :func:`calls` with ``size`` and ``every`` says how many per call), updates ``best``
    and yields an :class:`Epoch` per epoch. A NaN/Inf loss raises :class:`Diverged` with
    ``diverged(epoch, bad_members, first_bad_steps)`` after the epochs before it were yielded,
    before the bad state is used.

    Pipelined: call ``k + 1`` is dispatched *before* call ``k``'s metrics are read, so the
    device never waits for the host's work between calls (reading metrics, the best params,
    writing rows and checkpoints while ``k + 1`` runs). The program must therefore not donate
    its state: the state yielded for call ``k`` stays valid. A call dispatched past a stop
    (divergence, Ctrl-C, the consumer's exception) is dropped unused. ``Epoch.seconds`` is the
    wall time from one call's results to the next, shared by its epochs (validation included;
    the first from its dispatch).
    """
    plan = calls(epochs, size, every)
    t0 = time.perf_counter()
    if not plan:
        return
    pending = program(state, plan[0][1])
    for c, (first, n) in enumerate(plan):
        new_state, m, val, call_best = pending
        if c + 1 < len(plan):
            pending = program(new_state, plan[c + 1][1])  # queued behind this call: runs while we read it
        m, val, index, best_val = runtime.host((m, val, call_best["index"], call_best["val"]))
        step = m["nonfinite_step"][:n].reshape(n, -1)
        bad = (step >= 0) | ~np.isfinite(m["loss"][:n].reshape(n, -1))
        good = int(np.argmax(bad.any(1))) if bad.any() else n
        t1 = time.perf_counter()
        seconds, t0 = (t1 - t0) / n, t1
        if good:
            best.update(first + index, best_val, call_best["params"])
        for i in range(good):
            yield Epoch(
                first + i,
                new_state if i == n - 1 else None,
                {k: v[i] for k, v in m.items() if k != "nonfinite_step"},
                {k: v[i] for k, v in val.items()},
                seconds,
            )
        if good < n:
            raise Diverged(
                diverged(first + good, np.flatnonzero(bad[good]), np.maximum(step[good][bad[good]], 0))
            )


def runner(program: Callable[[Any, int], tuple[Any, Any, Any, Any]], size: int) -> EpochRunner:
    """:func:`run_epochs` of ``program`` (calls of up to ``size`` epochs) as the training loop's
    way to run epochs (:func:`jaxl2.mnist.train.train_epochs`)."""

    def run(state: Any, epochs: range, best: Best, diverged: Any, every: int | None) -> Iterator[Epoch]:
        return run_epochs(program, state, epochs, best, diverged, size, every)

    return run


def fused_epochs(
    epoch_fn: Callable[..., tuple[Any, Any]],
    evaluate_fn: Callable[..., Any],
    state: Any,
    *args: Any,
    latest: bool = False,
) -> EpochRunner:
    """:func:`compile_epochs` in calls of :func:`epochs_per_call` of the training data
    ``args[0]``, as the loop's way to run epochs (what :class:`~jaxl2.mnist.train.Run` takes)."""
    size = epochs_per_call(args[0].shape[0])
    return runner(compile_epochs(epoch_fn, evaluate_fn, size, state, *args, latest=latest), size)
