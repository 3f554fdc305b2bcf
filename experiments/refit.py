"""Does refitting on train ∪ validation help? The default recipe, with and without the refit,
on held-out data (mnist5k's test split, never used to choose anything), over seeds and splits.

    python experiments/refit.py OUT_DIR [--seeds 0,1,2] [--split-seeds 0] [--epochs 120] [--full]

For each (split seed, seed): ``jaxl2 train --seed S --split-seed P --refit`` (the best epoch by
validation accuracy chooses the refit's epoch count); ``--full`` also refits for all ``--epochs``
epochs, to compare the two choices. Prints a Markdown table and the means.
"""

import argparse
import dataclasses
import os

import numpy as np

from jaxl2.mnist import refit
from jaxl2.mnist.config import Config
from jaxl2.mnist.loop import load_and_check
from jaxl2.mnist.run import train_and_evaluate
from jaxl2.mnist.runtime import enable_compilation_cache


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--split-seeds", type=ints, default=[0])
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--full", action="store_true", help="also refit for all --epochs epochs")
    args = ap.parse_args()
    enable_compilation_cache()
    rows = []
    print("| split seed | seed | best epoch | test | refit test | refit, all epochs |")
    print("|---|---|---|---|---|---|")
    for split_seed in args.split_seeds:
        for seed in args.seeds:
            cfg = dataclasses.replace(Config(), seed=seed, split_seed=split_seed, epochs=args.epochs)
            out = os.path.join(args.out, f"split{split_seed}-seed{seed}")
            s = train_and_evaluate(cfg, out, overwrite=True, refit=True)
            full = None
            if args.full:
                cfg, ds = load_and_check(cfg)
                full = refit.refit(cfg, ds, cfg.epochs, os.path.join(out, "refit-full"))[
                    "refit_test_accuracy"
                ]
            rows.append((s["test_accuracy"], s["refit_test_accuracy"], full))
            shown = "—" if full is None else f"{100 * full:.2f}"
            print(
                f"| {split_seed} | {seed} | {s['best_epoch']} | {100 * s['test_accuracy']:.2f} | "
                f"{100 * s['refit_test_accuracy']:.2f} | {shown} |",
                flush=True,
            )
    a = 100 * np.array([[r[0], r[1]] for r in rows])
    print(
        f"\nmean test {a[:, 0].mean():.2f} ± {a[:, 0].std():.2f}, refit {a[:, 1].mean():.2f} ± {a[:, 1].std():.2f}"
    )
    print(f"refit − test per run: {', '.join(f'{d:+.1f}' for d in a[:, 1] - a[:, 0])}")
    if args.full:
        f = 100 * np.array([r[2] for r in rows])
        print(f"refit over all epochs: {f.mean():.2f} ± {f.std():.2f}")


if __name__ == "__main__":
    main()
