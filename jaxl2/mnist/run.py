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
import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, cast

import jax
import numpy as np

from jaxl2 import __version__
from jaxl2.mnist import data as _data
from jaxl2.mnist import parallel, sigint, sweepdir
from jaxl2.mnist import refit as _refit_mod
from jaxl2.mnist import sweep as _sweep
from jaxl2.mnist.config import (
    FIELDS,
    SPLITS,
    Config,
    ConfigError,
    RunSettings,
    field,
    settings_of,
    validate,
)
from jaxl2.mnist.hypergrad import AutoTrainer
from jaxl2.mnist.marglik import EvidenceTrainer
from jaxl2.mnist.model import abstract_params
from jaxl2.mnist.results import Refit, RunSummary
from jaxl2.mnist.rundir import (
    Checkpoints,
    Claim,
    SaveRule,
    default_out,
    disk_errors,
    has_checkpoint,
    is_disk_error,
    load_config,
    prepare,
    read_metrics,
    rewrite_metrics,
    run_config,
    write_json,
)
from jaxl2.mnist.runtime import Background, device_name
from jaxl2.mnist.train import (
    Best,
    Epoch,
    Interrupted,
    Trainer,
    check_interrupt,
    compile_epochs,
    diverged_message,
    epochs_per_call,
    lambda_columns,
    load_and_check,
    member_summary,
    stop_if_signalled,
    train_epochs,
)

__all__ = ["train_and_evaluate", "evaluate_run", "load_run_config", "mode_of"]


def mode_of(cfg: Config) -> type[Trainer]:
    """The trainer of ``cfg``'s λ mode: :class:`~jaxl2.mnist.hypergrad.AutoTrainer` for ``l2="auto"``,
    :class:`~jaxl2.mnist.marglik.EvidenceTrainer` for ``l2="evidence"``, else
    :class:`~jaxl2.mnist.train.Trainer` (a fixed λ). The run asks the trainer what differs."""
    if cfg.l2_evidence:
        return EvidenceTrainer
    return AutoTrainer if cfg.l2_auto else Trainer


def load_run_config(
    out: str, name: str = "out", *, l2: float | None = None, seed: int | None = None, kind: str | None = None
) -> Config:
    """The :class:`Config` of the training run in ``out``; for a finished sweep, that of one
    member (what ``jaxl2 train --l2 λ --seed s`` would train): ``l2`` and ``seed`` pick it,
    by default the member that ``jaxl2 eval`` evaluates (:func:`jaxl2.mnist.sweep.pick_member`).
    ``kind="run"`` refuses a sweep (``"sweep"`` a run); errors name the argument ``name``."""
    d = load_config(out, name)
    found = "sweep" if d.get("kind") == "sweep" else "run"
    if kind is not None and kind != found:
        other = "a sweep, not a training run" if found == "sweep" else "a training run, not a sweep"
        raise ConfigError(f"{field(name)} {out} holds {other}")
    if found == "sweep":
        return _sweep_member(out, name, l2, seed)[0]
    if l2 is not None or seed is not None:
        raise ConfigError(
            f"{field('l2')} and {field('seed')} pick a member of a sweep; {out} is a training run"
        )
    return run_config(d, os.path.join(out, "config.json"))


def _sweep_member(out: str, name: str, l2: float | None, seed: int | None) -> tuple[Config, dict, int]:
    """The member's Config, the sweep's summary and the member's index in its results."""
    cfg, _, _ = sweepdir.load_sweep_config(out, name)
    summary = sweepdir.read_summary(out, name)
    i = _sweep.pick_member(summary["results"], summary["selected_l2"], l2, seed)
    row = summary["results"][i]
    return dataclasses.replace(cfg, l2=row["l2"], seed=row["seed"]), summary, i


