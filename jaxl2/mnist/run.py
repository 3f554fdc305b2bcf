"""One training run into its directory (:mod:`jaxl2.mnist.rundir`), and the evaluation of a
finished run.

Orbax writes each checkpoint to a temporary directory and renames it, so a run killed at
any moment resumes from its last complete checkpoint and ends with the same parameters
as a run that was never stopped (every epoch's shuffle is keyed on the state's step). A run
that stops before its first checkpoint (bad input found late, Ctrl-C while compiling)
removes the directory it created; one killed outright resumes from the start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxl2.mnist import auto as _auto
from jaxl2.mnist import data as _data
from jaxl2.mnist import parallel, sigint
from jaxl2.mnist.config import FIELDS, SPLITS, Config, ConfigError, field, validate
from jaxl2.mnist.loop import (
    Best,
    Interrupted,
    diverged_message,
    load_and_check,
    member_summary,
    run_epochs,
)
from jaxl2.mnist.model import abstract_params
from jaxl2.mnist.rundir import (
    Checkpoints,
    default_out,
    has_checkpoint,
    load_config,
    prepare,
    read_metrics,
    rewrite_metrics,
    run_config,
    write_json,
)
from jaxl2.mnist.runtime import device_name
from jaxl2.mnist.steps import Trainer

__all__ = ["train_and_evaluate", "evaluate_run", "load_run_config"]


def _version() -> str:
    from jaxl2 import __version__

    return __version__


def load_run_config(out: str, name: str = "out") -> Config:
    """The :class:`Config` of the training run in ``out`` (an error for a sweep or no run)."""
    d = load_config(out, name)
    if d.get("kind") == "sweep":
        raise ConfigError(f"{out} is a sweep, not a training run")
    return run_config(d, os.path.join(out, "config.json"))


def _check_resume(cfg: Config, out: str) -> None:
    saved = validate(load_run_config(out))
    differ = [f for f in FIELDS if getattr(cfg, f) != getattr(saved, f)]
    if differ:
        desc = ", ".join(
            f"{field(f)} {_show(getattr(cfg, f))} vs {_show(getattr(saved, f))} in the run" for f in differ
        )
        raise ConfigError(
            f"{field('resume')}: settings differ from {out}/config.json: {desc} (resume with the run's own settings)"
        )


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def train_and_evaluate(
    cfg: Config,
    out: str | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int = 10,
    on_start: Callable[[], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    devices: int | None = None,
) -> dict[str, Any]:
    """Trains ``cfg`` into the run directory ``out`` and returns the summary.

    ``out=None`` creates a new ``runs/DATASET-YYYYmmdd-HHMMSS[-N]`` (never one another run
    took). A run that fails or is interrupted before its first checkpoint removes the
    directory if it was absent or empty before; after that, it resumes with ``resume=True``.

    ``devices`` (default: all) > 1, or several processes, trains data-parallel over a 1-D mesh:
    the batch is split along ``data``, params are replicated (see :mod:`jaxl2.mnist.parallel`);
    only process 0 writes the run directory's files (orbax coordinates the checkpoints).

    ``on_start()`` is called once the input is validated (before compiling), ``on_epoch(row)``
    after every epoch with its ``metrics.jsonl`` row. The summary's accuracies, data losses,
    penalty and norms are those of the **best** parameters by validation accuracy (what
    ``jaxl2 eval`` loads); ``final_val_accuracy`` is the last epoch's. ``train_loss`` is the
    total (data loss + penalty); ``*_data_loss`` is the cross-entropy alone.

    Raises:
      ConfigError: bad input, before anything is compiled or written.
      Diverged: a NaN/Inf loss; the last good checkpoint is kept.
      Interrupted: SIGINT; the epoch it interrupted was finished and checkpointed.
    """
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise ConfigError(f"{field('checkpoint_every')} {checkpoint_every} is invalid (an integer >= 1)")
    cfg, ds = load_and_check(cfg)
    sigint.check()
    if devices is not None and not (isinstance(devices, int) and devices >= 1):
        raise ConfigError(f"{field('devices')} {devices} is invalid (an integer >= 1)")
    n_dev = jax.device_count() if devices is None else devices
    mesh = None
    if n_dev > 1 or jax.process_count() > 1:
        mesh = parallel.make_mesh(n_dev)
        parallel.check_batch(cfg.batch_size, n_dev)
    primary = jax.process_index() == 0
    if resume:
        _check_resume(cfg, out)
    created = False
    if out is None:
        if jax.process_count() > 1:
            raise ConfigError(f"several processes need one {field('out')} directory that all of them reach")
        out = default_out("runs", cfg.dataset)
    if primary:
        created = prepare(
            out, {**cfg.to_json(), "jaxl2_version": _version()}, resume=resume, overwrite=overwrite
        )
    try:
        return _train(cfg, ds, out, mesh, primary, resume, checkpoint_every, on_start, on_epoch)
    except BaseException:
        if created and primary and not has_checkpoint(out):
            shutil.rmtree(out, ignore_errors=True)  # nothing to resume: leave no half-made run
        raise


def _run_state(state: Any, best: Best) -> dict[str, Any]:
    """What a checkpoint holds: the training state and the best params so far, with their
    validation accuracy and epoch (also the template that a resume restores into)."""
    return {
        "state": state,
        "best_params": best.params,
        "best_val": np.array(best.val, np.float32),
        "best_epoch": np.array(best.epoch, np.int32),
    }


def _train(cfg, ds, out, mesh, primary, resume, checkpoint_every, on_start, on_epoch) -> dict[str, Any]:
    sigint.check()
    if on_start:
        on_start()
    trainer = _auto.trainer_for(cfg, len(ds.train.y), mesh=mesh)
    data = tuple(parallel.put(a, mesh) for a in (ds.train.x, ds.train.y, ds.val.x, ds.val.y))
    ckpt = Checkpoints(out)
    metrics_path = os.path.join(out, "metrics.jsonl")
    state = parallel.replicate(trainer.init(), mesh)
    best = Best(parallel.host(state.params), keep=lambda b, p, better: parallel.host(p) if better else b)
    start = 0
    if resume:
        restored = ckpt.restore_latest(_run_state(state, Best(state.params, best.keep)))
        if restored is not None:  # a run killed before its first checkpoint starts over
            start, run = restored
            state = run["state"]
            best = Best(
                parallel.host(run["best_params"]), best.keep, float(run["best_val"]), int(run["best_epoch"])
            )
        if primary:
            rewrite_metrics(metrics_path, upto_epoch=start)

    def diverged(epoch, _members, steps):
        return f"{diverged_message(cfg, cfg.l2, epoch, int(steps[0]), trainer.steps_per_epoch)} {ckpt.last_good()}"

    train_seconds, compile_seconds, train_epoch = 0.0, 0.0, None
    epoch_data = data if cfg.l2_auto else data[:2]  # l2 auto: the epoch draws validation batches
    with sigint.deferred(), contextlib.closing(ckpt):
        if start < cfg.epochs:
            t0 = time.perf_counter()
            compiled = trainer.train_epoch.lower(state, *epoch_data).compile()
            compile_seconds = time.perf_counter() - t0

            def train_epoch(state, x, y):
                return compiled(state, x, y, *epoch_data[2:])

        with open(metrics_path, "a") if primary else contextlib.nullcontext() as mfile:
            epochs = range(start + 1, cfg.epochs + 1)
            for ep in run_epochs(train_epoch, trainer.evaluate, state, data, epochs, best, diverged):
                state = ep.state
                train_seconds += ep.seconds
                row = {
                    "epoch": ep.epoch,
                    "step": int(state.step),
                    # per-layer entries (l2/PATH, hypergrad/PATH of l2 auto) keep their own names
                    **{k if "/" in k else f"train_{k}": float(v) for k, v in ep.train.items()},
                    "val_data_loss": float(ep.val["data_loss"]),
                    "val_accuracy": float(ep.val["accuracy"]),
                    "epoch_seconds": ep.seconds,
                }
                if primary:
                    mfile.write(json.dumps(row) + "\n")
                    mfile.flush()
                    os.fsync(mfile.fileno())
                last = ep.epoch == cfg.epochs
                if last or sigint.pending() or ep.epoch % checkpoint_every == 0:
                    ckpt.save(ep.epoch, _run_state(state, best), best.epoch)
                if on_epoch:
                    on_epoch(row)
                if sigint.pending() and not last:
                    sigint.clear()
                    stopped = Interrupted(f"interrupted after epoch {ep.epoch}; checkpoint saved in {out}")
                    stopped.out = out
                    raise stopped

    rows = read_metrics(metrics_path)
    if primary:
        from jaxl2.mnist.plots import curves, lambdas

        curves(rows, os.path.join(out, "curves.png"), title=f"{cfg.dataset}, {cfg.optimizer}, λ={cfg.l2}")
        if cfg.l2_auto:
            lambdas(rows, os.path.join(out, "lambda.png"), title=f"{cfg.dataset}, {cfg.optimizer}, λ auto")
    trained = (cfg.epochs - start) * trainer.steps_per_epoch * cfg.batch_size
    l2, auto = cfg.l2, {}
    if cfg.l2_auto:  # the penalty of the best params with the λs of their epoch
        l2 = _auto.penalty_rules(_auto.l2_at(rows, best.epoch))
        auto = {"l2_final": trainer.lambdas(state)}
    summary = {
        **member_summary(trainer.evaluate, best.params, ds, cfg, l2),
        **auto,
        "best_epoch": best.epoch,
        "final_val_accuracy": rows[-1]["val_accuracy"] if rows else None,
        "epochs": cfg.epochs,
        "epochs_trained": cfg.epochs - start,
        "lr": cfg.lr,
        "seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "examples_per_second": trained / train_seconds if train_seconds else None,
        "device": device_name(),
        "out": out,
    }
    if primary:
        write_json(os.path.join(out, "summary.json"), summary)
    return summary


def evaluate_run(
    out: str, dataset: str | None = None, split: str = "test", data_dir: str | None = None
) -> dict[str, Any]:
    """Accuracy and data loss (cross-entropy) of a run's best checkpoint on ``split`` of
    ``dataset`` (default: the run's own dataset and split seed)."""
    cfg = load_run_config(out, "run")
    if split not in SPLITS:
        raise ConfigError(f"{field('split')} {split!r} is unknown (allowed: {', '.join(SPLITS)})")
    if not os.path.isdir(os.path.join(out, "best")):
        raise ConfigError(f"{field('run')} {out} has no best checkpoint (expected {out}/best)")
    dataset = cfg.dataset if dataset is None else dataset
    ds = _data.load(
        dataset,
        data_dir=cfg.data_dir if data_dir is None and dataset == cfg.dataset else data_dir,
        val_size=cfg.val_size if dataset == cfg.dataset else None,
        split_seed=cfg.split_seed,
    )
    part = getattr(ds, split)
    if part is None:
        raise ConfigError(f"{field('dataset')} {dataset} has no {split} split")
    ckpt = Checkpoints(out)
    like = abstract_params(cfg)
    try:
        params = ckpt.restore_best(like)
    finally:
        ckpt.close()
    shapes = [(np.shape(a), b.shape) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(like))]
    if len(jax.tree.leaves(params)) != len(jax.tree.leaves(like)) or any(a != b for a, b in shapes):
        raise ConfigError(
            f"{field('run')} {out}: the best checkpoint does not fit the model of its config.json "
            "(was config.json edited?)"
        )
    trainer = Trainer(cfg, cfg.batch_size)  # evaluation only: num_train just sizes the lr schedule
    ev = jax.device_get(trainer.evaluate(params, part.x, part.y))
    return {
        "dataset": dataset,
        "split": split,
        "accuracy": float(ev["accuracy"]),
        "data_loss": float(ev["data_loss"]),
        "n": int(len(part.y)),
    }
