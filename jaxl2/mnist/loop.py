"""The one training loop, shared by ``jaxl2 train`` (one state) and ``jaxl2 sweep`` (K stacked
states): loading and split checks, validation, the epochs with divergence detection,
best-by-validation tracking, and the final metrics (the penalty through :func:`jaxl2.l2_penalty`).

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
import numpy as np

import jaxl2
from jaxl2 import select as _select
from jaxl2.mnist import data as _data
from jaxl2.mnist import parallel
from jaxl2.mnist.config import SPLITS, Config, ConfigError, Named, field, validate
from jaxl2.mnist.model import check_selection, selector_of

__all__ = [
    "Diverged",
    "Interrupted",
    "load_and_check",
    "Best",
    "Epoch",
    "run_epochs",
    "member_summary",
    "split_metrics",
    "kernel_sq_norm",
    "diverged_message",
]


class Diverged(Named, RuntimeError):
    """The loss or the parameters became NaN/Inf; the last good checkpoint is intact."""


class Interrupted(Named, RuntimeError):
    """SIGINT arrived; the epoch it interrupted was finished and checkpointed."""


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
    lam_lr = "per-layer" if not isinstance(l2, int | float) else f"{l2 * cfg.lr:g}"
    return (
        f"the loss became NaN/Inf at epoch {epoch}, step {step + 1} of {steps_per_epoch} "
        f"({field('lr')} {cfg.lr:g}, λ {l2}, λ·lr {lam_lr}): the learning rate (or λ·lr) is too "
        f"large; lower {field('lr')}."
    )


class Best:
    """The best validation accuracy so far, its epoch and its params: scalars for one run,
    arrays of K for stacked members (``keep(best, params, better)`` picks per member).
    Ties go to the later epoch."""

    def __init__(self, params: Any, keep: Callable[[Any, Any, Any], Any], val: Any = -1.0, epoch: Any = 0):
        self.params, self.keep = params, keep
        self._set(np.asarray(val, np.float64), np.asarray(epoch, np.int64))

    def _set(self, val: np.ndarray, epoch: np.ndarray) -> None:
        self.val, self.epoch = (float(val), int(epoch)) if val.ndim == 0 else (val, epoch)

    def update(self, epoch: int, val_accuracy: Any, params: Any) -> None:
        val_accuracy = np.asarray(val_accuracy, np.float64)
        better = val_accuracy >= self.val
        self._set(np.where(better, val_accuracy, self.val), np.where(better, epoch, self.epoch))
        self.params = self.keep(self.params, params, better)


@dataclasses.dataclass
class Epoch:
    """One finished epoch: its number, the new state, train metrics and validation metrics
    (host arrays: scalars for one run, ``[K]`` for a sweep), and its seconds."""

    epoch: int
    state: Any
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    seconds: float


def run_epochs(
    epoch_fn: Callable[[Any, Any, Any], tuple[Any, Any]],
    evaluate_fn: Callable[[Any, Any, Any], Any],
    state: Any,
    data: tuple[Any, Any, Any, Any],
    epochs: range,
    best: Best,
    diverged: Callable[[int, np.ndarray, np.ndarray], str],
) -> Iterator[Epoch]:
    """Runs ``epoch_fn`` for each epoch in ``epochs``, evaluates on validation, updates ``best``
    and yields an :class:`Epoch`. A NaN/Inf loss raises :class:`Diverged` with
    ``diverged(epoch, bad_members, first_bad_steps)`` before the bad state is used.

    Pipelined: epoch ``k + 1`` and its validation are dispatched *before* epoch ``k``'s
    metrics are read, so the device never waits for the host's work between epochs (reading
    metrics, the best params, writing rows and checkpoints while ``k + 1`` runs). ``epoch_fn``
    must therefore not donate its state: the state yielded for epoch ``k`` stays valid. An
    epoch dispatched past a stop (divergence, Ctrl-C, the consumer's exception) is dropped
    unused. ``Epoch.seconds`` is wall time from one epoch's results to the next (validation
    included; the first from its dispatch).
    """
    x, y, xv, yv = data

    def dispatch(st):
        new, m = epoch_fn(st, x, y)
        return new, m, evaluate_fn(new.params, xv, yv)

    epochs = list(epochs)
    t0 = time.perf_counter()
    pending = dispatch(state) if epochs else None
    for i, epoch in enumerate(epochs):
        new_state, m, val = pending
        if i + 1 < len(epochs):
            pending = dispatch(new_state)  # queued behind this epoch: runs while we read it
        m = parallel.host(m)
        step = np.atleast_1d(m["nonfinite_step"])
        bad = (step >= 0) | ~np.isfinite(np.atleast_1d(m["loss"]))
        if bad.any():
            raise Diverged(diverged(epoch, np.flatnonzero(bad), np.maximum(step[bad], 0)))
        state = new_state
        val = parallel.host(val)
        t1 = time.perf_counter()
        seconds, t0 = t1 - t0, t1
        best.update(epoch, val["accuracy"], state.params)
        yield Epoch(epoch, state, {k: v for k, v in m.items() if k != "nonfinite_step"}, val, seconds)


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
