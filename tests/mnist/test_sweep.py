"""The vmapped sweep equals separate runs, compiles once, and selects λ by validation only."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxl2.mnist import run as _run
from jaxl2.mnist.config import Config, RunSettings, SweepSettings
from jaxl2.mnist.data import load
from jaxl2.mnist.sweep import SweepTrainer, members_that_fit, select_l2, train_sweep
from jaxl2.mnist.train import Trainer

CFG = Config(hidden=(64,), epochs=3)
L2S = (0.0, 1e-3, 3e-2)


@pytest.fixture(scope="module")
def data():
    d = load("mnist5k")
    return jnp.asarray(d.train.x), jnp.asarray(d.train.y)


@pytest.mark.parametrize("execution", ["vmap", "sequential"])
def test_sweep_params_equal_separate_runs_and_compile_once(data, execution):
    x, y = data
    tr = Trainer(CFG, len(y))
    sw = SweepTrainer(tr, execution)
    states = sw.init([0, 0, 0])
    l2_K = jnp.asarray(L2S, jnp.float32)
    for _ in range(3):
        states, _ = sw.epoch(states, x, y, l2_K)
    assert sw.epoch._cache_size() == 1  # λ is traced: one compilation for the whole sweep
    for i, lam in enumerate(L2S):
        one = Trainer(dataclasses.replace(CFG, l2=lam), len(y))
        s = one.init(0)
        for _ in range(3):
            s, _ = one.train_epoch(s, x, y)
        for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(states.params)):
            b = np.asarray(b[i])
            assert np.max(np.abs(np.asarray(a) - b)) <= 1e-4 * np.max(np.abs(b)), (lam, execution)


def test_sweep_metrics_equal_separate_train_runs(tmp_path):
    summary = train_sweep(CFG, SweepSettings(L2S, (0, 1), "vmap"), str(tmp_path / "sweep"))
    assert len(summary["results"]) == 6 and summary["chunks"] == 1
    for r in summary["results"][:3] + summary["results"][4:5]:
        one = _run.train_and_evaluate(
            dataclasses.replace(CFG, l2=r["l2"], seed=r["seed"]),
            str(tmp_path / f"{r['l2']}-{r['seed']}"),
            RunSettings(refit=False),
        )
        for key in ("train_accuracy", "val_accuracy", "test_accuracy", "train_data_loss", "penalty"):
            assert r[key] == pytest.approx(one[key], abs=2e-3), key
        for path, v in one["kernel_sq_norm"].items():
            assert r["kernel_sq_norm"][path] == pytest.approx(v, rel=1e-4)
    for name in ("sweep.json", "sweep.csv", "sweep.png", "config.json"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0
    assert json.load(open(tmp_path / "sweep" / "sweep.json"))["selected_l2"] == summary["selected_l2"]


def test_chunks_when_members_do_not_fit(tmp_path):
    per = members_that_fit(CFG, 3500, 10**12)
    assert per > 100
    budget = 2 * (10**12 // per)  # room for two members
    one = dataclasses.replace(CFG, epochs=1)
    small = train_sweep(one, SweepSettings(L2S, (0,), "vmap", budget_bytes=budget), str(tmp_path / "small"))
    whole = train_sweep(one, SweepSettings(L2S, (0,), "vmap"), str(tmp_path / "whole"))
    assert small["chunks"] == 2 and whole["chunks"] == 1
    for a, b in zip(small["results"], whole["results"]):
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=2e-3)


def test_selection_uses_validation_never_test():
    results = [
        {"l2": 0.0, "seed": 0, "val_accuracy": 0.90, "test_accuracy": 0.99},
        {"l2": 0.0, "seed": 1, "val_accuracy": 0.92, "test_accuracy": 0.99},
        {"l2": 1e-3, "seed": 0, "val_accuracy": 0.95, "test_accuracy": 0.80},
        {"l2": 1e-3, "seed": 1, "val_accuracy": 0.93, "test_accuracy": 0.80},
    ]
    assert select_l2(results) == 1e-3  # test accuracy would pick 0.0


def test_cli_sweep_json(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxl2",
            "sweep",
            "--l2",
            "0,1e-3",
            "--epochs",
            "1",
            "--hidden",
            "16",
            "--out",
            str(tmp_path / "s"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["selected_l2"] in (0.0, 1e-3) and len(d["results"]) == 2
    for key in (
        "l2",
        "seed",
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "train_loss",
        "kernel_sq_norm",
    ):
        assert key in d["results"][0]


def test_lambda_1se_and_per_l2_against_hand_math():
    from jaxl2.mnist.sweep import per_l2, select_l2_1se

    def row(lam, seed, val, train=1.0, test=0.5, norm=2.0):
        return {"l2": lam, "seed": seed, "val_accuracy": val, "train_accuracy": train,
                "test_accuracy": test, "kernel_sq_norm": {"a": norm, "b": 1.0}}  # fmt: skip

    results = [row(0.0, 0, 0.90), row(0.0, 1, 0.96), row(1e-3, 0, 0.92), row(1e-3, 1, 0.94),
               row(1e-2, 0, 0.901), row(1e-2, 1, 0.90)]  # fmt: skip
    # best mean: λ = 0 and 1e-3 tie at 0.93, the larger λ wins; SE = std([.92, .94], ddof=1)/√2 = 0.01
    assert select_l2(results) == 1e-3
    assert select_l2_1se(results) == 1e-3  # 1e-2's mean 0.9005 < 0.93 − 0.01
    results[4]["val_accuracy"] = 0.941  # now 1e-2's mean 0.9205 ≥ 0.92
    assert select_l2_1se(results) == 1e-2
    assert select_l2_1se([row(0.0, 0, 0.9), row(1e-3, 0, 0.8)]) == 0.0  # one seed: SE 0, the best
    rows = per_l2(results)
    assert [r["l2"] for r in rows] == [0.0, 1e-3, 1e-2] and rows[0]["seeds"] == 2
    assert rows[2]["val_accuracy"]["mean"] == pytest.approx((0.941 + 0.90) / 2)
    assert rows[2]["val_accuracy"]["std"] == pytest.approx(np.std([0.941, 0.90]))
    assert rows[0]["kernel_sq_norm"] == {"mean": 3.0, "std": 0.0}


def test_sweep_prints_mean_and_std_per_lambda(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "jaxl2", "sweep", "--hidden", "16", "--epochs", "2", "--batch-size", "500",
         "--l2", "0,1e-3", "--seeds", "2", "--out", str(tmp_path / "s"), "--quiet"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.load(open(tmp_path / "s" / "sweep.json"))
    val0 = [m["val_accuracy"] for m in summary["results"] if m["l2"] == 0.0]
    line = next(ln for ln in r.stdout.splitlines() if ln.split()[:2] == ["0", "2"])
    assert f"{100 * np.mean(val0):.2f} ± {100 * np.std(val0):.2f}" in line
    assert f"{summary['selected_l2_1se']:g} (lambda.1se" in r.stdout


def test_auto_execution_trains_with_the_program_it_timed(tmp_path, monkeypatch):
    made = []
    init = SweepTrainer.__init__

    def counted(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SweepTrainer, "__init__", counted)
    log = []
    summary = train_sweep(CFG, SweepSettings(L2S, (0,), "auto"), str(tmp_path / "auto"), log=log.append)
    assert "vmap" in log[0] and "sequential" in log[0] and log[0].endswith(f"→ {summary['execution']}")
    # the two timed candidates and no third one: the sweep reuses the chosen one's compiled program
    assert sorted(sw.execution for sw in made) == ["sequential", "vmap"]
    chosen = next(sw for sw in made if sw.execution == summary["execution"])
    assert [p._cache_size() for p in chosen._programs.values()] == [1]
    ref = train_sweep(CFG, SweepSettings(L2S, (0,), summary["execution"]), str(tmp_path / "ref"))
    for a, b in zip(summary["results"], ref["results"]):
        assert a["val_accuracy"] == b["val_accuracy"] and a["test_accuracy"] == b["test_accuracy"]


def test_a_sweep_refuses_a_lambda_given_twice():
    r = subprocess.run(
        [sys.executable, "-m", "jaxl2", "sweep", "--l2", "0,1e-3,0.001", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--l2 gives λ 0.001 more than once" in r.stderr and "--seeds" in r.stderr, r.stderr
