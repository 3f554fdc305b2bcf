"""Refit: once validation has chosen the settings, train again on train ∪ validation.

Validation has chosen the recipe (λ too, for a sweep: the selected λ); the refit model is then
trained from the **same init** (the same seed) on the training and validation examples
together, with that recipe:

* epochs ``E``, by one of two rules (:data:`EPOCH_RULES`): ``"all"``, the run's own epoch count
  (the recipe's, chosen on validation when the recipe was), or ``"best"``, the run's best epoch
  by validation accuracy (early stopping, carried over). Each epoch is a shuffled pass over the
  ``N_train + N_val`` examples, the permutation keyed on the state's rng and step as in every
  run, so a resumed refit is bit-identical;
* learning rate: the run's schedule over those ``E·⌊(N_train + N_val)/B⌋`` steps (cosine from
  the peak lr to 0 for the default recipe), so the refit anneals fully, as the run did;
* the model: the last epoch's params (no validation is left to choose another).

The test split is never fed to training; it is evaluated once, at the end. On mnist5k's own
held-out test split (4 split seeds × 3 seeds, ``experiments/refit.py``) the default recipe
scored 95.06% unrefit, 95.31% refit for the best epoch's count and 95.45% refit for all 120
epochs (the best epoch of a 500-image validation split is a noisy argmax over a plateau: 22 to
120): ``"all"`` is the default.

A run's refit follows its training (:func:`add_refit`, its keys added to the run's summary); with
a fixed λ and ``"all"``, it is made ready in the background while the run trains (:func:`ahead`).

Example:
  >>> from jaxl2.mnist.data import load
  >>> from jaxl2.mnist.refit import refit_epochs, train_val
  >>> d = load("mnist5k")
  >>> len(train_val(d).y) == len(d.train.y) + len(d.val.y) == 4000
  True
  >>> refit_epochs("all", best_epoch=98, epochs=120), refit_epochs("best", best_epoch=98, epochs=120)
  (120, 98)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.mnist import parallel, runtime, sigint
from jaxl2.mnist.config import Config, ConfigError, field, validate
from jaxl2.mnist.data import Dataset, Split
from jaxl2.mnist.fused import compile_epochs, epochs_per_call, runner
from jaxl2.mnist.results import Refit
from jaxl2.mnist.rundir import StepStore
from jaxl2.mnist.runtime import Background
from jaxl2.mnist.train import Best, Epoch, Run, Trainer, diverged_message, stop_if_signalled, train_epochs

__all__ = [
    "EPOCH_RULES",
    "refit_epochs",
    "train_val",
    "refit_config",
    "Ready",
    "ready",
    "refit",
    "restore_refit",
    "ahead",
    "add_refit",
]

EPOCH_RULES = ("all", "best")

MISMATCH = "the refit checkpoint does not fit the model of its config.json (was config.json edited?)"


def refit_epochs(rule: str, best_epoch: int, epochs: int) -> int:
    """The refit's epoch count: the run's ``epochs`` (``"all"``) or its ``best_epoch`` (``"best"``)."""
    if rule not in EPOCH_RULES:
        raise ConfigError(f"{field('refit_epochs')} {rule!r} is unknown (allowed: {', '.join(EPOCH_RULES)})")
    return epochs if rule == "all" else best_epoch


def train_val(ds: Dataset) -> Split:
    """The training examples, then the validation examples: what a refit trains on."""
    train, val = ds.need("train"), ds.need("val")
    return Split(np.concatenate([train.x, val.x]), np.concatenate([train.y, val.y]))


def refit_config(cfg: Config, epochs: int) -> Config:
    """``cfg`` over ``epochs`` epochs (its lr schedule spans them)."""
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ConfigError(f"{field('epochs')} {epochs} is invalid for a refit (an integer >= 1)")
    return dataclasses.replace(cfg, epochs=epochs)


def refit(
    cfg: Config,
    ds: Dataset,
    epochs: int,
    out: str,
    *,
    mesh: Any = None,
    checkpoint_every: int | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
    made: Ready | None = None,
) -> Refit:
    """Trains ``cfg`` (its seed) for ``epochs`` epochs on :func:`train_val` of ``ds``, with
    checkpoints in the directory ``out`` (resumed from there when it holds one), and returns
    its :class:`~jaxl2.mnist.results.Refit`: ``refit_epochs``, ``refit_examples``,
    ``refit_test_accuracy``, ... ``made``: this refit made :func:`ready` beforehand (its
    program compiled while the run trained); one of another config is ignored.

    Raises:
      Diverged: a NaN/Inf loss (the last good refit checkpoint is kept).
      Interrupted: SIGINT or SIGTERM; the call of epochs it interrupted was finished and checkpointed.
    """
    rcfg = validate(refit_config(cfg, epochs))  # as the trainer holds it (a Config from Python too)
    if made is None or made.trainer.cfg != rcfg or made.trainer.mesh is not mesh:
        made = ready(cfg, ds, epochs, mesh=mesh, compile=False)
    trainer, x, y, size = made.trainer, made.x, made.y, made.size
    plan = {"epochs": np.asarray(epochs, np.int32), "examples": np.asarray(x.shape[0], np.int32)}
    start, state = _resume_point(out, {"state": made.state, **plan})
    ckpt = StepStore(out)
    seconds = 0.0

    def diverged(epoch, _members, steps):
        msg = diverged_message(rcfg, rcfg.l2, epoch, int(steps[0]), trainer.steps_per_epoch)
        return f"refit on train ∪ validation: {msg}"

    with sigint.deferred(), contextlib.closing(ckpt):
        program, compile_seconds = made.program, made.compile_seconds
        if program is None and start < epochs:
            program, compile_seconds = _compile(trainer, size, state, x, y)
        nothing = Best(None, keep=lambda b, p, better: None)  # no validation, no best epoch to keep

        def on(ep: Epoch) -> None:
            nonlocal seconds
            seconds += ep.seconds
            if on_epoch:
                on_epoch(ep.epoch, epochs)

        state = train_epochs(
            runner(program, size) if program else lambda *_: iter(()),  # no program: no epoch left
            state,
            range(start + 1, epochs + 1),
            nothing,
            diverged=diverged,
            every=checkpoint_every,
            save=lambda epoch, st: ckpt.save(epoch, {"state": st, **plan}),
            on_epoch=on,
            where=lambda epoch: (
                f"during the refit, after its epoch {epoch} of {epochs}; checkpoint saved in {out}"
            ),
        )
    train = runtime.host(trainer.evaluate(state.params, x, y))
    test = runtime.host(trainer.evaluate(state.params, *(runtime.put(a, mesh) for a in ds.need("test"))))
    return {
        "refit_epochs": epochs,
        "refit_examples": int(x.shape[0]),
        "refit_train_accuracy": float(train["accuracy"]),
        "refit_test_accuracy": float(test["accuracy"]),
        "refit_test_data_loss": float(test["data_loss"]),
        "refit_seconds": seconds,
        "refit_compile_seconds": compile_seconds,
    }


@dataclasses.dataclass
class Ready:
    """What a refit needs before its first epoch (:func:`ready`): its trainer, its data on the
    device, its initial state, its epochs per compiled call, and the compiled call with the
    seconds it took (``None`` and 0 when not compiled yet)."""

    trainer: Trainer
    x: Any
    y: Any
    state: Any
    size: int
    program: Callable[[Any, int], Any] | None = None
    compile_seconds: float = 0.0


def ready(cfg: Config, ds: Dataset, epochs: int, *, mesh: Any = None, compile: bool = True) -> Ready:
    """The refit of ``cfg`` over ``epochs`` epochs, made ready to train: with ``compile``, its
    program compiled and its final evaluations (train ∪ validation, test) too, so that
    :func:`refit` (``made=``) starts at once. Thread-safe: ``jaxl2 train`` makes its refit
    ready in the background while the run trains, when the refit's config and epoch count are
    known from the start."""
    trainer = Trainer(refit_config(cfg, epochs), len(ds.need("train").y) + len(ds.need("val").y), mesh=mesh)
    x, y = (runtime.put(a, mesh) for a in train_val(ds))
    made = Ready(trainer, x, y, runtime.replicate(trainer.init(), mesh), epochs_per_call(x.shape[0]))
    if compile:
        made.program, made.compile_seconds = _compile(trainer, made.size, made.state, x, y)
        for xs, ys in ((x, y), tuple(runtime.put(a, mesh) for a in ds.need("test"))):
            jax.block_until_ready(trainer.evaluate(made.state.params, xs, ys))
    return made


def _compile(trainer: Trainer, size: int, state: Any, x: Any, y: Any) -> tuple[Any, float]:
    """The refit's compiled call of ``size`` epochs, and the seconds it took to compile."""
    t0 = time.perf_counter()
    program = compile_epochs(lambda st, x, y: trainer.epoch_fn(st, x, y), _no_validation, size, state, x, y)
    return program, time.perf_counter() - t0


