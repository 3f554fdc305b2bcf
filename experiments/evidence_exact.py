"""The shared λ that the Laplace evidence picks with the whole Gauss–Newton, beside K-FAC's and EK-FAC's.

For one λ shared by the kernels, the evidence's derivative in ``ln α`` is
``½·(γ(α) − α·Σ_l‖w_l‖²)`` with ``γ(α) = tr(H·(H + αI)⁻¹)`` and ``H`` the GGN of all three kernels
together (269,322 parameters: no block per layer, no Kronecker factors). ``jaxl2.ggn_lanczos``
estimates it by stochastic Lanczos quadrature (``--probes`` Rademacher vectors, ``--lanczos``
steps each, GGN-vector products over all 4,000 images), and
``jaxl2.evidence_l2(shared=True, method="bisect")`` finds its root. As a check, the same
quadrature's ``tr(H)`` is printed beside the exact trace (the sum of ``jaxl2.ggn``'s exact
diagonal), and the root is also found per probe, for its spread.

For each shared λ trained on train ∪ validation (the default recipe, as
``evidence_identifiability.py``), it prints the test accuracy, ``γ`` at that λ, and the shared λ
that maximises the evidence there: from the whole GGN, K-FAC and EK-FAC. Then a fixed-λ run with
its refit (``--refit-l2``: the λs, seeds 0, 1, 2) tells what test accuracy a λ gets.

    python experiments/evidence_exact.py [--l2 1e-3,3e-3] [--probes 8] [--lanczos 80] [--refit-l2 3e-3]
"""

import argparse
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from evidence_identifiability import shared_lambda, trained_at  # the sibling script's

from jaxl2 import Curvature, evidence_l2, ggn, ggn_lanczos
from jaxl2.mnist.config import Config
from jaxl2.mnist.data import load
from jaxl2.mnist.marglik import EvidenceTrainer
from jaxl2.mnist.refit import train_val
from jaxl2.mnist.run import train_and_evaluate
from jaxl2.mnist.runtime import device_name
from jaxl2.mnist.train import kernel_sq_norm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--l2", default="1e-3,3e-3", help="the shared λs to train at (train ∪ validation)")
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--lanczos", type=int, default=80, help="Lanczos steps per probe")
    ap.add_argument("--refit-l2", default="", help="λs to run as `jaxl2 train --l2 λ` (refit), seeds 0-2")
    args = ap.parse_args()
    ds = load("mnist5k")
    data = train_val(ds)
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)
    n = len(y)
    trainers = {c: EvidenceTrainer(Config(l2="evidence", evidence_curvature=c), n) for c in ("kron", "ekfac")}
    et = trainers["kron"]
    print(f"device: {device_name()}; seed {args.seed}; n {n}; {args.epochs} epochs per λ")
    print(f"{args.probes} probes × {args.lanczos} Lanczos steps")
    for lam in (float(v) for v in args.l2.split(",") if v):
        tr, state, test = trained_at(lam, args.seed, args.epochs, x, y, ds)
        sq = float(sum(kernel_sq_norm(state.params, tr.cfg).values()))
        t0 = time.perf_counter()
        whole = ggn_lanczos(
            tr.model.apply,
            state.params,
            x,
            y,
            key=jax.random.PRNGKey(args.seed),
            probes=args.probes,
            steps=args.lanczos,
            select=et.select,
        )
        nodes, weights = whole.ggn
        size = sum(np.size(leaf) for leaf in jax.tree.leaves(state.params) if np.ndim(leaf) == 2)
        trace = size * float(jnp.mean(jnp.sum(weights * nodes, axis=-1)))
        one = evidence_l2(whole, state.params, lam, select=et.select, shared=True)  # one MacKay step
        gamma = n * float(one[re.escape(et.paths[0])]) * sq
        per_probe = [
            shared_lambda(
                et,
                Curvature(
                    whole.log_likelihood, (nodes[i : i + 1], weights[i : i + 1]), n, whole.paths, "lanczos"
                ),
                state.params,
            )
            for i in range(args.probes)
        ]
        diag = ggn(et.model.apply, state.params, x, y, structure="diag", batch_size=1024)
        exact_trace = float(sum(jnp.sum(block) for block in diag.ggn))
        approx = {
            c: shared_lambda(t, t.curvature(state.params, x, y), state.params) for c, t in trainers.items()
        }
        print(
            f"λ {lam:g}: test {test:.2f}%; tr(H) quadrature {trace:.4g} vs exact {exact_trace:.4g}; "
            f"γ at λ {gamma:.0f}; shared evidence λ: whole GGN {shared_lambda(et, whole, state.params):.3g} "
            f"(one probe each: {min(per_probe):.3g}..{max(per_probe):.3g}), "
            f"K-FAC {approx['kron']:.3g}, EK-FAC {approx['ekfac']:.3g} ({time.perf_counter() - t0:.0f} s)"
        )
    for lam in (float(v) for v in args.refit_l2.split(",") if v):
        with tempfile.TemporaryDirectory() as root:
            accs = [
                100
                * train_and_evaluate(Config(l2=lam, seed=s), os.path.join(root, str(s)))[
                    "refit_test_accuracy"
                ]
                for s in (0, 1, 2)
            ]
        print(
            f"fixed λ {lam:g}, refit, seeds 0-2: "
            + ", ".join(f"{a:.2f}" for a in accs)
            + f" (mean {np.mean(accs):.2f})"
        )


if __name__ == "__main__":
    main()
