"""The vmapped sweep equals separate runs, compiles once, and selects λ by validation only; a sweep
stopped at any moment resumes to the bits of one never stopped (chunked or not); every member's best
params are kept, and `jaxl2 eval --run SWEEP` evaluates the member it names."""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxl2.mnist import run as _run
from jaxl2.mnist.config import Config, ConfigError, RunSettings, SweepSettings
from jaxl2.mnist.data import load
from jaxl2.mnist.evaluate import evaluate_run, member_config
from jaxl2.mnist.results import MemberResult, PerL2, SweepRefit, SweepSummary
from jaxl2.mnist.rundir import StepStore
from jaxl2.mnist.runtime import enable_compilation_cache
from jaxl2.mnist.sweep import SweepTrainer, members_that_fit, select_l2, train_sweep
from jaxl2.mnist.train import Trainer
from tests.keys import assert_typed
from tests.mnist.test_tensorboard import shown

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


def test_members_that_do_not_fit_train_in_chunks_to_the_same_accuracy(tmp_path):
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


def test_sweep_json_prints_the_selection_and_every_member_with_the_train_keys(tmp_path):
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


# the stopped and resumed sweeps: 4 members (2 λ, 2 seeds) in 2 chunks
SMALL = Config(hidden=(16,), epochs=4, batch_size=500)
SMALL_L2S = (0.0, 1e-2)
TWO = 2 * (10**12 // members_that_fit(SMALL, 3500, 10**12))  # a budget with room for two members


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    """Every sweep here compiles the same programs: JAX's persistent cache (the checkout's
    .jax_cache/, as the command's tests use) compiles them once."""
    before = jax.config.jax_compilation_cache_dir
    enable_compilation_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def sweep(out, resume=False, on_epoch=None, **kw):
    kw = {"execution": "vmap", "budget_bytes": TWO, "checkpoint_every": 2, **kw}
    settings = SweepSettings(SMALL_L2S, (0, 1), **kw)  # 4 members: 2 chunks of 2
    return train_sweep(SMALL, settings, str(out), resume=resume, on_epoch=on_epoch)


def stop_at(label, epoch):
    def on_epoch(lab, e, _total):
        if (lab, e) == (label, epoch):
            raise KeyboardInterrupt

    return on_epoch


def stored(out, name="best"):
    """Every step of out/NAME as NumPy trees, restored without a template."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(os.path.join(out, name))) as m:
        return {s: jax.tree.map(np.asarray, m.restore(s)) for s in m.all_steps()}


def assert_same_sweep(a, b):
    """Rows (every metric) equal exactly, and every chunk's best params bit for bit."""
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert ra == rb
    ba, bb = stored(a["out"]), stored(b["out"])
    assert sorted(ba) == sorted(bb) == list(range(a["chunks"]))
    for step in ba:
        for u, v in zip(jax.tree.leaves(ba[step]), jax.tree.leaves(bb[step]), strict=True):
            np.testing.assert_array_equal(u, v)


def assert_same_events(a, b):
    """Every member's TensorBoard events, as TensorBoard shows them (each epoch once, what a
    stopped sweep wrote past its checkpoint dropped), hold the same numbers (times aside)."""
    members = sorted(os.listdir(os.path.join(a, "tensorboard")))
    assert sorted(os.listdir(os.path.join(b, "tensorboard"))) == members and len(members) == 4
    for member in members:
        got, want = (shown(os.path.join(out, "tensorboard", member)) for out in (b, a))
        assert got.keys() == want.keys() and len(want) > 0
        assert {k: v for k, v in got.items() if k[0] != "epoch_seconds"} == {
            k: v for k, v in want.items() if k[0] != "epoch_seconds"
        }


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return sweep(tmp_path_factory.mktemp("ref") / "s")


def test_chunked_sweep_stopped_anywhere_resumes_bit_identical(ref, tmp_path):
    """Killed before its first checkpoint (only config.json left), then stopped in chunk 1 after
    its checkpoint at epoch 2, in chunk 2 before its first checkpoint and after it: each time
    resumed; the end is the uninterrupted sweep's, bit for bit."""
    assert ref["chunks"] == 2 and ref["chunk_size"] == 2
    out = tmp_path / "s"
    os.makedirs(out)
    shutil.copy(os.path.join(ref["out"], "config.json"), out)
    for label, epoch, rows_kept in [("chunk 1/2", 3, 0), ("chunk 2/2", 1, 2), ("chunk 2/2", 3, 2)]:
        with pytest.raises(KeyboardInterrupt):
            sweep(out, resume=True, on_epoch=stop_at(label, epoch))
        assert len(json.load(open(out / "progress.json"))["results"]) == rows_kept  # chunk 1's rows
    # resumed with another budget and execution: the sweep's own plan (chunks of 2, vmap) is kept
    assert_same_sweep(ref, sweep(out, resume=True, budget_bytes=10**12, execution="sequential"))
    assert_same_events(ref["out"], out)


def test_sweep_stopped_before_its_first_checkpoint_removes_its_directory(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        sweep(tmp_path / "s", on_epoch=stop_at("chunk 1/2", 1))
    assert not os.path.exists(tmp_path / "s")


def test_eval_of_a_sweep_evaluates_the_member_it_names(ref):
    rows = ref["results"]
    best = max((r for r in rows if r["l2"] == ref["selected_l2"]), key=lambda r: r["val_accuracy"])
    res = evaluate_run(ref["out"])  # default: the selected λ, its best seed
    assert (res["l2"], res["seed"], res["model"]) == (ref["selected_l2"], best["seed"], "best")
    assert res["accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-6)
    last = evaluate_run(ref["out"], split="val", l2=1e-2, seed=1)  # the last member, chunk 2
    assert last["accuracy"] == pytest.approx(rows[3]["val_accuracy"], abs=1e-6)
    assert member_config(ref["out"], l2=1e-2, seed=1) == Config(
        **{**vars(SMALL), "l2": 1e-2, "seed": 1, "lr": 0.3}
    )
    with pytest.raises(ConfigError, match=r"l2 0.5 is not one of the sweep's λ \(allowed: 0, 0.01\)"):
        evaluate_run(ref["out"], l2=0.5)
    with pytest.raises(ConfigError, match=r"seed 3 is not one of the sweep's seeds \(allowed: 0, 1\)"):
        evaluate_run(ref["out"], seed=3)
    with pytest.raises(ConfigError, match="no refit model"):
        evaluate_run(ref["out"], refit=True)


def test_a_sweep_killed_by_sigkill_resumes_to_the_uninterrupted_bits(tmp_path):
    args = ["--hidden", "16", "--epochs", "8", "--batch-size", "500", "--l2", "0,1e-2", "--seeds", "2"]
    args += ["--execution", "vmap", "--checkpoint-every", "1"]
    ref = train_sweep(
        dataclasses.replace(SMALL, epochs=8), SweepSettings(SMALL_L2S, (0, 1), "vmap"), str(tmp_path / "ref")
    )

    def start(*extra):
        cmd = [sys.executable, "-m", "jaxl2", "sweep", *args, "--out", str(tmp_path / "k"), *extra]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    proc = start()
    ckpt = tmp_path / "k" / "checkpoints"
    while not (ckpt.is_dir() and any(n.isdigit() for n in os.listdir(ckpt))) and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = start("--resume")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    lines = err.splitlines()  # not a terminal: one line per epoch, never "epoch 3/12epoch 4/12"
    assert all(ln.count("epoch") <= 1 for ln in lines) and "epoch 8/8" in lines
    assert f"jaxl2 eval --run {tmp_path / 'k'}" in out
    summary = json.load(open(tmp_path / "k" / "sweep.json"))
    summary["out"] = str(tmp_path / "k")
    assert_same_sweep(ref, summary)
    assert_same_events(ref["out"], tmp_path / "k")
    a, b = StepStore(os.path.join(ref["out"], "checkpoints")), StepStore(str(ckpt))
    assert a.latest() == b.latest() == 8
    a.close()
    b.close()


def test_refit_added_to_a_finished_sweep_and_its_eval(ref, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(ref["out"], out)
    s = sweep(out, resume=True, refit=True, refit_epochs="best")
    assert s["results"] == ref["results"]  # the finished sweep is not trained again
    assert_typed(s, SweepSummary)
    assert_typed(s["refit"], SweepRefit)
    for r, row in zip(s["results"], s["per_l2"]):
        assert_typed(r, MemberResult)
        assert_typed(row, PerL2)
    fit, chosen = s["refit"], [r for r in s["results"] if r["l2"] == s["selected_l2"]]
    assert fit["l2"] == s["selected_l2"] and [m["seed"] for m in fit["members"]] == [0, 1]
    assert [m["refit_epochs"] for m in fit["members"]] == [r["best_epoch"] for r in chosen]
    assert {m["refit_examples"] for m in fit["members"]} == {4000}
    res = evaluate_run(str(out))  # the refit model of the selected member
    member = next(m for m in fit["members"] if m["seed"] == res["seed"])
    assert res["model"] == "refit" and res["accuracy"] == pytest.approx(
        member["refit_test_accuracy"], abs=1e-6
    )
    assert evaluate_run(str(out), refit=False)["accuracy"] == pytest.approx(member["test_accuracy"], abs=1e-6)
