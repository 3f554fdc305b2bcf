"""TensorBoard event files beside ``metrics.jsonl``, so that ``tensorboard --logdir runs/`` shows
every run and every sweep member side by side. A feature beside the core: the ``train`` and
``sweep`` commands call it after each run; the core never imports it.

::

  RUN/tensorboard/                    the run's metrics.jsonl: each row's numbers at step = its epoch
  SWEEP/tensorboard/l2=λ,seed=S/      a member's results, with λ and seed as hyperparameters

Each call writes the directory anew from what the run has on disk (a resumed run's
``metrics.jsonl`` holds each epoch once), and its first event tells a TensorBoard that is already
showing the run to drop the points it had (a session start at step 1, as ``purge_step=1`` does):
a resume never shows an epoch twice. The events are written in the caller's thread (tensorboardX's
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


def _write(logdir: str, summaries: Iterable[tuple[int, Summary]]) -> None:
    """One event file in ``logdir``, made anew: a session start at step 1 (a TensorBoard that
    showed the directory drops what it had), then each ``(step, summary)``."""
    shutil.rmtree(logdir, ignore_errors=True)
    os.makedirs(logdir)
    writer = EventsWriter(os.path.join(logdir, "events"))
    writer.write_event(Event(step=1, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
    for step, summary in summaries:
        writer.write_event(Event(step=step, wall_time=time.time(), summary=summary))
    writer.close()


def write_run(out: str) -> str:
    """``out/tensorboard/`` from ``out/metrics.jsonl``: every number of each epoch's row (the epoch
    itself and its step count aside) at step = the epoch. Returns the event directory."""
    logdir = os.path.join(out, DIRNAME)
    summaries = [
        (row["epoch"], scalar(tag, value))
        for row in read_metrics(os.path.join(out, "metrics.jsonl"))
        for tag, value in scalars({k: v for k, v in row.items() if k not in ("epoch", "step")})
    ]
    with disk_errors(out):
        _write(logdir, summaries)
    return logdir


def write_sweep(out: str, results: list[Any]) -> str:
    """``out/tensorboard/l2=λ,seed=S/`` for each member of a sweep's ``results``: its numbers as
    metrics of the hyperparameters λ and seed (TensorBoard's HParams tab), at step = its best epoch.
    Returns the event directory."""
    logdir = os.path.join(out, DIRNAME)
    with disk_errors(out):
        shutil.rmtree(logdir, ignore_errors=True)
        for r in results:
            metrics = dict(scalars({k: v for k, v in r.items() if k not in ("l2", "seed")}))
            hp = hparams({"l2": r["l2"], "seed": r["seed"]}, metrics)
            summaries = [*hp, *(scalar(tag, value) for tag, value in metrics.items())]
            _write(
                os.path.join(logdir, f"l2={r['l2']:g},seed={r['seed']}"),
                [(r["best_epoch"], s) for s in summaries],
            )
    return logdir
