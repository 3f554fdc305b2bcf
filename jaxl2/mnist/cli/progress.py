"""The one progress reporter of the ``jaxl2`` commands (train, sweep, refit), on stderr.

On a terminal: a rich progress bar per task (the run, each sweep chunk, each refit). Otherwise
(a log file, a pipe): one plain line per epoch. Messages (``say``) never tear a bar's line.
"""

from __future__ import annotations

import sys
from typing import Any

from jaxl2.mnist.cli.report import flag
from jaxl2.mnist.config import render

__all__ = ["Progress", "epoch_info"]


def epoch_info(row: dict[str, Any]) -> str:
    """A ``metrics.jsonl`` row in one line: total loss = data loss + penalty, accuracies."""
    return (
        f"loss {row['train_loss']:.4f} = data {row['train_data_loss']:.4f} + penalty "
        f"{row['train_penalty']:.4f}  acc {100 * row['train_accuracy']:.2f}% "
        f"val {100 * row['val_accuracy']:.2f}%"
    )


class Progress:
    """Epochs of named tasks: :meth:`epoch` ``(task, epoch, epochs, info)`` moves the task's bar
    (created on its first epoch) or writes one line; ``quiet=True`` shows nothing but
    :meth:`say`'s lines. ``first`` names the task whose bar :meth:`start` shows ("compiling…")
    before its first epoch. Use it as a context manager: leaving stops the bars."""

    def __init__(self, quiet: bool = False, first: str | None = None, epochs: int = 0):
        self.quiet, self.first = quiet, (first, epochs)
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}
        self.started = False
        if quiet or not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("{task.description}"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )

    def start(self) -> None:
        """Training starts (input checked): the bar appears, its first task "compiling…"."""
        if self.bar is None or self.started:
            return
        self.started = True
        first, epochs = self.first
        if first is not None:
            self.tasks[first] = self.bar.add_task(first or "epoch", total=epochs, info="compiling…")
        self.bar.start()

    def epoch(self, task: str, epoch: int, epochs: int, info: str = "") -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.say(f"{task + ': ' if task else ''}epoch {epoch}/{epochs}{'  ' + info if info else ''}")
            return
        self.start()
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task or "epoch", total=epochs, info="")
        self.bar.update(self.tasks[task], completed=epoch, info=info)

    def say(self, message: str) -> None:
        """One line on stderr (above the bars on a terminal)."""
        if self.bar is not None and self.started:
            self.bar.console.print(message, markup=False, highlight=False)
        else:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    def log(self, text: str) -> None:
        """A message of the application (:func:`~jaxl2.mnist.config.field` names shown as flags)."""
        self.say(f"jaxl2: {render(text, flag)}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None and self.started:
            self.bar.stop()
        self.bar = None
