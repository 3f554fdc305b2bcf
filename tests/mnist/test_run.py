"""A run into its directory (jaxl2.mnist.run): its files, exact resume, a directory that holds a run refused."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxl2.mnist import run as _run
from jaxl2.mnist.config import Config, ConfigError, RunSettings
from jaxl2.mnist.results import RunSummary
from tests.keys import assert_typed


def small_run(tmp_path, name, **kw):
    cfg = Config(hidden=(32,), epochs=4, batch_size=500, lr=0.1, **kw)
    return cfg, os.path.join(tmp_path, name)


def test_run_directory_and_resume_equals_uninterrupted(tmp_path):
    cfg, out_a = small_run(tmp_path, "a")
    summary = _run.train_and_evaluate(
        cfg, out_a, RunSettings(refit=False, checkpoint_every=1)
    )  # refit: test_refit
    # every output exists and parses
    assert_typed(summary, RunSummary)
    assert json.load(open(os.path.join(out_a, "config.json")))["hidden"] == [32]
    rows = [json.loads(line) for line in open(os.path.join(out_a, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert json.load(open(os.path.join(out_a, "summary.json")))["test_accuracy"] == summary["test_accuracy"]
    assert open(os.path.join(out_a, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert summary["train_accuracy"] > 0.5 and set(summary["kernel_sq_norm"]) == {
        "params/Dense_0/kernel",
        "params/Dense_1/kernel",
    }

    # a run stopped after epoch 2 (checkpoint at 2) and resumed ends with the same params
    _, out_b = small_run(tmp_path, "b")
    every_2 = RunSettings(refit=False, checkpoint_every=2)

    def stop_at_3(row):
        if row["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run.train_and_evaluate(cfg, out_b, every_2, on_epoch=stop_at_3)
    with open(os.path.join(out_b, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 4, "torn')  # a kill mid-write
    summary_b = _run.train_and_evaluate(cfg, out_b, every_2, resume=True)
    rows_b = [json.loads(line) for line in open(os.path.join(out_b, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows, rows_b):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_accuracy"] == rb["val_accuracy"]
    pa = _restore_latest(out_a)
    pb = _restore_latest(out_b)
    for u, v in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(u, v)
    assert summary_b["test_accuracy"] == summary["test_accuracy"]


def _restore_latest(out):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints"))) as m:
        return m.restore(m.latest_step())["state"]["params"]


def test_out_dir_that_holds_a_run_is_refused(tmp_path):
    cfg, out = small_run(tmp_path, "a")
    os.makedirs(out)
    open(os.path.join(out, "config.json"), "w").write("{}")
    with pytest.raises(ConfigError, match=r"already holds a run \(use resume"):
        _run.train_and_evaluate(cfg, out)


def test_eval_of_the_test_split_reads_no_training_file(tmp_path):
    from tests.mnist.test_data import fake, write_idx

    def jaxl2(*args):
        return subprocess.run(
            [sys.executable, "-m", "jaxl2", *args], capture_output=True, text=True, timeout=180
        )

    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx(idx, "t10k", *fake(50))
    (idx / "train-images-idx3-ubyte").write_bytes(b"unreadable")
    (idx / "train-labels-idx1-ubyte").write_bytes(b"unreadable")
    out = tmp_path / "r"
    small = ["--hidden", "16", "--batch-size", "500", "--no-cache", "--epochs", "1", "--no-refit", "--quiet"]
    assert jaxl2("train", *small, "--out", str(out)).returncode == 0
    r = jaxl2("eval", "--run", str(out), "--dataset", f"idx:{idx}", "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 50
    bad = jaxl2("eval", "--run", str(out), "--dataset", f"idx:{idx}", "--split", "val")
    assert bad.returncode == 2 and "train-images-idx3-ubyte" in bad.stderr, bad.stderr
