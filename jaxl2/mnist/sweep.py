"""Many λ (and seeds) trained at once: one compiled epoch over stacked states, ``jax.vmap``-ed.

Every member is the run ``jaxl2 train --l2 λ --seed s`` would make: the same init (from its
seed) and the same data order (each epoch's permutation is keyed on the member's own rng, so
members with the same seed share their data order and members with different seeds do not).
λ is a traced array, so the whole sweep compiles once. A stopped sweep resumes to the same bits,
and every member's best params are kept (:mod:`jaxl2.mnist.sweepdir`), so that ``jaxl2 eval``
can evaluate any member (:func:`pick_member`).

Example:
  >>> from jaxl2.mnist.sweep import select_l2
  >>> select_l2([{"l2": 0.0, "val_accuracy": 0.9, "test_accuracy": 0.99},
  ...            {"l2": 1e-3, "val_accuracy": 0.95, "test_accuracy": 0.90}])
  0.001
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2 import __version__
from jaxl2.mnist import refit as _refit
from jaxl2.mnist import sigint, sweepdir
from jaxl2.mnist.config import (
    OPTIMIZERS,
    SEED_LIMIT,
    Config,
    ConfigError,
    SweepSettings,
    field,
    settings_of,
    validate,
)
from jaxl2.mnist.data import Dataset
from jaxl2.mnist.fused import epochs_per_call, epochs_program, runner
from jaxl2.mnist.model import abstract_params
from jaxl2.mnist.results import SweepSummary
from jaxl2.mnist.rundir import (
    SaveRule,
    StepStore,
    default_out,
    disk_errors,
    has_checkpoint,
    is_disk_error,
    prepare,
    write_json,
)
from jaxl2.mnist.runtime import device_name
from jaxl2.mnist.train import (
    Best,
    Interrupted,
    Trainer,
    diverged_message,
    load_and_check,
    member_summary,
    split_metrics,
    stop_if_signalled,
    train_epochs,
)

__all__ = [
    "SweepTrainer",
    "train_sweep",
    "select_l2",
    "select_l2_1se",
    "per_l2",
    "pick_member",
    "members_that_fit",
]

EXECUTIONS = ("auto", "vmap", "sequential")


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, i: int) -> Any:
    return jax.tree_util.tree_map(lambda x: x[i], tree)


class SweepTrainer:
    """The compiled functions of a sweep: ``epoch(states, x, y, l2s)`` (one epoch of every
    member) and :meth:`program` (the run loop's call of several epochs, validated).

    ``execution="vmap"`` batches the members' matmuls; ``"sequential"`` runs them one after
    another inside the same compiled program (``lax.map``), which can be faster on some CPUs.
    """

    def __init__(self, trainer: Trainer, execution: str = "vmap"):
        if execution not in ("vmap", "sequential"):
            raise ConfigError(f"{field('execution')} {execution!r} is unknown (allowed: vmap, sequential)")
        self.trainer, self.execution = trainer, execution
        if execution == "vmap":
            epoch: Callable[..., Any] = jax.vmap(trainer.epoch_fn, in_axes=(0, None, None, 0))
        else:

            def epoch(states, x, y, l2s):
                return jax.lax.map(lambda a: trainer.epoch_fn(a[0], x, y, a[1]), (states, l2s))

        self._epoch_fn, self._eval_fn = epoch, jax.vmap(trainer.eval_fn, in_axes=(0, None, None))
        self.epoch = jax.jit(epoch)  # not donated: see run_epochs
        self._programs: dict[int, Any] = {}

    def program(self, size: int) -> Any:
        """The run loop's call of up to ``size`` epochs (:func:`~jaxl2.mnist.fused.epochs_program`),
        jitted once per size: ``program(states, n, x, y, x_val, y_val, l2s)``."""
        if size not in self._programs:
            self._programs[size] = jax.jit(
                epochs_program(
                    lambda st, x, y, xv, yv, l2s: self._epoch_fn(st, x, y, l2s),
                    lambda p, x, y, xv, yv, l2s: self._eval_fn(p, xv, yv),
                    size,
                )
            )
        return self._programs[size]

    def init(self, seeds: Sequence[int]) -> Any:
        return _stack([self.trainer.init(s) for s in seeds])


def _by_l2(results: Sequence[dict[str, Any]], key: str) -> dict[float, list[float]]:
    by: dict[float, list[float]] = {}
    for r in results:
        by.setdefault(r["l2"], []).append(r[key])
    return by


def select_l2(results: Sequence[dict[str, Any]]) -> float:
    """The λ with the best mean **validation** accuracy over seeds (ties: the larger λ).

    The test accuracy is never looked at.
    """
    by_l2 = _by_l2(results, "val_accuracy")
    return max(by_l2, key=lambda lam: (np.mean(by_l2[lam]), lam))


def select_l2_1se(results: Sequence[dict[str, Any]]) -> float:
    """glmnet's ``lambda.1se``: the **largest** λ whose mean validation accuracy is within one
    standard error of the best mean, ``SE = std(ddof=1)/√n`` over the best λ's seeds (0 with one
    seed, where it is the best-mean choice). It prefers the simpler model among the ties.

    Example:
      >>> rows = [{"l2": lam, "val_accuracy": a} for lam, a in
      ...         [(0.0, 0.90), (0.0, 0.92), (1e-3, 0.95), (1e-3, 0.93), (1e-2, 0.935), (1e-2, 0.935)]]
      >>> select_l2(rows), select_l2_1se(rows)  # best mean 0.94 ± 0.01; 0.935 is within it
      (0.001, 0.01)
    """
    by_l2 = _by_l2(results, "val_accuracy")
    best = select_l2(results)
    accs = by_l2[best]
    se = float(np.std(accs, ddof=1) / np.sqrt(len(accs))) if len(accs) > 1 else 0.0
    return max(lam for lam, v in by_l2.items() if np.mean(v) >= np.mean(accs) - se)


def per_l2(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per λ: the number of seeds and, for train / val / test accuracy and ``Σ‖W‖²``,
    the mean and the standard deviation (``ddof=0``) over seeds, in λ order."""
    rows = []
    for lam in sorted({r["l2"] for r in results}):
        members = [r for r in results if r["l2"] == lam]
        row: dict[str, Any] = {"l2": lam, "seeds": len(members)}
        for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
            vals = [m[key] for m in members]
            row[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
        norms = [sum(m["kernel_sq_norm"].values()) for m in members]
        row["kernel_sq_norm"] = {"mean": float(np.mean(norms)), "std": float(np.std(norms))}
        rows.append(row)
    return rows


def pick_member(
    results: Sequence[dict[str, Any]], selected_l2: float, l2: float | None = None, seed: int | None = None
) -> int:
    """The index in ``results`` of the member that ``jaxl2 eval --run SWEEP`` evaluates: λ
    ``l2`` (default: ``selected_l2``, the best mean validation accuracy) with seed ``seed``
    (default: that λ's member with the best validation accuracy; ties: the smaller seed).

    Example:
      >>> rows = [{"l2": lam, "seed": s, "val_accuracy": a} for lam, s, a in
      ...         [(0.0, 0, 0.91), (1e-3, 0, 0.94), (0.0, 1, 0.92), (1e-3, 1, 0.95)]]
      >>> pick_member(rows, 1e-3), pick_member(rows, 1e-3, l2=0.0), pick_member(rows, 1e-3, seed=0)
      (3, 2, 1)
    """
    l2s = sorted({r["l2"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    lam: float | None = selected_l2
    if l2 is not None:
        lam = next((v for v in l2s if math.isclose(v, l2, rel_tol=1e-9)), None)
        if lam is None:
            raise ConfigError(
                f"{field('l2')} {l2:g} is not one of the sweep's λ (allowed: {', '.join(f'{v:g}' for v in l2s)})"
            )
    if seed is not None and seed not in seeds:
        raise ConfigError(
            f"{field('seed')} {seed} is not one of the sweep's seeds (allowed: {', '.join(map(str, seeds))})"
        )
    picks = [i for i, r in enumerate(results) if r["l2"] == lam and seed in (None, r["seed"])]
    return max(picks, key=lambda i: (results[i]["val_accuracy"], -results[i]["seed"]))


def members_that_fit(cfg: Config, num_train: int, budget_bytes: int) -> int:
    """How many members fit in ``budget_bytes``, float32 per member: four copies of the params
    (the params, the best so far, the compiled call's best, the gradients), the optimizer's
    state, and three batches of activations.

    Example (784-4-10, 3,190 params, plain SGD: 4·3,190·4 + 4·2·798·3 = 70,192 bytes):
      >>> members_that_fit(Config(hidden=(4,), batch_size=2, optimizer="sgd"), 3500, 10**6)
      14
    """
    layers = abstract_params(cfg)["params"]  # the model's: Dense_i, its kernel (inputs, outputs)
    kernels = [layers[f"Dense_{i}"]["kernel"].shape for i in range(len(layers))]
    sizes = [kernels[0][0], *(outputs for _, outputs in kernels)]
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    opt_copies = OPTIMIZERS[cfg.optimizer].state_copies
    per_member = 4 * n_params * (4 + opt_copies) + 4 * cfg.batch_size * sum(sizes) * 3
    return max(1, int(budget_bytes // per_member))


def _memory_budget() -> int:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(0.5 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    try:
        import psutil

        return int(0.25 * psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return 4 << 30


@jax.jit
def _keep_best(best: Any, params: Any, better_K: jax.Array) -> Any:
    """Member-wise ``params if better else best`` over stacked trees."""
    return jax.tree_util.tree_map(
        lambda b, p: jnp.where(better_K.reshape((-1,) + (1,) * (p.ndim - 1)), p, b), best, params
    )


def _keep(best: Any, params: Any, better_K: np.ndarray) -> Any:
    return _keep_best(best, params, jnp.asarray(better_K))


def _time_call(sweeper: SweepTrainer, size: int, states, data, l2s) -> float:
    """Seconds of one epoch run through the program the sweep runs (``sweeper.program(size)``,
    compiled by a first call, so the sweep reuses it); on copies of ``states``."""
    program = sweeper.program(size)
    jax.block_until_ready(program(jax.tree_util.tree_map(jnp.copy, states), 1, *data, l2s))
    copy = jax.tree_util.tree_map(jnp.copy, states)
    t0 = time.perf_counter()
    jax.block_until_ready(program(copy, 1, *data, l2s))
    return time.perf_counter() - t0


def _choose_execution(trainer, size, states, data, l2s) -> tuple[SweepTrainer, dict[str, float]]:
    """On CPU, the faster execution on one timed epoch of each (on copies); elsewhere vmap."""
    if jax.devices()[0].platform != "cpu" or states.step.shape[0] == 1:
        return SweepTrainer(trainer, "vmap"), {}
    sweepers = {ex: SweepTrainer(trainer, ex) for ex in ("vmap", "sequential")}
    times = {ex: _time_call(sw, size, states, data, l2s) for ex, sw in sweepers.items()}
    return sweepers[min(times, key=lambda ex: times[ex])], times


def _check_members(cfg: Config, l2s: Sequence[Any], seeds: Sequence[Any]) -> tuple[list[float], list[int]]:
    """The sweep's λs (numbers, each once) and seeds (in range), or a :class:`ConfigError`."""
    words = [v for v in (cfg.l2, *l2s) if isinstance(v, str)]
    if words:
        raise ConfigError(
            f"{field('l2')} {words[0]} tunes λ within one run (jaxl2 train), so a sweep, which trains "
            f"fixed λ values, cannot take it; give numbers, e.g. {field('l2')} 0,1e-4,1e-3"
        )
    validate(cfg)  # its seed first: the seeds below count from it
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or not 0 <= s < SEED_LIMIT for s in seeds):
        raise ConfigError(
            f"{field('seeds')} {seeds} is invalid (one or more integers from 0 to {SEED_LIMIT - 1})"
        )
    l2s = [float(v) for v in l2s]
    twice = sorted({v for v in l2s if l2s.count(v) > 1})
    if twice:
        raise ConfigError(
            f"{field('l2')} gives λ {', '.join(f'{v:g}' for v in twice)} more than once; give each λ once "
            f"(more runs of one λ are seeds: {field('seeds')})"
        )
    return l2s, seeds


def train_sweep(
    cfg: Config,
    settings: SweepSettings | None = None,
    out: str | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_epoch: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> SweepSummary:
    """Trains ``cfg`` once per (λ, seed) of ``settings`` (:class:`~jaxl2.mnist.config.SweepSettings`:
    default: :data:`~jaxl2.mnist.config.DEFAULT_SWEEP_L2` and ``cfg.seed``) and returns the summary
    (:class:`~jaxl2.mnist.results.SweepSummary`: ``selected_l2``, ``results``, ...).

    Results carry the same keys as ``jaxl2 train --json`` (the best epoch by validation
    accuracy), plus the final epoch's accuracies and the train − test gap. The sweep writes
    ``config.json``, checkpoints, every member's best params, then ``sweep.json``, ``sweep.csv``
    and ``sweep.png`` into ``out`` (default: a new ``runs/sweep-YYYYmmdd-HHMMSS[-N]``; the layout
    is :mod:`jaxl2.mnist.sweepdir`'s).

    A sweep stopped at any moment (SIGKILL included) continues with ``resume=True`` and ends
    with the bits of one never stopped: checkpoints (:class:`~jaxl2.mnist.rundir.SaveRule`: every
    30 s of training, and every ``settings.checkpoint_every`` epochs when given), at the end of each
    chunk and on SIGINT hold the chunk's states and best params; the plan (execution,
    chunk size) is kept, so a resumed sweep computes exactly as the first one did. One that fails
    before its first checkpoint removes the directory if it was absent or empty before.

    ``settings.refit`` then refits the selected λ once per seed on train ∪ validation
    (:mod:`jaxl2.mnist.refit`; ``refit_epochs="all"``: the sweep's epochs, ``"best"``: each
    member's own best epoch's count): ``summary["refit"]``. ``settings.budget_bytes`` (default:
    the available memory) bounds the members trained at once; the rest go in later chunks.
    ``on_epoch(label, epoch, epochs)`` follows the progress (``label`` names the chunk or refit).
    """
    settings = settings_of(settings, SweepSettings)
    execution, refit, refit_epochs = settings.execution, settings.refit, settings.refit_epochs
    checkpoint_every = settings.checkpoint_every
    if execution not in EXECUTIONS:
        raise ConfigError(f"{field('execution')} {execution!r} is unknown (allowed: {', '.join(EXECUTIONS)})")
    SaveRule(checkpoint_every)  # checks it before anything is loaded
    l2s, seeds = _check_members(cfg, settings.l2s, (cfg.seed,) if settings.seeds is None else settings.seeds)
    if refit:
        _refit.refit_epochs(refit_epochs, 1, 1)  # a bad rule fails before anything is done
    if resume:
        if out is None:
            raise ConfigError(f"{field('resume')} needs {field('out')}, the sweep to continue")
        sweepdir.check_resume(out, cfg, l2s, seeds)
    cfg, ds = load_and_check(cfg, l2s)
    out = default_out("runs", "sweep") if out is None else out
    config = sweepdir.config_json(cfg, l2s, seeds, __version__, refit, refit_epochs)
    claim = prepare(out, config, resume=resume, overwrite=overwrite)
    with claim, disk_errors(out):
        try:
            sigint.check()
            job = _SweepJob(cfg, ds, out, checkpoint_every, on_epoch, log)
            summary = _sweep(job, l2s, seeds, execution, settings.budget_bytes)
            if refit:
                stop_if_signalled(f"after the sweep, before its refit; checkpoint saved in {out}", out)
                summary["refit"] = _refit_selected(
                    cfg, ds, summary, out, refit_epochs, checkpoint_every, on_epoch
                )
            summary["out"] = out
            _write_outputs(out, summary)
            return cast(SweepSummary, summary)
        except BaseException as e:
            if isinstance(e, Interrupted):
                e.out = out
            if claim.created and not has_checkpoint(out) and not is_disk_error(e):
                shutil.rmtree(out, ignore_errors=True)  # nothing to resume: no half-made sweep is left
            raise


def _chunk_state(states: Any, best: Best) -> dict[str, Any]:
    """What a sweep's checkpoint holds: the chunk's states and best params so far, with their
    validation accuracies and epochs (also the template a resume restores into)."""
    return {
        "states": states,
        "best_params": best.params,
        "best_val": np.asarray(best.val, np.float32),
        "best_epoch": np.asarray(best.epoch, np.int32),
    }


def _plan(cfg, ds, members, trainer, data, execution, budget_bytes, log):
    """The execution and the chunk size, chosen once and kept in ``progress.json`` for a
    resume; and the :class:`SweepTrainer` of that execution (its program compiled when timed)."""
    fit = members_that_fit(cfg, len(ds.train.y), budget_bytes or _memory_budget())
    if execution != "auto":
        sweeper = SweepTrainer(trainer, execution)
    else:
        first = members[:fit]
        sweeper, timings = _choose_execution(
            trainer,
            epochs_per_call(len(ds.train.y), len(first)),
            _stack([trainer.init(m[1]) for m in first]),
            data,
            jnp.asarray([m[0] for m in first], jnp.float32),
        )
        if timings:
            log(
                "execution: "
                + ", ".join(f"{k} {v:.3f} s/epoch" for k, v in timings.items())
                + f" → {sweeper.execution}"
            )
    return {"execution": sweeper.execution, "chunk_size": fit, "results": []}, sweeper


@dataclasses.dataclass
class _SweepJob:
    """What the phases of :func:`train_sweep` share: the checked config and data, the sweep's
    directory, its checkpoint rule and how it reports."""

    cfg: Config
    ds: Dataset
    out: str
    checkpoint_every: int | None
    on_epoch: Callable[[str, int, int], None] | None
    log: Callable[[str], None]


def _sweep(
    job: _SweepJob, l2s: list[float], seeds: list[int], execution: str, budget_bytes: int | None
) -> dict[str, Any]:
    """Trains every member, chunk by chunk (resumed from ``progress.json`` and the checkpoints)."""
    cfg, ds, out, log = job.cfg, job.ds, job.out, job.log
    members = [(lam, s) for s in seeds for lam in l2s]
    trainer = Trainer(cfg, len(ds.need("train").y))
    data = tuple(jax.device_put(a) for a in (*ds.need("train"), *ds.need("val")))
    t0 = time.perf_counter()
    progress, sweeper = sweepdir.read_progress(out), None
    if progress is None:  # a new sweep, or one killed before its plan was written
        progress, sweeper = _plan(cfg, ds, members, trainer, data, execution, budget_bytes, log)
        sweepdir.write_progress(out, progress)
    else:
        sweeper = SweepTrainer(trainer, progress["execution"])
        if execution not in ("auto", progress["execution"]):
            log(f"resuming with execution {progress['execution']}, the sweep's own (not {execution})")
    fit = progress["chunk_size"]
    chunks = [members[i : i + fit] for i in range(0, len(members), fit)]
    if len(chunks) > 1:
        log(f"{len(members)} members do not fit at once: training {len(chunks)} chunks of up to {fit}")
    results = list(progress["results"])
    done = -(-len(results) // fit)  # chunks whose rows are recorded
    if done:
        log(f"resuming: {done} of {len(chunks)} chunks already done")
    latest = StepStore(os.path.join(out, "checkpoints"))
    best_store = StepStore(os.path.join(out, "best"), keep=None)
    with sigint.deferred(), contextlib.closing(latest), contextlib.closing(best_store):
        for c in range(done, len(chunks)):
            # the previous chunk was finished and recorded
            stop_if_signalled(f"after chunk {c} of {len(chunks)} of the sweep", out)
            label = f"chunk {c + 1}/{len(chunks)}" if len(chunks) > 1 else ""
            trained = _train_chunk(job, chunks[c], c, sweeper, data, latest, label)
            if c not in best_store.steps():  # (already saved by a sweep killed just after)
                best_store.save(c, trained["best_params"])
            results += trained["rows"]
            sweepdir.write_progress(out, {**progress, "results": results})
    return {
        "selected_l2": select_l2(results),
        "selected_l2_1se": select_l2_1se(results),
        "per_l2": per_l2(results),
        "results": results,
        "lr": cfg.lr,
        "execution": sweeper.execution,
        "chunks": len(chunks),
        "chunk_size": fit,
        "seconds": time.perf_counter() - t0,
        "device": device_name(),
    }


def _train_chunk(
    job: _SweepJob,
    chunk: list[tuple[float, int]],
    c: int,
    sweeper: SweepTrainer,
    data: tuple,
    latest: StepStore,
    label: str,
) -> dict[str, Any]:
    """Trains chunk ``c`` of members from its checkpoint (or from the start) to the last epoch;
    returns its rows and its stacked best params."""
    cfg, ds, on_epoch = job.cfg, job.ds, job.on_epoch
    trainer = sweeper.trainer
    l2_K = jnp.asarray([m[0] for m in chunk], jnp.float32)
    states = sweeper.init([m[1] for m in chunk])
    best = Best(
        jax.tree_util.tree_map(jnp.copy, states.params),
        _keep,
        np.full(len(chunk), -1.0),
        np.zeros(len(chunk)),
    )
    start = 0
    step = latest.latest()
    if step is not None and sweepdir.chunk_and_epoch(step, cfg.epochs)[0] == c:
        start = sweepdir.chunk_and_epoch(step, cfg.epochs)[1]
        run = latest.restore(_chunk_state(states, best))
        states = run["states"]
        best = Best(run["best_params"], _keep, np.asarray(run["best_val"]), np.asarray(run["best_epoch"]))
        job.log(f"resuming {label or 'the sweep'} after epoch {start} of {cfg.epochs}")

    def diverged(epoch, bad, steps):
        members = ", ".join(f"(λ {chunk[i][0]:g}, seed {chunk[i][1]})" for i in bad)
        return f"sweep members {members}: " + diverged_message(
            cfg, chunk[bad[0]][0], epoch, int(steps[0]), trainer.steps_per_epoch
        )

    size = epochs_per_call(len(ds.need("train").y), len(chunk))
    compiled = sweeper.program(size)

    def program(states, n):
        return compiled(states, n, *data, l2_K)

    def save(epoch: int, st: Any) -> None:
        latest.save(sweepdir.checkpoint_step(c, epoch, cfg.epochs), _chunk_state(st, best))

    states = train_epochs(
        runner(program, size),
        states,
        range(start + 1, cfg.epochs + 1),
        best,
        diverged=diverged,
        every=job.checkpoint_every,
        save=save,
        on_epoch=lambda ep: on_epoch(label, ep.epoch, cfg.epochs) if on_epoch else None,
        where=lambda epoch: (
            f"after epoch {epoch} of {cfg.epochs} of the sweep" + (f" ({label})" if label else "")
        ),
    )
    return {"rows": _chunk_rows(job, trainer, chunk, best, states), "best_params": best.params}


def _chunk_rows(
    job: _SweepJob, trainer: Trainer, chunk: list[tuple[float, int]], best: Best, states: Any
) -> list[dict[str, Any]]:
    """One result row per member of a trained chunk: its best params' summary, its final
    epoch's accuracies, the train − test gap and its best epoch."""
    rows = []
    for i, (lam, seed) in enumerate(chunk):
        best_i, final_i = _unstack(best.params, i), _unstack(states.params, i)
        row = {"l2": lam, "seed": seed, **member_summary(trainer.evaluate, best_i, job.ds, job.cfg, lam)}
        final = split_metrics(trainer.evaluate, final_i, job.ds)
        row.update({f"final_{k}_accuracy": final[f"{k}_accuracy"] for k in ("train", "val", "test")})
        row["gap"] = row["train_accuracy"] - row["test_accuracy"]
        row["best_epoch"] = int(best.epoch[i])
        rows.append(row)
    return rows


def _refit_selected(cfg, ds, summary, out, rule, checkpoint_every, on_epoch) -> dict[str, Any]:
    """The selected λ refit on train ∪ validation, once per seed."""
    lam = summary["selected_l2"]
    members = []
    for r in (r for r in summary["results"] if r["l2"] == lam):
        seed = r["seed"]

        def progress(epoch, epochs, seed=seed):
            if on_epoch:
                on_epoch(f"refit λ {lam:g} seed {seed}", epoch, epochs)

        res = _refit.refit(
            dataclasses.replace(cfg, l2=lam, seed=seed),
            ds,
            _refit.refit_epochs(rule, r["best_epoch"], cfg.epochs),
            sweepdir.refit_dir(out, seed),
            checkpoint_every=checkpoint_every,
            on_epoch=progress,
        )
        members.append({"seed": seed, "test_accuracy": r["test_accuracy"], **res})

    def mean_std(key):
        v = [m[key] for m in members]
        return {"mean": float(np.mean(v)), "std": float(np.std(v))}

    return {
        "l2": lam,
        "epoch_rule": rule,
        "members": members,
        "test_accuracy": mean_std("test_accuracy"),
        "refit_test_accuracy": mean_std("refit_test_accuracy"),
    }


def _write_outputs(out: str, summary: dict[str, Any]) -> None:
    write_json(os.path.join(out, "sweep.json"), summary)
    rows = summary["results"]
    layers = list(rows[0]["kernel_sq_norm"])
    cols = [k for k in rows[0] if k != "kernel_sq_norm"]
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + [f"sq_norm:{p}" for p in layers])
        for r in rows:
            w.writerow([r[c] for c in cols] + [r["kernel_sq_norm"][p] for p in layers])
    from jaxl2.mnist.plots import sweep as plot_sweep

    plot_sweep(rows, summary["selected_l2"], os.path.join(out, "sweep.png"))


def results_json(summary: SweepSummary) -> str:
    keys = ("selected_l2", "selected_l2_1se", "per_l2", "results", "refit")
    return json.dumps({k: v for k, v in summary.items() if k in keys})
