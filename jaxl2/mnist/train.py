"""Training, from the step to the loop: the state pytree, a jitted ``train_step``, a whole
epoch in one ``lax.scan``, the evaluation, and the one training loop that ``jaxl2 train`` (one
state), ``jaxl2 sweep`` (K stacked states) and the refit share: loading and split checks, the
epochs (each validated; how they run is handed in, one per compiled call by default and several
in :mod:`~jaxl2.mnist.fused`) with divergence detection, best-by-validation tracking, and the
final metrics (the penalty through :func:`jaxl2.l2_penalty`); and one run's training into its
directory (:func:`fit`): checkpoints, ``metrics.jsonl`` and the resume.

The step is :func:`jaxl2.make_train_step` (the library's, the only step in the project): the
loss is ``CE + λ/2·Σw²`` over the selected kernels and ``jax.grad`` adds ``λ·w`` to their
gradients. Decoupled weight decay (``adamw``) lives in the optimizer instead.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxl2.mnist.config import Config
  >>> from jaxl2.mnist.train import Best, Trainer
  >>> trainer = Trainer(Config(hidden=(32,), epochs=1, batch_size=4), num_train=8)
  >>> state = trainer.init()
  >>> x, y = jnp.zeros((4, 784)), jnp.zeros((4,), jnp.int32)
  >>> state, metrics = trainer.train_step(state, (x, y))
  >>> sorted(metrics)
  ['accuracy', 'data_loss', 'loss', 'penalty']
  >>> state, metrics = trainer.train_epoch(state, x, y)
  >>> sorted(metrics)
  ['accuracy', 'data_loss', 'loss', 'nonfinite_step', 'param_norm', 'penalty', 'update_norm']
  >>> best = Best(params="init", keep=lambda b, p, better: p if better else b)
  >>> best.update(1, 0.5, "epoch 1")
  >>> best.update(2, 0.4, "epoch 2")
  >>> best.epoch, best.val, best.params
  (1, 0.5, 'epoch 1')
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import jaxl2
from jaxl2 import select as _select
from jaxl2.decay import add_decayed_weights
from jaxl2.mnist import data as _data
from jaxl2.mnist import runtime, sigint
from jaxl2.mnist.config import INPUT_DIM, OPTIMIZERS, SPLITS, Config, ConfigError, Named, field, validate
from jaxl2.mnist.model import check_selection, model_of, selector_of
from jaxl2.mnist.rundir import Checkpoints, SaveRule, read_metrics, rewrite_metrics
from jaxl2.penalty import l2_penalty
from jaxl2.select import mask
from jaxl2.step import make_train_step

__all__ = [
    "TrainState",
    "Trainer",
    "make_optimizer",
    "per_example",
    "cross_entropy",
    "evaluate_fn",
    "Diverged",
    "Interrupted",
    "load_and_check",
    "Best",
    "Epoch",
    "EpochRunner",
    "one_epoch_per_call",
    "call_end",
    "train_epochs",
    "stopped",
    "stop_if_signalled",
    "check_interrupt",
    "member_summary",
    "split_metrics",
    "kernel_sq_norm",
    "diverged_message",
    "Run",
    "fit",
]


class TrainState(struct.PyTreeNode):
    """All that changes during training: ``step``, ``params``, ``opt_state``, ``rng`` (raw key)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def make_optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax optimizer of ``cfg``; ``adamw`` and ``sgdw`` decay the selected leaves only."""
    peak = OPTIMIZERS[cfg.optimizer].lr if cfg.lr is None else cfg.lr
    total = max(1, cfg.epochs * steps_per_epoch)
    lr = peak if cfg.schedule == "constant" else optax.cosine_decay_schedule(peak, total)
    if cfg.optimizer == "sgd":
        return optax.sgd(lr)
    if cfg.optimizer == "momentum":
        return optax.sgd(lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return optax.adam(lr)
    select = selector_of(cfg)
    if cfg.optimizer == "adamw":  # decoupled decay of the selected leaves only, like the penalty
        return optax.adamw(lr, weight_decay=cfg.weight_decay, mask=functools.partial(mask, select=select))
    if cfg.optimizer == "sgdw":  # decay added to the gradient before momentum: coupled, = L2 for SGD
        return optax.chain(
            add_decayed_weights(cfg.weight_decay, select=select), optax.sgd(lr, momentum=cfg.momentum)
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (allowed: {', '.join(OPTIMIZERS)})")


def per_example(logits_BxC: jax.Array, y_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's softmax cross-entropy and hit (1.0 or 0.0).

    A row is a hit when its label's logit is the largest (a tie for the largest counts as a
    hit; ``argmax`` would pick the first): the comparison reuses the row maximum that the
    cross-entropy's log-sum-exp computes, one reduction instead of two.
    """
    max_B = jax.lax.stop_gradient(logits_BxC.max(-1))
    lse_B = max_B + jnp.log(jnp.exp(logits_BxC - max_B[:, None]).sum(-1))
    is_label_BxC = y_B[:, None] == jnp.arange(logits_BxC.shape[-1])
    label_B = jnp.where(is_label_BxC, logits_BxC, 0.0).sum(-1)
    return lse_B - label_B, (label_B >= max_B).astype(jnp.float32)