def _check_resume(cfg: Config, out: str) -> None:
    saved = validate(load_run_config(out, kind="run"))
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
    settings: RunSettings | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_start: Callable[[], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_refit_epoch: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda text: None,
) -> RunSummary:
    """Trains ``cfg`` into the run directory ``out`` and returns the summary.

    ``out=None`` creates a new ``runs/DATASET-YYYYmmdd-HHMMSS[-N]`` (never one another run
    took). A run that fails or is interrupted before its first checkpoint removes the
    directory if it was absent or empty before; after that, it resumes with ``resume=True``.
    ``settings`` (:class:`~jaxl2.mnist.config.RunSettings`, default ``RunSettings()``) say how: checkpoints every 30 s of
    training, also every ``settings.checkpoint_every`` epochs when given, at the end and on
    SIGINT or SIGTERM (:class:`~jaxl2.mnist.rundir.SaveRule`), written in the background.

    ``settings.devices`` (default: all) > 1, or several processes, trains data-parallel over a 1-D mesh:
    the batch is split along ``data``, params are replicated (see :mod:`jaxl2.mnist.parallel`);
    only process 0 writes the run directory's files (orbax coordinates the checkpoints). With
    several processes, checkpoints are written in the foreground, and all processes save and
    stop at the same epochs (:func:`~jaxl2.mnist.train.call_end`).

    ``on_start()`` is called once the input is validated (before compiling), ``on_epoch(row)``
    after every epoch with its ``metrics.jsonl`` row. The summary
    (:class:`~jaxl2.mnist.results.RunSummary`, each key documented) holds the accuracies, data
    losses, penalty and norms of the **best** parameters by validation accuracy (what
    ``jaxl2 eval`` loads); ``final_val_accuracy`` is the last epoch's.

    ``settings.refit`` (the default recipe's) then trains again from the same init on train ∪
    validation (:mod:`jaxl2.mnist.refit`) for ``settings.refit_epochs`` epochs: ``"all"`` the
    run's, or ``"best"`` its best epoch's count; checkpoints in ``out/refit``,
    ``on_refit_epoch(epoch, epochs)`` after each of its epochs. The summary gains its
    ``refit_*`` keys, ``refit_test_accuracy`` among them, and ``jaxl2 eval`` evaluates the refit
    model.

    Example:
      >>> import os, tempfile
      >>> from jaxl2.mnist import Config, RunSettings, train_and_evaluate
      >>> out = os.path.join(tempfile.mkdtemp(), "run")
      >>> s = train_and_evaluate(Config(epochs=2), out, RunSettings(refit=False))
      >>> s["epochs_trained"], s["test_accuracy"] > 0.8
      (2, True)

    Raises:
      ConfigError: bad input, before anything is compiled or written.
      Diverged: a NaN/Inf loss; the last good checkpoint is kept.
      Interrupted: SIGINT or SIGTERM; the call of epochs it interrupted was finished and
        checkpointed (the last call too: the refit is then left to the resume).
      DiskFull: a file of the run could not be written (no space, a quota, a read-only file
        system); the last complete checkpoint and ``config.json`` are kept for the resume.
    """
    settings = settings_of(settings, RunSettings)
    refit, refit_epochs, checkpoint_every = settings.refit, settings.refit_epochs, settings.checkpoint_every
    SaveRule(checkpoint_every)  # checks it before anything is loaded
    if refit:
        _refit_mod.refit_epochs(refit_epochs, 1, 1)  # a bad rule fails before anything is done
    cfg, ds = load_and_check(cfg)
    mode = mode_of(cfg)
    if mode.trains_on_val:  # λ needs no held-out data: train on all of it, and nothing is left to refit
        if refit:
            log(f"{field('l2')} {cfg.l2} trains on all of train ∪ validation: there is no refit")
        refit, ds = False, ds._replace(train=_refit_mod.train_val(ds))
    check_interrupt()
    mesh = _mesh(settings.devices, cfg.batch_size)
    primary = jax.process_index() == 0
    if resume:
        if out is None:
            raise ConfigError(f"{field('resume')} needs {field('out')}, the run to continue")
        _check_resume(cfg, out)
    if out is None:
        if jax.process_count() > 1:
            raise ConfigError(f"several processes need one {field('out')} directory that all of them reach")
        out = default_out("runs", cfg.dataset)
    config = {**cfg.to_json(), "jaxl2_version": __version__, "refit": refit, "refit_epochs": refit_epochs}
    claim = _prepare_everywhere(out, config, resume, overwrite, primary)
    before = _read_summary(out) if resume else {}
    with claim, disk_errors(out):
        try:
            trainer = mode(cfg, len(ds.need("train").y), mesh=mesh)
            job = _Job(cfg, trainer, ds, out, mesh, primary, checkpoint_every, on_epoch, log)
            ahead = _refit_ahead(job, refit, refit_epochs, before)
            summary = _train(job, resume, on_start)
            drawing = Background(functools.partial(_plots, job) if primary else None)
            try:  # the plots are drawn while the refit trains
                summary = _with_refit(job, summary, before, refit, refit_epochs, on_refit_epoch, ahead)
            except BaseException:
                drawing.join(reraise=False)  # the first error is the one to report
                raise
            drawing.join()
            if primary and summary != before:
                write_json(os.path.join(out, "summary.json"), summary)
            elif primary:
                log(f"{out} had finished; its summary.json is unchanged")
            return cast(RunSummary, summary)
        except BaseException as e:
            if isinstance(e, Interrupted):
                e.out = out
            if claim.created and primary and not has_checkpoint(out) and not is_disk_error(e):
                shutil.rmtree(out, ignore_errors=True)  # nothing to resume: leave no half-made run
            raise


