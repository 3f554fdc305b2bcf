"""The ``jaxl2`` command: ``train`` (the main job), ``sweep``, ``eval``, ``bench``, ``gradcheck``.

Exit status: 0 done; 1 training diverged (or a gradient check failed); 2 bad input, with one
line ``jaxl2: error: <what> (<allowed>)``; 130 interrupted (Ctrl-C). Only jaxl2's own error
types are caught: anything else is a bug and shows its traceback.

The application (:mod:`jaxl2.mnist`) is imported only when a command runs, so ``jaxl2 --help``
is fast; without the ``mnist`` extra, commands say how to install it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from jaxl2.errors import Jaxl2Error
from jaxl2.mnist.config import (
    ACTIVATIONS,
    AUTO,
    AUTO_DEFAULTS,
    DATASETS,
    FIELDS,
    INITS,
    OPTIMIZERS,
    REFIT,
    REFIT_EPOCHS,
    SCHEDULES,
    SPLITS,
    Config,
)

DEFAULTS = Config()
DEFAULT_SWEEP_L2 = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def flag(name: str) -> str:
    """The command-line flag of a config field or argument: ``split_seed`` → ``--split-seed``."""
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        m = re.match(r"argument (--[\w-]+)(?:/[\w-]+)?: (.*)", message)
        if m and m.group(2).startswith(m.group(1)):
            message = m.group(2)  # our own message already names the flag
        if message.startswith("the following arguments are required: command"):
            message = "a command is required (train, sweep, eval, bench or gradcheck; jaxl2 --help says more)"
        sys.stderr.write(f"jaxl2: error: {message}\n")
        raise SystemExit(2)


def _message(e: BaseException) -> str:
    render = getattr(e, "render", None)
    return render(flag) if render else str(e)


def _fail(message: str) -> int:
    sys.stderr.write(f"jaxl2: error: {message}\n")
    return 2


def parse_l2(text: str) -> float | dict[str, float] | str:
    """``1e-3`` → 1e-3; ``'.*Dense_0/kernel=1e-3,.*=1e-4'`` → an ordered ``{regex: λ}``;
    ``auto`` → ``"auto"`` (one λ per layer, tuned during the run).

    Patterns are full-path regexes (``re.fullmatch``), first match wins; each item is split
    at its last ``=``, items at commas (so a pattern cannot contain a comma).
    """
    if text.strip() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        pass
    out: dict[str, float] = {}
    for item in text.split(","):
        pattern, sep, lam = item.strip().rpartition("=")
        if not sep or not pattern:
            raise argparse.ArgumentTypeError(
                f"--l2 {text!r} is neither a number, PATTERN=λ[,PATTERN=λ...] nor auto "
                "(e.g. --l2 1e-3, --l2 '.*Dense_0/kernel=1e-3,.*=1e-4' or --l2 auto)"
            )
        if pattern in out:
            raise argparse.ArgumentTypeError(f"--l2 {text!r}: pattern {pattern!r} is given twice")
        try:
            out[pattern] = float(lam)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--l2 {item!r}: {lam!r} is not a number") from None
    return out


def _ints(name: str, example: str) -> Any:
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(h) for h in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--{name} {text!r} is invalid (comma-separated integers, e.g. {example})"
            ) from None

    return parse


def _floats(text: str) -> list[float]:
    if AUTO in (v.strip() for v in text.split(",")):
        raise argparse.ArgumentTypeError(
            f"--l2 {AUTO} tunes λ within one run, so it is for jaxl2 train, not for a sweep, which trains "
            "fixed λ values (e.g. --l2 0,1e-4,1e-3); compare them with: jaxl2 train --l2 auto"
        )
    try:
        return [float(v.strip()) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--l2 {text!r} is invalid (comma-separated numbers, e.g. 0,1e-4,1e-3)"
        ) from None


def _lr_help() -> str:
    defaults = ", ".join(f"{k} {v.lr:g}" for k, v in OPTIMIZERS.items())
    return f"peak learning rate (default: the optimizer's own: {defaults})"


def _add_auto_flags(g: Any) -> None:
    """The settings of ``--l2 auto`` (refused without it)."""
    g.add_argument(
        "--l2-init",
        type=float,
        help=f"with --l2 {AUTO}: every layer's starting λ (default {AUTO_DEFAULTS['l2_init']:g})",
    )
    g.add_argument(
        "--l2-every",
        type=int,
        help=f"with --l2 {AUTO}: training steps per λ update, each on one validation batch of "
        f"--batch-size examples (default {AUTO_DEFAULTS['l2_every']})",
    )
    g.add_argument(
        "--l2-lr",
        type=float,
        help=f"with --l2 {AUTO}: Adam's learning rate on ln λ (default {AUTO_DEFAULTS['l2_lr']:g})",
    )


def _add_train_flags(p: argparse.ArgumentParser, *, auto: bool = True) -> None:
    """The config's flags; ``auto=False`` leaves out the settings of ``--l2 auto`` (a sweep)."""
    d = DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        help=f"{', '.join(DATASETS)}: mnist5k is shipped and offline (5,000 real images), mnist "
        f"downloads full MNIST through TensorFlow Datasets, idx:DIR reads raw IDX files (default {d.dataset})",
    )
    g.add_argument("--data-dir", help="TensorFlow Datasets' data_dir for --dataset mnist")
    g.add_argument(
        "--val-size",
        type=int,
        help="validation examples carved from the training data (default 500 for mnist5k, 5000 otherwise)",
    )
    g.add_argument(
        "--split-seed", type=int, help=f"seed of the train/validation(/test) split (default {d.split_seed})"
    )
    g = p.add_argument_group("regularization")
    g.add_argument(
        "--l2",
        type=parse_l2,
        help=f"λ of the penalty λ/2·Σw² on the selected kernels, or per layer as 'REGEX=λ,REGEX=λ' "
        f"matched in order against paths like params/Dense_0/kernel, or {AUTO}: one λ per selected "
        "kernel, tuned during the run by the hypergradient of the validation loss through one "
        "optimizer step (Luketina et al., ICML 2016), computed on a validation batch every "
        f"--l2-every steps; the λs go to metrics.jsonl (l2/PATH), lambda.png and the summary "
        f"(default {d.l2})",
    )
    if auto:
        _add_auto_flags(g)
    g.add_argument(
        "--select",
        help="which leaves the penalty covers: kernels (default: every Dense kernel, no biases) or a "
        "regex over paths like params/Dense_0/kernel",
    )
    takers = ", ".join(k for k, v in OPTIMIZERS.items() if v.decays)
    g.add_argument(
        "--weight-decay",
        type=float,
        help=f"weight decay in the optimizer, for --optimizer {takers}: decoupled for adamw, added "
        "before momentum for sgdw (default 0)",
    )
    g.add_argument(
        "--allow-both",
        action="store_true",
        default=None,
        help="allow --l2 > 0 together with --weight-decay (both regularize)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument(
        "--optimizer",
        help="; ".join(f"{k}: {v.about}" for k, v in OPTIMIZERS.items()) + f" (default {d.optimizer})",
    )
    g.add_argument("--lr", type=float, help=_lr_help())
    g.add_argument("--schedule", help=f"{', '.join(SCHEDULES)} (default {d.schedule})")
    g.add_argument("--momentum", type=float, help=f"for --optimizer momentum and sgdw (default {d.momentum})")
    g.add_argument(
        "--batch-size",
        type=int,
        help=f"default {d.batch_size}; the last partial batch of each epoch is dropped",
    )
    g.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    g = p.add_argument_group("model")
    g.add_argument(
        "--hidden",
        type=_ints("hidden", "256,256"),
        help="hidden widths, comma-separated (default 256,256)",
    )
    g.add_argument("--activation", help=f"{', '.join(ACTIVATIONS)} (default {d.activation})")
    g.add_argument(
        "--init",
        help=f"{', '.join(INITS)}: kernel init, Flax's default or N(0, 1) as in the classic recipe "
        f"(default {d.init})",
    )
    g.add_argument("--seed", type=int, help=f"init and shuffling seed (default {d.seed})")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line."""
    return {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}


def _enable_cache(args: argparse.Namespace) -> None:
    if not getattr(args, "no_cache", False):
        from jaxl2.mnist.runtime import enable_compilation_cache

        enable_compilation_cache()


def _absolute_paths(given: dict[str, Any]) -> dict[str, Any]:
    """``--dataset idx:DIR`` and ``--data-dir`` as absolute paths, so that the run's config.json
    still finds them from another working directory (``jaxl2 eval --run``)."""
    if str(given.get("dataset", "")).startswith("idx:") and len(given["dataset"]) > 4:
        given["dataset"] = "idx:" + os.path.abspath(os.path.expanduser(given["dataset"][4:]))
    if given.get("data_dir"):
        given["data_dir"] = os.path.abspath(os.path.expanduser(given["data_dir"]))
    return given


def cmd_train(args: argparse.Namespace) -> int:
    from jaxl2.mnist import run as _run
    from jaxl2.mnist.loop import Diverged, Interrupted
    from jaxl2.mnist.rundir import load_config

    given = _absolute_paths(_given(args))
    saved = None
    if args.resume:
        if not args.out:
            return _fail("--resume needs --out DIR, the run to continue")
        cfg = dataclasses.replace(_run.load_run_config(args.out, kind="run"), **given)
        saved = load_config(args.out)
    else:
        cfg = dataclasses.replace(DEFAULTS, **given)
    # gloo (the CPU collectives) prints "Rank 0 is connected…" on stdout, which --json keeps for its object
    with _fd1_to_stderr(args.json and args.distributed):
        if args.distributed:
            from jaxl2.mnist.parallel import initialize_distributed

            if not args.out:
                return _fail("--distributed needs --out DIR (one directory that every process can reach)")
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        _enable_cache(args)
        progress = None if args.quiet or args.json else _Progress(cfg.epochs)
        try:
            summary = _run.train_and_evaluate(
                cfg,
                args.out,
                resume=args.resume,
                overwrite=args.overwrite,
                checkpoint_every=args.checkpoint_every,
                on_start=progress.start if progress else None,
                on_epoch=progress.update if progress else None,
                devices=args.devices,
                **_refit_choice(args, saved, REFIT),
                on_refit_epoch=progress.refit if progress else None,
            )
        except Diverged as e:
            _close(progress)
            sys.stderr.write(f"jaxl2: error: {_message(e)}\n")
            return 1
        except Interrupted as e:
            _close(progress)
            sys.stderr.write(f"jaxl2: {_message(e)}; continue with: jaxl2 train --out {e.out} --resume\n")
            return 130
        finally:
            _close(progress)
    print(json.dumps(summary) if args.json else format_summary(summary))
    _warn_if_chance([(summary["val_accuracy"], summary["lr"], cfg.l2)], cfg)
    return 0


@contextlib.contextmanager
def _fd1_to_stderr(on: bool) -> Iterator[None]:
    """While ``on``, file descriptor 1 (stdout, where native libraries write) goes to stderr."""
    if not on:
        yield
        return
    sys.stdout.flush()
    kept = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(kept, 1)
        os.close(kept)


def _refit_choice(args: argparse.Namespace, saved: dict[str, Any] | None, default: bool) -> dict[str, Any]:
    """``refit`` and ``refit_epochs``: the flags, else (``--resume``) what the run was started
    with (no refit for a run from before refits), else the command's defaults."""
    refit, rule = args.refit, args.refit_epochs
    if saved is not None:
        refit = saved.get("refit", False) if refit is None else refit
        rule = rule or saved.get("refit_epochs")
    return {"refit": default if refit is None else refit, "refit_epochs": rule or REFIT_EPOCHS}


