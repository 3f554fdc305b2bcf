"""The jaxl2 commands as a user runs them: bad input in one line, directories, resume, interrupts,
eval, sweep, gradcheck, warnings and plots (mostly through the command itself)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxl2.mnist import cli
from jaxl2.mnist.cli import evaluate, report
from jaxl2.mnist.config import OPTIMIZERS, Config, ConfigError, validate
from jaxl2.mnist.rundir import default_out
from tests.mnist.test_tensorboard import read_events, scalars

TINY = ["--hidden", "16", "--epochs", "2", "--batch-size", "500", "--no-refit"]  # refit: test_cli, test_refit


def jaxl2(*args, timeout=180, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jaxl2", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def one_line_error(r, match):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("jaxl2: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert match in r.stderr, r.stderr


# -- the library stays light -----------------------------------------------------------------


def test_import_jaxl2_loads_no_application_dependency():
    code = (
        "import sys, jaxl2; [getattr(jaxl2, n) for n in jaxl2.__all__]; "
        "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    loaded = set(r.stdout.split())
    assert "jax" in loaded
    heavy = {"flax", "orbax", "tensorflow_datasets", "tensorflow", "matplotlib", "rich", "mlxtend", "yaml"}
    assert not heavy & loaded, heavy & loaded


def test_help_imports_neither_jax_nor_the_application():
    code = "import sys; from jaxl2.mnist import cli; cli.build_parser(); print(' '.join(sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    loaded = {m.split(".")[0] for m in r.stdout.split()}
    assert not {"jax", "flax", "orbax", "numpy"} & loaded


def test_library_modules_import_no_application_module():
    root = os.path.join(os.path.dirname(__file__), "..", "jaxl2")
    for name in os.listdir(root):
        if name.endswith(".py"):
            text = open(os.path.join(root, name)).read()
            assert "import jaxl2.mnist" not in text and "from jaxl2.mnist" not in text, name
            assert "import flax" not in text and "from flax" not in text, name


# -- sweep --------------------------------------------------------------------------------------


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


# -- train: the run directory ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    r = jaxl2("train", *TINY, "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    return out, r.stdout


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


def _start(out, *extra, cwd=None):
    return subprocess.Popen(
        [sys.executable, "-m", "jaxl2", *extra, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_sigint_at_any_moment_exits_130_and_leaves_no_half_made_directory(tmp_path, delay):
    out = tmp_path / "r"
    p = _start(out, "train", "--hidden", "16", "--epochs", "400", "--quiet", "--no-cache")
    time.sleep(delay)  # importing, loading, compiling, or training
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    if out.exists():  # stopped after an epoch: a checkpointed run that says how to resume it
        assert (out / "checkpoints").is_dir() and f"jaxl2 train --out {out} --resume" in err, err


def test_sigint_during_a_sweep_exits_130_with_a_checkpoint_to_resume(tmp_path):
    out = tmp_path / "s"
    p = _start(out, "sweep", "--hidden", "32", "--epochs", "400", "--l2", "0,1e-3", "--quiet")
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # training
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    if out.exists():  # stopped after an epoch: checkpointed there, and it says how to resume
        assert (out / "checkpoints").is_dir() and f"jaxl2 sweep --out {out} --resume" in err, err


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


# -- eval -------------------------------------------------------------------------------------------


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


# -- flags named in errors --------------------------------------------------------------------------


def test_negative_split_seed_names_the_flag():
    one_line_error(
        jaxl2("train", "--split-seed", "-1"), "--split-seed -1 is invalid (an integer from 0 to 4294967295)"
    )


def test_small_idx_training_set_names_val_size(tmp_path):
    from tests.mnist.test_data import fake, write_idx

    x, y = fake(40)
    write_idx(tmp_path, "train", x, y)
    write_idx(tmp_path, "t10k", x, y)
    r = jaxl2("train", "--dataset", f"idx:{tmp_path}", "--out", str(tmp_path / "r"))
    one_line_error(r, "--val-size 5000 is invalid for a training split of 40 images (between 1 and 39)")


# -- defaults, names and help ---------------------------------------------------------------------


def test_each_optimizer_has_its_own_default_lr_shown_in_help():
    assert validate(Config(optimizer="adam")).lr == OPTIMIZERS["adam"].lr == 3e-3
    assert validate(Config()).lr == 0.3 and validate(Config(optimizer="adam", lr=0.01)).lr == 0.01
    text = jaxl2("train", "--help").stdout
    assert "adam 0.003" in text and "momentum 0.3" in text


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


def test_a_run_at_chance_warns(capsys):
    report.warn_if_chance([(0.11, 0.3, 1e-3)], Config(optimizer="adam"))
    err = capsys.readouterr().err
    assert "near chance" in err and "--lr" in err and err.count("\n") == 1


def test_loss_means_total_everywhere(tmp_path, finished):
    out, _ = finished
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for row in rows:
        assert row["train_loss"] == pytest.approx(row["train_data_loss"] + row["train_penalty"], rel=1e-5)
        assert "val_loss" not in row and "val_data_loss" in row
    s = json.load(open(out / "summary.json"))
    assert s["train_loss"] == pytest.approx(s["train_data_loss"] + s["penalty"])
    assert not {"val_loss", "test_loss"} & set(s)


def test_help_offers_no_selection_the_mlp_cannot_match():
    text = jaxl2("train", "--help").stdout
    assert "haiku" not in text and "equinox" not in text


# -- errors by layer -------------------------------------------------------------------------------


def test_config_errors_name_fields_and_the_cli_names_flags():
    with pytest.raises(ConfigError) as e:
        validate(Config(batch_size=0))
    assert str(e.value) == "batch_size 0 is invalid (an integer >= 1)"
    assert e.value.render(report.flag) == "--batch-size 0 is invalid (an integer >= 1)"


def test_a_value_error_from_inside_jax_is_not_bad_input(monkeypatch):
    def boom(args):
        raise ValueError("an XLA bug")

    monkeypatch.setattr(evaluate, "run", boom)
    with pytest.raises(ValueError, match="an XLA bug"):
        cli.main(["eval", "--run", "x"])


# -- gradcheck ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        (["--eps", "0"], "eps"),
        (["--activation", "relu6"], "--activation 'relu6' is unknown (allowed: relu"),
        (["--hidden", "0"], "--hidden 0 is invalid"),
        (["--directions", "0"], "directions"),
    ],
)
def test_gradcheck_bad_input_is_one_line(args, match):
    one_line_error(jaxl2("gradcheck", "--hidden", "8", *args), match)


# -- the curves -----------------------------------------------------------------------------------------


def test_curves_show_every_epoch_and_mark_the_best(tmp_path):
    from jaxl2.mnist.plots import curves

    acc = [0.11, 0.6, 0.9, 0.95, 0.93]
    rows = [
        {
            "epoch": i + 1,
            "train_data_loss": 1.0 / (i + 1),
            "val_data_loss": 1.0 / (i + 1),
            "train_penalty": 0.01,
            "train_accuracy": min(1.0, a + 0.02),
            "val_accuracy": a,
        }
        for i, a in enumerate(acc)
    ]
    info = curves(rows, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert info["best_epoch"] == 4
    low, high = info["accuracy_limits"]
    assert low <= 100 * min(acc) and high >= 100 * max(a + 0.02 for a in acc)
    short = curves(rows[:3], str(tmp_path / "short.png"))  # 3 epochs: matplotlib alone ticks 1.5
    assert short["epoch_ticks"] and all(t == int(t) for t in short["epoch_ticks"]), short


def test_val_size_error_from_data_names_the_field():
    from jaxl2.mnist.data import load

    with pytest.raises(ConfigError, match="val_size 4000 is invalid for a training split of 4000 images"):
        load("mnist5k", val_size=4000)


# -- what a new user tried next ------------------------------------------------------------------------


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


def test_sweep_overwrite_and_its_errors_name_only_its_own_flags(tmp_path):
    out = tmp_path / "s"
    args = ["sweep", "--l2", "0,1e-3", *TINY, "--out", str(out), "--quiet"]
    assert jaxl2(*args).returncode == 0
    r = jaxl2(*args)
    one_line_error(r, "already holds a run (use --resume to continue it, --overwrite to replace it")
    assert jaxl2(*args, "--overwrite").returncode == 0


@pytest.mark.parametrize(
    "args, match",
    [
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
        ([], "a command is required (train, sweep, eval, bench or gradcheck"),
    ],
)
def test_more_bad_input_is_one_line_naming_the_flag(tmp_path, args, match):
    r = jaxl2(*args, cwd=tmp_path)
    one_line_error(r, match)
    assert "argument --" not in r.stderr  # the flag is named once, by our own message
    assert not (tmp_path / "runs").exists()


def test_per_layer_l2_items_may_have_spaces(tmp_path):
    r = jaxl2(
        "train", *TINY, "--l2", ".*Dense_0/kernel=1e-3, .*=1e-4", "--out", str(tmp_path / "r"), "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "config.json").read_text())["l2"] == {
        ".*Dense_0/kernel": 1e-3,
        ".*": 1e-4,
    }


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


def test_idx_dataset_path_is_stored_absolute(tmp_path):
    from tests.mnist.test_data import fake, write_idx

    (tmp_path / "idx").mkdir()
    x, y = fake(60)
    write_idx(tmp_path / "idx", "train", x, y)
    write_idx(tmp_path / "idx", "t10k", x, y)
    r = jaxl2("train", "--dataset", "idx:idx", "--val-size", "10", *TINY[:4], "--batch-size", "10",
              "--out", "r", "--quiet", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "config.json").read_text())["dataset"] == f"idx:{tmp_path / 'idx'}"
    e = jaxl2("eval", "--run", str(tmp_path / "r"), "--json", cwd="/")
    assert e.returncode == 0 and json.loads(e.stdout)["n"] == 60, e.stderr


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


def test_a_sweep_member_at_chance_warns(tmp_path):
    r = jaxl2("sweep", "--l2", "1e-3,5", *TINY, "--out", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    assert "1 of 2 members (first: λ 5.0)" in r.stderr and "near chance" in r.stderr


def test_sweep_progress_is_one_line_per_epoch_without_a_terminal(tmp_path):
    r = jaxl2("sweep", "--l2", "0,1e-3", *TINY, "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "epoch 1/2" in lines and "epoch 2/2" in lines and "\r" not in r.stderr
