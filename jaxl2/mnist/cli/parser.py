"""The command line of ``jaxl2``: one argparse parser. Its config flags are made from the
:class:`~jaxl2.mnist.config.Config` dataclass: a flag per field (``split_seed`` →
``--split-seed``), parsed as the field's type, in the group of the ``# -- data`` header above it,
with the field's comment as its ``--help``. The few flags of a command that are no config field
(``--out``, ``--resume``, …) are listed by hand.

argparse rather than tyro: tried on ``jaxl2 train``, tyro took over twice as long to print the help,
printed each error as a box of several lines where ``jaxl2`` prints one line naming the flag, and
needed a constructor of its own for ``--l2 REGEX=λ,…``, ``--hidden 256,256`` and ``--refit/--no-refit``.

This module imports nothing heavy (no jax), so ``jaxl2 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import re
import textwrap
from typing import Any

from jaxl2.mnist.cli.report import fail, flag
from jaxl2.mnist.config import (
    ACTIVATIONS,
    AUTO,
    DATASETS,
    EVIDENCE,
    FIELDS,
    MODE_FIELDS,
    OPTIMIZERS,
    SPLITS,
    Config,
    RunSettings,
    SweepSettings,
)

__all__ = ["build_parser", "field_docs", "parse_l2", "given", "refit_choice"]


@functools.cache
def _comments(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (group, comment)}`` from the source of the dataclass ``cls``: the comment lines
    directly above a field joined with the one at its end; a ``# -- NAME`` line starts the group
    NAME. Empty where the source is not shipped."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):
        return {}
    node = ast.parse("\n".join(lines)).body[0]
    assert isinstance(node, ast.ClassDef)
    out: dict[str, tuple[str, str]] = {}
    group, end = "", node.lineno
    for stmt in node.body:
        above: list[str] = []  # the comment lines since the last statement
        for line in (s.strip() for s in lines[end : stmt.lineno - 1]):
            if line.startswith("# --"):
                group, above = line[4:].strip(), []
            elif line.startswith("#"):
                above.append(line[1:].strip())
        end = stmt.end_lineno or stmt.lineno
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            tail = lines[end - 1].encode()[stmt.end_col_offset or 0 :].decode()  # bytes, as ast counts
            above.append(tail.strip().removeprefix("#").strip())
            out[stmt.target.id] = (group, " ".join(filter(None, above)))
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in the source of the dataclass ``cls`` (the way tyro reads a dataclass):
    the comment lines directly above the field and the one at its end.

    Example:
      >>> field_docs(Config)["seed"]
      'init and shuffling seed'
    """
    return {name: text for name, (_, text) in _comments(cls).items()}


def doc(cls: type, name: str, extra: str = "") -> str:
    """The help of the flag of field ``name`` of ``cls``: its comment (with `other_field` shown as
    ``--other-field``), ``extra``, and its default unless the comment says it."""
    text = re.sub(r"`(\w+)`", lambda m: flag(m.group(1)), field_docs(cls).get(name, ""))
    default = getattr(cls(), name)
    if "(default" not in text and default is not None and not isinstance(default, bool):
        if isinstance(default, tuple):
            default = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
        extra += f" (default {default})"
    return text + extra


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A value that starts like a negative number (-1e-3, -1,0) is a value, not an unknown flag:
        # it then reaches its own check and one-line message (argparse takes only -1 and -.5 so).
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):  # one line, no usage dump
        m = re.match(r"argument (--[\w-]+)(?:/[\w-]+)?: (.*)", message)
        if m and m.group(2).startswith(m.group(1)):
            message = m.group(2)  # our own message already names the flag
        if message.startswith("the following arguments are required: command"):
            message = "a command is required (train, sweep, eval, bench or gradcheck; jaxl2 --help says more)"
        raise SystemExit(fail(message))


