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
never sees half a file. One process at a time trains into a directory (:class:`Claim`); a file
that cannot be written (a full disk) is one :class:`DiskFull` error that names what was kept.

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
import errno
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax

from jaxl2.mnist.config import Config, ConfigError, Named, field

__all__ = [
    "write_json",
    "read_metrics",
    "rewrite_metrics",
    "default_out",
    "prepare",
    "load_config",
    "has_checkpoint",
    "checkpoint_steps",
    "Checkpoints",
    "StepStore",
    "Claim",
    "DiskFull",
    "disk_errors",
    "is_disk_error",
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
    rows: list[dict[str, Any]] = []
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
    | {"refit", "sweep.json", "sweep.csv", "sweep.png", "progress.json", "tensorboard"}
)


class Claim:
    """A run directory held by this process: an exclusive ``flock`` on the directory itself, which
    the kernel releases when the process ends, however it ends (SIGKILL included). ``created``:
    the directory was absent or empty before. A context manager; leaving releases the lock.
    An unheld claim (``fd=None``) stands for the processes of a distributed run other than 0."""

    def __init__(self, out: str, created: bool, fd: int | None = None):
        self.out, self.created, self.fd = out, created, fd

    @classmethod
    def take(cls, out: str, created: bool) -> Claim:
        """Locks ``out`` (which exists), or raises :class:`ConfigError` if another process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return cls(out, created)
        fd = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{field('out')} {out} is in use by another jaxl2 process, which holds its lock: let it "
                f"finish or stop it, then try again (or give another {field('out')})"
            ) from None
        except OSError:  # a file system without locks (some network mounts): go on unlocked
            os.close(fd)
            return cls(out, created)
        return cls(out, created, fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
) -> Claim:
    """Makes ``out`` ready for a run, takes it (:class:`Claim`: a directory that another live
    process trains into is refused) and writes its ``config.json``; the claim says whether ``out``
    was absent or empty before (so that a run that fails before its first checkpoint removes it).

    ``resume`` needs a ``config.json`` there (the run's own settings win). A directory that
    holds a run needs ``overwrite``, which removes that run's files; a directory that holds
    anything else is refused, ``overwrite`` or not (jaxl2 deletes only what it wrote).
    """
    _check_out(out)
    if resume:
        if not os.path.exists(os.path.join(out, "config.json")):
            raise ConfigError(
                f"{field('resume')}: {out} holds no jaxl2 run (no config.json); start it without "
                f"{field('resume')}"
            )
        return Claim.take(out, created=False)
    entries = set(os.listdir(out)) if os.path.isdir(out) else set()
    foreign = sorted(e for e in entries if e not in RUN_ENTRIES and not e.endswith(".tmp"))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise ConfigError(
            f"{field('out')} {out} holds files that are not a jaxl2 run's ({shown}); give a new or "
            f"empty directory (jaxl2 never deletes what it did not write)"
        )
    try:
        os.makedirs(out, exist_ok=True)
        claim = Claim.take(out, created=not entries)
    except OSError as e:
        raise ConfigError(f"{field('out')} {out} cannot be written ({e.strerror or e})") from None
    try:
        if entries and not overwrite:
            how = f"use {field('resume')} to continue it, " if resumable else ""
            raise ConfigError(
                f"{field('out')} {out} already holds a run ({how}{field('overwrite')} to replace it, "
                f"or another {field('out')})"
            )
        if entries:
            _replace_run(out)
        write_json(os.path.join(out, "config.json"), config_json)
    except OSError as e:
        claim.release()
        raise ConfigError(f"{field('out')} {out} cannot be written ({e.strerror or e})") from None
    except BaseException:
        claim.release()
        raise
    return claim


# errno values of "the disk cannot take it": full, over quota, a file over its size limit, read-only.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class DiskFull(Named, OSError):
    """A file of a run could not be written (no space, a quota, a read-only file system); the
    message names the path and what was kept; ``out`` is the directory to resume."""

    out: str | None = None


def disk_cause(e: BaseException | None) -> OSError | None:
    """The ``OSError`` of :data:`DISK_ERRNOS` that ``e`` is or was raised from, else ``None``
    (a failed orbax write is one: :class:`StepStore`)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def is_disk_error(e: BaseException | None) -> bool:
    """Whether ``e`` is a :class:`DiskFull` or has a :func:`disk_cause`."""
    return isinstance(e, DiskFull) or disk_cause(e) is not None


def kept(out: str) -> str:
    """What a stopped run in ``out`` can resume from: its last complete checkpoint, or nothing."""
    steps = checkpoint_steps(out)
    if steps:
        return (
            f"the last complete checkpoint ({os.path.join(out, 'checkpoints')}/{steps[-1]}) and config.json"
        )
    return "config.json (no checkpoint was complete: the resume starts from the beginning)"


@contextlib.contextmanager
def disk_errors(out: str) -> Iterator[None]:
    """Turns a disk error in the block (:func:`is_disk_error`) into one :class:`DiskFull` that
    names the path and what was kept in ``out`` (its ``out`` attribute: what to resume)."""
    try:
        yield
    except BaseException as e:
        cause = None if isinstance(e, DiskFull) else disk_cause(e)
        if cause is None:
            raise
        full = DiskFull(
            f"cannot write {cause.filename or out} ({cause.strerror or cause}); kept in {out}: {kept(out)}"
        )
        full.out = out
        raise full from None


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


CHECKPOINT_SECONDS = 30  # the time rule's default: a kill loses at most this much training


def _check_every(epochs: int | None) -> None:
    if epochs is not None and not (isinstance(epochs, int) and epochs >= 1):
        raise ConfigError(
            f"{field('checkpoint_every')} {epochs} is invalid (an integer >= 1; without it, every 30 s)"
        )


class SaveRule:
    """When the training loop (:func:`~jaxl2.mnist.train.call_end`) checkpoints, besides at the
    end and on a signal: every ``seconds`` of training since the last save or the start (an epoch
    here can be 30 ms and a save ~0.1 s, so a rule in epochs alone would cost more than it
    protects), and every ``epochs`` epochs when given. It is decided at the end of a compiled
    call, on every process alike; orbax's own save-decision policies count steps, which a sweep's
    stores number per chunk, so the loop keeps this rule.

    Example:
      >>> rule = SaveRule(epochs=3, seconds=None)
      >>> [e for e in range(1, 10) if rule.due(e)]
      [3, 6, 9]
    """

    def __init__(self, epochs: int | None = None, seconds: float | None = CHECKPOINT_SECONDS):
        _check_every(epochs)
        self.epochs, self.seconds, self.last = epochs, seconds, time.monotonic()

    def due(self, epoch: int) -> bool:
        """Whether to save after ``epoch`` (a question only: :meth:`saved` restarts the clock)."""
        return bool(self.epochs and epoch % self.epochs == 0) or (
            self.seconds is not None and time.monotonic() - self.last >= self.seconds
        )

    def saved(self) -> None:
        """A checkpoint was written (by this rule or another reason): the time rule restarts now."""
        self.last = time.monotonic()


def checkpoint_steps(out: str) -> list[int]:
    """The complete (renamed) orbax steps in ``out/checkpoints``, in order."""
    d = os.path.join(out, "checkpoints")
    return sorted(int(name) for name in os.listdir(d) if name.isdigit()) if os.path.isdir(d) else []


def has_checkpoint(out: str) -> bool:
    """Whether ``out/checkpoints`` holds a complete (renamed) orbax step."""
    return bool(checkpoint_steps(out))


def _raised_by_orbax(record: logging.LogRecord) -> bool:
    """False for the traceback that one of orbax's threads logs for an error that orbax then
    raises in the caller (who reports it: a full disk is one :class:`DiskFull` line)."""
    return not (record.exc_info and "orbax" in record.pathname.replace("\\", "/"))


def _quiet_closed_loop(unraisable: Any) -> None:
    """Python's ``sys.unraisablehook`` less tensorstore's calls into the event loop that orbax
    closed after a failed write (the failure itself reaches the caller)."""
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


# tensorstore, orbax's writer, reports a failed write as a ValueError whose text ends with the errno
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


class StepStore:
    """An orbax ``CheckpointManager`` of numbered steps of one pytree (a run's state or best
    params, a refit's state, a sweep's chunks), each written to a temporary directory and
    renamed when complete (a kill during a write leaves the previous step as the latest); it
    keeps the last ``keep`` steps (``None``: all of them).

    ``background=True``: orbax writes asynchronously (its ``enable_async_checkpointing``):
    :meth:`save` returns once the arrays are copied and the training goes on while orbax
    writes, one save at a time, in order; :meth:`wait` and :meth:`close` wait for the last and
    raise its error.
    A write that the disk refuses is raised as an ``OSError`` that names this store's directory.
    """

    def __init__(self, path: str, keep: int | None = 1, *, background: bool = False):
        import orbax.checkpoint as ocp

        self.ocp, self.path = ocp, os.path.abspath(path)
        logging.getLogger("absl").addFilter(_raised_by_orbax)  # once: a filter is added only once
        sys.unraisablehook = _quiet_closed_loop
        opts = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=background,
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        )
        self.manager = ocp.CheckpointManager(self.path, options=opts)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A disk error of orbax's writer (an ``OSError`` or tensorstore's ``ValueError``) as an
        ``OSError`` of its errno and this store's directory."""
        try:
            yield
        except Exception as e:
            code = _OS_ERROR_CODE.search(str(e))
            number = int(code.group(1)) if code else getattr(e, "errno", None)
            if number not in DISK_ERRNOS:
                raise
            raise OSError(number, os.strerror(number), self.path) from e

    def latest(self) -> int | None:
        """The latest step (with ``background``, the one being written counts), or ``None``."""
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, tree: Any) -> None:
        """Saves ``tree`` as ``step`` (with ``background``, once the previous save is done)."""
        with self._writing():
            self.manager.save(step, args=self.ocp.args.StandardSave(tree), force=True)

    def wait(self) -> None:
        """Waits for the save in flight, if any (its error is raised here)."""
        with self._writing():
            self.manager.wait_until_finished()

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
        with self._writing():
            self.manager.close()