def _close(progress: _Progress | None) -> None:
    if progress:
        progress.close()


def _warn_if_chance(runs: list[tuple[float, float, Any]], cfg: Config) -> None:
    """One line on stderr when a model learned nothing: ``(val accuracy, lr, λ)`` near 10%."""
    bad = [(acc, lr, lam) for acc, lr, lam in runs if acc < 0.2]
    if not bad:
        return
    acc, lr, lam = bad[0]
    which = "" if len(runs) == 1 else f"{len(bad)} of {len(runs)} members (first: λ {lam}): "
    smaller = f"--l2-init than {cfg.l2_init:g} (--l2 {AUTO})" if lam == AUTO else f"--l2 than {lam}"
    sys.stderr.write(
        f"jaxl2: warning: {which}validation accuracy {100 * acc:.1f}% is near chance (10%): the model "
        f"did not learn; try a smaller --lr than {lr:g} (--optimizer {cfg.optimizer}) or a smaller "
        f"{smaller}\n"
    )


class _Progress:
    """Training progress on stderr: epoch, total loss = data loss + penalty, accuracies. A rich
    progress bar on a terminal; otherwise (a log file, a pipe) one plain line per epoch."""

    def __init__(self, epochs: int):
        self.epochs, self.started, self.bar = epochs, False, None
        if not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.bar.add_task("epoch", total=epochs, info="compiling…")
        self.refit_task = None

    def start(self) -> None:
        self.started = True
        if self.bar:
            self.bar.start()

    def update(self, row: dict[str, Any]) -> None:
        info = (
            f"loss {row['train_loss']:.4f} = data {row['train_data_loss']:.4f} + penalty "
            f"{row['train_penalty']:.4f}  acc {100 * row['train_accuracy']:.2f}% "
            f"val {100 * row['val_accuracy']:.2f}%"
        )
        if self.bar:
            self.bar.update(self.task, completed=row["epoch"], info=info)
        else:
            sys.stderr.write(f"epoch {row['epoch']}/{self.epochs}  {info}\n")
            sys.stderr.flush()

    def refit(self, epoch: int, epochs: int) -> None:
        """One epoch of the refit on train ∪ validation."""
        if not self.bar:
            sys.stderr.write(f"refit on train ∪ validation: epoch {epoch}/{epochs}\n")
            sys.stderr.flush()
            return
        if self.refit_task is None:
            self.refit_task = self.bar.add_task("refit", total=epochs, info="on train ∪ validation")
        self.bar.update(self.refit_task, completed=epoch)

    def close(self) -> None:
        if self.started and self.bar:
            self.bar.stop()
        self.started = False