def _with_refit(
    job: _Job,
    summary: dict[str, Any],
    before: dict[str, Any],
    refit: bool,
    refit_epochs: Any,
    on_refit_epoch: Callable[[int, int], None] | None,
    ahead: Background | None = None,
) -> dict[str, Any]:
    """The trained run's summary with its refit's keys: those of ``before`` (the summary a
    resumed run had written) when its refit is done, else from the refit, trained now (made
    ready by ``ahead`` when it ran, :func:`_refit_ahead`)."""
    cfg, out = job.cfg, job.out
    if before and summary["epochs_trained"] == 0:  # a finished run: its numbers stay
        summary = {k: v for k, v in before.items() if not k.startswith("refit")}
    if refit and before.get("refit_epoch_rule") == refit_epochs:
        summary.update({k: v for k, v in before.items() if k.startswith("refit")})
    elif refit:
        epochs = _refit_mod.refit_epochs(refit_epochs, summary["best_epoch"], cfg.epochs)
        stop_if_signalled(f"after training, before the refit; checkpoint saved in {out}", out)
        made = ahead.result() if ahead else None
        fit = _refit(
            job.trainer.refit_config(summary),
            job.ds,
            out,
            job.mesh,
            epochs,
            job.checkpoint_every,
            on_refit_epoch,
            made,
        )
        summary.update(fit, refit_epoch_rule=refit_epochs)
    return summary


def _refit_ahead(job: _Job, refit: bool, refit_epochs: Any, before: dict[str, Any]) -> Background | None:
    """What follows training, compiled in the background while the run trains: the refit made
    ready (:func:`~jaxl2.mnist.refit.ready`), then the summary's evaluations of the training
    and validation splits (the same executables as the best params' summary). Only when the
    refit's config and epoch count are known before training (a fixed λ and
    ``refit_epochs="all"``), it is not done yet, and the run has one process (a background
    execution could interleave with the other processes' collectives)."""
    cfg = job.trainer.refit_config(None)
    known = refit_epochs == "all" and cfg is not None
    if not refit or not known or before.get("refit_epoch_rule") == refit_epochs or jax.process_count() > 1:
        return None

    def ready() -> _refit_mod.Ready:
        assert cfg is not None
        made = _refit_mod.ready(cfg, job.ds, cfg.epochs, mesh=job.mesh)
        for split in (job.ds.need("train"), job.ds.need("val")):
            jax.block_until_ready(made.trainer.evaluate(made.state.params, split.x, split.y))
        return made

    return Background(ready)


def _mesh(devices: int | None, batch_size: int) -> Any:
    """The data-parallel mesh over ``devices`` (default: all), or ``None`` for one device."""
    if devices is not None and not (isinstance(devices, int) and devices >= 1):
        raise ConfigError(f"{field('devices')} {devices} is invalid (an integer >= 1)")
    n_dev = jax.device_count() if devices is None else devices
    if n_dev == 1 and jax.process_count() == 1:
        return None
    parallel.check_batch(batch_size, n_dev)
    return parallel.make_mesh(n_dev)


def _prepare_everywhere(
    out: str, config: dict[str, Any], resume: bool, overwrite: bool, primary: bool
) -> Claim:
    """:func:`~jaxl2.mnist.rundir.prepare` on process 0 (the others get an unheld claim); every
    process raises if it failed there, so that none goes on to train without it."""
    failed, claim = None, Claim(out, created=False)
    if primary:
        try:
            claim = prepare(out, config, resume=resume, overwrite=overwrite)
        except Exception as e:
            failed = e
    if parallel.any_process(failed is not None)[0]:
        if failed is not None:
            raise failed
        raise ConfigError(f"process 0 could not prepare {field('out')} {out} (its error says why)")
    return claim


