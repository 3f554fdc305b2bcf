"""`--l2 auto` against a 7-point λ grid: validation and test accuracy, λ per layer, seconds.

For each optimizer: the grid (`jaxl2 sweep`'s one vmapped program, 7 λ × the seeds) and its best
λ by mean validation accuracy; then, per seed and side by side in this process, one fixed-λ run
(λ = 1e-3) and one `l2 auto` run, both through `train_and_evaluate` (what `jaxl2 train` runs:
compiling, checkpoints, plots), timed wall-clock, in alternating order. Everything else is the
default configuration (mnist5k, 120 epochs, batch 128). Writes OUT_DIR/auto_l2.json and prints
the README's table.

    python experiments/auto_l2.py OUT_DIR [--epochs 120] [--seeds 0,1,2] [--optimizers momentum,adam]
"""

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from jaxl2.mnist.config import DEFAULT_SWEEP_L2, Config, SweepSettings
from jaxl2.mnist.run import train_and_evaluate
from jaxl2.mnist.runtime import device_name
from jaxl2.mnist.sweep import train_sweep

TARGET_POINTS, TARGET_RATIO, FIXED_L2 = 0.3, 1.5, 1e-3


def timed_run(cfg: Config, out: str) -> dict:
    t0 = time.perf_counter()
    s = train_and_evaluate(cfg, out, overwrite=True)
    return {**s, "wall_seconds": time.perf_counter() - t0}


def pm(values, scale=100.0) -> str:
    return f"{scale * np.mean(values):.2f} ± {scale * np.std(values):.2f}"


def one_optimizer(optimizer: str, epochs: int, seeds: list[int], out: str) -> dict:
    base = Config(optimizer=optimizer, epochs=epochs)
    t0 = time.perf_counter()
    grid = train_sweep(
        base,
        SweepSettings(DEFAULT_SWEEP_L2, tuple(seeds), "sequential"),
        os.path.join(out, f"{optimizer}-grid"),
        overwrite=True,
    )
    grid_wall = time.perf_counter() - t0
    best = grid["selected_l2"]
    members = [r for r in grid["results"] if r["l2"] == best]
    fixed, auto = [], []
    for i, seed in enumerate(seeds):
        jobs = [("fixed", dataclasses.replace(base, seed=seed, l2=FIXED_L2), fixed)]
        jobs.append(("auto", dataclasses.replace(base, seed=seed, l2="auto"), auto))
        for name, cfg, into in jobs if i % 2 == 0 else jobs[::-1]:
            into.append(timed_run(cfg, os.path.join(out, f"{optimizer}-{name}-{seed}")))
    grid_val = [m["val_accuracy"] for m in members]
    auto_val = [a["val_accuracy"] for a in auto]
    layers = list(auto[0]["l2_final"])
    return {
        "optimizer": optimizer,
        "epochs": epochs,
        "seeds": seeds,
        "grid_l2": list(DEFAULT_SWEEP_L2),
        "grid_best_l2": best,
        "grid_per_l2": grid["per_l2"],
        "grid_seconds": grid_wall,
        "grid_val": grid_val,
        "grid_test": [m["test_accuracy"] for m in members],
        "auto_val": auto_val,
        "auto_test": [a["test_accuracy"] for a in auto],
        "auto_l2_final": {p: [a["l2_final"][p] for a in auto] for p in layers},
        "auto_best_epoch": [a["best_epoch"] for a in auto],
        "fixed_val": [f["val_accuracy"] for f in fixed],
        "fixed_wall_seconds": [f["wall_seconds"] for f in fixed],
        "auto_wall_seconds": [a["wall_seconds"] for a in auto],
        "val_gap_points": 100 * (np.mean(auto_val) - np.mean(grid_val)),
        "time_ratio": float(
            np.mean([a["wall_seconds"] for a in auto]) / np.mean([f["wall_seconds"] for f in fixed])
        ),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| optimizer | grid best λ | grid best: val / test % | `--l2 auto`: val / test % | auto λ at the end "
        "(per layer, geometric mean over seeds) | seconds: grid / fixed-λ run / auto run (ratio) | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lams = ", ".join(
            f"{p.split('/')[-2]} {np.exp(np.mean(np.log(v))):.2g}" for p, v in r["auto_l2_final"].items()
        )
        fixed_s, auto_s = np.mean(r["fixed_wall_seconds"]), np.mean(r["auto_wall_seconds"])
        gap, ratio = r["val_gap_points"], r["time_ratio"]
        met = gap >= -TARGET_POINTS and ratio <= TARGET_RATIO
        verdict = "met" if met else "missed"
        verdict += f": val {gap:+.2f} points"
        if gap < -TARGET_POINTS:
            verdict += f" ({-TARGET_POINTS - gap:.2f} beyond −{TARGET_POINTS})"
        verdict += f", time {ratio:.2f}×" + (
            f" ({ratio - TARGET_RATIO:.2f} beyond 1.5×)" if ratio > TARGET_RATIO else ""
        )
        lines.append(
            f"| {r['optimizer']} | {r['grid_best_l2']:g} | {pm(r['grid_val'])} / {pm(r['grid_test'])} | "
            f"{pm(r['auto_val'])} / {pm(r['auto_test'])} | {lams} | "
            f"{r['grid_seconds']:.0f} / {fixed_s:.1f} / {auto_s:.1f} ({ratio:.2f}×) | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=Config().epochs)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--optimizers", default="momentum,adam", help="comma-separated (default momentum,adam)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [one_optimizer(o, args.epochs, seeds, args.out) for o in args.optimizers.split(",")]
    with open(os.path.join(args.out, "auto_l2.json"), "w") as f:
        json.dump({"device": device_name(), "rows": rows}, f, indent=2)
    print(f"device: {device_name()}; {args.epochs} epochs, seeds {args.seeds}, mnist5k")
    print(table(rows))


if __name__ == "__main__":
    main()