def cross_entropy(logits_BxC: jax.Array, y_B: jax.Array, mask_B: jax.Array | None = None):
    """Mean softmax cross-entropy and accuracy (over the rows where ``mask_B`` is true), of
    :func:`per_example`."""
    ce_B, hit_B = per_example(logits_BxC, y_B)
    if mask_B is None:
        return ce_B.mean(), hit_B.mean()
    m = mask_B.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    return (ce_B * m).sum() / n, (hit_B * m).sum() / n


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: Any, key: jax.Array) -> tuple[Any, jax.Array]:
    """``model``'s params from the first half of ``key``, and the second half (the data key)."""
    k_init, k_data = jax.random.split(key)
    return model.init(k_init, jnp.zeros((1, INPUT_DIM), jnp.float32)), k_data


def evaluate_fn(model: Any, params: Any, x_NxD: jax.Array, y_N: jax.Array, chunk: int = 2048):
    """``{"data_loss", "accuracy"}`` of ``model`` with ``params`` over ``x_NxD, y_N``, in chunks
    of ``chunk`` rows (``lax.map``; the last one padded and masked)."""
    n = x_NxD.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    x = jnp.pad(x_NxD, ((0, pad), (0, 0))).reshape(-1, chunk, x_NxD.shape[1])
    y = jnp.pad(y_N, (0, pad)).reshape(-1, chunk)
    m = (jnp.arange(n + pad) < n).reshape(-1, chunk)

    def one(args):
        xc, yc, mc = args
        ce, acc = cross_entropy(model.apply(params, xc), yc, mc)
        k = mc.sum()
        return ce * k, acc * k

    ce, acc = jax.lax.map(one, (x, y, m))
    return {"data_loss": ce.sum() / n, "accuracy": acc.sum() / n}


_evaluate = jax.jit(evaluate_fn, static_argnums=0)  # one executable per model and shape