def _run_state(state: Any, best: Best) -> dict[str, Any]:
    """What a checkpoint holds: the training state and the best params so far, with their
    validation accuracy and epoch (also the template that a resume restores into)."""
    return {
        "state": state,
        "best_params": best.params,
        "best_val": np.array(best.val, np.float32),
        "best_epoch": np.array(best.epoch, np.int32),
    }


@dataclasses.dataclass
class _Job:
    """What :func:`train_and_evaluate` hands its phases: the checked config and data, where the
    run goes and how it reports."""

    cfg: Config
    trainer: Trainer  # the λ mode: what differs between a fixed λ, l2 auto and l2 evidence
    ds: _data.Dataset
    out: str
    mesh: Any  # the data-parallel mesh, or None for one device
    primary: bool  # process 0: it writes the run's files
    checkpoint_every: int | None
    on_epoch: Callable[[dict[str, Any]], None] | None
    log: Callable[[str], None]

    @property
    def metrics(self) -> str:
        return os.path.join(self.out, "metrics.jsonl")


def _train(job: _Job, resume: bool, on_start: Callable[[], None] | None) -> dict[str, Any]:
    """Trains the run from its start (or its checkpoint) and returns its summary."""
    check_interrupt()
    if on_start:
        on_start()
    trainer = job.trainer
    # orbax's save syncs the processes with a collective: from a thread, it could interleave
    # with the training's own collectives in a different order on each process (a hang)
    ckpt = Checkpoints(job.out, background=jax.process_count() == 1)
    state = parallel.replicate(trainer.init(), job.mesh)
    # host copies: best/ is saved without the mesh's sharding, so any process count restores it
    best = Best(
        parallel.host(state.params),
        keep=lambda b, p, better: parallel.host(p) if better else b,
        latest=trainer.latest,  # l2 evidence: its validation images are training data: the last epoch's
    )
    start = 0
    if resume:
        start, state, best = _restore(job, ckpt, state, best)
    with sigint.deferred(), contextlib.closing(ckpt):
        state, seconds, compile_seconds = _epochs(job, trainer, ckpt, state, best, start)
    return _summary(job, trainer, state, best, start, seconds, compile_seconds)


def _restore(job: _Job, ckpt: Checkpoints, state: Any, best: Best) -> tuple[int, Any, Best]:
    """The run's latest checkpoint (or its start, when none was written), its metrics cut there."""
    start = 0
    restored = ckpt.restore_latest(_run_state(state, Best(state.params, best.keep)))
    if restored is not None:  # a run killed before its first checkpoint starts over
        start, run = restored
        state = run["state"]
        best = Best(
            parallel.host(run["best_params"]),
            best.keep,
            float(run["best_val"]),
            int(run["best_epoch"]),
            latest=best.latest,
        )
    if job.primary:
        rewrite_metrics(job.metrics, upto_epoch=start)
    job.log(_resume_line(job.out, start, job.cfg.epochs))
    return start, state, best


