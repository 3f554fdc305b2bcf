"""TensorBoard event files beside ``metrics.jsonl``, so that ``tensorboard --logdir runs/`` shows
every run and every sweep member side by side. A feature beside the core:
:func:`~jaxl2.mnist.run.train_and_evaluate` calls :func:`write_run` once the run has trained, a
sweep writes :class:`MemberEvents` as it trains; the core never imports it.

::

  RUN/tensorboard/                    the run's metrics.jsonl: each row's numbers at step = its epoch
  SWEEP/tensorboard/l2=λ,seed=S/      a member's epochs, the same names, λ and seed as hyperparameters

Every event file starts with a session start at the step it writes first (what ``purge_step``
does): a TensorBoard drops the points it had from that step on, so a resume never shows an epoch
twice. :func:`write_run` writes its directory anew from what the run has on disk (a resumed run's
``metrics.jsonl`` holds each epoch once); a sweep's chunk, resumed after epoch ``e``, adds a file
starting at ``e + 1``. The events are written in the caller's thread (tensorboardX's
``EventsWriter``, not its ``SummaryWriter``'s background thread), so a full disk is the command's
one-line error, exit 74, like any other file of the run.

Example:
  >>> import json, tempfile
  >>> out = tempfile.mkdtemp()
  >>> with open(f"{out}/metrics.jsonl", "w") as f:
  ...     _ = f.write(json.dumps({"epoch": 1, "step": 31, "train_loss": 0.5, "val_accuracy": 0.9}) + "\\n")
  >>> os.listdir(write_run(out))[0].startswith("events.out.tfevents")
  True
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import hparams, scalar

from jaxl2.mnist.rundir import disk_errors, read_metrics

DIRNAME = "tensorboard"
HPARAM_METRICS = ("val_accuracy", "train_accuracy", "train_loss")  # the HParams tab's columns


def scalars(row: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numbers of a row as TensorBoard tags: nested mappings joined with ``/``
    (``kernel_sq_norm/params/Dense_0/kernel``); ``None`` (no value yet) left out.

    Example:
      >>> dict(scalars({"val_accuracy": 0.9, "kernel_sq_norm": {"params/Dense_0/kernel": 12.5}, "log_evidence": None}))
      {'val_accuracy': 0.9, 'kernel_sq_norm/params/Dense_0/kernel': 12.5}
    """
    for key, value in row.items():
        if isinstance(value, Mapping):
            yield from scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


def _writer(logdir: str, start: int, suffix: str = "") -> EventsWriter:
    """A new event file in ``logdir`` that starts with a session start at step ``start`` (a
    TensorBoard that showed the directory drops its points from ``start`` on)."""
    os.makedirs(logdir, exist_ok=True)
    writer = EventsWriter(os.path.join(logdir, "events"), suffix)
    writer.write_event(
        Event(step=start, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START))
    )
    return writer


def _write(writer: EventsWriter, step: int, summary: Summary) -> None:
    writer.write_event(Event(step=step, wall_time=time.time(), summary=summary))


def _write_row(writer: EventsWriter, step: int, row: Mapping[str, Any]) -> None:
    """One event at ``step`` with the :func:`scalars` of ``row``."""
    _write(writer, step, Summary(value=[v for tag, value in scalars(row) for v in scalar(tag, value).value]))


def write_run(out: str) -> str:
    """``out/tensorboard/`` from ``out/metrics.jsonl``, made anew: every number of each epoch's row
    (the epoch itself and its step count aside) at step = the epoch. Returns the event directory."""
    logdir = os.path.join(out, DIRNAME)
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    with disk_errors(out):
        shutil.rmtree(logdir, ignore_errors=True)
        writer = _writer(logdir, 1)
        for row in rows:
            _write_row(writer, row["epoch"], {k: v for k, v in row.items() if k not in ("epoch", "step")})
        writer.close()
    return logdir


class MemberEvents(contextlib.AbstractContextManager):
    """The event files of a sweep's chunk of ``members`` (``(λ, seed)`` pairs), one TensorBoard run
    per member in ``out/tensorboard/l2=λ,seed=S/``, from epoch ``start + 1`` on: :meth:`write` adds
    an epoch's row for every member, with the names of a run's ``metrics.jsonl`` (``train_loss``,
    ``val_accuracy``, ``epoch_seconds``, ...). A context manager: leaving it closes the files."""

    def __init__(self, out: str, members: Iterable[tuple[float, int]], start: int):
        self.writers = []
        for lam, seed in members:
            writer = _writer(
                os.path.join(out, DIRNAME, f"l2={lam:g},seed={seed}"), start + 1, f".{start + 1:06d}"
            )
            for summary in hparams({"l2": lam, "seed": seed}, dict.fromkeys(HPARAM_METRICS)):
                _write(writer, start + 1, summary)
            self.writers.append(writer)

    def write(self, ep: Any) -> None:
        """The rows of :class:`~jaxl2.mnist.train.Epoch` ``ep`` (its metrics ``[K]``, one per
        member), on disk at the end of each compiled call (``ep.state`` on hand)."""
        for i, writer in enumerate(self.writers):
            train = {f"train_{k}": float(v[i]) for k, v in ep.train.items()}
            val = {f"val_{k}": float(v[i]) for k, v in ep.val.items()}
            _write_row(writer, ep.epoch, {**train, **val, "epoch_seconds": ep.seconds})
            if ep.state is not None:
                writer.flush()

    def __exit__(self, *exc: object) -> None:
        for writer in self.writers:
            writer.close()