def _no_validation(params: Any, *data: Any) -> dict[str, jax.Array]:
    """The refit has no validation split: the run loop's validation slot gets zeros."""
    zero = jnp.zeros((), jnp.float32)
    return {"accuracy": zero, "data_loss": zero}


def _resume_point(out: str, like: dict[str, Any]) -> tuple[int, Any]:
    """``(epoch, state)`` of the refit checkpointed in ``out``, or ``(0, like["state"])`` when there
    is none, or when it is another refit (another epoch count or data size: a run resumed with
    another refit rule), which is then removed: its checkpoints would not continue this one."""
    ckpt = StepStore(out)
    try:
        step = ckpt.latest()
        saved = None if step is None else ckpt.restore(like)
    finally:
        ckpt.close()
    if step is None or saved is None:  # none, or killed before its first checkpoint: from the start
        return 0, like["state"]
    if all(int(saved[k]) == int(like[k]) for k in ("epochs", "examples")):
        return step, saved["state"]
    parallel.barrier("jaxl2-refit-read")  # every process has read it; one removes it; none
    if jax.process_index() == 0:  # starts the new refit before it is gone
        shutil.rmtree(out)
    parallel.barrier("jaxl2-refit-reset")
    return 0, like["state"]


def restore_refit(out: str, cfg: Config, epochs: int, num_examples: int) -> Any:
    """The params of the finished refit in ``out`` (``epochs`` epochs over ``num_examples``)."""
    trainer = Trainer(refit_config(cfg, epochs), num_examples)
    like = {"state": jax.eval_shape(trainer.init), "epochs": np.asarray(0, np.int32)}
    like["examples"] = like["epochs"]
    ckpt = StepStore(out)
    try:
        if ckpt.latest() != epochs:
            raise ConfigError(f"{field('run')}: {os.path.dirname(out)} has no finished refit (in {out})")
        return ckpt.restore(like, name="run", mismatch=MISMATCH)["state"].params
    finally:
        ckpt.close()