class Trainer:
    """The jitted functions of one configuration (``num_train`` sets the lr schedule's length).
    ``cfg`` is validated here: a ``Config`` from Python enters the application here too.

    * ``train_step(state, (x, y)) -> (state, metrics)``: one SGD step, state donated;
    * ``train_epoch(state, x_train, y_train) -> (state, metrics)``: a whole shuffled epoch in
      one compiled call (``lax.scan`` over batches; the last partial batch is **dropped**,
      and a different one each epoch since the data is reshuffled; the state is not donated).
      Each step adds its rows' cross-entropies and hits to per-row sums carried through the
      epoch (``data_loss`` and ``accuracy`` are their means over the epoch's examples, with no
      reduction or record per step); the penalty ``λ/2·Σw²`` and ``param_norm`` are
      those of the epoch's final params, ``loss = data_loss + penalty``, ``update_norm`` is
      ``‖θ_end − θ_start‖`` over the epoch, and ``nonfinite_step`` the first step whose data
      loss was NaN/Inf, or -1;
    * ``evaluate(params, x, y) -> {"data_loss", "accuracy"}``: one compiled call over a split
      (``data_loss`` is the mean cross-entropy; the penalty is not part of it); ``eval_fn`` is
      the same, not compiled (:func:`evaluate_fn`, traced into the run's programs).

    ``l2`` may be overridden per call of the ``*_fn`` functions (``step_fn``/``epoch_fn``),
    which is what the vmapped sweep does with a traced λ.

    A trainer is also the run's **λ mode**: the run loop (:func:`fit`) asks it,
    and nothing else, what differs between a fixed λ (this class), λ by hypergradients
    (:class:`~jaxl2.mnist.hypergrad.AutoTrainer`) and λ from the evidence
    (:class:`~jaxl2.mnist.marglik.EvidenceTrainer`): its state (:meth:`state_of`), its epoch
    over the training and validation splits (:meth:`run_epoch`), which params it keeps
    (:attr:`latest`), what its data is (:attr:`trains_on_val`), its summary's λ and keys
    (:meth:`summary`) and the config of its refit (:meth:`refit_config`).
    """

    latest = False  # keep the best params by validation accuracy (True: every epoch's)
    trains_on_val = False  # True: it trains on train ∪ validation, and has no refit

    def __init__(self, cfg: Config, num_train: int, *, mesh: Any = None):
        self.cfg = cfg = validate(cfg)
        self.mesh = mesh  # a jax.sharding.Mesh with a "data" axis: batches are split along it
        self.model = model_of(cfg)
        self.select = selector_of(cfg)
        self.steps_per_epoch = num_train // cfg.batch_size
        self.tx = make_optimizer(cfg, self.steps_per_epoch)
        self.train_step = jax.jit(self.step_fn, donate_argnums=0)
        # not donated: the run loop dispatches epoch k + 1 while it still reads epoch k's state
        self.train_epoch = jax.jit(self.epoch_fn)
        self.eval_fn = functools.partial(evaluate_fn, self.model)
        self.evaluate = functools.partial(_evaluate, self.model)
        self._init_state = jax.jit(self.state_of)  # a mode's own state_of, compiled once

    # -- state -------------------------------------------------------------------------
    def init(self, seed: int | None = None) -> TrainState:
        """A fresh state from ``seed`` (default ``cfg.seed``), built under ``jit``: the model's
        params (one executable per model, shared by every trainer of it: a refit's init compiles
        nothing new), then :meth:`state_of` them."""
        seed = self.cfg.seed if seed is None else seed
        params, k_data = _init_params(self.model, jax.random.PRNGKey(seed))
        return self._init_state(params, k_data)

    def state_of(self, params: Any, rng: jax.Array) -> TrainState:
        """The state at step 0 of ``params``: the optimizer's initial state, ``rng`` the data key."""
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), rng)

    # -- pure functions ----------------------------------------------------------------
    def data_loss(self, params, x_BxD, y_B):
        ce, acc = cross_entropy(self.model.apply(params, x_BxD), y_B)
        return ce, {"accuracy": acc}

    def rows_loss(self, params, x_BxD, y_B):
        """The mean cross-entropy, with each row's ``{"ce_B", "hit_B"}`` (:func:`per_example`)."""
        ce_B, hit_B = per_example(self.model.apply(params, x_BxD), y_B)
        return ce_B.mean(), {"ce_B": ce_B, "hit_B": hit_B}

    def step_fn(self, state: TrainState, batch, l2=None, loss_fn=None):
        """One step of :func:`jaxl2.make_train_step` on the MLP's cross-entropy (``loss_fn``,
        default :meth:`data_loss`); ``l2`` overrides ``cfg.l2`` (a traced λ in the sweep)."""
        l2 = self.cfg.l2 if l2 is None else l2
        loss_fn = self.data_loss if loss_fn is None else loss_fn
        step = make_train_step(loss_fn, self.tx, l2=l2, select=self.select, has_aux=True, norms=False)
        params, opt_state, metrics = step(state.params, state.opt_state, *batch)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def batches(self, state: TrainState, num_examples: int) -> jax.Array:
        """This epoch's batch indices ``[steps, batch]``: a permutation keyed on the step."""
        key = jax.random.fold_in(state.rng, state.step)
        steps = num_examples // self.cfg.batch_size
        perm = jax.random.permutation(key, num_examples)
        return perm[: steps * self.cfg.batch_size].reshape(steps, self.cfg.batch_size)

    def shard(self, *arrays: jax.Array) -> tuple[jax.Array, ...]:
        """``arrays`` (a batch) declared split along the mesh's ``data`` axis; jit does the rest."""
        if self.mesh is None:
            return arrays
        spec = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        return jax.lax.with_sharding_constraint(arrays, spec)

    def epoch_fn(self, state: TrainState, x_NxD, y_N, l2=None):
        idx_SxB = self.batches(state, x_NxD.shape[0])
        steps, batch = idx_SxB.shape

        def body(carry, i_idx):
            st, ce_B, hit_B, bad_B = carry
            i, idx_B = i_idx
            x_BxD, y_B = self.shard(x_NxD[idx_B], y_N[idx_B])
            st, m = self.step_fn(st, (x_BxD, y_B), l2, self.rows_loss)
            # per row: sums over the steps, and the first step whose loss was not finite
            bad_B = jnp.where((bad_B == steps) & ~jnp.isfinite(m["ce_B"]), i, bad_B)
            return (st, ce_B + m["ce_B"], hit_B + m["hit_B"], bad_B), None

        start = state.params
        zeros_B = jnp.zeros((batch,), jnp.float32)
        carry = (state, zeros_B, zeros_B, jnp.full((batch,), steps, jnp.int32))
        (state, ce_B, hit_B, bad_B), _ = jax.lax.scan(body, carry, (jnp.arange(steps), idx_SxB))
        metrics = {"data_loss": ce_B.sum() / idx_SxB.size, "accuracy": hit_B.sum() / idx_SxB.size}
        lam: Any = self.cfg.l2 if l2 is None else l2  # a fixed λ: a number or {regex: λ}
        penalty = l2_penalty(state.params, lam, select=self.select)
        metrics = self.with_final_params(metrics, start, state.params, penalty)
        bad = bad_B.min()
        metrics["nonfinite_step"] = jnp.where(bad < steps, bad, -1)
        return state, metrics

    # -- the λ mode --------------------------------------------------------------------
    def run_epoch(self, state: Any, x_NxD, y_N, xv_MxD, yv_M) -> tuple[Any, dict]:
        """The epoch the run loop compiles, over the training split ``x_NxD, y_N`` and the
        validation split ``xv_MxD, yv_M``: here :meth:`epoch_fn` (a fixed λ needs no
        validation data)."""
        return self.epoch_fn(state, x_NxD, y_N)

    def summary(self, state: Any, rows: list[dict[str, Any]], best_epoch: int) -> tuple[Any, dict[str, Any]]:
        """The λ of the best params' penalty (a number, ``{regex: λ}`` or ``{path: λ}``: those of
        ``best_epoch``, from the run's ``metrics.jsonl`` ``rows``) and the mode's own summary
        keys, at the final ``state``: here ``cfg.l2`` and none."""
        return self.cfg.l2, {}

    def refit_config(self, summary: dict[str, Any] | None) -> Config | None:
        """The config a refit of the run trains, given the run's ``summary``; ``None`` while
        that cannot be known (``summary=None``: before training). Here ``cfg`` itself."""
        return self.cfg

    @staticmethod
    def with_final_params(metrics: dict, start: Any, params: Any, penalty: jax.Array) -> dict:
        """An epoch's ``metrics`` (its steps' means) with what its final ``params`` give:
        ``penalty`` (``λ/2·Σw²``), ``loss = data_loss + penalty``, ``param_norm`` and
        ``update_norm = ‖params − start‖``, one pass over the weights per epoch."""
        return {
            **metrics,
            "penalty": penalty,
            "loss": metrics["data_loss"] + penalty,
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, params, start)),
        }


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


