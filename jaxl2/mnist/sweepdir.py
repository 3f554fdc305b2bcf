"""A sweep's directory on disk: its config, its progress, its checkpoints and every member's params.

::

  DIR/config.json      the Config, with "kind": "sweep", "l2": [λ, …], "seeds": [s, …]
  DIR/progress.json    the plan (execution, chunk size) and the rows of the finished chunks
  DIR/checkpoints/     orbax: the latest state of the chunk in training (resume point)
  DIR/best/            orbax: one step per finished chunk, its members' best params, stacked
  DIR/refit/seed-S/    orbax: the refit of the selected λ with seed S (``--refit``)
  DIR/sweep.json  sweep.csv  sweep.png      the results, once every chunk is done

Members are ordered seed-major, ``[(λ, s) for s in seeds for λ in l2s]``, and trained in chunks
of ``chunk_size`` consecutive members (one chunk when they all fit). The latest checkpoint's step
numbers the chunk and the epoch together: ``chunk · epochs + epoch``.

Example:
  >>> from jaxl2.mnist.sweepdir import chunk_and_epoch, checkpoint_step
  >>> checkpoint_step(chunk=1, epoch=3, epochs=30), chunk_and_epoch(33, epochs=30)
  (33, (1, 3))
  >>> chunk_and_epoch(30, epochs=30)  # the last epoch of chunk 0
  (0, 30)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxl2.mnist.config import FIELDS, Config, ConfigError, field, validate
from jaxl2.mnist.model import abstract_params
from jaxl2.mnist.rundir import StepStore, check_settings, load_config, run_config, write_json

PROGRESS = "progress.json"


def config_json(
    cfg: Config, l2s: Sequence[float], seeds: Sequence[int], version: str, refit: bool, refit_epochs: str
) -> dict[str, Any]:
    """What a sweep's ``config.json`` holds: the Config, its λ list and its seeds, and the refit
    asked for (what ``--resume`` does unless told otherwise)."""
    return {
        **cfg.to_json(),
        "kind": "sweep",
        "l2": [float(v) for v in l2s],
        "seeds": list(seeds),
        "jaxl2_version": version,
        "refit": refit,
        "refit_epochs": refit_epochs,
    }


def load_sweep_config(out: str, name: str = "out") -> tuple[Config, list[float], list[int]]:
    """``(cfg, l2s, seeds)`` of the sweep in ``out``; ``cfg.l2`` is the first λ of the list."""
    d = load_config(out, name)
    path = os.path.join(out, "config.json")
    if d.get("kind") != "sweep":
        raise ConfigError(f"{field(name)} {out} holds a training run, not a sweep")
    l2s, seeds = d.get("l2"), d.get("seeds")
    if not (isinstance(l2s, list) and l2s and isinstance(seeds, list) and seeds):
        raise ConfigError(f"{path}: a sweep config needs lists 'l2' and 'seeds'")
    cfg = run_config({k: v for k, v in d.items() if k != "seeds"} | {"l2": l2s[0]}, path)
    return cfg, [float(v) for v in l2s], [int(s) for s in seeds]


def check_resume(out: str, cfg: Config, l2s: Sequence[float], seeds: Sequence[int]) -> None:
    """A resumed sweep must have the settings it was started with: the error names every
    field that differs."""

    def settings(cfg: Config, l2s: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
        cfg = validate(cfg)
        return {**{f: getattr(cfg, f) for f in FIELDS if f != "l2"}, "l2": list(l2s), "seeds": list(seeds)}

    saved = settings(*load_sweep_config(out, "out"))
    check_settings(out, "sweep", settings(cfg, l2s, seeds), saved)


def read_progress(out: str) -> dict[str, Any] | None:
    """The plan and the finished chunks' rows, or ``None`` before the plan was written."""
    path = os.path.join(out, PROGRESS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_progress(out: str, progress: dict[str, Any]) -> None:
    write_json(os.path.join(out, PROGRESS), progress)


def checkpoint_step(chunk: int, epoch: int, epochs: int) -> int:
    return chunk * epochs + epoch


def chunk_and_epoch(step: int, epochs: int) -> tuple[int, int]:
    """The inverse of :func:`checkpoint_step` (epochs count from 1)."""
    chunk = (step - 1) // epochs
    return chunk, step - chunk * epochs


def read_summary(out: str, name: str = "run") -> dict[str, Any]:
    """``sweep.json`` of a finished sweep (an error naming ``name`` for one not finished)."""
    path = os.path.join(out, "sweep.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        raise ConfigError(
            f"{field(name)} {out}: the sweep has not finished (no sweep.json); continue it with "
            f"{field('resume')}"
        ) from None


def restore_member(out: str, cfg: Config, chunk_size: int, n_members: int, index: int) -> Any:
    """The best params of member ``index`` (in the sweep's member order) from ``out/best``."""
    chunk, i = divmod(index, chunk_size)
    size = min(chunk_size, n_members - chunk * chunk_size)
    like = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((size, *a.shape), a.dtype), abstract_params(cfg)
    )
    store = StepStore(os.path.join(out, "best"), keep=None)
    try:
        if chunk not in store.steps():
            raise ConfigError(
                f"{field('run')} {out}: chunk {chunk}'s best params are missing from {out}/best"
            )
        mismatch = "the best params do not fit the model of its config.json (was config.json edited?)"
        stacked = store.restore(like, chunk, name="run", mismatch=mismatch)
    finally:
        store.close()
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), stacked)


def refit_dir(out: str, seed: int) -> str:
    """Where the refit of the selected λ with ``seed`` keeps its checkpoints."""
    return os.path.join(out, "refit", f"seed-{seed}")
