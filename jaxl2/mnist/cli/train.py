"""``jaxl2 train``: one run into its directory (:func:`jaxl2.mnist.run.train_and_evaluate`)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from jaxl2.mnist.cli.options import enable_cache, fd1_to_stderr, given, refit_choice
from jaxl2.mnist.cli.progress import Progress, epoch_info
from jaxl2.mnist.cli.report import fail, format_summary, warn_if_chance
from jaxl2.mnist.config import Config, RunSettings

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxl2.mnist import run as _run
    from jaxl2.mnist import tensorboard
    from jaxl2.mnist.rundir import load_config

    fields, saved = given(args), None
    if args.resume:
        if not args.out:
            return fail("--resume needs --out DIR, the run to continue")
        cfg = dataclasses.replace(_run.load_run_config(args.out, kind="run"), **fields)
        saved = load_config(args.out)
    else:
        cfg = dataclasses.replace(Config(), **fields)
    # gloo (the CPU collectives) prints "Rank 0 is connected…" on stdout, which --json keeps for its object
    with fd1_to_stderr(args.json and args.distributed):
        if args.distributed:
            from jaxl2.mnist.parallel import initialize_distributed

            if not args.out:
                return fail("--distributed needs --out DIR (one directory that every process can reach)")
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        enable_cache(args)
        with Progress(args.quiet or args.json, first="", epochs=cfg.epochs) as progress:
            summary = _run.train_and_evaluate(
                cfg,
                args.out,
                RunSettings(
                    checkpoint_every=args.checkpoint_every,
                    devices=args.devices,
                    **refit_choice(args, saved, RunSettings.refit),
                ),
                resume=args.resume,
                overwrite=args.overwrite,
                on_start=progress.start,
                on_epoch=lambda row: progress.epoch("", row["epoch"], cfg.epochs, epoch_info(row)),
                on_refit_epoch=lambda e, n: progress.epoch("refit on train ∪ validation", e, n),
                log=progress.log,
            )
    if jax.process_index() == 0:  # the process that writes the run directory
        tensorboard.write_run(summary["out"])
    print(json.dumps(summary) if args.json else format_summary(summary))
    warn_if_chance([(summary["val_accuracy"], summary["lr"], cfg.l2)], cfg)
    return 0
