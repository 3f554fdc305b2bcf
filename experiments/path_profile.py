"""Where ``jaxl2 train``'s training time goes beside the hand-written epoch: one layer at a time.

The bench's equal-work ratio (``jaxl2 bench``) compares ``train_and_evaluate`` with a
hand-written jitted epoch followed by the same validation. Between the two sit three layers,
each timed here side by side with the peer, interleaved (order reversed every other round),
as the median of per-round time ratios (> 1: faster than the peer). Every variant builds its
executables anew in each round, before its clock starts, so each times its programs' first
execution, as a run does:

* ``epoch + eval``: ``Trainer.train_epoch`` then ``Trainer.evaluate`` on the validation split,
  dispatched back to back, as the peer does (jaxl2's step and metrics, nothing else);
* ``program``: the run loop's compiled call of several epochs (:func:`jaxl2.mnist.fused.compile_epochs`:
  validation, the per-epoch norms and best-params tracking inside the call), called as the run
  calls it, without the host's work;
* ``train_and_evaluate``: the whole path (``metrics.jsonl``, best params on the host,
  checkpoints), its own ``seconds``.

Run (about 1 minute per setting on 2 CPU cores)::

    .venv/bin/python experiments/path_profile.py [--batch 128] [--rounds 11] [--dataset mnist5k]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import jax

from jaxl2.mnist import bench
from jaxl2.mnist.config import Config, RunSettings
from jaxl2.mnist.data import load
from jaxl2.mnist.fused import calls, compile_epochs, epochs_per_call
from jaxl2.mnist.run import train_and_evaluate
from jaxl2.mnist.runtime import device_name
from jaxl2.mnist.train import Trainer


def _epoch_and_eval(cfg: Config, data: tuple, epochs: int):
    xt, yt, xv, yv = data

    def timed() -> float:
        tr = Trainer(cfg, yt.shape[0])  # new executables each round, as the run's
        s = jax.block_until_ready(tr.init())
        epoch = tr.train_epoch.lower(s, xt, yt).compile()
        evaluate = jax.jit(tr.eval_fn).lower(s.params, xv, yv).compile()
        t = time.perf_counter()
        for _ in range(epochs):
            s, m = epoch(s, xt, yt)
            v = evaluate(s.params, xv, yv)
        jax.block_until_ready((s, m, v))
        return time.perf_counter() - t

    return timed


def _program(cfg: Config, data: tuple, epochs: int):
    size = epochs_per_call(data[1].shape[0])

    def timed() -> float:
        tr = Trainer(cfg, data[1].shape[0])  # new executables each round, as the run's
        s = jax.block_until_ready(tr.init())
        program = compile_epochs(
            lambda st, x, y, xv, yv: tr.epoch_fn(st, x, y),
            lambda p, x, y, xv, yv: tr.eval_fn(p, xv, yv),
            size,
            s,
            *data,
        )
        t = time.perf_counter()
        outs = []
        for _, n in calls(range(1, epochs + 1), size):  # the run's own calls
            s, *out = program(s, n)
            outs.append(out)
        jax.block_until_ready((s, outs))
        return time.perf_counter() - t

    return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--rounds", type=int, default=11, help="interleaved rounds (default 11)")
    p.add_argument("--dataset", default="mnist5k", help="mnist5k (15 epochs) or idx:DIR (3 epochs)")
    args = p.parse_args()
    if args.batch < 1 or args.rounds < 1:
        p.error("--batch and --rounds must be at least 1")
    ds = load(args.dataset)
    data = tuple(jax.device_put(a) for a in (*ds.need("train"), *ds.need("val")))
    epochs = bench.PATH_EPOCHS if args.dataset == "mnist5k" else bench.FULL_EPOCHS
    cfg = dataclasses.replace(bench.PATH_RECIPE, dataset=args.dataset, batch_size=args.batch, epochs=epochs)
    with tempfile.TemporaryDirectory() as root:
        out = os.path.join(root, "run")

        def whole() -> float:
            return train_and_evaluate(cfg, out, RunSettings(refit=False), overwrite=True)["seconds"]

        whole()  # compiles, and the first run in a process pays one-time costs
        fns = {
            "peer": bench._hand_written_timer(args.batch, data[0], data[1], epochs, data[2:]),
            "epoch + eval": _epoch_and_eval(cfg, data, epochs),
            "program": _program(cfg, data, epochs),
            "train_and_evaluate": whole,
        }
        times = bench._interleave(fns, args.rounds)
    examples = epochs * (data[1].shape[0] // args.batch) * args.batch
    print(f"{device_name()}; {args.dataset}, batch {args.batch}, {epochs} epochs, {args.rounds} rounds")
    for name, ts in times.items():
        ratio = statistics.median(p / t for p, t in zip(times["peer"], ts))
        print(f"  {name:20s} {examples / statistics.median(ts):10,.0f} examples/s   ÷ peer {ratio:.3f}")


if __name__ == "__main__":
    main()
