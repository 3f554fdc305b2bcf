"""A run's directory on disk: claiming it, its JSON files, its metrics and its checkpoints.

::

  DIR/config.json      the Config (and the jaxl2 version)
  DIR/metrics.jsonl    one JSON line per epoch, flushed and fsync-ed after each compiled call
  DIR/checkpoints/     orbax: the latest state (resume point)
  DIR/best/            orbax: the params with the best validation accuracy so far
  DIR/refit/           orbax: the refit's latest state (``--refit``: train ∪ validation)
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

import contextlib
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
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
    "StepStore",
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
    | {"refit", "sweep.json", "sweep.csv", "sweep.png", "progress.json"}
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


# What config.json holds beside the Config's fields: the version, a sweep's kind, the refit asked for.
RUN_KEYS = ("jaxl2_version", "kind", "refit", "refit_epochs")


def run_config(d: dict[str, Any], path: str) -> Config:
    """The :class:`Config` of a run's ``config.json`` dict."""
    d = {k: v for k, v in d.items() if k not in RUN_KEYS}
    try:
        return Config.from_json(d)
    except TypeError as e:
        raise ConfigError(f"{path}: not a jaxl2 run config ({e})") from None


CHECKPOINT_SECONDS = 30.0  # the time rule's default: a kill loses at most this much training


class SaveRule:
    """When a training loop checkpoints, besides at the end and on Ctrl-C: once ``seconds``
    have passed since the last save (the default rule: an epoch here can be 30 ms and an orbax
    save ~0.1 s, so a rule in epochs would cost more than it protects), and every ``epochs``
    epochs when given. Where the loop stops does not change what a resume computes.

    Example:
      >>> rule = SaveRule(epochs=3, seconds=None)
      >>> [e for e in range(1, 10) if rule.due(e)]
      [3, 6, 9]
    """

    def __init__(self, epochs: int | None = None, seconds: float | None = CHECKPOINT_SECONDS):
        if epochs is not None and not (isinstance(epochs, int) and epochs >= 1):
            raise ConfigError(
                f"{field('checkpoint_every')} {epochs} is invalid (an integer >= 1; without it, every 30 s)"
            )
        self.epochs, self.seconds, self.last = epochs, seconds, time.monotonic()

    def due(self, epoch: int) -> bool:
        """Whether to save after ``epoch`` (a question only: :meth:`saved` restarts the clock)."""
        return bool(self.epochs and epoch % self.epochs == 0) or (
            self.seconds is not None and time.monotonic() - self.last >= self.seconds
        )

    def saved(self) -> None:
        """A checkpoint was written (by this rule or another reason): the time rule restarts now."""
        self.last = time.monotonic()


def has_checkpoint(out: str) -> bool:
    """Whether ``out/checkpoints`` holds a complete (renamed) orbax step."""
    d = os.path.join(out, "checkpoints")
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


class StepStore:
    """An orbax manager of numbered steps of one pytree (a run's state or best params, a refit's
    state, a sweep's chunks), each written to a temporary directory and renamed when complete;
    it keeps the last ``keep`` steps (``None``: all of them)."""

    def __init__(self, path: str, keep: int | None = 1):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(os.path.abspath(path), options=opts)

    def latest(self) -> int | None:
        """The latest complete step, or ``None``."""
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, tree: Any) -> None:
        self.manager.save(step, args=self.ocp.args.StandardSave(tree), force=True)

    def restore(
        self,
        like: Any,
        step: int | None = None,
        name: str = "resume",
        mismatch: str = "the checkpoint does not fit this model",
    ) -> Any:
        """Step ``step`` (default: the latest) restored into the structure of ``like`` (arrays or
        ``jax.ShapeDtypeStruct``); a step that does not fit is an error naming ``name``."""
        step = self.latest() if step is None else step
        abstract = jax.tree_util.tree_map(self.ocp.utils.to_shape_dtype_struct, like)
        try:
            return self.manager.restore(step, args=self.ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError) as e:
            reason = " ".join(str(e).split())  # orbax's tree diffs span lines: one line here
            raise ConfigError(f"{field(name)}: {mismatch} ({reason[:200]})") from None

    def close(self) -> None:
        self.manager.close()


class Checkpoints:
    """A run's two stores (:class:`StepStore`): ``checkpoints/`` (the latest run state) and
    ``best/`` (the params with the best validation accuracy).

    ``background=True`` (training) writes in a thread: :meth:`save` returns at once, the
    training goes on while orbax writes (a save is ~0.1 s here, nearly all of it waiting on the
    file system), one save at a time, in order; :meth:`close` waits for the last and raises its
    error, if any. Orbax writes each step to a temporary directory and renames it when
    complete, so a kill during a write leaves the previous checkpoint as the latest. The
    arrays handed to :meth:`save` must not change afterwards (the run's are never donated).
    """

    def __init__(self, out: str, background: bool = False):
        self.latest = StepStore(os.path.join(out, "checkpoints"))
        self.best = StepStore(os.path.join(out, "best"))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="jaxl2-checkpoint") if background else None
        self._pending: Future | None = None

    def save(self, epoch: int, run_state: dict, best_epoch: int) -> None:
        if self._pool is None:
            self._save(epoch, run_state, best_epoch)
            return
        self.wait()
        self._pending = self._pool.submit(self._save, epoch, run_state, best_epoch)

    def _save(self, epoch: int, run_state: dict, best_epoch: int) -> None:
        if best_epoch > 0 and self.best.latest() != best_epoch:
            self.best.save(best_epoch, run_state["best_params"])
        self.latest.save(epoch, run_state)

    def wait(self) -> None:
        """Waits for the save in flight, if any (its error is raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def restore_latest(self, like: dict) -> tuple[int, dict] | None:
        """``(epoch, run_state)`` of the latest checkpoint, or ``None`` when there is none."""
        step = self.latest.latest()
        return None if step is None else (step, self.latest.restore(like, step))

    def restore_best(self, like: Any) -> Any:
        step = self.best.latest()
        if step is None:
            raise ConfigError("the run has no best checkpoint (it stopped before its first save)")
        mismatch = "the best checkpoint does not fit the model of its config.json (was config.json edited?)"
        return self.best.restore(like, step, name="run", mismatch=mismatch)

    def last_good(self) -> str:
        with contextlib.suppress(Exception):  # the message is about the files, whatever the thread hit
            self.wait()
        step = self.latest.latest()
        if step is None:
            return "No checkpoint had been written yet."
        return f"The last good checkpoint (epoch {step}) is intact."

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
            self.latest.close()
            self.best.close()
