"""`jaxl2 bench --quick --json` emits every documented key; the FLOP model matches XLA's."""

import json
import subprocess
import sys

import pytest

from jaxl2.mnist.bench import shape_ceiling, xla_flops_per_example
from jaxl2.mnist.model import flops_per_example


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
    on kernels, three norms: ~12 by hand), which the batch amortizes: xla(b) = G + c + k/b."""
    x128, x1024 = xla_flops_per_example(128), xla_flops_per_example(1024)
    k = (x128 - x1024) / (1 / 128 - 1 / 1024)
    n_params = 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert 4 <= k / n_params <= 20, k / n_params
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
        "peers",
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
    assert {"cold_seconds", "warm_seconds"} <= set(d["startup"])
    assert {"vmap", "sequential"} <= set(d["sweep"]) and "4" in d["sweep"]["vmap"]
    assert {"torch", "keras"} <= set(d["peers"])
    for name, p in d["peers"].items():  # null unless the optional peer is installed
        if p is not None:
            assert {"examples_per_second", "jaxl2_examples_per_second", "jaxl2_speedup", "version"} <= set(p)
            assert p["jaxl2_speedup"] > 0, name
