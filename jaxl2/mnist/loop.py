"""The one training loop, shared by ``jaxl2 train`` (one state) and ``jaxl2 sweep`` (K stacked
states): loading and split checks, the epochs (several per compiled call, each validated)
with divergence detection, best-by-validation tracking, and the final metrics (the penalty through :func:`jaxl2.l2_penalty`).

Example:
  >>> from jaxl2.mnist.loop import Best
  >>> best = Best(params="init", keep=lambda b, p, better: p if better else b)
  >>> best.update(1, 0.5, "epoch 1")
  >>> best.update(2, 0.4, "epoch 2")
  >>> best.epoch, best.val, best.params
  (1, 0.5, 'epoch 1')
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxl2
from jaxl2 import select as _select
from jaxl2.mnist import data as _data
from jaxl2.mnist import parallel, sigint
from jaxl2.mnist.config import SPLITS, Config, ConfigError, Named, field, validate
from jaxl2.mnist.model import check_selection, selector_of
from jaxl2.mnist.rundir import SaveRule

__all__ = [
    "Diverged",
    "Interrupted",
    "load_and_check",
    "Best",
    "Epoch",
    "calls",
    "epochs_per_call",
    "epochs_program",
    "compile_epochs",
    "run_epochs",
    "call_end",
    "train_epochs",
    "stopped",
    "stop_if_signalled",
    "check_interrupt",
    "member_summary",
    "split_metrics",
    "kernel_sq_norm",
    "diverged_message",
]


class Diverged(Named, RuntimeError):
    """The loss or the parameters became NaN/Inf; the last good checkpoint is intact."""


class Interrupted(Named, RuntimeError):
    """SIGINT or SIGTERM arrived; the compiled call of epochs it interrupted was finished and
    checkpointed. ``signal`` says which, ``out`` is the directory to resume."""

    out: str | None = None
    signal: int = 2  # signal.SIGINT


def stopped(where: str, out: str | None = None) -> Interrupted:
    """The :class:`Interrupted` of the signal that came: ``"interrupted " + where`` (Ctrl-C) or
    ``"stopped by SIGTERM " + where``."""
    e = Interrupted(f"{sigint.name()} {where}")
    e.signal, e.out = sigint.last_signal(), out
    return e


def load_and_check(cfg: Config, l2s: Sequence[float] | None = None) -> tuple[Config, _data.Dataset]:
    """Validates ``cfg`` (for every λ in ``l2s`` when given), loads its data, checks the
    splits, the batch size against the training set and the selection against the model.

    Returns the config with its defaults filled in, and the dataset.
    """
    variants = [cfg] if l2s is None else [dataclasses.replace(cfg, l2=lam) for lam in l2s]
    if l2s is not None and not l2s:
        raise ConfigError(f"{field('l2')} needs at least one value for a sweep (e.g. 0,1e-4,1e-3)")
    variants = [validate(v) for v in variants]  # every field, before loading anything
    ds = _data.load(cfg.dataset, data_dir=cfg.data_dir, val_size=cfg.val_size, split_seed=cfg.split_seed)
    if ds.train is None:
        raise ConfigError(
            f"{field('dataset')} {cfg.dataset} has no training split (train-images/labels files)"
        )
    if ds.test is None:
        raise ConfigError(f"{field('dataset')} {cfg.dataset} has no test split (t10k-images/labels files)")
    for v in variants:
        validate(v, len(ds.train.y))
        check_selection(v)
    return dataclasses.replace(variants[0], l2=cfg.l2), ds


def diverged_message(cfg: Config, l2: Any, epoch: int, step: int, steps_per_epoch: int) -> str:
    """The one shape of the divergence message, for a run and for a sweep's member."""
    lam_lr = "per-layer" if not isinstance(l2, int | float) else f"{l2 * (cfg.lr or 0.0):g}"
    return (
        f"the loss became NaN/Inf at epoch {epoch}, step {step + 1} of {steps_per_epoch} "
        f"({field('lr')} {cfg.lr:g}, λ {l2}, λ·lr {lam_lr}): the learning rate (or λ·lr) is too "
        f"large; lower {field('lr')}."
    )


