"""The ``jaxl2`` command's shared behaviour (jaxl2/mnist/cli/__init__.py, main()): bad input is
one line naming the flag and exits 2, nothing half-written; a closed pipe and a bug inside jax
are not bad input (Ctrl-C: tests/mnist/test_sigint.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxl2.mnist import cli
from jaxl2.mnist.cli import commands
from tests.mnist.cli.command import jaxl2, one_line_error


@pytest.mark.parametrize(
    "args, match",
    [
        (["train", "--l2", "-1", "--out", "bad"], "--l2 must be a finite number >= 0, got -1.0"),
        (["train", "--l2", "nan", "--out", "bad"], "got nan"),
        (["train", "--l2", "inf", "--out", "bad"], "got inf"),
        (["train", "--l2", "Dense_[0=1e-3", "--out", "bad"], "not a valid regular expression"),
        (
            ["train", "--l2", "nomatch=1e-3", "--out", "bad"],
            "l2 pattern 'nomatch' matches no selected parameter",
        ),
        (["train", "--batch-size", "0", "--out", "bad"], "--batch-size 0 is invalid (an integer >= 1)"),
        (
            ["train", "--batch-size", "4000", "--out", "bad"],
            "--batch-size 4000 is larger than the training set (at most 3500",
        ),
        (["train", "--epochs", "-1", "--out", "bad"], "--epochs -1 is invalid"),
        (["train", "--lr", "0", "--out", "bad"], "--lr 0.0 is invalid (a finite number > 0)"),
        (
            ["train", "--optimizer", "rmsprop", "--out", "bad"],
            "--optimizer 'rmsprop' is unknown (allowed: sgd, momentum, adam, adamw, sgdw)",
        ),
        (
            ["train", "--dataset", "idx:/does/not/exist", "--out", "bad"],
            "idx:/does/not/exist: no such directory",
        ),
        (
            ["train", "--select", "nothing", "--out", "bad"],
            "--select 'nothing' matched no parameter (kernels, or a regex",
        ),
        (
            ["train", "--optimizer", "adamw", "--weight-decay", "1e-4", "--out", "bad"],
            "--weight-decay and --l2 together",
        ),
        (["train", "--hidden", "a,b", "--out", "bad"], "--hidden 'a,b' is invalid"),
        (["train", "--split-seed", "-1"], "--split-seed -1 is invalid (an integer from 0 to 4294967295)"),
        (["train", "--devices", "0"], "--devices 0 is invalid (an integer >= 1)"),
        (["train", "--devices", "-1"], "--devices -1 is invalid"),
        (
            ["train", "--seed", "9223372036854775808"],
            "--seed 9223372036854775808 is invalid (an integer from 0",
        ),
        (["gradcheck", "--seed", "99999999999999999999"], "--seed 99999999999999999999 is invalid"),
        (["train", "--l2", "-1e-3"], "--l2 must be a finite number >= 0, got -0.001"),
        (["sweep", "--l2", "-1,0"], "--l2 must be a finite number >= 0, got -1.0"),
        (["train", "--hidden", "-5,3"], "--hidden -5,3 is invalid"),
        (["train", "--l2", "1e300"], "--l2 1e+300 is too large"),
        (["sweep", "--seed", "-1"], "--seed -1 is invalid"),
        (["train", "--out", ""], "--out is empty"),
        (["gradcheck", "--l2", "-1"], "--l2 must be a finite number >= 0, got -1.0"),
        (["gradcheck", "--hidden", "8", "--eps", "0"], "eps"),
        (
            ["gradcheck", "--hidden", "8", "--activation", "relu6"],
            "--activation 'relu6' is unknown (allowed: relu",
        ),
        (["gradcheck", "--hidden", "8", "--hidden", "0"], "--hidden 0 is invalid"),
        (["gradcheck", "--hidden", "8", "--directions", "0"], "directions"),
        (["train", "--resume", "--hidden", "8"], "--resume needs --out, the run to continue"),
        (["sweep", "--resume", "--hidden", "8"], "--resume needs --out, the sweep to continue"),
        ([], "a command is required (train, sweep, eval, bench or gradcheck"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag_exit_2_and_writes_nothing(tmp_path, args, match):
    r = jaxl2(*args, cwd=tmp_path)
    one_line_error(r, match)
    assert "argument --" not in r.stderr  # the flag is named once, by our own message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "bad").exists()  # nothing half-written


def test_a_value_error_from_inside_jax_is_not_bad_input(monkeypatch):
    def boom(args):
        raise ValueError("an XLA bug")

    monkeypatch.setattr(commands, "evaluate", boom)
    with pytest.raises(ValueError, match="an XLA bug"):
        cli.main(["eval", "--run", "x", "--no-cache"])  # no cache switched on in this process


def test_a_closed_pipe_is_not_a_traceback(finished):
    p = subprocess.Popen(
        [sys.executable, "-m", "jaxl2", "eval", "--run", str(finished[0])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.close()  # like `| head -0`: the reader is gone before anything is written
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_small_idx_training_set_names_val_size(tmp_path):
    from tests.mnist.test_data import fake, write_idx

    x, y = fake(40)
    write_idx(tmp_path, "train", x, y)
    write_idx(tmp_path, "t10k", x, y)
    r = jaxl2("train", "--dataset", f"idx:{tmp_path}", "--out", str(tmp_path / "r"))
    one_line_error(r, "--val-size 5000 is invalid for a training split of 40 images (between 1 and 39)")


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