def format_summary(s: dict[str, Any]) -> str:
    """The human summary of a run: accuracy and data loss per split, penalty, total, time."""
    if s["examples_per_second"] is None:
        time_line = (
            f"time: no epoch left to train (the run had finished all {s['epochs']}); device {s['device']}"
        )
    else:
        time_line = (
            f"time: {s['seconds']:.2f} s training, {s['examples_per_second']:,.0f} examples/s "
            f"(+ {s['compile_seconds']:.2f} s compiling); device {s['device']}"
        )
    lines = [
        f"run directory: {s['out']}",
        f"{'split':<7}{'accuracy':>10}{'data loss':>11}",
        *(f"{k:<7}{100 * s[k + '_accuracy']:>9.2f}%{s[k + '_data_loss']:>11.4f}" for k in SPLITS),
        f"(best epoch by val accuracy: {s['best_epoch']} of {s['epochs']}; data loss = cross-entropy; "
        f"penalty λ/2·Σw² = {s['penalty']:.4f}; train loss = data loss + penalty = {s['train_loss']:.4f})",
        "‖W‖² per layer: " + ", ".join(f"{p} {v:.1f}" for p, v in s["kernel_sq_norm"].items()),
        *(
            ["λ per layer (auto, at the end): " + ", ".join(f"{p} {v:.3g}" for p, v in s["l2_final"].items())]
            if "l2_final" in s
            else []
        ),
        time_line,
    ]
    if "refit_test_accuracy" in s:
        lines.append(
            f"refit on train ∪ validation ({s['refit_examples']:,} examples, {s['refit_epochs']} epochs, "
            f"{EPOCH_RULE_WORDS[s['refit_epoch_rule']]}): test {100 * s['refit_test_accuracy']:.2f}% (unrefit "
            f"{100 * s['test_accuracy']:.2f}%); jaxl2 eval uses the refit model ({s['refit_seconds']:.2f} s)"
        )
    return "\n".join(lines)