class Best:
    """The best validation accuracy so far, its epoch and its params: scalars for one run,
    arrays of K for stacked members (``keep(best, params, better)`` picks per member).
    Ties go to the later epoch. ``latest=True`` keeps every epoch's instead (a run whose
    validation split is part of its training data has nothing held out to choose by)."""

    def __init__(
        self,
        params: Any,
        keep: Callable[[Any, Any, Any], Any],
        val: Any = -1.0,
        epoch: Any = 0,
        *,
        latest: bool = False,
    ):
        self.params, self.keep, self.latest = params, keep, latest
        self._set(np.asarray(val, np.float64), np.asarray(epoch, np.int64))

    def _set(self, val: np.ndarray, epoch: np.ndarray) -> None:
        self.val: Any
        self.epoch: Any
        self.val, self.epoch = (float(val), int(epoch)) if val.ndim == 0 else (val, epoch)

    def update(self, epoch: int, val_accuracy: Any, params: Any) -> None:
        val_accuracy = np.asarray(val_accuracy, np.float64)
        better = (val_accuracy >= self.val) | self.latest
        self._set(np.where(better, val_accuracy, self.val), np.where(better, epoch, self.epoch))
        self.params = self.keep(self.params, params, better)


@dataclasses.dataclass
class Epoch:
    """One finished epoch: its number, the new state, train metrics and validation metrics
    (host arrays: scalars for one run, ``[K]`` for a sweep), and its seconds. ``state`` is
    ``None`` for an epoch inside a call of several epochs (only the call's last epoch has its
    state on hand: save checkpoints and stop there)."""

    epoch: int
    state: Any
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    seconds: float


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
        m, val, index, best_val = parallel.host((m, val, call_best["index"], call_best["val"]))
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


def call_end(rule: SaveRule, epoch: int, last: bool) -> tuple[bool, bool]:
    """``(save, stop)`` at the end of a compiled call, whose state is on hand: save when
    ``rule`` is due, at the ``last`` epoch or on a signal; stop on a signal (SIGINT or SIGTERM),
    the last epoch included: what comes after training (the summary, a refit) is left to the
    resume, and the signal is cleared. Every process of a distributed run takes the same
    decision (:func:`~jaxl2.mnist.parallel.any_process`): one process's clock or signal counts
    for all.

    Example:
      >>> from jaxl2.mnist.rundir import SaveRule
      >>> call_end(SaveRule(epochs=2, seconds=None), 4, last=False)
      (True, False)
    """
    interrupted = sigint.pending()
    save, stop = parallel.any_process(rule.due(epoch) or last or interrupted, interrupted)
    if save:  # on every process, whichever clock or reason asked for it
        rule.saved()
    if stop:
        sigint.clear()
    return save, stop


