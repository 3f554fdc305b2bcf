"""``jaxl2 eval``'s work: a finished run's model, or a sweep member's, on one split
(:func:`evaluate_run`). A feature beside the training loop: it reads a run directory."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from jaxl2.mnist import data as _data
from jaxl2.mnist import refit as _refit
from jaxl2.mnist import sweepdir
from jaxl2.mnist.config import SPLITS, Config, ConfigError, field
from jaxl2.mnist.model import abstract_params
from jaxl2.mnist.run import read_summary
from jaxl2.mnist.rundir import Checkpoints, load_config, run_config
from jaxl2.mnist.sweep import pick_member
from jaxl2.mnist.train import Trainer

__all__ = ["evaluate_run", "member_config"]


def member_config(out: str, name: str = "out", *, l2: float | None = None, seed: int | None = None) -> Config:
    """The :class:`Config` of the run in ``out``; for a finished sweep, that of one member (what
    ``jaxl2 train --l2 λ --seed s`` would train): ``l2`` and ``seed`` pick it, by default the
    member that ``jaxl2 eval`` evaluates (:func:`jaxl2.mnist.sweep.pick_member`). Errors name
    the argument ``name``."""
    return _config_and_member(out, name, l2, seed)[0]


def _config_and_member(out: str, name: str, l2, seed) -> tuple[Config, tuple[dict, int] | None]:
    """:func:`member_config`, and for a sweep its summary and the member's row index (``None``
    for a run): config.json and summary.json read once."""
    d = load_config(out, name)
    if d.get("kind") != "sweep":
        if l2 is not None or seed is not None:
            raise ConfigError(
                f"{field('l2')} and {field('seed')} pick a member of a sweep; {out} is a training run"
            )
        return run_config(d, os.path.join(out, "config.json")), None
    cfg, _, _ = sweepdir.load_sweep_config(out, name)
    summary = sweepdir.read_summary(out, name)
    i = pick_member(summary["results"], summary["selected_l2"], l2, seed)
    row = summary["results"][i]
    return dataclasses.replace(cfg, l2=row["l2"], seed=row["seed"]), (summary, i)


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
    cfg, member = _config_and_member(out, "run", l2, seed)
    params, which = _model(out, cfg, member, refit)
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


def _model(
    out: str, cfg: Config, member: tuple[dict, int] | None, refit: bool | None
) -> tuple[Any, dict[str, Any]]:
    """The params that :func:`evaluate_run` evaluates, and what they are: the run's (or the
    sweep member's, ``member``: the sweep's summary and the member's row) refit or best params."""
    sweep = member is not None
    if member is not None:  # only the selected λ is refit
        summary, i = member
        fit: Any = summary.get("refit")
        has_refit = fit is not None and fit["l2"] == cfg.l2
        which = {"l2": cfg.l2, "seed": cfg.seed}
        how = "sweep it with"
    else:
        summary, fit = read_summary(out), None
        has_refit = "refit_epochs" in summary
        which, how = {}, "train it with"
    refit = has_refit if refit is None else refit
    if refit and not has_refit:
        why = f"{how} {field('refit')}, or add one: {field('resume')} {field('refit')}"
        if sweep and fit is not None:
            why = f"for {field('l2')} {cfg.l2:g}: only the selected λ {fit['l2']:g} was refit"
        raise ConfigError(f"{field('refit')}: {out} has no refit model ({why})")
    which = {"model": "refit" if refit else "best", **which}
    if sweep:
        if not refit:
            return sweepdir.restore_member(out, cfg, summary["chunk_size"], len(summary["results"]), i), which
        m = next(m for m in fit["members"] if m["seed"] == cfg.seed)
        path = sweepdir.refit_dir(out, cfg.seed)
        return _refit.restore_refit(path, cfg, m["refit_epochs"], m["refit_examples"]), which
    if refit:
        path = os.path.join(out, "refit")
        return _refit.restore_refit(path, cfg, summary["refit_epochs"], summary["refit_examples"]), which
    return _best(out, cfg), which


def _best(out: str, cfg: Config) -> Any:
    """The run's best params by validation accuracy (``out/best``), checked against its model."""
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
    return params
