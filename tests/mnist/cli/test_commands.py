"""The ``jaxl2`` commands (jaxl2/mnist/cli/commands.py) end to end in subprocesses: what ``train``
writes (the run directory, resume, overwrite), ``sweep``'s outputs, and ``eval`` on runs and
sweeps with its one-line refusals."""

import json
import os
import subprocess
import sys

import pytest

from jaxl2.mnist.rundir import default_out
from tests.mnist.cli.command import FAST, TINY, jaxl2, one_line_error
from tests.mnist.test_tensorboard import read_events, scalars

# -- jaxl2 train -----------------------------------------------------------------------


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


# -- jaxl2 sweep -----------------------------------------------------------------------


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


# -- jaxl2 eval ------------------------------------------------------------------------


def test_eval_reads_the_dataset_from_the_run_and_split_names_are_one_set(finished):
    out, summary_text = finished
    r = jaxl2("eval", "--run", str(out), "--split", "val", "--no-refit", "--json")  # the best epoch's
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["dataset"] == "mnist5k" and ev["n"] == 500 and ev["model"] == "best"
    shown = next(ln for ln in summary_text.splitlines() if ln.startswith("val "))
    assert f"{100 * ev['accuracy']:.2f}%" in shown  # the summary's "val" row is eval's "val" split
    one_line_error(jaxl2("eval", "--run", str(out), "--split", "validation"), "allowed: train, val, test")


def test_eval_of_an_unfinished_sweep_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"kind": "sweep", "l2": [0.0], "seeds": [0]}))
    one_line_error(jaxl2("eval", "--run", str(tmp_path)), "the sweep has not finished (no sweep.json)")
    one_line_error(jaxl2("train", "--out", str(tmp_path), "--resume"), "holds a sweep, not a training run")


def test_eval_of_a_file_names_run(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    one_line_error(jaxl2("eval", "--run", str(f)), f"--run {f} is a file")


@pytest.mark.parametrize("hidden", [[64], [16, 16], []], ids=["other-width", "more-layers", "fewer-layers"])
def test_eval_refuses_a_checkpoint_that_does_not_fit_its_config(tmp_path, finished, hidden):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(finished[0], copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "hidden": hidden}))
    one_line_error(jaxl2("eval", "--run", str(copy)), "does not fit the model of its config.json")
