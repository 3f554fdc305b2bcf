"""A run's directory: claiming it, its JSON files, its metrics and its orbax checkpoints.

::

  DIR/config.json      the Config (and the jaxl2 version)
  DIR/metrics.jsonl    one JSON line per epoch, flushed and fsync-ed after each compiled call
  DIR/checkpoints/     orbax: the latest run state (the resume point)
  DIR/best/            orbax: the params with the best validation accuracy so far
  DIR/refit/           orbax: the refit's latest state (``--refit``: train ∪ validation)
  DIR/curves.png       loss and accuracy against epoch (``lambda.png``: λ per layer)
  DIR/summary.json     what ``jaxl2 train --json`` prints

Files are written to a temporary name and renamed: a reader (or a resume) never sees half a file.
One process at a time trains into a directory (:class:`Claim`); a file that the disk refuses is
one :class:`DiskFull` error that names what was kept.

Example:
  >>> import tempfile, os
  >>> root = tempfile.mkdtemp()
  >>> a, b = default_out(root, "mnist5k"), default_out(root, "mnist5k")
  >>> a != b and os.path.isdir(a) and os.path.isdir(b)
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
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

__all__ = ["write_json", "read_metrics", "rewrite_metrics", "default_out", "prepare", "load_config"]
__all__ += ["run_config", "SaveRule", "StepStore", "Checkpoints", "checkpoint_steps", "has_checkpoint"]
__all__ += ["Claim", "DiskFull", "disk_errors", "is_disk_error", "check_settings"]


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON in ``path``, written to a temporary file and renamed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_metrics(path: str, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    """The complete lines of ``metrics.jsonl`` up to ``upto_epoch`` (a line torn by a kill ends them)."""
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
    rows = read_metrics(path, upto_epoch)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def default_out(root: str, prefix: str) -> str:
    """Creates and returns a new directory ``root/PREFIX-YYYYmmdd-HHMMSS[-N]`` (``os.mkdir`` fails on
    an existing one, so two runs started in the same second get two directories)."""
    base = os.path.join(root, f"{re.sub('[:/]', '_', prefix)}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(root, exist_ok=True)
    path, n = base, 1
    while True:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
            return path
        n += 1
        path = f"{base}-{n}"


# What a run or a sweep writes: all that --overwrite may remove.
RUN_ENTRIES = frozenset(
    {"config.json", "metrics.jsonl", "checkpoints", "best", "curves.png", "lambda.png", "summary.json"}
    | {"refit", "sweep.json", "sweep.csv", "sweep.png", "progress.json", "tensorboard"}
)


@dataclasses.dataclass
class Claim(contextlib.AbstractContextManager):
    """A run directory held by this process: an exclusive ``flock`` on the directory, which the
    kernel releases when the process ends, however it ends (SIGKILL included). ``created``: the
    directory was absent or empty before. ``fd=None``: unheld (processes other than 0)."""

    out: str
    created: bool
    fd: int | None = None

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
        except OSError as e:
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise ConfigError(
                    f"{field('out')} {out} is in use by another jaxl2 process, which holds its lock: let "
                    f"it finish or stop it, then try again (or give another {field('out')})"
                ) from None
            return cls(out, created)  # a file system without locks (some network mounts): unlocked
        return cls(out, created, fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_out(out: str, name: str = "out") -> None:
    if not out:
        raise ConfigError(f"{field(name)} is empty (give a directory path)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{field(name)} {out} is a file, not a directory (give a directory path)")


def prepare(out: str, config_json: dict[str, Any], *, resume: bool, overwrite: bool) -> Claim:
    """Makes ``out`` ready for a run, claims it (:class:`Claim`) and writes its ``config.json``.

    ``resume`` needs a ``config.json`` there. A directory that holds a run needs ``overwrite``,
    which removes that run's files; one that holds anything else is refused (jaxl2 deletes only
    what it wrote).
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
        try:
            if entries and not overwrite:
                raise ConfigError(
                    f"{field('out')} {out} already holds a run (use {field('resume')} to continue it, "
                    f"{field('overwrite')} to replace it, or another {field('out')})"
                )
            for entry in os.scandir(out):  # the run's own files (out stays: its lock is on it)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.remove(entry.path)
            write_json(os.path.join(out, "config.json"), config_json)
        except BaseException:
            claim.release()
            raise
    except OSError as e:
        raise ConfigError(f"{field('out')} {out} cannot be written ({e.strerror or e})") from None
    return claim


