"""``jaxl2 bench``: throughput against the machine's limit (:func:`jaxl2.mnist.bench.run_bench`)."""

from __future__ import annotations

import argparse
import json

from jaxl2.mnist.cli.report import fail

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    from jaxl2.mnist import bench, sigint

    sigint.allow()  # the benchmark writes nothing: Ctrl-C may stop it anywhere
    if args.rounds is not None and args.rounds < 1:
        return fail(f"--rounds {args.rounds} is invalid (an integer >= 1)")
    res = bench.run_bench(quick=args.quick, rounds=args.rounds)
    print(json.dumps(res) if args.json else bench.format_bench(res))
    return 0
