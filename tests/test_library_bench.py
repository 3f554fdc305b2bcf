"""experiments/library_bench.py: its variants do the same work, and --quick --json reports every target."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import jaxl2

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "experiments", "library_bench.py")
spec = importlib.util.spec_from_file_location("library_bench", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TINY = [(bench.deep_tanh, (4, 8, 4)), (bench.stacked, (2, 8, 16, 4)), (bench.mlp, (8, 4))]


@pytest.mark.parametrize("build, sizes", TINY, ids=["200 leaves", "stacked", "mlp"])
def test_the_timed_variants_compute_the_same_step(build, sizes):
    w = build(*sizes)
    tx = optax.sgd(bench.LR, momentum=0.9)
    state = tx.init(w.params)
    hand = jax.jit(bench.hand_step(w.loss, tx))(w.params, state, *w.batch)
    for norms in (False, True):
        ours = jax.jit(jaxl2.make_train_step(w.loss, tx, l2=bench.LAM, norms=norms))(
            w.params, state, *w.batch
        )
        np.testing.assert_allclose(float(ours[2]["loss"]), float(hand[2]["loss"]), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(ours[0]), jax.tree.leaves(hand[0])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    # the two decays in a chain: the same update
    grads = jax.grad(w.loss)(w.params, *w.batch)
    outs = []
    for decay in (
        optax.add_decayed_weights(bench.LAM, mask=jaxl2.mask(w.params)),
        jaxl2.add_decayed_weights(bench.LAM),
    ):
        chain = optax.chain(decay, optax.sgd(bench.LR))
        outs.append(bench.decay_update(chain)(w.params, chain.init(w.params), grads)[0])
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    # and the penalty of the hand-written objective is jaxl2's
    pen = bench.hand_regularized(w.loss)(w.params, *w.batch) - w.loss(w.params, *w.batch)
    np.testing.assert_allclose(float(pen), float(jaxl2.l2_penalty(w.params, bench.LAM)), rtol=1e-5)


def test_quick_json_reports_every_target_of_every_workload():
    r = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--rounds", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["quick"] is True and out["rounds"] == 1 and out["machine"]["cores"] >= 1
    assert list(out["workloads"]) == ["200 leaves", "stacked", "mlp"]
    for w in out["workloads"].values():
        assert set(w["targets"]) == set(bench.TARGETS)
        for key, t in w["targets"].items():
            assert t["target"] == bench.TARGETS[key][1] and t["ratio"] > 0
            assert t["met"] == (t["ratio"] <= t["target"]) and len(t["rounds"]) >= 1
        assert w["peak_bytes"]["hand"] > 0 and w["hlo_ops"]["step"] > 0


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--rounds", "two"], ["--rounds", "-1"]])
def test_bad_rounds_exit_2_saying_what_is_allowed(argv):
    r = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "must be a whole number >= 1" in r.stderr
