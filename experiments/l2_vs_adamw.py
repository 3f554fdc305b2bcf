"""L2 in the loss against weight decay in the optimizer, at matched strengths.

Under SGD with momentum they coincide: ``sgdw`` (optax ``add_decayed_weights(λ)`` before the
momentum SGD) and L2 in the loss take the same steps up to float rounding (the max parameter
difference after one epoch is printed; over many epochs rounding differences grow, as training
is chaotic, while the accuracies and norms stay together).
Under Adam they do not: ``optax.adamw(weight_decay=λ)`` against Adam on ``CE + λ/2·Σw²``.

    python experiments/l2_vs_adamw.py OUT_DIR [--epochs 60]
"""

import argparse
import dataclasses
import json
import os

import jax
import numpy as np

from jaxl2.mnist.config import Config
from jaxl2.mnist.data import load
from jaxl2.mnist.train import Trainer, kernel_sq_norm


def train(cfg: Config, ds) -> dict:
    tr = Trainer(cfg, len(ds.train.y))
    s = tr.init()
    x, y = jax.device_put(ds.train.x), jax.device_put(ds.train.y)
    first = None
    for epoch in range(cfg.epochs):
        s, _ = tr.train_epoch(s, x, y)
        if epoch == 0:
            first = jax.device_get(s.params)
    params = jax.device_get(s.params)
    acc = {
        n: float(tr.evaluate(params, sp.x, sp.y)["accuracy"])
        for n, sp in (("train", ds.train), ("val", ds.val), ("test", ds.test))
    }
    return {"params": params, "first": first, **acc, "sq_norm": sum(kernel_sq_norm(params, cfg).values())}


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ds = load("mnist5k")
    rows = []
    base_sgd = Config(epochs=args.epochs)
    base_adam = Config(optimizer="adam", lr=3e-3, epochs=args.epochs)
    for lam in (1e-4, 1e-3, 1e-2):
        l2 = train(dataclasses.replace(base_sgd, l2=lam), ds)
        wd = train(dataclasses.replace(base_sgd, optimizer="sgdw", l2=0.0, weight_decay=lam), ds)
        diff = (max_diff(l2["first"], wd["first"]), max_diff(l2["params"], wd["params"]))
        rows.append(("momentum", lam, l2, wd, diff))
        l2 = train(dataclasses.replace(base_adam, l2=lam), ds)
        wd = train(dataclasses.replace(base_adam, optimizer="adamw", l2=0.0, weight_decay=lam), ds)
        diff = (max_diff(l2["first"], wd["first"]), max_diff(l2["params"], wd["params"]))
        rows.append(("adam", lam, l2, wd, diff))
    with open(os.path.join(args.out, "l2_vs_adamw.json"), "w") as f:
        json.dump(
            [
                {
                    "optimizer": o,
                    "strength": lam,
                    "max_param_diff_epoch1": d[0],
                    "max_param_diff_final": d[1],
                    **{f"l2_{k}": a[k] for k in ("train", "val", "test", "sq_norm")},
                    **{f"decay_{k}": b[k] for k in ("train", "val", "test", "sq_norm")},
                }
                for o, lam, a, b, d in rows
            ],
            f,
            indent=2,
        )
    print(
        "| optimizer | λ = wd | L2 in loss: train / val / test, Σ‖W‖² | decay in optimizer: train / val / test, Σ‖W‖² | max abs Δparam after 1 epoch / at the end |"
    )
    print("|---|---|---|---|---|")
    for o, lam, a, b, d in rows:
        decay = "sgdw (add_decayed_weights)" if o == "momentum" else "adamw"

        def fmt(r):
            return (
                f"{100 * r['train']:.2f} / {100 * r['val']:.2f} / {100 * r['test']:.2f}%, {r['sq_norm']:,.1f}"
            )

        print(f"| {o} vs {decay} | {lam:g} | {fmt(a)} | {fmt(b)} | {d[0]:.1e} / {d[1]:.2f} |")


if __name__ == "__main__":
    main()
