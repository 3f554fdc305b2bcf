"""``jaxl2 gradcheck``: :func:`jaxl2.gradcheck` on the reference MLP, in float64."""

from __future__ import annotations

import argparse
import json
import re

from jaxl2.errors import Jaxl2Error
from jaxl2.mnist.cli.report import fail, flag
from jaxl2.mnist.config import Config, validate

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    from jaxl2.check import gradcheck
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
            report = gradcheck(
                loss_fn, params, *batch, l2=args.l2, directions=args.directions, eps=args.eps, seed=args.seed
            )
        except Jaxl2Error as e:  # the library names its arguments; here they are flags
            return fail(re.sub(r"^(l2|eps|directions|seed)\b", lambda m: flag(m.group(1)), str(e)))
    print(json.dumps(report.as_dict()) if args.json else report)
    return 0 if report.ok else 1