def call_end(rule: SaveRule, epoch: int, last: bool) -> tuple[bool, bool]:
    """``(save, stop)`` at the end of a compiled call, whose state is on hand: save when
    ``rule`` is due, at the ``last`` epoch or on a signal; stop on a signal (SIGINT or SIGTERM),
    the last epoch included: what comes after training (the summary, a refit) is left to the
    resume, and the signal is cleared. Every process of a distributed run takes the same
    decision (:func:`~jaxl2.mnist.runtime.any_process`): one process's clock or signal counts
    for all.

    Example:
      >>> from jaxl2.mnist.rundir import SaveRule
      >>> call_end(SaveRule(epochs=2, seconds=None), 4, last=False)
      (True, False)
    """
    interrupted = sigint.pending()
    save, stop = runtime.any_process(rule.due(epoch) or last or interrupted, interrupted)
    if save:  # on every process, whichever clock or reason asked for it
        rule.saved()
    if stop:
        sigint.clear()
    return save, stop


EpochRunner = Callable[
    [Any, range, Best, Callable[[int, np.ndarray, np.ndarray], str], int | None], Iterator[Epoch]
]
"""How the loop runs epochs: ``run(state, epochs, best, diverged, every)`` trains ``epochs`` from
``state``, updates ``best``, yields an :class:`Epoch` each (``state`` set where a checkpoint may
be written: at least at a multiple of ``every`` and at the last), and raises :class:`Diverged`
with ``diverged(epoch, bad_members, first_bad_steps)`` on a NaN/Inf loss, before the bad state
is used. :func:`one_epoch_per_call` here; :func:`jaxl2.mnist.fused.fused_epochs` runs several
per compiled call."""