def ahead(job: Run, rule: str, before: dict[str, Any]) -> Background | None:
    """What follows a run's training, compiled in the background while the run trains: its
    refit made :func:`ready`, then the summary's evaluations of the training and validation
    splits (the same executables as the best params' summary). Only when the refit's config
    and epoch count are known before training (a fixed λ and ``rule="all"``), it is not done
    yet (``before``: the summary a resumed run had written), and the run has one process (a
    background execution could interleave with the other processes' collectives)."""
    cfg = job.trainer.refit_config(None)
    if rule != "all" or cfg is None or before.get("refit_epoch_rule") == rule or jax.process_count() > 1:
        return None

    def make() -> Ready:
        assert cfg is not None
        made = ready(cfg, job.ds, cfg.epochs, mesh=job.mesh)
        for split in (job.ds.need("train"), job.ds.need("val")):
            jax.block_until_ready(made.trainer.evaluate(made.state.params, split.x, split.y))
        return made

    return Background(make)


def add_refit(
    job: Run,
    summary: dict[str, Any],
    before: dict[str, Any],
    rule: str,
    on_epoch: Callable[[int, int], None] | None,
    made: Background | None,
) -> dict[str, Any]:
    """The trained run's ``summary`` with its refit's keys: those of ``before`` (the summary a
    resumed run had written) when its refit by ``rule`` is done, else from the refit, trained
    now (made ready by ``made``, :func:`ahead`, when it ran)."""
    if before.get("refit_epoch_rule") == rule:
        return {**summary, **{k: v for k, v in before.items() if k.startswith("refit")}}
    out = job.out
    epochs = refit_epochs(rule, summary["best_epoch"], job.cfg.epochs)
    stop_if_signalled(f"after training, before the refit; checkpoint saved in {out}", out)
    cfg = job.trainer.refit_config(summary)
    assert cfg is not None  # a λ mode with no refit turned it off before training
    fit = refit(
        cfg,
        job.ds,
        epochs,
        os.path.join(out, "refit"),
        mesh=job.mesh,
        checkpoint_every=job.checkpoint_every,
        on_epoch=on_epoch,
        made=made.result() if made else None,
    )
    return {**summary, **fit, "refit_epoch_rule": rule}
