"""Why ``--l2 evidence`` regularises more than the grid on mnist5k, from fixed-λ runs.

Each shared λ is trained on train ∪ validation (4,000 images; the default recipe: momentum,
120 epochs) and then measured at the params it reached. The script prints:

* the test accuracy;
* per layer: ``‖w_l‖²``, ``n·λ·‖w_l‖²`` and the effective number of parameters ``γ_l`` under
  K-FAC and under EK-FAC (``jaxl2.evidence_l2``'s one MacKay step gives ``γ_l = n·λ_new_l·‖w_l‖²``).

A ReLU MLP with unregularised biases computes the same function when one layer is scaled by
``c`` and the next by ``1/c``. At a trained optimum ``n·λ_l·‖w_l‖²`` is therefore the same for
every layer, while MacKay's fixed point needs it to equal ``γ_l``. Unequal ``γ_l`` leave per-layer
λs with no joint fixed point.

It also prints, under K-FAC and EK-FAC, the shared λ that maximises the evidence at those params:
the root of ``Σγ_l(λ) = n·λ·Σ‖w_l‖²`` (``jaxl2.evidence_l2(shared=True, method="bisect")``).

    python experiments/evidence_identifiability.py [--seed 0] [--l2 1e-4,1e-3,3e-3,1e-2] [--epochs 120]
"""

import argparse
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxl2 import evidence_l2
from jaxl2.mnist.config import Config
from jaxl2.mnist.data import load
from jaxl2.mnist.marglik import EvidenceTrainer
from jaxl2.mnist.refit import train_val
from jaxl2.mnist.runtime import device_name
from jaxl2.mnist.train import Trainer, kernel_sq_norm


def gammas(et: EvidenceTrainer, curv, params, sq: np.ndarray, lam: float) -> np.ndarray:
    """``γ_l`` at a shared λ: one MacKay step from it, ``γ_l = n·λ_new_l·‖w_l‖²`` (``sq``: the
    layers' ``‖w_l‖²``, in ``et.paths`` order)."""
    new = evidence_l2(curv, params, lam, select=et.select, steps=1)
    return curv.n * np.array([float(new[re.escape(p)]) for p in et.paths]) * sq


def shared_lambda(et: EvidenceTrainer, curv, params) -> float:
    """The one λ that maximises the evidence at ``params`` (bisection in ``ln λ``)."""
    new = evidence_l2(curv, params, 1e-3, select=et.select, shared=True, method="bisect", steps=40)
    return float(new[re.escape(et.paths[0])])


def trained_at(lam: float, seed: int, epochs: int, x, y, ds) -> tuple[Trainer, Any, float]:
    """A shared λ trained on ``x, y`` (train ∪ validation) with the default recipe: the trainer,
    the final state and the test accuracy (%) of ``ds``."""
    tr = Trainer(Config(seed=seed, l2=lam, epochs=epochs), len(y))
    state = tr.init()
    for _ in range(epochs):
        state, _ = tr.train_epoch(state, x, y)
    return tr, state, 100 * float(tr.evaluate(state.params, *map(jnp.asarray, ds.need("test")))["accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--l2", default="1e-4,1e-3,3e-3,1e-2", help="the shared λs to train at")
    ap.add_argument("--epochs", type=int, default=120)
    args = ap.parse_args()
    ds = load("mnist5k")
    data = train_val(ds)
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)
    trainers = [
        EvidenceTrainer(Config(l2="evidence", seed=args.seed, evidence_curvature=c), len(y))
        for c in ("kron", "ekfac")
    ]
    print(f"device: {device_name()}; seed {args.seed}; n {len(y)}; {args.epochs} epochs per λ")
    print(
        "λ       test %   ‖w_l‖²             n·λ·‖w_l‖²         K-FAC γ_l            EK-FAC γ_l"
        "           shared evidence λ: K-FAC, EK-FAC"
    )
    for lam in (float(v) for v in args.l2.split(",")):
        tr, state, test = trained_at(lam, args.seed, args.epochs, x, y, ds)
        norms = kernel_sq_norm(state.params, tr.cfg)
        sq = np.array([norms[p] for p in trainers[0].paths])
        curvs = [et.curvature(state.params, x, y) for et in trainers]
        gamma = [gammas(et, c, state.params, sq, lam) for et, c in zip(trainers, curvs)]
        shared = [shared_lambda(et, c, state.params) for et, c in zip(trainers, curvs)]

        def fmt(v):
            return "(" + ", ".join(f"{a:.0f}" if a >= 10 else f"{a:.2f}" for a in v) + ")"

        print(
            f"{lam:<7.0e} {test:6.2f}   {fmt(sq):18s} {fmt(len(y) * lam * sq):18s} "
            f"{fmt(gamma[0]):20s} {fmt(gamma[1]):20s} {shared[0]:.3g}, {shared[1]:.3g}"
        )


if __name__ == "__main__":
    main()