def parse_l2(text: str) -> float | dict[str, float] | str:
    """``1e-3`` → 1e-3; ``'.*Dense_0/kernel=1e-3,.*=1e-4'`` → an ordered ``{regex: λ}``;
    ``auto`` → ``"auto"`` (one λ per layer, tuned during the run); ``evidence`` → ``"evidence"``
    (λ from the Laplace evidence).

    Patterns are full-path regexes (``re.fullmatch``), first match wins; each item is split
    at its last ``=``, items at commas (so a pattern cannot contain a comma).
    """
    if text.strip() in (AUTO, EVIDENCE):
        return text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    out: dict[str, float] = {}
    for item in text.split(","):
        pattern, sep, lam = item.strip().rpartition("=")
        if not sep or not pattern:
            raise argparse.ArgumentTypeError(
                f"--l2 {text!r} is neither a number, PATTERN=λ[,PATTERN=λ...], auto nor evidence "
                "(e.g. --l2 1e-3, --l2 '.*Dense_0/kernel=1e-3,.*=1e-4', --l2 auto or --l2 evidence)"
            )
        if pattern in out:
            raise argparse.ArgumentTypeError(f"--l2 {text!r}: pattern {pattern!r} is given twice")
        try:
            out[pattern] = float(lam)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--l2 {item!r}: {lam!r} is not a number") from None
    return out


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden {text!r} is invalid (comma-separated integers, e.g. 256,256)"
        ) from None


def _l2s(text: str) -> list[float]:
    for word in (AUTO, EVIDENCE):
        if word in (v.strip() for v in text.split(",")):
            raise argparse.ArgumentTypeError(
                f"--l2 {word} tunes λ within one run, so it is for jaxl2 train, not for a sweep, which "
                f"trains fixed λ values (e.g. --l2 0,1e-4,1e-3); compare them with: jaxl2 train --l2 {word}"
            )
    try:
        return [float(v.strip()) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--l2 {text!r} is invalid (comma-separated numbers, e.g. 0,1e-4,1e-3)"
        ) from None


# How a config flag's text becomes its field's value, by the field's type (`| None` aside).
PARSE: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "tuple[int, ...]": _hidden,
    "float | Mapping[str, float] | str": parse_l2,
}
# What a config flag's help says beyond its field's comment.
EXTRA = {
    "l2": " (e.g. '.*Dense_0/kernel=1e-3,.*=1e-4')",
    "lr": ": " + ", ".join(f"{k} {v.lr:g}" for k, v in OPTIMIZERS.items()),
    "hidden": ", comma-separated",
}


