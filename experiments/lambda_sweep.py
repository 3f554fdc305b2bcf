"""What L2 does: a 7-λ × 3-seed sweep on mnist5k, for SGD with momentum and for Adam.

    python experiments/lambda_sweep.py OUT_DIR [--epochs 120]

Each optimizer's sweep trains its 21 members in one compiled program (``jaxl2.mnist.sweep``) and
writes OUT_DIR/<optimizer>/sweep.{json,csv,png}; a Markdown table (mean ± std over seeds)
is printed.
"""

import argparse
import dataclasses
import os

import numpy as np

from jaxl2.mnist.config import Config, SweepSettings
from jaxl2.mnist.sweep import train_sweep

L2S = [0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
RECIPES = {
    "momentum": Config(),  # the default: momentum 0.9, lr 0.3 cosine
    "adam": Config(optimizer="adam", lr=3e-3),  # lr 3e-3 cosine
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    for name, cfg in RECIPES.items():
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
        s = train_sweep(
            cfg, SweepSettings(L2S, tuple(range(args.seeds))), os.path.join(args.out, name), log=print
        )
        print(
            f"\n### {name} ({s['execution']}, {s['seconds']:.0f} s, {s['device']}); selected λ = {s['selected_l2']:g}\n"
        )
        print("| λ | train | validation | test | train − test | Σ‖W‖² |")
        print("|---|---|---|---|---|---|")
        for lam in L2S:
            rs = [r for r in s["results"] if r["l2"] == lam]

            def ms(key, scale=100.0, rs=rs):
                v = scale * np.array([r[key] if isinstance(key, str) else key(r) for r in rs])
                return f"{v.mean():.2f} ± {v.std():.2f}"

            print(
                f"| {lam:g} | {ms('train_accuracy')} | {ms('val_accuracy')} | {ms('test_accuracy')} | {ms('gap')} | "
                f"{ms(lambda r: sum(r['kernel_sq_norm'].values()), 1.0)} |"
            )


if __name__ == "__main__":
    main()