def one_epoch_per_call(
    epoch_fn: Callable[..., tuple[Any, Any]],
    evaluate_fn: Callable[..., Any],
    state: Any,
    *args: Any,
    latest=False,
) -> EpochRunner:
    """The plain way to run epochs: one compiled call per epoch, ``epoch_fn(state, *args) ->
    (state, metrics)`` then ``evaluate_fn(state.params, *args)``, compiled here for ``state``
    and ``args`` (``latest`` is :class:`Best`'s own)."""

    def one(st: Any, *args: Any) -> tuple[Any, Any, Any]:
        st, m = epoch_fn(st, *args)
        return st, m, evaluate_fn(st.params, *args)

    compiled = jax.jit(one).lower(state, *args).compile()

    def run(state: Any, epochs: range, best: Best, diverged: Any, every: int | None) -> Iterator[Epoch]:
        for epoch in epochs:
            t0 = time.perf_counter()
            state, m, val = compiled(state, *args)
            m, val = runtime.host((m, val))
            step = m.pop("nonfinite_step")
            if step >= 0 or not np.isfinite(m["loss"]):
                raise Diverged(diverged(epoch, np.array([0]), np.array([max(int(step), 0)])))
            best.update(epoch, val["accuracy"], state.params)
            yield Epoch(epoch, state, m, val, time.perf_counter() - t0)

    return run


def train_epochs(
    run: EpochRunner,
    state: Any,
    epochs: range,
    best: Best,
    *,
    diverged: Callable[[int, np.ndarray, np.ndarray], str],
    every: int | None,
    save: Callable[[int, Any], None],
    on_epoch: Callable[[Epoch], None] | None = None,
    where: Callable[[int], str] = lambda epoch: f"after epoch {epoch}",
) -> Any:
    """The one training driver of a run, a sweep's chunk and a refit: ``run`` (an
    :data:`EpochRunner`), and at each epoch whose state is on hand (:func:`call_end`)
    ``save(epoch, state)`` when a checkpoint is due and a stop on SIGINT/SIGTERM
    (:func:`stopped`, ``where(epoch)`` in its message). ``on_epoch(epoch)`` sees every
    :class:`Epoch` before its checkpoint is written. Returns the last state; ``best`` is updated
    in place.

    Example (a runner of plain Python that adds 1 per epoch, its state on hand every 2 epochs):
      >>> from types import SimpleNamespace as NS
      >>> def run(st, epochs, best, diverged, every):
      ...     for e in epochs:
      ...         yield Epoch(e, NS(params=e) if e % 2 == 0 or e == epochs[-1] else None, {}, {}, 0.0)
      >>> saved = []
      >>> end = train_epochs(run, NS(params=0), range(1, 6), Best(0, lambda b, p, better: p),
      ...                    diverged=str, every=None, save=lambda e, st: saved.append(e))
      >>> end.params, saved
      (5, [5])
    """
    rule = SaveRule(every)
    for ep in run(state, epochs, best, diverged, every):
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
    signalled = runtime.any_process(sigint.pending())[0]
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
    on_host = runtime.host(params)
    res["penalty"] = float(jaxl2.l2_penalty(on_host, l2, select=selector_of(cfg)))
    res["train_loss"] = res["train_data_loss"] + res["penalty"]
    res["kernel_sq_norm"] = kernel_sq_norm(on_host, cfg)
    return res


