"""A sweep stopped at any moment resumes to the bits of one never stopped (chunked or not); every
member's best params are kept, and `jaxl2 eval --run SWEEP` evaluates the member it names."""

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
import numpy as np
import pytest

from jaxl2.mnist import run as _run
from jaxl2.mnist.config import Config, ConfigError, SweepSettings
from jaxl2.mnist.evaluate import evaluate_run
from jaxl2.mnist.results import MemberResult, PerL2, SweepRefit, SweepSummary
from jaxl2.mnist.rundir import StepStore
from jaxl2.mnist.runtime import enable_compilation_cache
from jaxl2.mnist.sweep import members_that_fit, train_sweep
from tests.keys import assert_typed

CFG = Config(hidden=(16,), epochs=4, batch_size=500)
L2S = (0.0, 1e-2)
TWO = 2 * (10**12 // members_that_fit(CFG, 3500, 10**12))  # a budget with room for two members


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
    settings = SweepSettings(L2S, (0, 1), **kw)  # 4 members: 2 chunks of 2
    return train_sweep(CFG, settings, str(out), resume=resume, on_epoch=on_epoch)


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


def test_sweep_stopped_before_its_first_checkpoint_removes_its_directory(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        sweep(tmp_path / "s", on_epoch=stop_at("chunk 1/2", 1))
    assert not os.path.exists(tmp_path / "s")


def test_resume_with_other_settings_is_refused(ref, tmp_path):
    with pytest.raises(
        ConfigError, match=r"settings differ .*l2 0.0 vs 0.0,0.01; seeds 0 vs 0,1 in the sweep"
    ):
        train_sweep(CFG, SweepSettings(L2S[:1], (0,)), ref["out"], resume=True)


def test_eval_of_a_sweep_evaluates_the_member_it_names(ref):
    rows = ref["results"]
    best = max((r for r in rows if r["l2"] == ref["selected_l2"]), key=lambda r: r["val_accuracy"])
    res = evaluate_run(ref["out"])  # default: the selected λ, its best seed
    assert (res["l2"], res["seed"], res["model"]) == (ref["selected_l2"], best["seed"], "best")
    assert res["accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-6)
    last = evaluate_run(ref["out"], split="val", l2=1e-2, seed=1)  # the last member, chunk 2
    assert last["accuracy"] == pytest.approx(rows[3]["val_accuracy"], abs=1e-6)
    assert _run.load_run_config(ref["out"], l2=1e-2, seed=1) == Config(
        **{**vars(CFG), "l2": 1e-2, "seed": 1, "lr": 0.3}
    )
    with pytest.raises(ConfigError, match=r"l2 0.5 is not one of the sweep's λ \(allowed: 0, 0.01\)"):
        evaluate_run(ref["out"], l2=0.5)
    with pytest.raises(ConfigError, match=r"seed 3 is not one of the sweep's seeds \(allowed: 0, 1\)"):
        evaluate_run(ref["out"], seed=3)
    with pytest.raises(ConfigError, match="no refit model"):
        evaluate_run(ref["out"], refit=True)


def test_cli_sweep_sigkill_then_resume_equals_uninterrupted(tmp_path):
    args = ["--hidden", "16", "--epochs", "8", "--batch-size", "500", "--l2", "0,1e-2", "--seeds", "2"]
    args += ["--execution", "vmap", "--checkpoint-every", "1"]
    ref = train_sweep(
        dataclasses.replace(CFG, epochs=8), SweepSettings(L2S, (0, 1), "vmap"), str(tmp_path / "ref")
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