def _epochs(
    job: _Job, trainer: Any, ckpt: Checkpoints, state: Any, best: Best, start: int
) -> tuple[Any, float, float]:
    """Epochs ``start + 1 …`` through :func:`~jaxl2.mnist.train.train_epochs`, a ``metrics.jsonl``
    row each; returns the last state, the training seconds and the compiling seconds."""
    cfg, primary = job.cfg, job.primary
    data = tuple(parallel.put(a, job.mesh) for a in (*job.ds.need("train"), *job.ds.need("val")))
    size = epochs_per_call(len(job.ds.need("train").y))
    seconds, compile_seconds, program = 0.0, 0.0, None
    if start < cfg.epochs:  # compiled here, so that no epoch's time includes compiling
        t0 = time.perf_counter()
        program = compile_epochs(
            trainer.run_epoch,
            lambda p, x, y, xv, yv: trainer.eval_fn(p, xv, yv),
            size,
            state,
            *data,
            latest=trainer.latest,  # each call keeps the params that `best` keeps
        )
        compile_seconds = time.perf_counter() - t0

    def diverged(epoch, _members, steps):
        return f"{diverged_message(cfg, cfg.l2, epoch, int(steps[0]), trainer.steps_per_epoch)} {ckpt.last_good()}"

    metrics: Any = open(job.metrics, "a") if primary else contextlib.nullcontext()
    with metrics as mfile:

        def on(ep: Epoch) -> None:
            nonlocal seconds
            seconds += ep.seconds
            row = _metrics_row(ep, trainer.steps_per_epoch)
            if primary:
                mfile.write(json.dumps(row) + "\n")
            if job.on_epoch:
                job.on_epoch(row)

        def save(epoch: int, st: Any) -> None:
            if primary:  # the rows up to the checkpoint are on disk before it
                mfile.flush()
                os.fsync(mfile.fileno())
            ckpt.save(epoch, _run_state(st, best), best.epoch)

        state = train_epochs(
            program,
            state,
            range(start + 1, cfg.epochs + 1),
            best,
            diverged=diverged,
            size=size,
            every=job.checkpoint_every,
            save=save,
            on_epoch=on,
            where=lambda epoch: f"after epoch {epoch}; checkpoint saved in {job.out}",
        )
    return state, seconds, compile_seconds


def _summary(
    job: _Job, trainer: Any, state: Any, best: Best, start: int, seconds: float, compile_seconds: float
) -> dict[str, Any]:
    """The run's summary: the best params' metrics, the times, the device."""
    cfg = job.cfg
    rows = read_metrics(job.metrics)
    trained = (cfg.epochs - start) * trainer.steps_per_epoch * cfg.batch_size
    l2, extra = trainer.summary(parallel.host(state), rows, best.epoch)  # the λ mode's
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
        "device": device_name(),
        "out": job.out,
    }


def _plots(job: _Job) -> None:
    """``curves.png`` of the run's ``metrics.jsonl`` (and ``lambda.png`` when its rows hold λ per
    layer: ``l2 auto`` or ``l2 evidence``); drawn in a thread while the refit trains."""
    from jaxl2.mnist.plots import curves, lambdas

    rows, cfg = read_metrics(job.metrics), job.cfg
    title = f"{cfg.dataset}, {cfg.optimizer}, λ={cfg.l2}"
    curves(rows, os.path.join(job.out, "curves.png"), title=title)
    if lambda_columns(rows):
        lambdas(rows, os.path.join(job.out, "lambda.png"), title=title)


def _resume_line(out: str, start: int, epochs: int) -> str:
    """What a resume says about where it starts."""
    if start == 0:
        return f"resuming {out}: no checkpoint was written yet, so training starts at epoch 1"
    if start >= epochs:
        return f"resuming {out}: all {epochs} epochs were trained already"
    return f"resuming {out} after epoch {start}: training epochs {start + 1} to {epochs}"


def _metrics_row(ep: Epoch, steps_per_epoch: int) -> dict[str, Any]:
    """The ``metrics.jsonl`` row of an epoch."""
    return {
        "epoch": ep.epoch,
        "step": ep.epoch * steps_per_epoch,
        # per-layer entries (l2/PATH, hypergrad/PATH of l2 auto) keep their own names
        **{k if "/" in k else f"train_{k}": float(v) for k, v in ep.train.items() if k != "log_evidence"},
        # l2 evidence: the log evidence of the last λ update (none before the first)
        **({"log_evidence": _finite(ep.train["log_evidence"])} if "log_evidence" in ep.train else {}),
        "val_data_loss": float(ep.val["data_loss"]),
        "val_accuracy": float(ep.val["accuracy"]),
        "epoch_seconds": ep.seconds,
    }


def _finite(v: Any) -> float | None:
    return float(v) if np.isfinite(v) else None


def _refit(cfg, ds, out, mesh, epochs, checkpoint_every, on_epoch, made=None) -> Refit:
    try:
        return _refit_mod.refit(
            cfg,
            ds,
            epochs,
            os.path.join(out, "refit"),
            mesh=mesh,
            checkpoint_every=checkpoint_every,
            on_epoch=on_epoch,
            made=made,
        )
    except Interrupted as e:
        e.out = out
        raise


