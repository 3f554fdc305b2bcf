"""`jaxl2 train` (jaxl2/mnist/cli/train.py) end to end in subprocesses: its outputs, the run
directory it writes, resume, overwrite, and `jaxl2 eval` of what it wrote."""

import json
import os
import subprocess
import sys

import pytest

from jaxl2.mnist.rundir import default_out
from tests.mnist.cli.command import FAST, TINY, jaxl2, one_line_error
from tests.mnist.test_tensorboard import read_events, scalars


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


def test_resume_of_a_finished_run_keeps_its_summary_and_says_so(finished):
    out, first = finished
    before = (out / "summary.json").read_bytes()
    r = jaxl2("train", "--out", str(out), "--resume", "--quiet")  # as it was started: --no-refit
    assert r.returncode == 0, r.stderr
    assert r.stdout == first and not (out / "refit").exists()  # its own numbers, its time included
    assert (out / "summary.json").read_bytes() == before
    assert f"resuming {out}: all 2 epochs were trained already" in r.stderr, r.stderr
    assert "its summary.json is unchanged" in r.stderr


def test_out_that_is_a_file_or_cannot_be_created(tmp_path):
    f = tmp_path / "file.md"
    f.write_text("mine")
    one_line_error(jaxl2("train", *TINY, "--out", str(f)), f"--out {f} is a file")
    assert f.read_text() == "mine"
    one_line_error(jaxl2("train", *TINY, "--out", str(f / "sub")), "cannot be written")


def test_default_run_directories_never_collide(tmp_path):
    dirs = [default_out(str(tmp_path), "mnist5k") for _ in range(5)]
    assert len(set(dirs)) == 5 and all(os.path.isdir(d) for d in dirs)


def test_two_runs_started_together_get_two_directories(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxl2", "train", *TINY, "--json"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout)["out"])
    assert outs[0] != outs[1]


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, finished):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text((finished[0] / "config.json").read_text())
    r = jaxl2("train", "--out", str(out), "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert sorted({step for _, step in scalars(read_events(out / "tensorboard"))}) == [1, 2]
    plain = jaxl2("train", "--out", str(out))
    one_line_error(plain, "already holds a run (use --resume to continue it, --overwrite")


def test_default_adam_learns(tmp_path):
    r = jaxl2(
        "train",
        "--optimizer",
        "adam",
        "--hidden",
        "64",
        "--epochs",
        "3",
        "--no-refit",
        "--out",
        str(tmp_path / "a"),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["lr"] == 3e-3 and s["test_accuracy"] > 0.8 and "warning" not in r.stderr


def test_loss_means_total_everywhere(tmp_path, finished):
    out, _ = finished
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for row in rows:
        assert row["train_loss"] == pytest.approx(row["train_data_loss"] + row["train_penalty"], rel=1e-5)
        assert "val_loss" not in row and "val_data_loss" in row
    s = json.load(open(out / "summary.json"))
    assert s["train_loss"] == pytest.approx(s["train_data_loss"] + s["penalty"])
    assert not {"val_loss", "test_loss"} & set(s)


def test_overwrite_replaces_a_run_but_never_foreign_files(tmp_path, finished):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("important")
    r = jaxl2("train", *TINY, "--out", str(precious), "--overwrite")
    one_line_error(r, "holds files that are not a jaxl2 run's (thesis.txt)")
    assert (precious / "thesis.txt").read_text() == "important"
    r = jaxl2("train", *TINY, "--out", ".", "--overwrite", cwd=precious)
    one_line_error(r, "holds files that are not a jaxl2 run's")
    run = tmp_path / "run"
    assert jaxl2("train", *TINY, "--refit", "--out", str(run), "--quiet").returncode == 0
    first = json.loads((run / "config.json").read_text())
    assert (run / "refit").is_dir()
    r = jaxl2("train", *TINY, "--seed", "3", "--out", str(run), "--overwrite", "--no-refit", "--json")
    assert r.returncode == 0, r.stderr
    assert not (run / "refit").exists() and not any(k.startswith("refit") for k in json.loads(r.stdout))
    assert json.loads((run / "config.json").read_text())["seed"] == 3
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [row["epoch"] for row in rows] == [1, 2]  # the old run's lines are gone, not appended to
    assert first["seed"] == 0
