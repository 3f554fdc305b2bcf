"""The classic TensorFlow 1 L2 example, literally, next to the same network the Flax way.

Classic: a *linear* 784-256-256-10 network (no activation), N(0, 1) initial weights, plain SGD
with lr 0.01, λ = 0.01 on the weights (λ/2·‖W‖², as tf.nn.l2_loss·λ). Beside it: ReLU and
Flax's LeCun-normal init with the same optimizer and λ, then with λ = 0.

    python experiments/classic_recipe.py OUT_DIR [--epochs 50]

Writes OUT_DIR/classic_recipe.json and prints a Markdown table.
"""

import argparse
import dataclasses
import json
import os

from jaxl2.mnist.config import Config, RunSettings
from jaxl2.mnist.run import train_and_evaluate
from jaxl2.mnist.train import Diverged

CLASSIC = Config(activation="identity", init="normal", optimizer="sgd", schedule="constant", lr=0.01, l2=0.01)
VARIANTS = {
    "classic: linear, N(0,1) init, SGD 0.01, λ 0.01": CLASSIC,
    "ReLU, Flax init, SGD 0.01, λ 0.01": dataclasses.replace(CLASSIC, activation="relu", init="lecun_normal"),
    "ReLU, Flax init, SGD 0.01, λ 0": dataclasses.replace(
        CLASSIC, activation="relu", init="lecun_normal", l2=0.0
    ),
    "linear, Flax init, SGD 0.01, λ 0.01": dataclasses.replace(CLASSIC, init="lecun_normal"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=50)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, cfg in VARIANTS.items():
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
        run_dir = os.path.join(
            args.out, name.split(":")[0].replace(" ", "_").replace(",", "").replace(".", "")
        )
        try:
            s = train_and_evaluate(
                cfg, run_dir, RunSettings(refit=False), overwrite=True
            )  # the recipes as they were
            rows.append(
                {
                    "variant": name,
                    **{
                        k: s[k]
                        for k in (
                            "train_accuracy",
                            "val_accuracy",
                            "test_accuracy",
                            "train_data_loss",
                            "penalty",
                            "kernel_sq_norm",
                        )
                    },
                }
            )
        except Diverged as e:
            rows.append({"variant": name, "diverged": str(e)})
    with open(os.path.join(args.out, "classic_recipe.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(
        f"| variant ({args.epochs} epochs, mnist5k, batch 128) | train | val | test | train CE | λ/2·Σw² | Σ‖W‖² |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "diverged" in r:
            print(f"| {r['variant']} | diverged: {r['diverged'][:80]} | | | | | |")
            continue
        print(
            f"| {r['variant']} | {100 * r['train_accuracy']:.2f}% | {100 * r['val_accuracy']:.2f}% | "
            f"{100 * r['test_accuracy']:.2f}% | {r['train_data_loss']:.3f} | {r['penalty']:.2f} | "
            f"{sum(r['kernel_sq_norm'].values()):,.0f} |"
        )


if __name__ == "__main__":
    main()