def _config_flags(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """A flag per :class:`Config` field, in the groups of its comments. A sweep trains fixed λs:
    it has no settings of ``--l2 auto`` and ``evidence``, and its ``--l2`` is a list of them."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if sweep and f.name in MODE_FIELDS:
            continue
        title = _comments(Config).get(f.name, ("config", ""))[0]  # "config" where the source is not shipped
        g = groups[title] = groups.get(title) or p.add_argument_group(title)
        if sweep and f.name == "l2":
            g.add_argument("--l2", type=_l2s, help=doc(SweepSettings, "l2s", ", comma-separated"))
        elif f.type == "bool":
            g.add_argument(flag(f.name), action="store_true", default=None, help=doc(Config, f.name))
        else:
            kind = PARSE[str(f.type).removesuffix(" | None")]
            g.add_argument(flag(f.name), type=kind, help=doc(Config, f.name, EXTRA.get(f.name, "")))


def _switches(g: Any, **helps: str) -> None:
    """A ``store_true`` flag per keyword: ``no_cache="…"`` is ``--no-cache`` with that help."""
    for name, text in helps.items():
        g.add_argument(flag(name), action="store_true", help=text)


def _run_flags(
    g: Any, settings: type, what: str, out: str, resume: str, overwrite: str, **helps: str
) -> None:
    """The flags of ``train`` and ``sweep`` beside the config's: ``--out`` (a new ``runs/OUT-…``
    by default), ``--resume``, ``--overwrite``, the checkpoints and the refit (documented by
    ``settings``, :class:`RunSettings` or :class:`SweepSettings`), then the switches ``helps``;
    ``what`` is a run or a sweep."""
    g.add_argument("--out", help=f"{what} directory (default: a new runs/{out}-YYYYmmdd-HHMMSS[-N])")
    _switches(g, resume=resume, overwrite=overwrite)
    g.add_argument("--checkpoint-every", type=int, metavar="N", help=doc(settings, "checkpoint_every"))
    on = "on" if settings().refit else "off"
    g.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        help=doc(settings, "refit", f" (default: {on}, or with --resume the {what}'s own; --no-refit: off)"),
    )
    g.add_argument("--refit-epochs", help=doc(settings, "refit_epochs"))
    _switches(g, **helps)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``jaxl2`` and its five commands (exits 2 with one line on bad input)."""
    p = _Parser(
        prog="jaxl2",
        description="L2 regularization (λ/2·Σw² on the kernels) of fully connected networks in JAX: "
        "train, sweep λ, evaluate, benchmark and check gradients on MNIST.",
        epilog="Exit status: 0 done, 1 diverged (or gradcheck failed), 2 bad input, 74 a file could not "
        "be written (a full disk), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM; 74, 130 and 143 "
        "keep what can be resumed and say how.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train the reference MLP with L2 (the main job)",
        description="Train the 784-256-256-10 MLP with λ/2·Σw² on its kernels; writes a run directory "
        "(config.json, metrics.jsonl, checkpoints/, best/, curves.png, summary.json).",
    )
    _config_flags(t)
    _run_flags(
        t.add_argument_group("run"),
        RunSettings,
        "run",
        "DATASET",
        resume="continue the run in --out from its last checkpoint",
        overwrite="replace a run already in --out",
        no_cache="do not use JAX's persistent compilation cache (~/.cache/jaxl2/jax)",
        quiet="no progress bar",
        json="print only one JSON object with the results on stdout",
    )
    g = t.add_argument_group("devices and hosts")
    g.add_argument("--devices", type=int, metavar="N", help=doc(RunSettings, "devices"))
    _switches(g, distributed="call jax.distributed.initialize() first (several hosts)")
    g.add_argument("--coordinator", help="with --distributed: HOST:PORT of process 0 (or $JAXL2_COORDINATOR)")
    for name, what in (("num_processes", "number of processes"), ("process_id", "this process's index")):
        g.add_argument(flag(name), type=int, help=f"with --distributed: {what} (or $JAXL2_{name.upper()})")

    sw = sub.add_parser(
        "sweep",
        help="train many λ (and seeds) at once in one compiled program",
        description="Train every (λ, seed) pair together (jax.vmap over stacked states, λ traced: one "
        "compilation). Writes sweep.json, sweep.csv and sweep.png; selects λ by validation accuracy only.",
    )
    _config_flags(sw, sweep=True)
    g = sw.add_argument_group("sweep")
    g.add_argument(
        "--seeds",
        type=int,
        help="init seeds per λ: --seed, --seed+1, … (default 1); data order follows the seed",
    )
    g.add_argument("--execution", default=SweepSettings.execution, help=doc(SweepSettings, "execution"))
    _run_flags(
        g,
        SweepSettings,
        "sweep",
        "sweep",
        resume="continue the sweep in --out from its last checkpoint (with its own settings)",
        overwrite="replace a sweep (or run) already in --out",
        no_cache="do not use the compilation cache",
        quiet="no progress (on a terminal one line; else one line per epoch)",
        json='print only {"selected_l2": …, "selected_l2_1se": …, "per_l2": […], "results": […]} '
        '(and "refit": {…} with --refit)',
    )

    e = sub.add_parser(
        "eval",
        help="evaluate a run's model (or a sweep member's)",
        description="Accuracy and data loss (cross-entropy) of a trained run's model (the refit one if "
        "the run has one, else the best epoch by validation; for a sweep, one member's) on a split of "
        "its own dataset, or of another one.",
    )
    e.add_argument("--run", required=True, help="the run (or sweep) directory")
    e.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        help="the refit model (train ∪ validation) or, with --no-refit, the best epoch by validation "
        "(default: the refit model when the run has one)",
    )
    e.add_argument(
        "--l2",
        type=float,
        help="for a sweep: the member's λ (default: the selected λ, best mean validation accuracy)",
    )
    e.add_argument(
        "--seed",
        type=int,
        help="for a sweep: the member's seed (default: the seed of that λ with the best validation accuracy)",
    )
    e.add_argument("--dataset", help=f"{', '.join(DATASETS)} (default: the run's own)")
    e.add_argument(
        "--data-dir", help="TensorFlow Datasets' data_dir for --dataset mnist (default: the run's)"
    )
    e.add_argument("--split", default="test", help=f"{', '.join(SPLITS)} (default test)")
    _switches(
        e, no_cache="do not use the compilation cache", json="print one JSON object: accuracy, data_loss, n"
    )

    b = sub.add_parser(
        "bench",
        help="measure throughput against the machine's limit",
        description="Side-by-side, interleaved measurements: GEMM rate and the examples/s ceiling; "
        "`jaxl2 train` itself (validation every epoch) at batch 128 and 1024, on mnist5k and on a "
        "full-MNIST-size set (60,000 images: mnist5k's repeated, 5,000 for validation), against a "
        "hand-written jitted JAX epoch with and without the same validation, and PyTorch eager and "
        "Keras if installed; the epoch alone with and without L2 (the L2 overhead); start-up beside "
        "its floor (import jax and a trivial jit); the default `jaxl2 train`'s wall time beside its "
        "training and refit seconds; sweep scaling; and each performance target with its number "
        "(met or MISS). A full run takes 6 to 9 minutes on 2 CPU cores.",
    )
    _switches(b, quick="small sizes and 1 round (checks that it runs; numbers are rough)")
    b.add_argument("--rounds", type=int, help="interleaved rounds (default 9, 1 with --quick)")
    _switches(b, json="print one JSON object with every number")

    gc = sub.add_parser(
        "gradcheck",
        help="check gradients in float64",
        description="jax.grad of λ/2·Σw² vs the analytic λ·w, and of the regularized loss vs central "
        "finite differences, on the reference MLP in float64. Exits 0 when both pass, 1 otherwise. "
        "For your own model, call jaxl2.gradcheck(loss_fn, params, *batch).",
    )
    gc.add_argument("--l2", type=float, default=1e-3, help="λ (default 1e-3)")
    gc.add_argument("--hidden", type=_hidden, default=(256, 256), help="hidden widths (default 256,256)")
    gc.add_argument("--activation", default="relu", help=f"{', '.join(ACTIVATIONS)} (default relu)")
    gc.add_argument("--batch", type=int, default=64, help="random examples in the loss (default 64)")
    gc.add_argument(
        "--directions", type=int, default=8, help="random directions for finite differences (default 8)"
    )
    gc.add_argument("--eps", type=float, default=1e-5, help="finite-difference step, > 0 (default 1e-5)")
    gc.add_argument("--seed", type=int, default=0, help="seed of the params, data and directions (default 0)")
    _switches(gc, json="print one JSON object")
    return p


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, ``--dataset idx:DIR`` and ``--data-dir`` as
    absolute paths (so that the run's config.json still finds them from another working
    directory: ``jaxl2 eval --run``)."""
    out = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    if str(out.get("dataset", "")).startswith("idx:") and len(out["dataset"]) > 4:
        out["dataset"] = "idx:" + os.path.abspath(os.path.expanduser(out["dataset"][4:]))
    if out.get("data_dir"):
        out["data_dir"] = os.path.abspath(os.path.expanduser(out["data_dir"]))
    return out


def refit_choice(
    args: argparse.Namespace, saved: dict[str, Any] | None, settings: type[RunSettings] | type[SweepSettings]
) -> dict[str, Any]:
    """``refit`` and ``refit_epochs``: the flags, else (``--resume``) what the run was started
    with (its ``config.json``), else the defaults of ``settings`` (:class:`RunSettings` or
    :class:`SweepSettings`)."""
    saved = saved or {}
    refit = saved.get("refit", settings.refit) if args.refit is None else args.refit
    return {
        "refit": refit,
        "refit_epochs": args.refit_epochs or saved.get("refit_epochs") or settings.refit_epochs,
    }
