"""`jaxl2 sweep` (jaxl2/mnist/cli/sweep.py) end to end in subprocesses."""

import json
import os

from tests.mnist.cli.command import TINY, jaxl2, one_line_error


def test_sweep_with_sgdw_runs(tmp_path):
    r = jaxl2("sweep", "--optimizer", "sgdw", "--l2", "0,1e-3", *TINY, "--out", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["results"]) == 2
    members = sorted(os.listdir(tmp_path / "s" / "tensorboard"))  # one event directory per member
    assert [m for m in members if m.startswith("l2=")] == ["l2=0,seed=0", "l2=0.001,seed=0"]


def test_sweep_refuses_weight_decay_with_l2_unless_allowed(tmp_path):
    args = ["sweep", "--optimizer", "adamw", "--weight-decay", "1e-2", "--l2", "0,1e-3", *TINY]
    one_line_error(jaxl2(*args, "--out", str(tmp_path / "s")), "--weight-decay and --l2 together")
    assert not (tmp_path / "s").exists()
    r = jaxl2(*args, "--allow-both", "--out", str(tmp_path / "both"), "--json")
    assert r.returncode == 0, r.stderr


def test_sweep_divergence_exits_1_like_train_and_leaves_nothing(tmp_path):
    bad = ["--optimizer", "sgd", "--schedule", "constant", "--lr", "0.5", "--hidden", "16", "--epochs", "20"]
    r = jaxl2("sweep", *bad, "--l2", "0,5", "--out", str(tmp_path / "s"), "--quiet")
    assert r.returncode == 1, r.stderr
    assert "(λ 5, seed 0)" in r.stderr and "the loss became NaN/Inf at epoch" in r.stderr
    assert "lower --lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()
    t = jaxl2("train", *bad, "--l2", "5", "--out", str(tmp_path / "t"), "--quiet")
    assert t.returncode == 1 and "the loss became NaN/Inf at epoch" in t.stderr


def test_sweep_overwrite_and_its_errors_name_only_its_own_flags(tmp_path):
    out = tmp_path / "s"
    args = ["sweep", "--l2", "0,1e-3", *TINY, "--out", str(out), "--quiet"]
    assert jaxl2(*args).returncode == 0
    r = jaxl2(*args)
    one_line_error(r, "already holds a run (use --resume to continue it, --overwrite to replace it")
    assert jaxl2(*args, "--overwrite").returncode == 0


def test_a_sweep_member_at_chance_warns(tmp_path):
    r = jaxl2("sweep", "--l2", "1e-3,5", *TINY, "--out", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    assert "1 of 2 members (first: λ 5.0)" in r.stderr and "near chance" in r.stderr


def test_sweep_progress_is_one_line_per_epoch_without_a_terminal(tmp_path):
    r = jaxl2("sweep", "--l2", "0,1e-3", *TINY, "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "epoch 1/2" in lines and "epoch 2/2" in lines and "\r" not in r.stderr