def train_epochs(
    program: Callable[[Any, int], tuple[Any, Any, Any, Any]] | None,
    state: Any,
    epochs: range,
    best: Best,
    *,
    diverged: Callable[[int, np.ndarray, np.ndarray], str],
    size: int,
    every: int | None,
    save: Callable[[int, Any], None],
    on_epoch: Callable[[Epoch], None] | None = None,
    where: Callable[[int], str] = lambda epoch: f"after epoch {epoch}",
) -> Any:
    """The one training driver of a run, a sweep's chunk and a refit: :func:`run_epochs`, and at
    the end of each compiled call (:func:`call_end`) ``save(epoch, state)`` when a checkpoint is
    due and a stop on SIGINT/SIGTERM (:func:`stopped`, ``where(epoch)`` in its message).
    ``on_epoch(epoch)`` sees every :class:`Epoch` before its call's checkpoint is written.
    Returns the last state; ``best`` is updated in place.

    Example (a "program" of plain Python that adds 1 per epoch):
      >>> import numpy as np
      >>> from types import SimpleNamespace as NS
      >>> def program(st, n):
      ...     m = {"loss": np.zeros(n), "nonfinite_step": -np.ones(n, int)}
      ...     best = {"index": n - 1, "val": 0.5, "params": st.params + n}
      ...     return NS(params=st.params + n), m, {"accuracy": np.full(n, 0.5)}, best
      >>> saved = []
      >>> end = train_epochs(program, NS(params=0), range(1, 6), Best(0, lambda b, p, better: p),
      ...                    diverged=str, size=2, every=None, save=lambda e, st: saved.append(e))
      >>> end.params, saved
      (5, [5])
    """
    rule = SaveRule(every)
    if program is None:  # nothing compiled: no epoch is left to train
        if len(epochs):
            raise ValueError(f"no program to train epochs {epochs}")
        return state
    for ep in run_epochs(program, state, epochs, best, diverged, size, every):
        stop = False
        if on_epoch:
            on_epoch(ep)
        if ep.state is not None:  # the end of a compiled call: its state is on hand
            state = ep.state
            due, stop = call_end(rule, ep.epoch, last=ep.epoch == epochs[-1])
            if due:
                save(ep.epoch, state)
        if stop:
            raise stopped(where(ep.epoch))
    return state


def stop_if_signalled(where: str, out: str | None = None) -> None:
    """Raises :func:`stopped` ``(where, out)`` if SIGINT or SIGTERM reached any process: between
    the phases of a run that has something to resume (training done, the refit not begun)."""
    if _signalled_anywhere():
        raise stopped(where, out)


def check_interrupt() -> None:
    """:func:`jaxl2.mnist.sigint.check` taken by every process together: a Ctrl-C that reached
    one process raises ``KeyboardInterrupt`` in all (alone, it would leave the others waiting in
    their first collective). Between start-up phases; one process: ``sigint.check()`` itself."""
    if _signalled_anywhere():
        raise KeyboardInterrupt


def _signalled_anywhere() -> bool:
    """Whether SIGINT or SIGTERM reached any process (one decision for all); the signal is then
    cleared, since the caller acts on it."""
    signalled = parallel.any_process(sigint.pending())[0]
    if signalled:
        sigint.clear()
    return signalled


def kernel_sq_norm(params: Any, cfg: Config) -> dict[str, float]:
    """``Σw²`` of every selected leaf, by path, in float64."""
    rows = jaxl2.selected(params, select=selector_of(cfg))
    leaves = dict(_select.leaves(params))
    return {r.path: float(np.sum(np.square(np.asarray(leaves[r.path], np.float64)))) for r in rows}


def split_metrics(
    evaluate: Callable[[Any, Any, Any], Any], params: Any, ds: _data.Dataset
) -> dict[str, float]:
    """Accuracy and data loss of ``params`` on every split: ``{split}_accuracy``, ``{split}_data_loss``."""
    res = {}
    for name in SPLITS:
        split = getattr(ds, name)
        ev = jax.device_get(evaluate(params, split.x, split.y))
        res[f"{name}_accuracy"], res[f"{name}_data_loss"] = float(ev["accuracy"]), float(ev["data_loss"])
    return res


def member_summary(
    evaluate: Callable[[Any, Any, Any], Any], params: Any, ds: _data.Dataset, cfg: Config, l2: Any
) -> dict[str, Any]:
    """:func:`split_metrics`, the penalty ``λ/2·Σw²`` (:func:`jaxl2.l2_penalty`), the total train
    loss, and ``Σw²`` per selected layer, of one set of params."""
    res: dict[str, Any] = split_metrics(evaluate, params, ds)
    on_host = parallel.host(params)
    res["penalty"] = float(jaxl2.l2_penalty(on_host, l2, select=selector_of(cfg)))
    res["train_loss"] = res["train_data_loss"] + res["penalty"]
    res["kernel_sq_norm"] = kernel_sq_norm(on_host, cfg)
    return res
