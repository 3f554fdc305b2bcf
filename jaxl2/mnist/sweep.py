"""Many λ (and seeds) trained at once: one compiled epoch over stacked states, ``jax.vmap``-ed.

Every member is the run ``jaxl2 train --l2 λ --seed s`` would make: the same init (from its
seed) and the same data order (each epoch's permutation is keyed on the member's own rng, so
members with the same seed share their data order and members with different seeds do not).
λ is a traced array, so the whole sweep compiles once. A stopped sweep resumes to the same bits,
and every member's best params are kept (:mod:`jaxl2.mnist.sweepdir`), so that ``jaxl2 eval``
can evaluate any member (:func:`pick_member`). Each member's epochs are TensorBoard events
(:mod:`jaxl2.mnist.tensorboard`) as they are trained.

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
import functools
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from jaxl2 import __version__
from jaxl2.mnist import fused, rundir, sigint, sweepdir, tensorboard, train
from jaxl2.mnist import refit as _refit
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
from jaxl2.mnist.model import abstract_params
from jaxl2.mnist.results import SweepSummary
from jaxl2.mnist.runtime import device_name

EXECUTIONS = ("auto", "vmap", "sequential")


class SweepTrainer:
    """The compiled functions of a sweep: ``epoch(states, x, y, l2s)`` (one epoch of every
    member) and :meth:`program` (the run loop's call of several epochs, validated).

    ``execution="vmap"`` batches the members' matmuls; ``"sequential"`` runs them one after
    another inside the same compiled program (``lax.map``), which can be faster on some CPUs.
    """

    def __init__(self, trainer: train.Trainer, execution: str = "vmap"):
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
                fused.epochs_program(
                    lambda st, x, y, xv, yv, l2s: self._epoch_fn(st, x, y, l2s),
                    lambda p, x, y, xv, yv, l2s: self._eval_fn(p, xv, yv),
                    size,
                )
            )
        return self._programs[size]

    def init(self, seeds: Sequence[int]) -> Any:
        return jax.tree.map(lambda *xs: jnp.stack(xs), *[self.trainer.init(s) for s in seeds])


def _val_by_l2(results: Sequence[dict[str, Any]]) -> dict[float, list[float]]:
    by: dict[float, list[float]] = {}
    for r in results:
        by.setdefault(r["l2"], []).append(r["val_accuracy"])
    return by


def select_l2(results: Sequence[dict[str, Any]]) -> float:
    """The λ with the best mean **validation** accuracy over seeds (ties: the larger λ).

    The test accuracy is never looked at.
    """
    by_l2 = _val_by_l2(results)
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
    by_l2 = _val_by_l2(results)
    accs = by_l2[select_l2(results)]
    se = float(np.std(accs, ddof=1) / np.sqrt(len(accs))) if len(accs) > 1 else 0.0
    return max(lam for lam, v in by_l2.items() if np.mean(v) >= np.mean(accs) - se)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def per_l2(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per λ: the number of seeds and, for train / val / test accuracy and ``Σ‖W‖²``,
    the mean and the standard deviation (``ddof=0``) over seeds, in λ order."""
    rows = []
    for lam in sorted({r["l2"] for r in results}):
        members = [r for r in results if r["l2"] == lam]
        row: dict[str, Any] = {"l2": lam, "seeds": len(members)}
        for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
            row[key] = _mean_std([m[key] for m in members])
        row["kernel_sq_norm"] = _mean_std([sum(m["kernel_sq_norm"].values()) for m in members])
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
    state, and three batches of activations (the model's units: its inputs and each layer's outputs).

    Example (784-4-10, 3,190 params, plain SGD: 4·3,190·4 + 4·2·798·3 = 70,192 bytes):
      >>> members_that_fit(Config(hidden=(4,), batch_size=2, optimizer="sgd"), 3500, 10**6)
      14
    """
    leaves = jax.tree.leaves(abstract_params(cfg))  # Dense_0's bias and kernel first
    kernels = [a.shape for a in leaves if len(a.shape) == 2]
    units = kernels[0][0] + sum(outputs for _, outputs in kernels)
    n_params = sum(math.prod(a.shape) for a in leaves)
    per_member = 4 * n_params * (4 + OPTIMIZERS[cfg.optimizer].state_copies) + 4 * cfg.batch_size * units * 3
    return max(1, int(budget_bytes // per_member))


def _memory_budget() -> int:
    """Half the free device memory; on CPU (no memory stats), a quarter of the available RAM."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return int(0.5 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    return int(0.25 * psutil.virtual_memory().available)  # psutil: a dependency of orbax


@jax.jit
def _keep(best: Any, params: Any, better_K: Any) -> Any:
    """Member-wise ``params if better else best`` over stacked trees (``Best``'s ``keep``)."""
    return jax.tree.map(
        lambda b, p: jnp.where(better_K.reshape((-1,) + (1,) * (p.ndim - 1)), p, b), best, params
    )


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
    ``config.json``, checkpoints, every member's best params and TensorBoard events (a row per
    epoch), then ``sweep.json``, ``sweep.csv`` and ``sweep.png`` into ``out`` (default: a new
    ``runs/sweep-YYYYmmdd-HHMMSS[-N]``; the layout is :mod:`jaxl2.mnist.sweepdir`'s).

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
    if settings.execution not in EXECUTIONS:
        raise ConfigError(
            f"{field('execution')} {settings.execution!r} is unknown (allowed: {', '.join(EXECUTIONS)})"
        )
    rundir.SaveRule(settings.checkpoint_every)  # checks it before anything is loaded
    l2s, seeds = _check_members(cfg, settings.l2s, (cfg.seed,) if settings.seeds is None else settings.seeds)
    if settings.refit:
        _refit.refit_epochs(settings.refit_epochs, 1, 1)  # a bad rule fails before anything is done
    if resume:
        if out is None:
            raise ConfigError(f"{field('resume')} needs {field('out')}, the sweep to continue")
        sweepdir.check_resume(out, cfg, l2s, seeds)
    cfg, ds = train.load_and_check(cfg, l2s)
    out = rundir.default_out("runs", "sweep") if out is None else out
    config = sweepdir.config_json(cfg, l2s, seeds, __version__, settings.refit, settings.refit_epochs)
    claim = rundir.prepare(out, config, resume=resume, overwrite=overwrite)
    with claim, rundir.disk_errors(out):
        try:
            sigint.check()
            members = [(lam, s) for s in seeds for lam in l2s]
            summary = _sweep(cfg, ds, out, members, settings, on_epoch, log)
            if settings.refit:
                train.stop_if_signalled(f"after the sweep, before its refit; checkpoint saved in {out}", out)
                summary["refit"] = _refit_selected(cfg, ds, summary, out, settings, on_epoch)
            summary["out"] = out
            _write_outputs(out, summary)
            return cast(SweepSummary, summary)
        except BaseException as e:
            if isinstance(e, train.Interrupted):
                e.out = out
            if claim.created and not rundir.has_checkpoint(out) and not rundir.is_disk_error(e):
                shutil.rmtree(out, ignore_errors=True)  # nothing to resume: no half-made sweep is left
            raise


def _plan(
    trainer: train.Trainer, first: list[tuple[float, int]], data: tuple, execution: str, log
) -> SweepTrainer:
    """The :class:`SweepTrainer` of ``execution``; for ``"auto"`` on CPU, the faster of vmap and
    sequential on one epoch of the ``first`` chunk, timed through the program the sweep then runs
    (compiled by a first call, so the sweep reuses it). Elsewhere, or with one member, vmap."""
    if execution != "auto":
        return SweepTrainer(trainer, execution)
    if jax.devices()[0].platform != "cpu" or len(first) == 1:
        return SweepTrainer(trainer, "vmap")
    sweepers = {ex: SweepTrainer(trainer, ex) for ex in ("vmap", "sequential")}
    states = sweepers["vmap"].init([s for _, s in first])
    l2_K = jnp.asarray([lam for lam, _ in first], jnp.float32)
    seconds = {}
    for ex, sweeper in sweepers.items():
        program = sweeper.program(fused.epochs_per_call(len(data[1]), len(first)))
        jax.block_until_ready(program(states, 1, *data, l2_K))  # compiles (not donated: states stay)
        t0 = time.perf_counter()
        jax.block_until_ready(program(states, 1, *data, l2_K))
        seconds[ex] = time.perf_counter() - t0
    chosen = min(seconds, key=lambda ex: seconds[ex])
    log("execution: " + ", ".join(f"{k} {v:.3f} s/epoch" for k, v in seconds.items()) + f" → {chosen}")
    return sweepers[chosen]


def _sweep(
    cfg: Config,
    ds: Dataset,
    out: str,
    members: list[tuple[float, int]],
    settings: SweepSettings,
    on_epoch: Callable[[str, int, int], None] | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Trains every member, chunk by chunk, from ``progress.json`` and the checkpoints when
    resumed: the plan, then per chunk its training (from its checkpoint), its best params and its
    result rows; returns the sweep's summary."""
    trainer = train.Trainer(cfg, len(ds.need("train").y))
    data = tuple(jax.device_put(a) for a in (*ds.need("train"), *ds.need("val")))
    t0 = time.perf_counter()
    progress = sweepdir.read_progress(out)
    if progress is None:  # a new sweep, or one killed before its plan was written
        fit = members_that_fit(cfg, len(data[1]), settings.budget_bytes or _memory_budget())
        sweeper = _plan(trainer, members[:fit], data, settings.execution, log)
        progress = {"execution": sweeper.execution, "chunk_size": fit, "results": []}
        sweepdir.write_progress(out, progress)
    else:
        sweeper = SweepTrainer(trainer, progress["execution"])
        if settings.execution not in ("auto", progress["execution"]):
            log(
                f"resuming with execution {progress['execution']}, the sweep's own (not {settings.execution})"
            )
    fit = progress["chunk_size"]
    chunks = [members[i : i + fit] for i in range(0, len(members), fit)]
    if len(chunks) > 1:
        log(f"{len(members)} members do not fit at once: training {len(chunks)} chunks of up to {fit}")
    results = list(progress["results"])
    done = -(-len(results) // fit)  # chunks whose rows are recorded
    if done:
        log(f"resuming: {done} of {len(chunks)} chunks already done")
    latest = rundir.StepStore(os.path.join(out, "checkpoints"))
    best_store = rundir.StepStore(os.path.join(out, "best"), keep=None)

    def train_chunk(c: int, chunk: list[tuple[float, int]]) -> list[dict[str, Any]]:
        """Chunk ``c`` from its checkpoint (or its start) to the last epoch; saves its members'
        best params and returns their result rows (best params' metrics, final accuracies)."""
        label = f"chunk {c + 1}/{len(chunks)}" if len(chunks) > 1 else ""
        states = sweeper.init([s for _, s in chunk])
        best = train.Best(
            jax.tree.map(jnp.copy, states.params), _keep, np.full(len(chunk), -1.0), np.zeros(len(chunk))
        )

        def checkpoint(states: Any) -> dict[str, Any]:
            """The chunk's states and best params so far (also the template of a resume)."""
            val, epoch = np.asarray(best.val, np.float32), np.asarray(best.epoch, np.int32)
            return {"states": states, "best_params": best.params, "best_val": val, "best_epoch": epoch}

        start, step = 0, latest.latest()
        if step is not None and sweepdir.chunk_and_epoch(step, cfg.epochs)[0] == c:
            start = sweepdir.chunk_and_epoch(step, cfg.epochs)[1]
            run = latest.restore(checkpoint(states))
            states = run["states"]
            best = train.Best(
                run["best_params"], _keep, np.asarray(run["best_val"]), np.asarray(run["best_epoch"])
            )
            log(f"resuming {label or 'the sweep'} after epoch {start} of {cfg.epochs}")

        def diverged(epoch, bad, steps):
            names = ", ".join(f"(λ {chunk[i][0]:g}, seed {chunk[i][1]})" for i in bad)
            return f"sweep members {names}: " + train.diverged_message(
                cfg, chunk[bad[0]][0], epoch, int(steps[0]), trainer.steps_per_epoch
            )

        size = fused.epochs_per_call(len(data[1]), len(chunk))
        program, l2_K = sweeper.program(size), jnp.asarray([lam for lam, _ in chunk], jnp.float32)
        with tensorboard.MemberEvents(out, chunk, start) as events:

            def epoch_done(ep: Any) -> None:
                events.write(ep)  # every member's row, then the progress
                if on_epoch:
                    on_epoch(label, ep.epoch, cfg.epochs)

            states = train.train_epochs(
                fused.runner(lambda states, n: program(states, n, *data, l2_K), size),
                states,
                range(start + 1, cfg.epochs + 1),
                best,
                diverged=diverged,
                every=settings.checkpoint_every,
                save=lambda epoch, st: latest.save(
                    sweepdir.checkpoint_step(c, epoch, cfg.epochs), checkpoint(st)
                ),
                on_epoch=epoch_done,
                where=lambda epoch: (
                    f"after epoch {epoch} of {cfg.epochs} of the sweep" + (f" ({label})" if label else "")
                ),
            )
        if c not in best_store.steps():  # (already saved by a sweep killed just after)
            best_store.save(c, best.params)
        rows = []
        for i, (lam, seed) in enumerate(chunk):
            best_i, final_i = jax.tree.map(lambda a, i=i: a[i], (best.params, states.params))
            row = {"l2": lam, "seed": seed, **train.member_summary(trainer.evaluate, best_i, ds, cfg, lam)}
            final = train.split_metrics(trainer.evaluate, final_i, ds)
            row.update({f"final_{k}_accuracy": final[f"{k}_accuracy"] for k in ("train", "val", "test")})
            row["gap"] = row["train_accuracy"] - row["test_accuracy"]
            row["best_epoch"] = int(best.epoch[i])
            rows.append(row)
        return rows

    with sigint.deferred(), contextlib.closing(latest), contextlib.closing(best_store):
        for c in range(done, len(chunks)):
            # the previous chunk was finished and recorded
            train.stop_if_signalled(f"after chunk {c} of {len(chunks)} of the sweep", out)
            results += train_chunk(c, chunks[c])
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


def _refit_selected(cfg, ds, summary, out, settings: SweepSettings, on_epoch) -> dict[str, Any]:
    """The selected λ refit on train ∪ validation, once per seed."""
    lam, members = summary["selected_l2"], []
    for r in (r for r in summary["results"] if r["l2"] == lam):
        res = _refit.refit(
            dataclasses.replace(cfg, l2=lam, seed=r["seed"]),
            ds,
            _refit.refit_epochs(settings.refit_epochs, r["best_epoch"], cfg.epochs),
            sweepdir.refit_dir(out, r["seed"]),
            checkpoint_every=settings.checkpoint_every,
            on_epoch=functools.partial(on_epoch, f"refit λ {lam:g} seed {r['seed']}") if on_epoch else None,
        )
        members.append({"seed": r["seed"], "test_accuracy": r["test_accuracy"], **res})
    return {
        "l2": lam,
        "epoch_rule": settings.refit_epochs,
        "members": members,
        "test_accuracy": _mean_std([m["test_accuracy"] for m in members]),
        "refit_test_accuracy": _mean_std([m["refit_test_accuracy"] for m in members]),
    }


def _write_outputs(out: str, summary: dict[str, Any]) -> None:
    """``sweep.json``, ``sweep.csv`` (a row per member, ``sq_norm:PATH`` per layer) and ``sweep.png``."""
    rundir.write_json(os.path.join(out, "sweep.json"), summary)
    rows = [
        {
            **{k: v for k, v in r.items() if k != "kernel_sq_norm"},
            **{f"sq_norm:{p}": v for p, v in r["kernel_sq_norm"].items()},
        }
        for r in summary["results"]
    ]
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from jaxl2.mnist.plots import sweep as plot_sweep

    plot_sweep(summary["results"], summary["selected_l2"], os.path.join(out, "sweep.png"))