def load_config(out: str, name: str = "out") -> dict[str, Any]:
    """The ``config.json`` of the run in ``out`` as a dict (``kind`` tells a run from a sweep);
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
    """The :class:`Config` of a run's ``config.json`` dict; one written in another format is refused
    in one line that names the jaxl2 version that wrote it."""
    try:
        return Config.from_json({k: v for k, v in d.items() if k not in RUN_KEYS})
    except TypeError as e:
        version = d.get("jaxl2_version", "unknown")
        raise ConfigError(f"{path}: not a jaxl2 run config ({e}; written by jaxl2 {version})") from None


def check_settings(out: str, kind: str, now: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuses to resume the ``kind`` ("run" or "sweep") in ``out`` with settings ``now`` other
    than its ``saved`` ones: the error names every field that differs, with both values."""

    def show(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, tuple | list) else str(v)

    differ = [f"{field(f)} {show(now[f])} vs {show(saved[f])}" for f in now if now[f] != saved[f]]
    if differ:
        raise ConfigError(
            f"{field('resume')}: settings differ from {out}/config.json: {'; '.join(differ)} in the "
            f"{kind} (resume with the {kind}'s own settings)"
        )


class DiskFull(Named, OSError):
    """A file of the run in ``out`` could not be written (no space, a quota, a read-only file
    system); the message names the path and what was kept for the resume."""

    out: str | None = None


