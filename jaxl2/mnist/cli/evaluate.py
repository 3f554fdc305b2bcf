"""``jaxl2 eval``: a run's model (or a sweep member's) on one split (:func:`jaxl2.mnist.evaluate.evaluate_run`)."""

from __future__ import annotations

import argparse
import json

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
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