def cmd_sweep(args: argparse.Namespace) -> int:
    from jaxl2.mnist import sweep as _sweep
    from jaxl2.mnist import sweepdir
    from jaxl2.mnist.loop import Diverged, Interrupted
    from jaxl2.mnist.rundir import load_config

    l2s = args.l2
    args.l2 = None
    given = _absolute_paths(_given(args))
    if args.seeds is not None and args.seeds < 1:
        return _fail(f"--seeds {args.seeds} is invalid (an integer >= 1)")
    saved = None
    if args.resume:
        if not args.out:
            return _fail("--resume needs --out DIR, the sweep to continue")
        saved_cfg, saved_l2s, saved_seeds = sweepdir.load_sweep_config(args.out)
        cfg = dataclasses.replace(saved_cfg, **given)
        saved = load_config(args.out)
        l2s = saved_l2s if l2s is None else l2s
        seeds = saved_seeds if args.seeds is None and "seed" not in given else None
    else:
        cfg = dataclasses.replace(DEFAULTS, **given)
        l2s = list(DEFAULT_SWEEP_L2) if l2s is None else l2s
        seeds = None
    if seeds is None:
        seeds = [cfg.seed + i for i in range(1 if args.seeds is None else args.seeds)]
    _enable_cache(args)
    quiet = args.quiet or args.json
    tty = sys.stderr.isatty()
    line = {"open": False}  # a progress line is on the terminal without its newline

    def say(msg: str) -> None:
        if line["open"]:
            sys.stderr.write("\n")
            line["open"] = False
        sys.stderr.write(msg + "\n")

    def log(msg: str) -> None:
        if not quiet:
            say(f"jaxl2: {msg}")

    def on_epoch(label: str, epoch: int, total: int) -> None:
        if quiet:
            return
        text = f"{label + ': ' if label else ''}epoch {epoch}/{total}"
        if tty:  # one line, rewritten
            sys.stderr.write(f"\r{text}\x1b[K")
            line["open"] = epoch < total
            if epoch == total:
                sys.stderr.write("\n")
        else:  # a log: one line per epoch
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    try:
        summary = _sweep.train_sweep(
            cfg,
            l2s,
            seeds,
            args.out,
            execution=args.execution,
            overwrite=args.overwrite,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            **_refit_choice(args, saved, False),
            on_epoch=on_epoch,
            log=log,
        )
    except Diverged as e:
        say(f"jaxl2: error: {_message(e)}")
        return 1
    except Interrupted as e:
        say(f"jaxl2: {_message(e)}; continue with: jaxl2 sweep --out {e.out} --resume")
        return 130
    except BaseException:
        if line["open"]:
            sys.stderr.write("\n")
        raise
    rows = summary["results"]
    _warn_if_chance([(r["val_accuracy"], summary["lr"], r["l2"]) for r in rows], cfg)
    if args.json:
        print(_sweep.results_json(summary))
        return 0
    print(
        f"sweep directory: {summary['out']} ({len(summary['results'])} members, {summary['execution']}, "
        f"{summary['seconds']:.1f} s; {summary['device']})"
    )
    print(format_per_l2(summary["per_l2"]))
    print(
        f"selected λ: {summary['selected_l2']:g} (best mean val accuracy); "
        f"{summary['selected_l2_1se']:g} (lambda.1se: the largest λ within one standard error of it)"
    )
    if "refit" in summary:
        fit = summary["refit"]

        def pm(d: dict[str, float]) -> str:
            return f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}%"

        epochs = ", ".join(str(m["refit_epochs"]) for m in fit["members"])
        print(
            f"refit of λ {fit['l2']:g} on train ∪ validation ({len(fit['members'])} seeds; epochs {epochs}, "
            f"{EPOCH_RULE_WORDS[fit['epoch_rule']]}): "
            f"test {pm(fit['refit_test_accuracy'])} (unrefit {pm(fit['test_accuracy'])})"
        )
    print(f"every member: {os.path.join(summary['out'], 'sweep.csv')}; jaxl2 eval --run {summary['out']}")
    return 0


