"""The ``jaxl2`` commands, one function each: ``train``, ``sweep``, ``evaluate`` (``jaxl2 eval``),
``gradcheck`` and ``bench``. Each maps its flags to the application's functions and prints the
result; the application is imported inside each, when the command runs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator

from jaxl2.errors import Jaxl2Error
from jaxl2.mnist.cli.parser import given, refit_choice
from jaxl2.mnist.cli.report import (
    Progress,
    epoch_info,
    fail,
    flag,
    format_per_l2,
    format_refit,
    format_summary,
    warn_if_chance,
)
from jaxl2.mnist.config import Config, RunSettings, SweepSettings, validate

__all__ = ["train", "sweep", "evaluate", "gradcheck", "bench"]


def train(args: argparse.Namespace) -> int:
    """``jaxl2 train``: one run into its directory (:func:`jaxl2.mnist.run.train_and_evaluate`)."""
    from jaxl2.mnist import run as _run
    from jaxl2.mnist.rundir import load_config

    cfg, saved = Config(), None
    if args.resume and args.out:  # without --out, train_and_evaluate says what is missing
        cfg, saved = _run.load_run_config(args.out), load_config(args.out)
    cfg = dataclasses.replace(cfg, **given(args))
    # gloo (the CPU collectives) prints "Rank 0 is connected…" on stdout, which --json keeps for its object
    with _stdout_to_stderr(args.json and args.distributed):
        if args.distributed:
            from jaxl2.mnist.parallel import initialize_distributed

            if not args.out:
                return fail("--distributed needs --out DIR (one directory that every process can reach)")
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        with Progress(args.quiet or args.json, first="", epochs=cfg.epochs) as progress:
            summary = _run.train_and_evaluate(
                cfg,
                args.out,
                RunSettings(
                    checkpoint_every=args.checkpoint_every,
                    devices=args.devices,
                    **refit_choice(args, saved, RunSettings),
                ),
                resume=args.resume,
                overwrite=args.overwrite,
                on_start=progress.start,
                on_epoch=lambda row: progress.epoch("", row["epoch"], cfg.epochs, epoch_info(row)),
                on_refit_epoch=lambda e, n: progress.epoch("refit on train ∪ validation", e, n),
                log=progress.log,
            )
    print(json.dumps(summary) if args.json else format_summary(summary))
    warn_if_chance([(summary["val_accuracy"], summary["lr"], cfg.l2)], cfg)
    return 0


@contextlib.contextmanager
def _stdout_to_stderr(on: bool) -> Iterator[None]:
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


def sweep(args: argparse.Namespace) -> int:
    """``jaxl2 sweep``: many λ and seeds in one compiled program (:func:`jaxl2.mnist.sweep.train_sweep`)."""
    from jaxl2.mnist import sweep as _sweep
    from jaxl2.mnist import sweepdir
    from jaxl2.mnist.rundir import load_config

    if args.seeds is not None and args.seeds < 1:
        return fail(f"--seeds {args.seeds} is invalid (an integer >= 1)")
    cfg, l2s, seeds, saved = Config(), list(SweepSettings.l2s), None, None
    if args.resume and args.out:  # without --out, train_sweep says what is missing
        cfg, l2s, seeds = sweepdir.load_sweep_config(args.out)
        saved = load_config(args.out)
    if args.l2 is not None:
        l2s, args.l2 = args.l2, None  # the sweep's λs, not the config field l2
    fields = given(args)
    cfg = dataclasses.replace(cfg, **fields)
    if seeds is None or args.seeds is not None or "seed" in fields:  # a resumed sweep keeps its own
        seeds = [cfg.seed + i for i in range(args.seeds or 1)]
    with Progress(args.quiet or args.json) as progress:
        settings = SweepSettings(
            tuple(l2s),
            tuple(seeds),
            args.execution,
            checkpoint_every=args.checkpoint_every,
            **refit_choice(args, saved, SweepSettings),
        )
        summary = _sweep.train_sweep(
            cfg,
            settings,
            args.out,
            overwrite=args.overwrite,
            resume=args.resume,
            on_epoch=progress.epoch,
            log=(lambda text: None) if args.quiet or args.json else progress.log,
        )
    warn_if_chance([(r["val_accuracy"], summary["lr"], r["l2"]) for r in summary["results"]], cfg)
    if args.json:
        keys = ("selected_l2", "selected_l2_1se", "per_l2", "results", "refit")
        print(json.dumps({k: v for k, v in summary.items() if k in keys}))
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
        print(format_refit(summary["refit"]))
    print(f"every member: {os.path.join(summary['out'], 'sweep.csv')}; jaxl2 eval --run {summary['out']}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``jaxl2 eval``: a run's model (or a sweep member's) on one split (:func:`jaxl2.mnist.evaluate.evaluate_run`)."""
    from jaxl2.mnist import sigint
    from jaxl2.mnist.evaluate import evaluate_run

    sigint.allow()  # evaluation writes nothing
    res = evaluate_run(
        args.run, args.dataset, args.split, args.data_dir, l2=args.l2, seed=args.seed, refit=args.refit
    )
    if args.json:
        print(json.dumps(res))
        return 0
    model = "refit on train ∪ validation" if res["model"] == "refit" else "best epoch by validation"
    if res["model"] == "refit" and res["split"] in ("train", "val"):
        model += f", so it trained on this {res['split']} split"
    if "seed" in res:
        model += f"; sweep member λ {res['l2']:g}, seed {res['seed']}"
    print(
        f"{res['dataset']} {res['split']}: accuracy {100 * res['accuracy']:.2f}%  "
        f"data loss {res['data_loss']:.4f}  n {res['n']}  (model: {model})"
    )
    return 0


def gradcheck(args: argparse.Namespace) -> int:
    """``jaxl2 gradcheck``: :func:`jaxl2.gradcheck` on the reference MLP, in float64."""
    from jaxl2.check import gradcheck as check_gradients
    from jaxl2.mnist import sigint
    from jaxl2.mnist.model import reference_problem

    sigint.allow()  # the check writes nothing
    if args.batch < 1:
        return fail(f"--batch {args.batch} is invalid (an integer >= 1)")
    cfg = validate(Config(hidden=args.hidden, activation=args.activation, seed=args.seed, l2=args.l2))
    import jax

    with jax.enable_x64(True):
        loss_fn, params, batch = reference_problem(cfg, batch=args.batch, seed=args.seed)
        try:
            report = check_gradients(
                loss_fn, params, *batch, l2=args.l2, directions=args.directions, eps=args.eps, seed=args.seed
            )
        except Jaxl2Error as e:  # the library names its arguments; here they are flags
            return fail(re.sub(r"^(l2|eps|directions|seed)\b", lambda m: flag(m.group(1)), str(e)))
    print(json.dumps(report.as_dict()) if args.json else report)
    return 0 if report.ok else 1


def bench(args: argparse.Namespace) -> int:
    """``jaxl2 bench``: throughput against the machine's limit (:func:`jaxl2.mnist.bench.run_bench`)."""
    from jaxl2.mnist import bench as _bench
    from jaxl2.mnist import sigint

    sigint.allow()  # the benchmark writes nothing: Ctrl-C may stop it anywhere
    if args.rounds is not None and args.rounds < 1:
        return fail(f"--rounds {args.rounds} is invalid (an integer >= 1)")
    res = _bench.run_bench(quick=args.quick, rounds=args.rounds)
    print(json.dumps(res) if args.json else _bench.format_bench(res))
    return 0
