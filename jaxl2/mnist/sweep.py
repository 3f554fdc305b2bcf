"""Many λ (and seeds) trained at once: one compiled epoch over stacked states, ``jax.vmap``-ed.

Every member is the run ``jaxl2 train --l2 λ --seed s`` would make: the same init (from its
seed) and the same data order (each epoch's permutation is keyed on the member's own rng, so
members with the same seed share their data order and members with different seeds do not).
λ is a traced array, so the whole sweep compiles once.

Example:
  >>> from jaxl2.mnist.sweep import select_l2
  >>> select_l2([{"l2": 0.0, "val_accuracy": 0.9, "test_accuracy": 0.99},
  ...            {"l2": 1e-3, "val_accuracy": 0.95, "test_accuracy": 0.90}])
  0.001
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.mnist import sigint
from jaxl2.mnist.config import OPTIMIZERS, SEED_LIMIT, Config, ConfigError, field, validate
from jaxl2.mnist.loop import (
    Best,
    Interrupted,
    diverged_message,
    load_and_check,
    member_summary,
    run_epochs,
    split_metrics,
)
from jaxl2.mnist.rundir import default_out, prepare, write_json
from jaxl2.mnist.runtime import XLA_OPTIONS, device_name
from jaxl2.mnist.steps import Trainer

__all__ = ["SweepTrainer", "train_sweep", "select_l2", "select_l2_1se", "per_l2", "members_that_fit"]

EXECUTIONS = ("auto", "vmap", "sequential")


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, i: int) -> Any:
    return jax.tree_util.tree_map(lambda x: x[i], tree)


class SweepTrainer:
    """The compiled functions of a sweep: ``epoch(states, x, y, l2s)`` and ``evaluate``.

    ``execution="vmap"`` batches the members' matmuls; ``"sequential"`` runs them one after
    another inside the same compiled program (``lax.map``), which can be faster on some CPUs.
    """

    def __init__(self, trainer: Trainer, execution: str = "vmap"):
        if execution not in ("vmap", "sequential"):
            raise ConfigError(f"{field('execution')} {execution!r} is unknown (allowed: vmap, sequential)")
        self.trainer, self.execution = trainer, execution
        if execution == "vmap":
            epoch = jax.vmap(trainer.epoch_fn, in_axes=(0, None, None, 0))
        else:

            def epoch(states, x, y, l2s):
                return jax.lax.map(lambda a: trainer.epoch_fn(a[0], x, y, a[1]), (states, l2s))

        self.epoch = jax.jit(epoch, donate_argnums=0, compiler_options=XLA_OPTIONS)
        self.evaluate = jax.jit(jax.vmap(trainer.eval_fn, in_axes=(0, None, None)))

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


def members_that_fit(cfg: Config, num_train: int, budget_bytes: int) -> int:
    """How many members fit in ``budget_bytes``: params, optimizer state, best params, gradients
    and one batch of activations per member, float32."""
    sizes = [784, *cfg.hidden, 10]
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    opt_copies = OPTIMIZERS[cfg.optimizer].state_copies
    per_member = 4 * n_params * (3 + opt_copies) + 4 * cfg.batch_size * sum(sizes) * 3
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


def _time_epoch(sweeper: SweepTrainer, states, x, y, l2s) -> float:
    """Seconds of one epoch on a copy of ``states``, after a first call that compiles
    (so the sweep that follows reuses ``sweeper``'s compiled epoch)."""
    jax.block_until_ready(sweeper.epoch(jax.tree_util.tree_map(jnp.copy, states), x, y, l2s))
    copy = jax.tree_util.tree_map(jnp.copy, states)
    t0 = time.perf_counter()
    jax.block_until_ready(sweeper.epoch(copy, x, y, l2s))
    return time.perf_counter() - t0


def _choose_execution(trainer, states, x, y, l2s) -> tuple[SweepTrainer, dict[str, float]]:
    """On CPU, the faster execution on one timed epoch of each (on copies); elsewhere vmap."""
    if jax.devices()[0].platform != "cpu" or states.step.shape[0] == 1:
        return SweepTrainer(trainer, "vmap"), {}
    sweepers = {ex: SweepTrainer(trainer, ex) for ex in ("vmap", "sequential")}
    times = {ex: _time_epoch(sw, states, x, y, l2s) for ex, sw in sweepers.items()}
    return sweepers[min(times, key=times.get)], times


def train_sweep(
    cfg: Config,
    l2s: Sequence[float],
    seeds: Sequence[int],
    out: str | None = None,
    *,
    execution: str = "auto",
    overwrite: bool = False,
    budget_bytes: int | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Trains every (λ, seed) pair of ``cfg`` and returns ``{"selected_l2", "results", ...}``.

    Results carry the same keys as ``jaxl2 train --json`` (the best epoch by validation
    accuracy), plus the final epoch's accuracies and the train − test gap. The sweep writes
    ``config.json``, ``sweep.json``, ``sweep.csv`` and ``sweep.png`` into ``out`` (default: a
    new ``runs/sweep-YYYYmmdd-HHMMSS[-N]``); one that fails or is interrupted removes the
    directory if it was absent or empty before.
    """
    if execution not in EXECUTIONS:
        raise ConfigError(f"{field('execution')} {execution!r} is unknown (allowed: {', '.join(EXECUTIONS)})")
    if cfg.l2_auto or any(isinstance(v, str) for v in l2s):
        raise ConfigError(
            f"{field('l2')} auto tunes λ within one run (jaxl2 train), so a sweep, which trains fixed λ "
            f"values, cannot take it; give numbers, e.g. {field('l2')} 0,1e-4,1e-3"
        )
    validate(cfg)  # its seed first: the seeds below count from it
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or not 0 <= s < SEED_LIMIT for s in seeds):
        raise ConfigError(
            f"{field('seeds')} {seeds} is invalid (one or more integers from 0 to {SEED_LIMIT - 1})"
        )
    cfg, ds = load_and_check(cfg, list(l2s))
    out = default_out("runs", "sweep") if out is None else out
    config_json = {**cfg.to_json(), "kind": "sweep", "l2": [float(v) for v in l2s], "seeds": seeds}
    created = prepare(out, config_json, resume=False, overwrite=overwrite, resumable=False)
    try:
        sigint.check()
        summary = _sweep(cfg, ds, [float(v) for v in l2s], seeds, execution, budget_bytes, on_epoch, log)
        summary["out"] = out
        _write_outputs(out, summary)
        return summary
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # no half-made sweep is left behind
        raise


def _sweep(cfg, ds, l2s, seeds, execution, budget_bytes, on_epoch, log) -> dict[str, Any]:
    members = [(lam, s) for s in seeds for lam in l2s]
    fit = members_that_fit(cfg, len(ds.train.y), budget_bytes or _memory_budget())
    chunks = [members[i : i + fit] for i in range(0, len(members), fit)]
    if len(chunks) > 1:
        log(f"{len(members)} members do not fit at once: training {len(chunks)} chunks of up to {fit}")
    trainer = Trainer(cfg, len(ds.train.y))
    data = tuple(jax.device_put(a) for a in (ds.train.x, ds.train.y, ds.val.x, ds.val.y))
    t0 = time.perf_counter()
    if execution == "auto":
        first = chunks[0]
        sweeper, timings = _choose_execution(
            trainer,
            SweepTrainer(trainer).init([m[1] for m in first]),
            data[0],
            data[1],
            jnp.asarray([m[0] for m in first], jnp.float32),
        )
        if timings:
            log(
                "execution: "
                + ", ".join(f"{k} {v:.3f} s/epoch" for k, v in timings.items())
                + f" → {sweeper.execution}"
            )
    else:
        sweeper = SweepTrainer(trainer, execution)
    results = []
    for chunk in chunks:
        l2_K = jnp.asarray([m[0] for m in chunk], jnp.float32)
        states = sweeper.init([m[1] for m in chunk])
        best = Best(
            jax.tree_util.tree_map(jnp.copy, states.params),
            _keep,
            np.full(len(chunk), -1.0),
            np.zeros(len(chunk)),
        )

        def diverged(epoch, bad, steps, chunk=chunk):
            members = ", ".join(f"(λ {chunk[i][0]:g}, seed {chunk[i][1]})" for i in bad)
            return f"sweep members {members}: " + diverged_message(
                cfg, chunk[bad[0]][0], epoch, int(steps[0]), trainer.steps_per_epoch
            )

        def epoch_fn(states, x, y, l2_K=l2_K):
            return sweeper.epoch(states, x, y, l2_K)

        epochs = range(1, cfg.epochs + 1)
        with sigint.deferred():
            for ep in run_epochs(epoch_fn, sweeper.evaluate, states, data, epochs, best, diverged):
                states = ep.state
                if on_epoch:
                    on_epoch(ep.epoch, cfg.epochs)
                if sigint.pending() and ep.epoch < cfg.epochs:
                    sigint.clear()
                    raise Interrupted(f"sweep interrupted after epoch {ep.epoch} of {cfg.epochs}")
        for i, (lam, seed) in enumerate(chunk):
            best_i, final_i = _unstack(best.params, i), _unstack(states.params, i)
            row = {"l2": lam, "seed": seed, **member_summary(trainer.evaluate, best_i, ds, cfg, lam)}
            final = split_metrics(trainer.evaluate, final_i, ds)
            row.update({f"final_{k}_accuracy": final[f"{k}_accuracy"] for k in ("train", "val", "test")})
            row["gap"] = row["train_accuracy"] - row["test_accuracy"]
            row["best_epoch"] = int(best.epoch[i])
            results.append(row)
    return {
        "selected_l2": select_l2(results),
        "selected_l2_1se": select_l2_1se(results),
        "per_l2": per_l2(results),
        "results": results,
        "lr": cfg.lr,
        "execution": sweeper.execution,
        "chunks": len(chunks),
        "seconds": time.perf_counter() - t0,
        "device": device_name(),
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


def results_json(summary: dict[str, Any]) -> str:
    keys = ("selected_l2", "selected_l2_1se", "per_l2", "results")
    return json.dumps({k: summary[k] for k in keys})