def format_per_l2(rows: list[dict[str, Any]]) -> str:
    """The sweep's table: per λ, mean ± std over seeds of the accuracies (%) and of Σ‖W‖²."""

    def pm(d: dict[str, float], scale: float = 100.0, digits: int = 2) -> str:
        return f"{scale * d['mean']:.{digits}f} ± {scale * d['std']:.{digits}f}"

    head = f"{'λ':>8} {'seeds':>5} {'train %':>15} {'val %':>15} {'test %':>15} {'Σ‖W‖²':>17}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['l2']:>8g} {r['seeds']:>5} {pm(r['train_accuracy']):>15} {pm(r['val_accuracy']):>15} "
            f"{pm(r['test_accuracy']):>15} {pm(r['kernel_sq_norm'], 1.0, 1):>17}"
        )
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from jaxl2.mnist import bench, sigint

    sigint.allow()  # the benchmark writes nothing: Ctrl-C may stop it anywhere

    if args.rounds is not None and args.rounds < 1:
        return _fail(f"--rounds {args.rounds} is invalid (an integer >= 1)")
    res = bench.run_bench(quick=args.quick, rounds=args.rounds)
    print(json.dumps(res) if args.json else bench.format_bench(res))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxl2.mnist import run as _run
    from jaxl2.mnist import sigint

    sigint.allow()  # evaluation writes nothing

    _enable_cache(args)
    res = _run.evaluate_run(
        args.run, args.dataset, args.split, args.data_dir, l2=args.l2, seed=args.seed, refit=args.refit
    )
    if args.json:
        print(json.dumps(res))
    else:
        model = "refit on train ∪ validation" if res["model"] == "refit" else "best epoch by validation"
        if "seed" in res:
            model += f"; sweep member λ {res['l2']:g}, seed {res['seed']}"
        print(
            f"{res['dataset']} {res['split']}: accuracy {100 * res['accuracy']:.2f}%  "
            f"data loss {res['data_loss']:.4f}  n {res['n']}  (model: {model})"
        )
    return 0


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from jaxl2.check import gradcheck
    from jaxl2.mnist import sigint
    from jaxl2.mnist.config import validate
    from jaxl2.mnist.model import reference_problem

    sigint.allow()  # the check writes nothing

    if args.batch < 1:
        return _fail(f"--batch {args.batch} is invalid (an integer >= 1)")
    fields = {"hidden": args.hidden, "activation": args.activation, "seed": args.seed, "l2": args.l2}
    cfg = validate(dataclasses.replace(DEFAULTS, **fields))
    import jax

    with jax.enable_x64(True):
        loss_fn, params, batch = reference_problem(cfg, batch=args.batch, seed=args.seed)
        try:
            report = gradcheck(
                loss_fn, params, *batch, l2=args.l2, directions=args.directions, eps=args.eps, seed=args.seed
            )
        except Jaxl2Error as e:  # the library names its arguments; here they are flags
            return _fail(re.sub(r"^(l2|eps|directions|seed)\b", lambda m: flag(m.group(1)), str(e)))
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(report)
    return 0 if report.ok else 1


