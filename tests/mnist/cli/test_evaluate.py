"""`jaxl2 eval` (jaxl2/mnist/cli/evaluate.py) on runs and sweeps, and its one-line refusals."""

import json

import pytest

from tests.mnist.cli.command import jaxl2, one_line_error


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
