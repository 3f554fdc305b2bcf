"""``jaxl2 train``: one run into its directory (:func:`jaxl2.mnist.run.train_and_evaluate`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator

from jaxl2.mnist.cli.parser import given, refit_choice
from jaxl2.mnist.cli.report import Progress, epoch_info, fail, format_summary, warn_if_chance
from jaxl2.mnist.config import Config, RunSettings

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxl2.mnist import run as _run
    from jaxl2.mnist import tensorboard
    from jaxl2.mnist.rundir import load_config

    cfg, saved = Config(), None
    if args.resume and args.out:  # without --out, train_and_evaluate says what is missing
        cfg, saved = _run.load_run_config(args.out, kind="run"), load_config(args.out)
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
    if jax.process_index() == 0:  # the process that writes the run directory
        tensorboard.write_run(summary["out"])
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
