"""A run's directory on disk: claiming it, its JSON files, its metrics and its checkpoints.

::

  DIR/config.json      the Config (and the jaxl2 version)
  DIR/metrics.jsonl    one JSON line per epoch, flushed and fsync-ed as it is written
  DIR/checkpoints/     orbax: the latest state (resume point)
  DIR/best/            orbax: the params with the best validation accuracy so far
  DIR/curves.png       loss and accuracy against epoch
  DIR/lambda.png       with l2 auto: each layer's λ against epoch
  DIR/summary.json     what ``jaxl2 train --json`` prints

Every file is written to a temporary name and renamed, so a reader (or a resumed run)
never sees half a file.

Example:
  >>> import tempfile, os
  >>> from jaxl2.mnist.rundir import default_out
  >>> root = tempfile.mkdtemp()
  >>> a, b = default_out(root, "mnist5k"), default_out(root, "mnist5k")
  >>> a != b and os.path.isdir(a) and os.path.isdir(b)
  True
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax

from jaxl2.mnist.config import Config, ConfigError, field

__all__ = [
    "write_json",
    "read_metrics",
    "rewrite_metrics",
    "default_out",
    "prepare",
    "load_config",
    "has_checkpoint",
    "Checkpoints",
]


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON in ``path``, written to a temporary file and renamed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_metrics(path: str, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """The complete lines of ``metrics.jsonl`` (a torn last line is dropped), up to an epoch."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn by a kill mid-write
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if upto_epoch is not None and row["epoch"] > upto_epoch:
                break
            rows.append(row)
    return rows


def rewrite_metrics(path: str, upto_epoch: int) -> None:
    """Keeps the rows up to ``upto_epoch`` (a resumed run continues after its checkpoint)."""
    rows = read_metrics(path, upto_epoch=upto_epoch)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def default_out(root: str, prefix: str) -> str:
    """Creates and returns a new directory ``root/PREFIX-YYYYmmdd-HHMMSS[-N]``.

    ``os.mkdir`` either creates the directory or fails, so two runs started in the same
    second get different directories (the second one takes the next ``-N``).
    """
    base = os.path.join(
        root, f"{prefix.replace(':', '_').replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    os.makedirs(root, exist_ok=True)
    for n in range(1, 10_000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"{field('out')}: could not create a new directory under {root}")  # pragma: no cover


# What a run or a sweep writes: all that --overwrite may remove.
RUN_ENTRIES = frozenset(
    {"config.json", "metrics.jsonl", "checkpoints", "best", "curves.png", "lambda.png", "summary.json"}
    | {"sweep.json", "sweep.csv", "sweep.png"}
)


def _check_out(out: str, name: str = "out") -> None:
    if not out:
        raise ConfigError(f"{field(name)} is empty (give a directory path)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{field(name)} {out} is a file, not a directory (give a directory path)")


def _replace_run(out: str) -> None:
    """Removes what a run wrote in ``out``, and nothing else (``out`` itself stays)."""
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def prepare(
    out: str, config_json: dict[str, Any], *, resume: bool, overwrite: bool, resumable: bool = True
) -> bool:
    """Makes ``out`` ready for a run and writes its ``config.json``; returns whether ``out`` was
    absent or empty before (so that a run that fails before its first checkpoint removes it).

    ``resume`` needs a ``config.json`` there (the run's own settings win). A directory that
    holds a run needs ``overwrite``, which removes that run's files; a directory that holds
    anything else is refused, ``overwrite`` or not (jaxl2 deletes only what it wrote).
    """
    _check_out(out)
    cfg_path = os.path.join(out, "config.json")
    if resume:
        if not os.path.exists(cfg_path):
            raise ConfigError(
                f"{field('resume')}: {out} holds no jaxl2 run (no config.json); start it without "
                f"{field('resume')}"
            )
        return False
    entries = set(os.listdir(out)) if os.path.isdir(out) else set()
    if entries:
        foreign = sorted(e for e in entries if e not in RUN_ENTRIES and not e.endswith(".tmp"))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
            raise ConfigError(
                f"{field('out')} {out} holds files that are not a jaxl2 run's ({shown}); give a new or "
                f"empty directory (jaxl2 never deletes what it did not write)"
            )
        if not overwrite:
            how = f"use {field('resume')} to continue it, " if resumable else ""
            raise ConfigError(
                f"{field('out')} {out} already holds a run ({how}{field('overwrite')} to replace it, "
                f"or another {field('out')})"
            )
        _replace_run(out)
    try:
        os.makedirs(out, exist_ok=True)
        write_json(cfg_path, config_json)
    except OSError as e:
        raise ConfigError(f"{field('out')} {out} cannot be written ({e.strerror or e})") from None
    return True


def load_config(out: str, name: str = "out") -> dict[str, Any]:
    """The ``config.json`` of the run in ``out``, as a dict (``kind`` tells a run from a sweep);
    errors name the argument ``name`` (``out``, or ``run`` for an evaluation)."""
    _check_out(out, name)
    path = os.path.join(out, "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{path}: cannot read the run's config ({getattr(e, 'strerror', None) or e}); "
            f"is {out} a jaxl2 run directory?"
        ) from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: not a jaxl2 run config")
    return d


def run_config(d: dict[str, Any], path: str) -> Config:
    """The :class:`Config` of a run's ``config.json`` dict."""
    d = {k: v for k, v in d.items() if k not in ("jaxl2_version", "kind")}
    try:
        return Config.from_json(d)
    except TypeError as e:
        raise ConfigError(f"{path}: not a jaxl2 run config ({e})") from None


def has_checkpoint(out: str) -> bool:
    """Whether ``out/checkpoints`` holds a complete (renamed) orbax step."""
    d = os.path.join(out, "checkpoints")
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


class Checkpoints:
    """Two orbax managers: ``checkpoints/`` (latest run state) and ``best/`` (params)."""

    def __init__(self, out: str):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        opts = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
        self.latest = ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints")), options=opts)
        self.best = ocp.CheckpointManager(os.path.abspath(os.path.join(out, "best")), options=opts)

    def save(self, epoch: int, run_state: dict, best_epoch: int) -> None:
        if best_epoch > 0 and self.best.latest_step() != best_epoch:
            self.best.save(best_epoch, args=self.ocp.args.StandardSave(run_state["best_params"]))
        self.latest.save(epoch, args=self.ocp.args.StandardSave(run_state), force=True)

    def restore_latest(self, like: dict) -> tuple[int, dict] | None:
        """``(epoch, run_state)`` of the latest checkpoint, or ``None`` when there is none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(self.ocp.utils.to_shape_dtype_struct, like)
        try:
            return step, self.latest.restore(step, args=self.ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError) as e:
            raise ConfigError(
                f"{field('resume')}: the checkpoint does not fit this model ({str(e)[:200]})"
            ) from None

    def restore_best(self, like: Any) -> Any:
        step = self.best.latest_step()
        if step is None:
            raise ConfigError("the run has no best checkpoint (it stopped before its first save)")
        abstract = jax.tree_util.tree_map(self.ocp.utils.to_shape_dtype_struct, like)
        return self.best.restore(step, args=self.ocp.args.StandardRestore(abstract))

    def last_good(self) -> str:
        step = self.latest.latest_step()
        if step is None:
            return "No checkpoint had been written yet."
        return f"The last good checkpoint (epoch {step}) is intact."

    def close(self) -> None:
        self.latest.close()
        self.best.close()
