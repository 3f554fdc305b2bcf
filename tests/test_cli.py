"""`jaxl2 train` and `jaxl2 eval` end to end in subprocesses, and the one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.mnist.test_tensorboard import read_events, scalars

FAST = ["--hidden", "32", "--epochs", "2", "--batch-size", "256"]


def jaxl2(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "jaxl2", *args], capture_output=True, text=True, timeout=timeout
    )


def test_train_json_then_eval_reproduces_test_accuracy(tmp_path):
    out = tmp_path / "run"
    r = jaxl2("train", *FAST, "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)  # one JSON object and nothing else on stdout
    for key in (
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "train_loss",
        "penalty",
        "kernel_sq_norm",
        "epochs",
        "seconds",
        "examples_per_second",
        "device",
    ):
        assert key in s, key
    assert s["epochs"] == 2 and s["examples_per_second"] > 0 and 0 < s["test_accuracy"] <= 1
    assert sorted(os.listdir(out)) == [
        "best",
        "checkpoints",
        "config.json",
        "curves.png",
        "metrics.jsonl",
        "refit",
        "summary.json",
        "tensorboard",
    ]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    events = scalars(read_events(out / "tensorboard"))  # the same numbers, at step = epoch
    assert events == {
        (k, r["epoch"]): pytest.approx(v, rel=1e-6)
        for r in rows
        for k, v in r.items()
        if k not in ("epoch", "step")
    }
    assert s["refit_epochs"] == s["epochs"] and s["refit_examples"] == 4000  # train ∪ validation
    e = jaxl2("eval", "--run", str(out), "--dataset", "mnist5k", "--json")  # the refit model
    assert e.returncode == 0, e.stderr
    ev = json.loads(e.stdout)
    assert ev["n"] == 1000 and ev["accuracy"] == pytest.approx(s["refit_test_accuracy"], abs=1e-6)
    assert ev["model"] == "refit"
    e = jaxl2("eval", "--run", str(out), "--no-refit", "--json")  # the best epoch by validation
    assert json.loads(e.stdout)["accuracy"] == pytest.approx(s["test_accuracy"], abs=1e-6)


def test_train_human_summary_and_progress_lines(tmp_path):
    r = jaxl2("train", *FAST, "--out", str(tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()  # not a terminal: one plain line per epoch, no bar
    assert [ln.split("  ")[0] for ln in lines if ln.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]
    assert "refit on train ∪ validation: epoch 2/2" in lines and "\r" not in r.stderr
    assert "test" in r.stdout and "examples/s" in r.stdout and "params/Dense_0/kernel" in r.stdout
    assert "refit on train ∪ validation (4,000 examples, 2 epochs" in r.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (["--l2", "-1"], "--l2 must be a finite number >= 0, got -1.0"),
        (["--l2", "nan"], "got nan"),
        (["--l2", "inf"], "got inf"),
        (["--l2", "Dense_[0=1e-3"], "not a valid regular expression"),
        (["--l2", "nomatch=1e-3"], "l2 pattern 'nomatch' matches no selected parameter"),
        (["--batch-size", "0"], "--batch-size 0 is invalid (an integer >= 1)"),
        (["--batch-size", "4000"], "--batch-size 4000 is larger than the training set (at most 3500"),
        (["--epochs", "-1"], "--epochs -1 is invalid"),
        (["--lr", "0"], "--lr 0.0 is invalid (a finite number > 0)"),
        (
            ["--optimizer", "rmsprop"],
            "--optimizer 'rmsprop' is unknown (allowed: sgd, momentum, adam, adamw, sgdw)",
        ),
        (["--dataset", "idx:/does/not/exist"], "idx:/does/not/exist: no such directory"),
        (["--select", "nothing"], "--select 'nothing' matched no parameter (kernels, or a regex"),
        (["--optimizer", "adamw", "--weight-decay", "1e-4"], "--weight-decay and --l2 together"),
        (["--hidden", "a,b"], "--hidden 'a,b' is invalid"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, match):
    out = tmp_path / "bad"
    r = jaxl2("train", *args, "--out", str(out), timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("jaxl2: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert match in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()  # nothing half-written


def _idx_dir(tmp_path, truncate=0, n_labels=20):
    from tests.mnist.test_data import fake, write_idx

    d = tmp_path / "idx"
    d.mkdir()
    x, _ = fake(20)
    write_idx(d, "train", x, np.arange(n_labels) % 10, truncate=truncate)
    write_idx(d, "t10k", x, np.arange(20) % 10)
    return d


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "small"
    r = jaxl2("train", "--hidden", "16", "--epochs", "1", "--batch-size", "500", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("case", ["truncated", "counts", "resume_shape", "out_taken"])
def test_bad_files_and_directories_are_one_line_exit_2(tmp_path, small_run, case):
    out = tmp_path / "new"
    if case == "truncated":
        args, match = (
            ["--dataset", f"idx:{_idx_dir(tmp_path, truncate=50)}", "--out", str(out)],
            "truncated or corrupt file",
        )
    elif case == "counts":
        args, match = (
            ["--dataset", f"idx:{_idx_dir(tmp_path, n_labels=21)}", "--out", str(out)],
            "has 20 images but",
        )
    elif case == "resume_shape":
        args, match = (
            ["--resume", "--hidden", "64", "--out", str(small_run)],
            "--hidden 64 vs 16 in the run",
        )
    else:
        args, match = ["--out", str(small_run)], "already holds a run (use --resume"
    before = sorted(os.listdir(small_run))
    r = jaxl2("train", *args, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("jaxl2: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert match in r.stderr
    assert not out.exists() and sorted(os.listdir(small_run)) == before