@dataclasses.dataclass
class Run:
    """One run as :func:`fit` trains it: the checked config, its λ mode (the trainer: a fixed λ,
    :mod:`~jaxl2.mnist.hypergrad` or :mod:`~jaxl2.mnist.marglik`), the data, the run directory
    (prepared by :func:`jaxl2.mnist.rundir.prepare`), the mesh, and how it reports."""

    cfg: Config
    trainer: Trainer  # the λ mode: what differs between a fixed λ, l2 auto and l2 evidence
    ds: _data.Dataset
    out: str
    mesh: Any  # the data-parallel mesh, or None for one device
    primary: bool  # process 0: it writes the run's files
    checkpoint_every: int | None
    on_epoch: Callable[[dict[str, Any]], None] | None
    log: Callable[[str], None]
    # how epochs run: one per compiled call, or jaxl2.mnist.fused.fused_epochs (jaxl2 train's)
    make_runner: Callable[..., EpochRunner] = one_epoch_per_call

    @property
    def metrics(self) -> str:
        return os.path.join(self.out, "metrics.jsonl")


def fit(job: Run, resume: bool, on_start: Callable[[], None] | None) -> dict[str, Any]:
    """Trains ``job`` from its start, or with ``resume`` from its latest checkpoint (its
    ``metrics.jsonl`` cut there, and a line that says where it starts), and returns its summary:
    the best params' metrics (:func:`member_summary`, with the λ mode's penalty and keys), the
    times and the device. Each epoch appends its ``metrics.jsonl`` row and calls
    ``job.on_epoch(row)``; checkpoints hold the state and the best params (every 30 s of training,
    every ``job.checkpoint_every`` epochs, at the end, and on SIGINT or SIGTERM, which then stop
    the run with :class:`Interrupted`). ``on_start()`` is called before compiling."""
    check_interrupt()
    if on_start:
        on_start()
    cfg, trainer, primary = job.cfg, job.trainer, job.primary
    # orbax's save syncs the processes with a collective: from a thread, it could interleave
    # with the training's own collectives in a different order on each process (a hang)
    ckpt = Checkpoints(job.out, background=jax.process_count() == 1)
    state = runtime.replicate(trainer.init(), job.mesh)

    def keep(b: Any, p: Any, better: Any) -> Any:
        # host copies: best/ is saved without the mesh's sharding, so any process count restores it
        return runtime.host(p) if better else b

    # l2 evidence (latest): its validation images are training data: the last epoch's params
    best = Best(runtime.host(state.params), keep, latest=trainer.latest)
    start = 0
    if resume:
        restored = ckpt.restore_latest(_saved(state, Best(state.params, keep)))
        if restored is not None:  # a run killed before its first checkpoint starts over
            start, saved = restored
            state = saved["state"]
            val, epoch = float(saved["best_val"]), int(saved["best_epoch"])
            best = Best(runtime.host(saved["best_params"]), keep, val, epoch, latest=trainer.latest)
        if primary:
            rewrite_metrics(job.metrics, upto_epoch=start)
        if start == 0:
            job.log(f"resuming {job.out}: no checkpoint was written yet, so training starts at epoch 1")
        elif start >= cfg.epochs:
            job.log(f"resuming {job.out}: all {cfg.epochs} epochs were trained already")
        else:
            job.log(f"resuming {job.out} after epoch {start}: training epochs {start + 1} to {cfg.epochs}")
    seconds, compile_seconds = 0.0, 0.0
    run: EpochRunner = lambda *_: iter(())  # noqa: E731 (nothing is left to train)

    def evaluate(params: Any, x: Any, y: Any, xv: Any, yv: Any) -> Any:
        return trainer.eval_fn(params, xv, yv)

    def diverged(epoch: int, _members: Any, steps: np.ndarray) -> str:
        return f"{diverged_message(cfg, cfg.l2, epoch, int(steps[0]), trainer.steps_per_epoch)} {ckpt.last_good()}"

    def on(ep: Epoch) -> None:  # the epoch's metrics.jsonl row; per-layer keys (l2/PATH) keep their names
        nonlocal seconds
        seconds += ep.seconds
        train: dict[str, float | None] = {
            k if "/" in k else f"train_{k}": float(v) for k, v in ep.train.items() if k != "log_evidence"
        }
        if "log_evidence" in ep.train:  # l2 evidence: that of the last λ update (none before the first)
            evidence = float(ep.train["log_evidence"])
            train["log_evidence"] = evidence if np.isfinite(evidence) else None
        row = {
            "epoch": ep.epoch,
            "step": ep.epoch * trainer.steps_per_epoch,
            **train,
            "val_data_loss": float(ep.val["data_loss"]),
            "val_accuracy": float(ep.val["accuracy"]),
            "epoch_seconds": ep.seconds,
        }
        if primary:
            rows_file.write(json.dumps(row) + "\n")
        if job.on_epoch:
            job.on_epoch(row)

    def save(epoch: int, st: Any) -> None:
        if primary:  # the rows up to the checkpoint are on disk before it
            rows_file.flush()
            os.fsync(rows_file.fileno())
        ckpt.save(epoch, _saved(st, best), best.epoch)

    with sigint.deferred(), contextlib.closing(ckpt):
        data = tuple(runtime.put(a, job.mesh) for a in (*job.ds.need("train"), *job.ds.need("val")))
        if start < cfg.epochs:  # compiled here, so that no epoch's time includes compiling
            t0 = time.perf_counter()
            # each call keeps the params that `best` keeps
            run = job.make_runner(trainer.run_epoch, evaluate, state, *data, latest=trainer.latest)
            compile_seconds = time.perf_counter() - t0
        rows_file: Any = open(job.metrics, "a") if primary else contextlib.nullcontext()
        with rows_file:
            state = train_epochs(
                run,
                state,
                range(start + 1, cfg.epochs + 1),
                best,
                diverged=diverged,
                every=job.checkpoint_every,
                save=save,
                on_epoch=on,
                where=lambda epoch: f"after epoch {epoch}; checkpoint saved in {job.out}",
            )
    rows = read_metrics(job.metrics)
    trained = (cfg.epochs - start) * trainer.steps_per_epoch * cfg.batch_size
    l2, extra = trainer.summary(runtime.host(state), rows, best.epoch)  # the λ mode's
    return {
        **member_summary(trainer.evaluate, best.params, job.ds, cfg, l2),
        **extra,
        "best_epoch": best.epoch,
        "final_val_accuracy": rows[-1]["val_accuracy"] if rows else None,
        "epochs": cfg.epochs,
        "epochs_trained": cfg.epochs - start,
        "lr": cfg.lr,
        "seconds": seconds,
        "compile_seconds": compile_seconds,
        "examples_per_second": trained / seconds if seconds else None,
        "device": runtime.device_name(),
        "out": job.out,
    }


def _saved(state: Any, best: Best) -> dict[str, Any]:
    """What a checkpoint holds: the training state and the best params so far, with their
    validation accuracy and epoch (also the template that a resume restores into)."""
    return {
        "state": state,
        "best_params": best.params,
        "best_val": np.array(best.val, np.float32),
        "best_epoch": np.array(best.epoch, np.int32),
    }
