"""`jaxl2 bench --quick --json` emits every documented key; the FLOP model matches XLA's."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxl2.mnist.bench import (
    PATH_L2,
    PATH_LR,
    flops_per_example,
    hand_written_epoch,
    shape_ceiling,
    targets,
    xla_flops_per_example,
)
from jaxl2.mnist.config import Config
from jaxl2.mnist.train import Trainer


def test_flops_per_example_hand_count():
    # forward 2·(784·256 + 256·256 + 256·10), weight gradients the same, input gradients of layers 2 and 3
    fwd = 2 * (784 * 256 + 256 * 256 + 256 * 10)
    assert flops_per_example((784, 256, 256, 10)) == 2 * fwd + 2 * (256 * 256 + 256 * 10) == 1_211_392


def test_shape_ceiling_hand_count():
    # batch 2, every shape at 1 GFLOP/s: the step's GEMM FLOPs are 2 · 1,211,392, one second per 1e9
    gemm = {f"2x{a}x{c}": {"median": 1.0} for a, c in ((784, 256), (256, 256), (256, 10))}
    assert shape_ceiling(gemm, 2) == pytest.approx(2 / (2 * 1_211_392 / 1e9))
    gemm["2x784x256"]["median"] = 2.0  # first layer twice as fast: its 2 GEMMs take half the time
    seconds = (2 * 2 * 2 * 784 * 256 / 2 + 3 * 2 * 2 * (256 * 256 + 256 * 10)) / 1e9
    assert shape_ceiling(gemm, 2) == pytest.approx(2 / seconds)


def test_flops_per_example_matches_xla_cost_analysis():
    """XLA counts every operation of the step: per example the GEMMs (our count) plus a few
    element-wise ops per unit, and per step a few per parameter (the update, λ·w and the penalty
    on kernels: ~6 by hand), which the batch amortizes: xla(b) = G + c + k/b."""
    x128, x1024 = xla_flops_per_example(128), xla_flops_per_example(1024)
    k = (x128 - x1024) / (1 / 128 - 1 / 1024)
    n_params = 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert 3 <= k / n_params <= 12, k / n_params
    per_example = x1024 - k / 1024
    assert abs(per_example / flops_per_example((784, 256, 256, 10)) - 1) < 0.02, per_example


def test_bench_quick_json_has_every_key():
    r = subprocess.run(
        [sys.executable, "-m", "jaxl2", "bench", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in (
        "device",
        "gemm_gflops",
        "flops_per_example",
        "xla_flops_per_example",
        "ceiling_examples_per_second",
        "train",
        "startup",
        "sweep",
        "path",
        "targets",
    ):
        assert key in d, key
    for b in ("128", "1024"):
        t = d["train"][b]
        for key in (
            "examples_per_second",
            "examples_per_second_no_l2",
            "l2_overhead",
            "fraction_of_ceiling",
            "shape_ceiling_examples_per_second",
            "fraction_of_shape_ceiling",
            "epoch_compile_seconds",
        ):
            assert key in t, (b, key)
        assert {"median", "min", "max"} <= set(t["examples_per_second"])
        assert t["examples_per_second"]["median"] > 0
    assert {"cold_seconds", "warm_seconds", "floor_seconds", "warm_over_floor_seconds"} <= set(d["startup"])
    for which in ("cold", "warm"):
        c = d["command"][which]
        assert c["wall_seconds"] > c["training_seconds"] + c["refit_seconds"] > 0, c
        assert c["wall_over_compute"] == c["wall_seconds"] / (c["training_seconds"] + c["refit_seconds"])
    assert {"vmap", "sequential"} <= set(d["sweep"]) and "4" in d["sweep"]["vmap"]
    assert set(d["path"]) == {"mnist5k", "full-size"}
    assert d["path"]["full-size"]["128"]["train_examples"] > d["path"]["mnist5k"]["128"]["train_examples"]
    for w, b in [(w, b) for w in d["path"] for b in ("128", "1024")]:
        p = d["path"][w][b]
        assert p["examples_per_second"]["median"] > 0 and 0 < p["fraction_of_ceiling"]
        assert {"jax", "jax_val", "torch", "keras"} <= set(p["peers"]) and p["peers"]["jax"][
            "jaxl2_speedup"
        ] > 0
        for name, q in p["peers"].items():  # null unless the optional peer is installed
            if q is not None:
                assert {"examples_per_second", "jaxl2_speedup", "version"} <= set(q), name
    assert {t["name"].split(",")[0] for t in d["targets"]} >= {
        "jaxl2 train ÷ hand-written JAX epoch + validation (equal work)",
        "warm start − its floor",
        "default jaxl2 train (cold cache)",
    }


def test_hand_written_peer_trains_exactly_what_jaxl2_trains():
    """The peer is a fair one: its epoch (one full batch here) moves the params as jaxl2's
    train step does with the same init, SGD lr, λ on the kernels and none on the biases."""
    init, epoch, evaluate = hand_written_epoch(256)
    params, key = init(0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(256, 784)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 256).astype(np.int32))
    flax_params = {"params": {f"Dense_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(params)}}
    cfg = Config(optimizer="sgd", schedule="constant", lr=PATH_LR, l2=PATH_L2, batch_size=256)
    tr = Trainer(cfg, 256)
    state = tr.init().replace(params=jax.tree_util.tree_map(jnp.array, flax_params))
    state, _ = tr.train_step(state, (x, y))
    new, _ = epoch(params, key, x, y)
    for i, (w, b) in enumerate(new):
        ours = state.params["params"][f"Dense_{i}"]
        np.testing.assert_allclose(w, ours["kernel"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, ours["bias"], rtol=1e-5, atol=1e-6)
    ce, acc = evaluate(new, x, y)
    ev = tr.evaluate(state.params, x, y)
    assert float(ce) == pytest.approx(float(ev["data_loss"]), rel=1e-5)
    assert float(acc) == pytest.approx(float(ev["accuracy"]))


def test_targets_compare_each_number_with_its_bound():
    peers = {
        "jax": {"jaxl2_speedup": 0.9},
        "jax_val": {"jaxl2_speedup": 1.02},
        "torch": {"jaxl2_speedup": 1.4},
    }
    slow = {**peers, "jax_val": {"jaxl2_speedup": 0.99}, "torch": None}
    r = {
        "device": "cpu: test",
        "path": {
            "mnist5k": {
                "128": {"peers": peers, "fraction_of_ceiling": 0.5},
                "1024": {"peers": slow, "fraction_of_ceiling": 0.7},
            },
            "full-size": {
                "128": {"peers": slow, "fraction_of_ceiling": 0.61},
                "1024": {"peers": peers, "fraction_of_ceiling": 0.5},
            },
        },
        "train": {"128": {"l2_overhead": {"median": 0.021}}, "1024": {"l2_overhead": {"median": -0.01}}},
        "startup": {"warm_over_floor_seconds": {"median": 0.4}, "cold_over_floor_seconds": {"median": 2.1}},
        "command": {
            "cold": {"wall_over_compute": 1.4, "training_seconds": 1.0, "refit_seconds": 1.0},
            "warm": {"wall_over_compute": 1.2, "training_seconds": 1.0, "refit_seconds": 1.0},
        },
    }
    rows = {t["name"]: t for t in targets(r)}
    equal = "jaxl2 train ÷ hand-written JAX epoch + validation (equal work)"
    assert {k: t["met"] for k, t in rows.items()} == {
        f"{equal}, mnist5k, batch 128": True,
        f"{equal}, mnist5k, batch 1024": False,
        f"{equal}, full-size, batch 128": False,
        f"{equal}, full-size, batch 1024": True,
        "jaxl2 train ÷ PyTorch eager, mnist5k, batch 128": True,
        "jaxl2 train ÷ PyTorch eager, full-size, batch 1024": True,  # no torch: no row
        "jaxl2 train, fraction of the GEMM ceiling, full-size, batch 128": True,
        "L2 overhead, batch 128 (median of paired rounds)": False,
        "L2 overhead, batch 1024 (median of paired rounds)": True,
        "warm start − its floor, seconds": True,
        "cold start − its floor, seconds": False,
        "default jaxl2 train (cold cache), wall ÷ (training + refit)": False,
        "default jaxl2 train (warm cache), wall ÷ (training + refit)": True,
    }
    assert rows["default jaxl2 train (cold cache), wall ÷ (training + refit)"]["target"] == pytest.approx(1.3)
    # on a GPU: equal work ≥ 0.9 on the full-size workload only, the command ≤ 3 × compute + 5 s
    gpu = {
        **r,
        "device": "gpu: H100 × 1",
        "sweep": {"vmap": {"1": {"relative_to_1": 1.0}, "64": {"relative_to_1": 0.04}}},
    }
    rows = {t["name"]: t for t in targets(gpu)}
    assert rows[f"{equal}, full-size, batch 128"]["met"] and f"{equal}, mnist5k, batch 128" not in rows
    assert rows["default jaxl2 train (cold cache), wall ÷ (training + refit)"]["target"] == pytest.approx(
        (3 * 2 + 5) / 2
    )
    assert rows["64-member vmapped sweep ÷ one member, time"] == {
        "name": "64-member vmapped sweep ÷ one member, time",
        "value": pytest.approx(2.56),
        "target": 3.0,
        "at_least": False,
        "met": True,
    }
