"""The shared λ that the Laplace evidence picks with the exact Gauss–Newton, beside K-FAC's and EK-FAC's.

The evidence's derivative in ``ln α`` for one λ shared by the kernels is ``½·(γ(α) − α·Σ_l‖w_l‖²)``
with ``γ(α) = tr(H·(H + αI)⁻¹)`` and ``H`` the GGN of all three kernels together (269,322
parameters: no K-FAC, no block per layer). ``γ(α)`` comes from stochastic Lanczos quadrature:
``--probes`` Rademacher vectors ``z``, ``--lanczos`` steps of Lanczos on ``H`` from each (GGN-vector
products by ``jax.jvp``/``jax.vjp`` over all 4,000 images, full reorthogonalisation), and
``zᵀf(H)z ≈ ‖z‖²·Σ_j τ_j²·f(θ_j)`` with ``θ_j, τ_j`` the Ritz values and first components of the
tridiagonal's eigenvectors. One Lanczos run per probe serves every α, so the root is bisected on
the quadrature. As a check the same quadrature's ``tr(H)`` (``f(h) = h``) is printed beside the
exact trace (the sum of ``dense_ggn``'s exact diagonal).

For each shared λ trained on train ∪ validation (the default recipe, as
``evidence_identifiability.py``), it prints the test accuracy, ``γ`` at that λ, and the shared λ
that maximises the evidence there: exact (± the spread over probes), K-FAC, EK-FAC. Then a
fixed-λ run with its refit (``--refit-l2``: the λs, seeds 0, 1, 2) tells what test accuracy a
λ gets.

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

from jaxl2 import evidence_l2
from jaxl2.mnist.config import Config
from jaxl2.mnist.data import load
from jaxl2.mnist.evidence import EvidenceTrainer, dense_ggn
from jaxl2.mnist.loop import kernel_sq_norm
from jaxl2.mnist.refit import train_val
from jaxl2.mnist.run import train_and_evaluate
from jaxl2.mnist.runtime import device_name
from jaxl2.mnist.steps import Trainer

KERNELS = ("Dense_0", "Dense_1", "Dense_2")


def ggn_product(params, x_NxD):
    """``v ↦ H·v`` over the kernels raveled (biases held), ``H = Σ_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i``."""
    layers = params["params"]
    shapes = [layers[k]["kernel"].shape for k in KERNELS]
    sizes = [int(np.prod(s)) for s in shapes]

    def logits(theta):
        h, start = x_NxD, 0
        for i, (k, shape, size) in enumerate(zip(KERNELS, shapes, sizes)):
            w = theta[start : start + size].reshape(shape)
            h = h @ w + layers[k]["bias"]
            h = jax.nn.relu(h) if i < len(KERNELS) - 1 else h
            start += size
        return h

    theta = jnp.concatenate([layers[k]["kernel"].ravel() for k in KERNELS])
    z, jvp = jax.linearize(logits, theta)
    _, vjp = jax.vjp(logits, theta)
    p = jax.nn.softmax(z)

    @jax.jit
    def product(v):
        u = jvp(v)
        return vjp(p * u - p * jnp.sum(p * u, axis=1, keepdims=True))[0]

    return product, theta.size


def lanczos(product, z: jax.Array, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values ``θ`` and weights ``τ²`` (first components squared) of ``steps`` Lanczos steps
    from ``z``, with full reorthogonalisation."""
    basis = [z / jnp.linalg.norm(z)]
    alphas, betas = [], []
    for j in range(steps):
        w = product(basis[j])
        a = jnp.vdot(w, basis[j])
        q = jnp.stack(basis)
        w = w - q.T @ (q @ w)  # full reorthogonalisation (twice is enough)
        w = w - q.T @ (q @ w)
        b = jnp.linalg.norm(w)
        alphas.append(float(a))
        if j == steps - 1 or float(b) < 1e-6 * abs(alphas[0]):
            break
        betas.append(float(b))
        basis.append(w / b)
    t = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
    theta, vectors = np.linalg.eigh(t)
    return np.maximum(theta, 0.0), vectors[0] ** 2


def shared_root(runs, size: int, sq: float, n: int) -> list[float]:
    """Per probe: the λ where ``γ(nλ) = nλ·sq`` (bisection in ``ln λ`` over 1e-8..1)."""
    out = []
    for theta, tau2 in runs:
        lo, hi = np.log(1e-8), 0.0
        for _ in range(60):
            mid = (lo + hi) / 2
            a = n * np.exp(mid)
            gamma = size * np.sum(tau2 * theta / (theta + a))
            lo, hi = (mid, hi) if gamma > a * sq else (lo, mid)
        out.append(float(np.exp((lo + hi) / 2)))
    return out


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
    print(f"device: {device_name()}; seed {args.seed}; n {n}; {args.epochs} epochs per λ")
    print(f"{args.probes} probes × {args.lanczos} Lanczos steps")
    for lam in (float(v) for v in args.l2.split(",") if v):
        tr = Trainer(Config(seed=args.seed, l2=lam, epochs=args.epochs), n)
        state = tr.init()
        for _ in range(args.epochs):
            state, _ = tr.train_epoch(state, x, y)
        test = 100 * float(tr.evaluate(state.params, *map(jnp.asarray, ds.need("test")))["accuracy"])
        norms = kernel_sq_norm(state.params, tr.cfg)
        sq = float(sum(norms.values()))
        t0 = time.perf_counter()
        product, size = ggn_product(state.params, x)
        keys = jax.random.split(jax.random.key(args.seed), args.probes)
        runs = [lanczos(product, jax.random.rademacher(k, (size,), jnp.float32), args.lanczos) for k in keys]
        roots = shared_root(runs, size, sq, n)
        gamma = [size * np.sum(t2 * th / (th + n * lam)) for th, t2 in runs]
        trace = np.mean([size * np.sum(t2 * th) for th, t2 in runs])
        diag, _ = dense_ggn(state.params, x, y, "relu", "diag")
        exact_trace = float(sum(jnp.sum(diag["params"][k]["kernel"]) for k in KERNELS))
        approx = {}
        for c, et in trainers.items():
            new = evidence_l2(
                et.curvature(state.params, x, y),
                state.params,
                1e-3,
                select=et.select,
                shared=True,
                method="bisect",
                steps=40,
            )
            approx[c] = float(new[re.escape(et.paths[0])])
        print(
            f"λ {lam:g}: test {test:.2f}%; tr(H) quadrature {trace:.4g} vs exact {exact_trace:.4g}; "
            f"γ at λ {np.mean(gamma):.0f} ± {np.std(gamma):.0f}; shared evidence λ: exact "
            f"{np.exp(np.mean(np.log(roots))):.3g} (probes {min(roots):.3g}..{max(roots):.3g}), "
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
