"""What the GGN costs on the reference MLP: ``jaxl2.ggn``'s K-FAC, EK-FAC and exact diagonal
(found from the jaxpr, :mod:`jaxl2.kfac`: what ``jaxl2 train --l2 evidence`` computes) and the whole
GGN's quadrature (``jaxl2.ggn_lanczos``, ``--evidence-curvature lanczos``) on mnist5k's
training images, beside one full-batch gradient of the same loss, in one process.

    python experiments/evidence_cost.py [--examples 3500] [--batch-size 1024] [--rounds 3]

All are compiled first; the medians of ``--rounds`` interleaved timings are printed with the
device, and their ratios to the gradient.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxl2
from jaxl2.mnist import MLP, load_data
from jaxl2.mnist.marglik import LANCZOS_PROBES, LANCZOS_STEPS
from jaxl2.mnist.runtime import device_name


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(fn(*args)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=3500, help="training images used (default 3500: all)")
    ap.add_argument(
        "--batch-size", type=int, default=1024, help="examples per chunk of jaxl2.ggn (default 1024)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timings of each (default 3)")
    args = ap.parse_args()
    ds = load_data("mnist5k")
    x, y = jnp.asarray(ds.train.x[: args.examples]), jnp.asarray(ds.train.y[: args.examples])
    model = MLP((256, 256))
    params = model.init(jax.random.PRNGKey(0), x[:1])

    def apply_fn(p, xb):
        return model.apply(p, xb)

    fns = {
        **{
            f"{name} (jaxl2.ggn {structure}, batch {args.batch_size})": jax.jit(
                lambda p, s=structure: (
                    jaxl2.ggn(apply_fn, p, x, y, structure=s, batch_size=args.batch_size).ggn
                )
            )
            for name, structure in (("exact diagonal", "diag"), ("K-FAC", "kron"), ("EK-FAC", "ekfac"))
        },
        f"whole GGN by Lanczos (jaxl2.ggn_lanczos, {LANCZOS_PROBES} probes × {LANCZOS_STEPS} steps)": jax.jit(
            lambda p: (
                jaxl2.ggn_lanczos(
                    apply_fn, p, x, y, key=jax.random.PRNGKey(0), probes=LANCZOS_PROBES, steps=LANCZOS_STEPS
                ).ggn
            )
        ),
        "one full-batch gradient": jax.jit(
            jax.grad(lambda p: -jnp.mean(jax.nn.log_softmax(apply_fn(p, x))[jnp.arange(len(y)), y]))
        ),
    }
    for fn in fns.values():  # compile each
        timed(fn, params)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, params))
    grad = float(np.median(times["one full-batch gradient"]))
    print(f"device: {device_name()}; {len(y)} examples, the 784-256-256-10 MLP")
    for name, t in times.items():
        print(f"{name}: {np.median(t):.3f} s ({np.median(t) / grad:,.1f}× the gradient)")


if __name__ == "__main__":
    main()