def evaluate_run(
    out: str,
    dataset: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    *,
    l2: float | None = None,
    seed: int | None = None,
    refit: bool | None = None,
) -> dict[str, Any]:
    """Accuracy and data loss (cross-entropy) of a run's model on ``split`` of ``dataset``
    (default: the run's own dataset and split seed).

    The model: the refit one (train ∪ validation) when the run has one, else the best
    checkpoint by validation accuracy; ``refit=False`` asks for the best checkpoint, ``True``
    for the refit. For a sweep, one member's (:func:`jaxl2.mnist.sweep.pick_member`: the
    selected λ and its seed with the best validation accuracy, unless ``l2`` / ``seed`` say).
    The result names the model (``"model": "refit"`` or ``"best"``, and for a sweep its λ and seed).
    """
    if split not in SPLITS:
        raise ConfigError(f"{field('split')} {split!r} is unknown (allowed: {', '.join(SPLITS)})")
    cfg = load_run_config(out, "run", l2=l2, seed=seed)
    params, which = _model(out, cfg, l2, seed, refit)
    dataset = cfg.dataset if dataset is None else dataset
    ds = _data.load(
        dataset,
        data_dir=cfg.data_dir if data_dir is None and dataset == cfg.dataset else data_dir,
        val_size=cfg.val_size if dataset == cfg.dataset else None,
        split_seed=cfg.split_seed,
        splits=(split,),
    )
    part = getattr(ds, split)
    if part is None:
        raise ConfigError(f"{field('dataset')} {dataset} has no {split} split")
    trainer = Trainer(cfg, cfg.batch_size)  # evaluation only: num_train just sizes the lr schedule
    ev = jax.device_get(trainer.evaluate(params, part.x, part.y))
    return {
        "dataset": dataset,
        "split": split,
        "accuracy": float(ev["accuracy"]),
        "data_loss": float(ev["data_loss"]),
        "n": int(len(part.y)),
        **which,
    }


def _no_refit(out: str, how: str) -> ConfigError:
    return ConfigError(f"{field('refit')}: {out} has no refit model ({how})")


def _model(out: str, cfg: Config, l2, seed, refit: bool | None) -> tuple[Any, dict[str, Any]]:
    """The params that :func:`evaluate_run` evaluates, and what they are."""
    if load_config(out, "run").get("kind") == "sweep":
        return _sweep_model(out, cfg, l2, seed, refit)
    summary = _read_summary(out)
    if refit is None:
        refit = "refit_epochs" in summary
    if refit:
        if "refit_epochs" not in summary:
            raise _no_refit(
                out, f"train it with {field('refit')}, or add one: {field('resume')} {field('refit')}"
            )
        path = os.path.join(out, "refit")
        params = _refit_mod.restore_refit(path, cfg, summary["refit_epochs"], summary["refit_examples"])
        return params, {"model": "refit"}
    if not os.path.isdir(os.path.join(out, "best")):
        raise ConfigError(f"{field('run')} {out} has no best checkpoint (expected {out}/best)")
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
    return params, {"model": "best"}


def _sweep_model(out: str, cfg: Config, l2, seed, refit: bool | None) -> tuple[Any, dict[str, Any]]:
    """A sweep member's best params, or its refit's (only the selected λ is refit)."""
    _, summary, i = _sweep_member(out, "run", l2, seed)
    fit = summary.get("refit")
    if refit is None:
        refit = fit is not None and fit["l2"] == cfg.l2
    which = {"model": "refit" if refit else "best", "l2": cfg.l2, "seed": cfg.seed}
    if not refit:
        n = len(summary["results"])
        return sweepdir.restore_member(out, cfg, summary["chunk_size"], n, i), which
    if fit is None:
        raise _no_refit(
            out, f"sweep it with {field('refit')}, or add one: {field('resume')} {field('refit')}"
        )
    if fit["l2"] != cfg.l2:
        raise _no_refit(out, f"for {field('l2')} {cfg.l2:g}: only the selected λ {fit['l2']:g} was refit")
    m = next(m for m in fit["members"] if m["seed"] == cfg.seed)
    path = sweepdir.refit_dir(out, cfg.seed)
    return _refit_mod.restore_refit(path, cfg, m["refit_epochs"], m["refit_examples"]), which


def _read_summary(out: str) -> dict[str, Any]:
    """The run's ``summary.json``, or ``{}`` (a run that has not finished)."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
