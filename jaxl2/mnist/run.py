"""One training run into its directory (:mod:`jaxl2.mnist.rundir`), composed with its
features.

:func:`train_and_evaluate` checks the input, picks the λ mode (:func:`mode_of`), prepares the
directory and hands the training itself to :func:`jaxl2.mnist.train.fit`; around it, the
features: the data-parallel mesh (:mod:`~jaxl2.mnist.parallel`), the refit on train ∪ validation
(:func:`~jaxl2.mnist.refit.add_refit`, compiled in the background while the run trains:
:func:`~jaxl2.mnist.refit.ahead`), the plots
(:mod:`~jaxl2.mnist.plots`, drawn while the refit trains), and ``summary.json``.

Orbax writes each checkpoint to a temporary directory and renames it, so a run killed at
any moment resumes from its last complete checkpoint and ends with the same parameters
as a run that was never stopped (every epoch's shuffle is keyed on the state's step). A run
that stops before its first checkpoint (bad input found late, Ctrl-C while compiling)
removes the directory it created; one killed outright resumes from the start.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from typing import Any, cast

import jax

from jaxl2 import __version__
from jaxl2.mnist import parallel, runtime
from jaxl2.mnist import refit as _refit_mod
from jaxl2.mnist.config import (
    FIELDS,
    Config,
    ConfigError,
    RunSettings,
    field,
    settings_of,
    validate,
)
from jaxl2.mnist.fused import fused_epochs
from jaxl2.mnist.results import RunSummary
from jaxl2.mnist.rundir import (
    Claim,
    SaveRule,
    check_settings,
    default_out,
    disk_errors,
    has_checkpoint,
    is_disk_error,
    load_config,
    prepare,
    read_metrics,
    run_config,
    write_json,
)
from jaxl2.mnist.runtime import Background
from jaxl2.mnist.train import (
    Interrupted,
    Run,
    Trainer,
    check_interrupt,
    fit,
    load_and_check,
)

__all__ = ["train_and_evaluate", "load_run_config", "read_summary", "mode_of"]


def mode_of(cfg: Config) -> type[Trainer]:
    """The trainer of ``cfg``'s λ mode: :class:`~jaxl2.mnist.hypergrad.AutoTrainer` for ``l2="auto"``,
    :class:`~jaxl2.mnist.marglik.EvidenceTrainer` for ``l2="evidence"``, else
    :class:`~jaxl2.mnist.train.Trainer` (a fixed λ). The run asks the trainer what differs. A
    mode's module is imported when it is chosen: a fixed-λ run loads neither."""
    if cfg.l2_evidence:
        from jaxl2.mnist.marglik import EvidenceTrainer

        return EvidenceTrainer
    if cfg.l2_auto:
        from jaxl2.mnist.hypergrad import AutoTrainer

        return AutoTrainer
    return Trainer


def load_run_config(out: str, name: str = "out") -> Config:
    """The :class:`Config` of the training run in ``out`` (a sweep's directory is refused; a
    sweep member's config: :func:`jaxl2.mnist.evaluate.member_config`). Errors name the
    argument ``name``."""
    d = load_config(out, name)
    if d.get("kind") == "sweep":
        raise ConfigError(f"{field(name)} {out} holds a sweep, not a training run")
    return run_config(d, os.path.join(out, "config.json"))


def _check_resume(cfg: Config, out: str) -> None:
    saved = validate(load_run_config(out))  # lr filled in as in cfg, whoever wrote it
    check_settings(out, "run", {f: getattr(cfg, f) for f in FIELDS}, {f: getattr(saved, f) for f in FIELDS})


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
    after every epoch with its ``metrics.jsonl`` row; the rows are also drawn (``curves.png``)
    and written as TensorBoard events (``out/tensorboard/``) once the run has trained. The summary
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
    before = read_summary(out) if resume else {}
    with claim, disk_errors(out):
        try:
            trainer = mode(cfg, len(ds.need("train").y), mesh=mesh)
            job = Run(cfg, trainer, ds, out, mesh, primary, checkpoint_every, on_epoch, log, fused_epochs)
            ahead = _refit_mod.ahead(job, refit_epochs, before) if refit else None
            summary = fit(job, resume, on_start)
            if before and summary["epochs_trained"] == 0:  # a finished run: its numbers stay
                summary = {k: v for k, v in before.items() if not k.startswith("refit")}
            drawing = Background(functools.partial(_plots, job) if primary else None)
            try:  # the plots are drawn while the refit trains
                if refit:
                    summary = _refit_mod.add_refit(job, summary, before, refit_epochs, on_refit_epoch, ahead)
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
    if runtime.any_process(failed is not None)[0]:
        if failed is not None:
            raise failed
        raise ConfigError(f"process 0 could not prepare {field('out')} {out} (its error says why)")
    return claim


def _plots(job: Run) -> None:
    """``curves.png`` of the run's ``metrics.jsonl`` (and ``lambda.png`` when its rows hold λ per
    layer: ``l2 auto`` or ``l2 evidence``) and its TensorBoard events (``tensorboard/``); drawn
    in a thread while the refit trains."""
    from jaxl2.mnist import tensorboard
    from jaxl2.mnist.plots import curves, lambdas

    rows, cfg = read_metrics(job.metrics), job.cfg
    title = f"{cfg.dataset}, {cfg.optimizer}, λ={cfg.l2}"
    curves(rows, os.path.join(job.out, "curves.png"), title=title)
    lambdas(rows, os.path.join(job.out, "lambda.png"), title=title)  # none without λ columns
    tensorboard.write_run(job.out)


def read_summary(out: str) -> dict[str, Any]:
    """The run's ``summary.json``, or ``{}`` (a run that has not finished)."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