EPOCH_RULE_WORDS = {"all": "all the run's", "best": "the best epoch's count"}


def _add_checkpoints_and_refit(g: argparse._ArgumentGroup, end: str, refit_help: str) -> None:
    """``--checkpoint-every`` (a save also at the end, with ``end`` appended, and on Ctrl-C), ``--refit`` and
    ``--refit-epochs``: the flags that train and sweep share but word apart."""
    g.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="EPOCHS",
        help="also checkpoint every EPOCHS epochs (default: every 30 s of training; always at the end"
        f"{end} and on Ctrl-C)",
    )
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, help=refit_help)
    g.add_argument(
        "--refit-epochs",
        help="the refit's epochs: all (the run's --epochs, its full lr schedule) or best (the best "
        f"epoch by validation accuracy) (default {REFIT_EPOCHS}: it scored higher on held-out data)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jaxl2",
        description="L2 regularization (λ/2·Σw² on the kernels) of fully connected networks in JAX: "
        "train, sweep λ, evaluate, benchmark and check gradients on MNIST.",
        epilog="Exit status: 0 done, 1 diverged (or gradcheck failed), 2 bad input, 130 interrupted.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train the reference MLP with L2 (the main job)",
        description="Train the 784-256-256-10 MLP with λ/2·Σw² on its kernels; writes a run directory "
        "(config.json, metrics.jsonl, checkpoints/, best/, curves.png, summary.json).",
    )
    _add_train_flags(t)
    g = t.add_argument_group("run")
    g.add_argument("--out", help="run directory (default: a new runs/DATASET-YYYYmmdd-HHMMSS[-N])")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    _add_checkpoints_and_refit(
        g,
        "",
        "then train again from the same init on train ∪ validation (see --refit-epochs), report its "
        f"test accuracy and let jaxl2 eval use it (default: {'on' if REFIT else 'off'}, or with --resume the "
        "run's own; --no-refit: off)",
    )
    g.add_argument(
        "--no-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (~/.cache/jaxl2/jax)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--json", action="store_true", help="print only one JSON object with the results on stdout"
    )
    g = t.add_argument_group("devices and hosts")
    g.add_argument(
        "--devices",
        type=int,
        help="data-parallel over the first N devices (default: all); the batch must divide by N",
    )
    g.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first (several hosts)"
    )
    g.add_argument("--coordinator", help="with --distributed: HOST:PORT of process 0 (or $JAXL2_COORDINATOR)")
    g.add_argument(
        "--num-processes", type=int, help="with --distributed: number of processes (or $JAXL2_NUM_PROCESSES)"
    )
    g.add_argument(
        "--process-id", type=int, help="with --distributed: this process's index (or $JAXL2_PROCESS_ID)"
    )
    t.set_defaults(func=cmd_train)

    sw = sub.add_parser(
        "sweep",
        help="train many λ (and seeds) at once in one compiled program",
        description="Train every (λ, seed) pair together (jax.vmap over stacked states, λ traced: one "
        "compilation). Writes sweep.json, sweep.csv and sweep.png; selects λ by validation accuracy only.",
    )
    _add_train_flags(sw, auto=False)
    for action in sw._actions:
        if action.dest == "l2":
            action.type = _floats
            action.help = f"comma-separated λ values (default {','.join(f'{v:g}' for v in DEFAULT_SWEEP_L2)})"
    g = sw.add_argument_group("sweep")
    g.add_argument(
        "--seeds",
        type=int,
        help="init seeds per λ: --seed, --seed+1, … (default 1); data order follows the seed",
    )
    g.add_argument(
        "--execution",
        default="auto",
        help="vmap, sequential (lax.map in one program) or auto: on CPU the faster of the two on one "
        "timed epoch (default)",
    )
    g.add_argument("--out", help="sweep directory (default: a new runs/sweep-YYYYmmdd-HHMMSS[-N])")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep in --out from its last checkpoint (with its own settings)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace a sweep (or run) already in --out")
    _add_checkpoints_and_refit(
        g,
        " of each chunk",
        "then refit the selected λ on train ∪ validation, once per seed (see --refit-epochs), and "
        "report its test accuracy (default: off, or with --resume the sweep's own)",
    )
    g.add_argument("--no-cache", action="store_true", help="do not use the compilation cache")
    g.add_argument(
        "--quiet", action="store_true", help="no progress (on a terminal one line; else one line per epoch)"
    )
    g.add_argument(
        "--json",
        action="store_true",
        help='print only {"selected_l2": …, "selected_l2_1se": …, "per_l2": […], "results": […]} '
        '(and "refit": {…} with --refit)',
    )
    sw.set_defaults(func=cmd_sweep)

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
    e.add_argument("--no-cache", action="store_true", help="do not use the compilation cache")
    e.add_argument("--json", action="store_true", help="print one JSON object: accuracy, data_loss, n")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench",
        help="measure throughput against the machine's limit",
        description="Side-by-side, interleaved measurements: GEMM rate and the examples/s ceiling; "
        "`jaxl2 train` itself (mnist5k, validation every epoch) at batch 128 and 1024 against a "
        "hand-written jitted JAX epoch, and PyTorch eager and Keras if installed; the epoch alone with "
        "and without L2 (the L2 overhead); start-up; sweep scaling; and each performance target with "
        "its number (met or MISS).",
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and 1 round (checks that it runs; numbers are rough)",
    )
    b.add_argument("--rounds", type=int, help="interleaved rounds (default 9, 1 with --quick)")
    b.add_argument("--json", action="store_true", help="print one JSON object with every number")
    b.set_defaults(func=cmd_bench)

    gc = sub.add_parser(
        "gradcheck",
        help="check gradients in float64",
        description="jax.grad of λ/2·Σw² vs the analytic λ·w, and of the regularized loss vs central "
        "finite differences, on the reference MLP in float64. Exits 0 when both pass, 1 otherwise. "
        "For your own model, call jaxl2.gradcheck(loss_fn, params, *batch).",
    )
    gc.add_argument("--l2", type=float, default=1e-3, help="λ (default 1e-3)")
    gc.add_argument(
        "--hidden",
        type=_ints("hidden", "256,256"),
        default=(256, 256),
        help="hidden widths (default 256,256)",
    )
    gc.add_argument("--activation", default="relu", help=f"{', '.join(ACTIVATIONS)} (default relu)")
    gc.add_argument("--batch", type=int, default=64, help="random examples in the loss (default 64)")
    gc.add_argument(
        "--directions", type=int, default=8, help="random directions for finite differences (default 8)"
    )
    gc.add_argument("--eps", type=float, default=1e-5, help="finite-difference step, > 0 (default 1e-5)")
    gc.add_argument("--seed", type=int, default=0, help="seed of the params, data and directions (default 0)")
    gc.add_argument("--json", action="store_true", help="print one JSON object")
    gc.set_defaults(func=cmd_gradcheck)
    return p