# errno values of "the disk cannot take it": full, over quota, a file over its size limit, read-only.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _disk_cause(e: BaseException | None) -> OSError | None:
    """The ``OSError`` of :data:`DISK_ERRNOS` that ``e`` is or was raised from, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def is_disk_error(e: BaseException | None) -> bool:
    return isinstance(e, DiskFull) or _disk_cause(e) is not None


@contextlib.contextmanager
def disk_errors(out: str) -> Iterator[None]:
    """A disk error in the block (:func:`is_disk_error`) as one :class:`DiskFull` naming what was kept."""
    try:
        yield
    except BaseException as e:
        cause = None if isinstance(e, DiskFull) else _disk_cause(e)
        if cause is None:
            raise
        steps = checkpoint_steps(out)
        kept = (
            f"the last complete checkpoint ({os.path.join(out, 'checkpoints')}/{steps[-1]}) and config.json"
            if steps
            else "config.json (no checkpoint was complete: the resume starts from the beginning)"
        )
        full = DiskFull(
            f"cannot write {cause.filename or out} ({cause.strerror or cause}); kept in {out}: {kept}"
        )
        full.out = out
        raise full from None


class SaveRule:
    """When the loop checkpoints, besides at the end and on a signal: every ``seconds`` of training
    since the last save (an epoch can take 30 ms, a save 0.1 s), and every ``epochs`` epochs when
    given. Asked once per compiled call for all stores (orbax's policies are per store and step).

    Example:
      >>> rule = SaveRule(epochs=3, seconds=None)
      >>> [e for e in range(1, 10) if rule.due(e)]
      [3, 6, 9]
    """

    def __init__(self, epochs: int | None = None, seconds: float | None = 30):
        if epochs is not None and not (isinstance(epochs, int) and epochs >= 1):
            raise ConfigError(
                f"{field('checkpoint_every')} {epochs} is invalid (an integer >= 1; without it, every 30 s)"
            )
        self.epochs, self.seconds, self.last = epochs, seconds, time.monotonic()

    def due(self, epoch: int) -> bool:
        """Whether to save after ``epoch`` (a question only: :meth:`saved` restarts the clock)."""
        by_time = self.seconds is not None and time.monotonic() - self.last >= self.seconds
        return bool(self.epochs and epoch % self.epochs == 0) or by_time

    def saved(self) -> None:
        self.last = time.monotonic()


def checkpoint_steps(out: str) -> list[int]:
    """The complete (renamed) orbax steps in ``out/checkpoints``, in order."""
    d = os.path.join(out, "checkpoints")
    return sorted(int(name) for name in os.listdir(d) if name.isdigit()) if os.path.isdir(d) else []


def has_checkpoint(out: str) -> bool:
    return bool(checkpoint_steps(out))


def _not_orbax_echo(record: logging.LogRecord) -> bool:
    """False for the traceback that an orbax thread logs for an error it then raises in the caller."""
    return not (record.exc_info and "orbax" in record.pathname.replace("\\", "/"))


def _unraisable(unraisable: Any) -> None:
    """Python's hook less tensorstore's calls into the event loop orbax closed after a failed write."""
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


# tensorstore, orbax's writer, reports a failed write as a ValueError whose text ends with the errno
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


class StepStore:
    """An orbax ``CheckpointManager`` of numbered steps of one pytree, each written to a temporary
    directory and renamed when complete; it keeps the last ``keep`` steps (``None``: all).
    ``background=True``: orbax's async saves (:meth:`save` returns once the arrays are copied;
    :meth:`close` raises the error of the last). A write that the disk refuses is
    an ``OSError`` of its errno and this store's directory (orbax's own echoes of it are dropped).
    """

    def __init__(self, path: str, keep: int | None = 1, *, background: bool = False):
        import orbax.checkpoint as ocp

        self.ocp, self.path = ocp, os.path.abspath(path)
        logging.getLogger("absl").addFilter(_not_orbax_echo)  # added once however often it is called
        sys.unraisablehook = _unraisable
        policy = ocp.checkpoint_managers.LatestN(keep)
        opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=background, preservation_policy=policy)
        self.manager = ocp.CheckpointManager(self.path, options=opts)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
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
        with self._writing():
            self.manager.save(step, args=self.ocp.args.StandardSave(tree), force=True)

    def restore(
        self,
        like: Any,
        step: int | None = None,
        name: str = "resume",
        mismatch: str = "the checkpoint does not fit this model",
    ) -> Any:
        """Step ``step`` (default: the latest) restored into the structure of ``like`` (arrays or
        ``jax.ShapeDtypeStruct``); one that does not fit is an error naming ``name``."""
        abstract = jax.tree_util.tree_map(self.ocp.utils.to_shape_dtype_struct, like)
        try:
            return self.manager.restore(
                self.latest() if step is None else step, args=self.ocp.args.StandardRestore(abstract)
            )
        except (ValueError, KeyError) as e:
            reason = " ".join(str(e).split())  # orbax's tree diffs span lines: one line here
            raise ConfigError(f"{field(name)}: {mismatch} ({reason[:200]})") from None

    def close(self) -> None:
        with self._writing():
            self.manager.close()


class Checkpoints:
    """A run's two stores: ``checkpoints/`` (the latest run state, the best params included) and
    ``best/`` (the best params, what ``jaxl2 eval`` reads). ``best/`` is a store of its own, not
    orbax's ``best_fn`` over the saved steps: the best epoch is rarely a saved one (saves come every
    30 s, a compiled call runs many epochs). With ``background``, the arrays handed to :meth:`save`
    must not change afterwards."""

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
        """``(epoch, run_state)`` of the latest checkpoint, or ``None``; a ``best/`` behind it (a kill
        between the two stores' writes) is brought up to it."""
        step = self.latest.latest()
        if step is None:
            return None
        run = self.latest.restore(like, step)
        self._save_best(int(run["best_epoch"]), run["best_params"])
        return step, run

    def restore_best(self, like: Any) -> Any:
        if self.best.latest() is None:
            raise ConfigError("the run has no best checkpoint (it stopped before its first save)")
        mismatch = "the best checkpoint does not fit the model of its config.json (was config.json edited?)"
        return self.best.restore(like, name="run", mismatch=mismatch)

    def last_good(self) -> str:
        for store in (self.best, self.latest):
            with contextlib.suppress(Exception):  # the message is about the files, whatever a save hit
                store.manager.wait_until_finished()
        steps = checkpoint_steps(self.out)
        if steps:
            return f"The last good checkpoint (epoch {steps[-1]}) is intact."
        return "No checkpoint had been written yet."

    def close(self) -> None:
        try:
            self.best.close()
        finally:
            self.latest.close()
