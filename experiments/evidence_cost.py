"""What the exact GGN diagonal costs on the reference MLP: ``jaxl2.ggn(structure="diag")`` on
mnist5k's training images beside one full-batch gradient of the same loss, in one process.

    python experiments/evidence_cost.py [--examples 3500] [--batch-size 32] [--rounds 3]

Both are compiled first; the medians of ``--rounds`` interleaved timings are printed with the
device, and their ratio.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxl2
from jaxl2.mnist import MLP, load_data
from jaxl2.mnist.runtime import device_name


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(fn(*args)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=3500, help="training images used (default 3500: all)")
    ap.add_argument(
        "--batch-size", type=int, default=32, help="examples per vectorised Jacobian (default 32)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timings of each (default 3)")
    args = ap.parse_args()
    ds = load_data("mnist5k")
    x, y = jnp.asarray(ds.train.x[: args.examples]), jnp.asarray(ds.train.y[: args.examples])
    model = MLP((256, 256))
    params = model.init(jax.random.PRNGKey(0), x[:1])

    def apply_fn(p, xb):
        return model.apply(p, xb)

    diag = jax.jit(lambda p: jaxl2.ggn(apply_fn, p, x, y, structure="diag", batch_size=args.batch_size))
    grad = jax.jit(jax.grad(lambda p: -jnp.mean(jax.nn.log_softmax(apply_fn(p, x))[jnp.arange(len(y)), y])))
    timed(diag, params), timed(grad, params)  # compile both
    t_diag, t_grad = [], []
    for _ in range(args.rounds):
        t_diag.append(timed(diag, params))
        t_grad.append(timed(grad, params))
    d, g = float(np.median(t_diag)), float(np.median(t_grad))
    p = sum(h.size for h in diag(params).ggn)
    print(f"device: {device_name()}")
    print(
        f"exact GGN diagonal, {len(y)} examples, P = {p:,} kernel weights, batch {args.batch_size}: {d:.2f} s"
    )
    print(f"one full-batch gradient of the same examples: {g:.3f} s; ratio {d / g:,.0f}")


if __name__ == "__main__":
    main()