def _value_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option of every command that takes a value (``--l2``, ``--hidden``, …)."""
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _value_flags(sub)
        elif action.option_strings and action.nargs is None:
            flags.update(action.option_strings)
    return flags


def _attach_negative_values(argv: list[str], value_flags: set[str]) -> list[str]:
    """``--l2 -1e-3`` → ``--l2=-1e-3``: argparse takes ``-1e-3`` or ``-1,0`` for an option and
    says "expected one argument"; attached, the value reaches its own check and message."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in value_flags and i + 1 < len(argv) and re.match(r"-[\d.]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    import signal

    from jaxl2.mnist import sigint

    previous = signal.getsignal(signal.SIGINT)
    sigint.install()  # Ctrl-C waits for a safe point: never inside an import of jaxlib or XLA
    try:
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parser.parse_args(_attach_negative_values(argv, _value_flags(parser)))
        sigint.check()
        return args.func(args)
    except Jaxl2Error as e:
        return _fail(_message(e))
    except BrokenPipeError:  # `jaxl2 … | head`: the reader left; the work itself is done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # What the command made is already removed (or checkpointed). Exit at once: tearing the
        # interpreter down while XLA's threads may still run can crash it.
        sys.stderr.write("jaxl2: interrupted\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except ImportError as e:
        if e.name and e.name.split(".")[0] in ("flax", "orbax", "tensorflow_datasets", "matplotlib", "rich"):
            return _fail(f"jaxl2 {args.command} needs the mnist extra ({e}): pip install 'jaxl2[mnist]'")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    raise SystemExit(main())
