"""``jaxl2 sweep``: many λ and seeds in one compiled program (:func:`jaxl2.mnist.sweep.train_sweep`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from jaxl2.mnist.cli.options import enable_cache, given, refit_choice
from jaxl2.mnist.cli.progress import Progress
from jaxl2.mnist.cli.report import fail, flag, format_per_l2, format_refit, warn_if_chance
from jaxl2.mnist.config import Config, SweepSettings, render

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    from jaxl2.mnist import sweep as _sweep
    from jaxl2.mnist import sweepdir
    from jaxl2.mnist.rundir import load_config

    l2s, args.l2 = args.l2, None
    fields, saved = given(args), None
    if args.seeds is not None and args.seeds < 1:
        return fail(f"--seeds {args.seeds} is invalid (an integer >= 1)")
    seeds = None
    if args.resume:
        if not args.out:
            return fail("--resume needs --out DIR, the sweep to continue")
        saved_cfg, saved_l2s, saved_seeds = sweepdir.load_sweep_config(args.out)
        cfg = dataclasses.replace(saved_cfg, **fields)
        saved = load_config(args.out)
        l2s = saved_l2s if l2s is None else l2s
        seeds = saved_seeds if args.seeds is None and "seed" not in fields else None
    else:
        cfg = dataclasses.replace(Config(), **fields)
        l2s = SweepSettings.l2s if l2s is None else l2s
    if seeds is None:
        seeds = [cfg.seed + i for i in range(1 if args.seeds is None else args.seeds)]
    enable_cache(args)
    with Progress(args.quiet or args.json) as progress:
        settings = SweepSettings(
            tuple(l2s),
            tuple(seeds),
            args.execution,
            checkpoint_every=args.checkpoint_every,
            **refit_choice(args, saved, SweepSettings.refit),
        )
        summary = _sweep.train_sweep(
            cfg,
            settings,
            args.out,
            overwrite=args.overwrite,
            resume=args.resume,
            on_epoch=progress.epoch,
            log=lambda text: (
                None if args.quiet or args.json else progress.say(f"jaxl2: {render(text, flag)}")
            ),
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
