"""``jaxl2 sweep``: many λ and seeds in one compiled program (:func:`jaxl2.mnist.sweep.train_sweep`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from jaxl2.mnist.cli.parser import given, refit_choice
from jaxl2.mnist.cli.report import Progress, fail, format_per_l2, format_refit, warn_if_chance
from jaxl2.mnist.config import Config, SweepSettings

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
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
