"""Many λ (and seeds) trained at once: one compiled epoch over stacked states, ``jax.vmap``-ed.

Every member is the run ``jaxl2 train --l2 λ --seed s`` would make: the same init (from its
seed) and the same data order (each epoch's permutation is keyed on the member's own rng, so
members with the same seed share their data order and members with different seeds do not).
λ is a traced array, so the whole sweep compiles once.

Example:
  >>> from jaxl2.sweep import select_l2
  >>> select_l2([{"l2": 0.0, "val_accuracy": 0.9, "test_accuracy": 0.99},
  ...            {"l2": 1e-3, "val_accuracy": 0.95, "test_accuracy": 0.90}])
  0.001
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2 import data as _data
from jaxl2.run import RunError, _device, _write_json, kernel_sq_norm, validate
from jaxl2.train import XLA_OPTIONS, Config, Trainer

__all__ = ["SweepTrainer", "train_sweep", "select_l2", "members_that_fit"]

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
            raise ValueError(f"execution {execution!r} is invalid (allowed: vmap, sequential)")
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


def select_l2(results: Sequence[dict[str, Any]]) -> float:
    """The λ with the best mean **validation** accuracy over seeds (ties: the larger λ).

    The test accuracy is never looked at.
    """
    by_l2: dict[float, list[float]] = {}
    for r in results:
        by_l2.setdefault(r["l2"], []).append(r["val_accuracy"])
    return max(by_l2, key=lambda lam: (np.mean(by_l2[lam]), lam))


def members_that_fit(cfg: Config, num_train: int, budget_bytes: int) -> int:
    """How many members fit in ``budget_bytes``: params, optimizer state, best params, gradients
    and one batch of activations per member, float32."""
    sizes = [784, *cfg.hidden, 10]
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    opt_copies = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}[cfg.optimizer]
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
    budget_bytes: int | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Trains every (λ, seed) pair of ``cfg`` and returns ``{"selected_l2", "results", ...}``.

    Results carry the same keys as ``jaxl2 train --json`` (the best epoch by validation
    accuracy), plus the final epoch's accuracies and the train − test gap.
    """
    if not l2s:
        raise RunError("--l2 needs at least one value for a sweep (e.g. 0,1e-4,1e-3)")
    if execution not in EXECUTIONS:
        raise RunError(f"--execution {execution!r} is invalid (allowed: {', '.join(EXECUTIONS)})")
    ds = _data.load(cfg.dataset, data_dir=cfg.data_dir, val_size=cfg.val_size, split_seed=cfg.split_seed)
    if ds.train is None or ds.test is None:
        raise RunError(f"{cfg.dataset} needs both a training and a test split for a sweep")
    for lam in l2s:
        validate(dataclasses.replace(cfg, l2=lam), len(ds.train.y))
    if out is not None:
        if os.path.isdir(out) and os.listdir(out):
            raise RunError(f"--out {out} already holds files (choose another --out)")
        os.makedirs(out, exist_ok=True)
        _write_json(
            os.path.join(out, "config.json"), {**cfg.to_json(), "l2": list(l2s), "seeds": list(seeds)}
        )

    members = [(float(lam), int(s)) for s in seeds for lam in l2s]
    fit = members_that_fit(cfg, len(ds.train.y), budget_bytes or _memory_budget())
    chunks = [members[i : i + fit] for i in range(0, len(members), fit)]
    if len(chunks) > 1:
        log(f"{len(members)} members do not fit at once: training {len(chunks)} chunks of up to {fit}")
    trainer = Trainer(cfg, len(ds.train.y))
    x, y = jax.device_put(ds.train.x), jax.device_put(ds.train.y)
    xv, yv = jax.device_put(ds.val.x), jax.device_put(ds.val.y)
    t0 = time.perf_counter()
    if execution == "auto":
        first = chunks[0]
        sweeper, timings = _choose_execution(
            trainer,
            SweepTrainer(trainer).init([m[1] for m in first]),
            x,
            y,
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
        best_val = np.full(len(chunk), -1.0)
        best_epoch = np.zeros(len(chunk), int)
        best_params = jax.tree_util.tree_map(jnp.copy, states.params)
        for epoch in range(1, cfg.epochs + 1):
            states, m = sweeper.epoch(states, x, y, l2_K)
            bad_K = np.asarray(m["nonfinite_step"]) >= 0
            if bad_K.any():
                bad = [chunk[i] for i in np.flatnonzero(bad_K)]
                raise RunError(
                    f"members (λ, seed) {bad} diverged at epoch {epoch}; lower --lr or drop those λ"
                )
            val = np.asarray(sweeper.evaluate(states.params, xv, yv)["accuracy"])
            better = val >= best_val
            best_val, best_epoch = np.where(better, val, best_val), np.where(better, epoch, best_epoch)
            best_params = _keep_best(best_params, states.params, jnp.asarray(better))
            if on_epoch:
                on_epoch(epoch, cfg.epochs)
        results += _member_results(sweeper, cfg, chunk, best_params, states.params, best_epoch, ds)
    seconds = time.perf_counter() - t0
    summary = {
        "selected_l2": select_l2(results),
        "results": results,
        "execution": sweeper.execution,
        "chunks": len(chunks),
        "seconds": seconds,
        "device": _device(),
    }
    if out is not None:
        _write_outputs(out, summary)
    return summary


def _member_results(sweeper, cfg, chunk, best_params, final_params, best_epoch, ds) -> list[dict[str, Any]]:
    ev = {}
    for which, params in (("best", best_params), ("final", final_params)):
        for name, split in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
            r = jax.device_get(sweeper.evaluate(params, split.x, split.y))
            ev[which, name] = r
    out = []
    for i, (lam, seed) in enumerate(chunk):
        p = _unstack(best_params, i)
        row = {"l2": lam, "seed": seed}
        for name in ("train", "val", "test"):
            row[f"{name}_accuracy"] = float(ev["best", name]["accuracy"][i])
            row[f"{name}_loss"] = float(ev["best", name]["loss"][i])
        for name in ("train", "val", "test"):
            row[f"final_{name}_accuracy"] = float(ev["final", name]["accuracy"][i])
        row["gap"] = row["train_accuracy"] - row["test_accuracy"]
        row["best_epoch"] = int(best_epoch[i])
        row["kernel_sq_norm"] = kernel_sq_norm(jax.device_get(p), cfg)
        row["penalty"] = lam / 2 * sum(row["kernel_sq_norm"].values())
        out.append(row)
    return out


def _write_outputs(out: str, summary: dict[str, Any]) -> None:
    _write_json(os.path.join(out, "sweep.json"), summary)
    rows = summary["results"]
    layers = list(rows[0]["kernel_sq_norm"])
    cols = [k for k in rows[0] if k != "kernel_sq_norm"]
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + [f"sq_norm:{p}" for p in layers])
        for r in rows:
            w.writerow([r[c] for c in cols] + [r["kernel_sq_norm"][p] for p in layers])
    from jaxl2.plots import sweep as plot_sweep

    plot_sweep(rows, summary["selected_l2"], os.path.join(out, "sweep.png"))


def results_json(summary: dict[str, Any]) -> str:
    return json.dumps({"selected_l2": summary["selected_l2"], "results": summary["results"]})
