"""Does refitting on train ∪ validation help? The default recipe, with and without the refit,
on held-out data (mnist5k's test split, never used to choose anything), over seeds and splits.

    python experiments/refit.py OUT_DIR [--seeds 0,1,2] [--split-seeds 0,1,2,3] [--epochs 120]

For each (split seed, seed): ``jaxl2 train --seed S --split-seed P`` (which refits for all its
epochs, the default), then a second refit for the best epoch's count (``--refit-epochs best``),
to compare the two rules. Prints a Markdown table and the means.
"""

import argparse
import dataclasses
import os

import numpy as np

from jaxl2.mnist import refit
from jaxl2.mnist.config import Config, RunSettings
from jaxl2.mnist.run import train_and_evaluate
from jaxl2.mnist.runtime import enable_compilation_cache
from jaxl2.mnist.train import load_and_check


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--split-seeds", type=ints, default=[0, 1, 2, 3])
    ap.add_argument("--epochs", type=int, default=120)
    args = ap.parse_args()
    enable_compilation_cache()
    rows = []
    print(
        "| split seed | seed | best epoch | test, unrefit | refit, all epochs (default) | refit, best epoch's count |"
    )
    print("|---|---|---|---|---|---|")
    for split_seed in args.split_seeds:
        for seed in args.seeds:
            cfg = dataclasses.replace(Config(), seed=seed, split_seed=split_seed, epochs=args.epochs)
            out = os.path.join(args.out, f"split{split_seed}-seed{seed}")
            s = train_and_evaluate(cfg, out, RunSettings(refit=True, refit_epochs="all"), overwrite=True)
            cfg, ds = load_and_check(cfg)
            best = refit.refit(cfg, ds, s["best_epoch"], out + "-refit-best")
            rows.append((s["test_accuracy"], s["refit_test_accuracy"], best["refit_test_accuracy"]))
            print(
                f"| {split_seed} | {seed} | {s['best_epoch']} | "
                + " | ".join(f"{100 * v:.2f}" for v in rows[-1])
                + " |",
                flush=True,
            )
    a = 100 * np.array(rows)
    print("| mean | | | " + " | ".join(f"{m:.2f}" for m in a.mean(0)) + " |")
    print(f"\nrefit (all) − unrefit per run: {', '.join(f'{d:+.1f}' for d in a[:, 1] - a[:, 0])}")
    print(f"refit (all) − refit (best) per run: {', '.join(f'{d:+.1f}' for d in a[:, 1] - a[:, 2])}")


if __name__ == "__main__":
    main()