class Checkpoints:
    """A run's two stores (:class:`StepStore`): ``checkpoints/`` (the latest run state, which
    holds the best params too) and ``best/`` (the params with the best validation accuracy,
    what ``jaxl2 eval`` reads). ``best/`` is a store of its own, not orbax's ``BestN`` over the
    saved steps: the best epoch is rarely a saved one (saves come every 30 s; a compiled call
    runs many epochs), and ``best/`` holds that epoch's params.

    ``background=True`` (training): both stores write asynchronously (:class:`StepStore`); the
    arrays handed to :meth:`save` must not change afterwards (the run's are never donated).
    """

    def __init__(self, out: str, background: bool = False):
        self.out = out
        self.latest = StepStore(os.path.join(out, "checkpoints"), background=background)
        self.best = StepStore(os.path.join(out, "best"), background=background)

    def save(self, epoch: int, run_state: dict, best_epoch: int) -> None:
        self._save_best(best_epoch, run_state["best_params"])
        self.latest.save(epoch, run_state)

    def _save_best(self, best_epoch: int, params: Any) -> None:
        if best_epoch > (self.best.latest() or 0):
            self.best.save(best_epoch, params)

    def restore_latest(self, like: dict) -> tuple[int, dict] | None:
        """``(epoch, run_state)`` of the latest checkpoint, or ``None`` when there is none; a
        ``best/`` behind it (a kill between the two stores' writes) is brought up to it."""
        step = self.latest.latest()
        if step is None:
            return None
        run = self.latest.restore(like, step)
        self._save_best(int(run["best_epoch"]), run["best_params"])
        return step, run

    def restore_best(self, like: Any) -> Any:
        step = self.best.latest()
        if step is None:
            raise ConfigError("the run has no best checkpoint (it stopped before its first save)")
        mismatch = "the best checkpoint does not fit the model of its config.json (was config.json edited?)"
        return self.best.restore(like, step, name="run", mismatch=mismatch)

    def last_good(self) -> str:
        for store in (self.best, self.latest):
            with contextlib.suppress(Exception):  # the message is about the files, whatever a save hit
                store.wait()
        steps = checkpoint_steps(self.out)
        if not steps:
            return "No checkpoint had been written yet."
        return f"The last good checkpoint (epoch {steps[-1]}) is intact."

    def close(self) -> None:
        try:
            self.best.close()
        finally:
            self.latest.close()
