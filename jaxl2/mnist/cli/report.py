"""What the ``jaxl2`` commands print: one-line errors, warnings, summaries, the sweep's table, and
the one progress reporter on stderr (:class:`Progress`: on a terminal a rich bar per task, the
run, each sweep chunk, each refit; otherwise one plain line per epoch)."""

from __future__ import annotations

import sys
from typing import Any

from jaxl2.mnist.config import AUTO, EVIDENCE, SPLITS, Config, render
from jaxl2.mnist.results import MeanStd, PerL2, RunSummary, SweepRefit

__all__ = [
    "fail",
    "message",
    "flag",
    "warn_if_chance",
    "format_summary",
    "format_per_l2",
    "format_refit",
    "Progress",
    "epoch_info",
]

EPOCH_RULE_WORDS = {"all": "all the run's", "best": "the best epoch's count"}


def flag(name: str) -> str:
    """The command-line flag of a config field or argument: ``split_seed`` → ``--split-seed``."""
    return "--" + name.replace("_", "-")


def message(e: BaseException) -> str:
    """An error's message with config fields shown as flags."""
    render = getattr(e, "render", None)
    return render(flag) if render else str(e)


def fail(text: str, code: int = 2) -> int:
    """``jaxl2: error: TEXT`` on stderr; returns the exit status (2: bad input)."""
    sys.stderr.write(f"jaxl2: error: {text}\n")
    return code


def pm(d: MeanStd, scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std`` of a ``{"mean", "std"}`` dict (in % by default)."""
    return f"{scale * d['mean']:.{digits}f} ± {scale * d['std']:.{digits}f}"


def warn_if_chance(runs: list[tuple[float, float, Any]], cfg: Config) -> None:
    """One line on stderr when a model learned nothing: ``(val accuracy, lr, λ)`` near 10%."""
    bad = [(acc, lr, lam) for acc, lr, lam in runs if acc < 0.2]
    if not bad:
        return
    acc, lr, lam = bad[0]
    which = "" if len(runs) == 1 else f"{len(bad)} of {len(runs)} members (first: λ {lam}): "
    smaller = (
        f"--l2-init than {cfg.l2_init:g} (--l2 {lam})" if lam in (AUTO, EVIDENCE) else f"--l2 than {lam}"
    )
    sys.stderr.write(
        f"jaxl2: warning: {which}validation accuracy {100 * acc:.1f}% is near chance (10%): the model "
        f"did not learn; try a smaller --lr than {lr:g} (--optimizer {cfg.optimizer}) or a smaller "
        f"{smaller}\n"
    )


def _time_line(s: RunSummary) -> str:
    if s["examples_per_second"] is None:
        return f"time: no epoch left to train (the run had finished all {s['epochs']}); device {s['device']}"
    return (
        f"time: {s['seconds']:.2f} s training, {s['examples_per_second']:,.0f} examples/s "
        f"(+ {s['compile_seconds']:.2f} s compiling); device {s['device']}"
    )


def _which_epoch(s: RunSummary) -> str:
    if "log_evidence" in s:  # l2 evidence: trained on train ∪ validation, nothing held out but test
        return (
            f"the last epoch's params, {s['best_epoch']} of {s['epochs']}: val was part of the training data"
        )
    return f"best epoch by val accuracy: {s['best_epoch']} of {s['epochs']}"


def format_summary(s: RunSummary) -> str:
    """The human summary of a run: accuracy and data loss per split, penalty, total, time."""
    lines = [
        f"run directory: {s['out']}",
        f"{'split':<7}{'accuracy':>10}{'data loss':>11}",
        *(f"{k:<7}{100 * s[k + '_accuracy']:>9.2f}%{s[k + '_data_loss']:>11.4f}" for k in SPLITS),  # type: ignore[literal-required]
        f"({_which_epoch(s)}; data loss = cross-entropy; "
        f"penalty λ/2·Σw² = {s['penalty']:.4f}; train loss = data loss + penalty = {s['train_loss']:.4f})",
        "‖W‖² per layer: " + ", ".join(f"{p} {v:.1f}" for p, v in s["kernel_sq_norm"].items()),
    ]
    if "l2_final" in s:
        how = "evidence" if "log_evidence" in s else "auto"
        lines.append(
            f"λ per layer ({how}, at the end): " + ", ".join(f"{p} {v:.3g}" for p, v in s["l2_final"].items())
        )
    if s.get("log_evidence") is not None:
        lines.append(f"log evidence at the last λ update: {s['log_evidence']:,.1f} nats")
    lines.append(_time_line(s))
    if "refit_test_accuracy" in s:
        lines.append(
            f"refit on train ∪ validation ({s['refit_examples']:,} examples, {s['refit_epochs']} epochs, "
            f"{EPOCH_RULE_WORDS[s['refit_epoch_rule']]}): test {100 * s['refit_test_accuracy']:.2f}% (unrefit "
            f"{100 * s['test_accuracy']:.2f}%); jaxl2 eval uses the refit model ({s['refit_seconds']:.2f} s)"
        )
    return "\n".join(lines)


def format_per_l2(rows: list[PerL2]) -> str:
    """The sweep's table: per λ, mean ± std over seeds of the accuracies (%) and of Σ‖W‖²."""
    head = f"{'λ':>8} {'seeds':>5} {'train %':>15} {'val %':>15} {'test %':>15} {'Σ‖W‖²':>17}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['l2']:>8g} {r['seeds']:>5} {pm(r['train_accuracy']):>15} {pm(r['val_accuracy']):>15} "
            f"{pm(r['test_accuracy']):>15} {pm(r['kernel_sq_norm'], 1.0, 1):>17}"
        )
    return "\n".join(lines)


def format_refit(fit: SweepRefit) -> str:
    """The line of a sweep's refit: the selected λ's test accuracy refit and unrefit."""
    epochs = ", ".join(str(m["refit_epochs"]) for m in fit["members"])
    return (
        f"refit of λ {fit['l2']:g} on train ∪ validation ({len(fit['members'])} seeds; epochs {epochs}, "
        f"{EPOCH_RULE_WORDS[fit['epoch_rule']]}): "
        f"test {pm(fit['refit_test_accuracy'])}% (unrefit {pm(fit['test_accuracy'])}%)"
    )


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
