"""SIGINT (Ctrl-C) and SIGTERM: deferred to the next safe point, a stopped run or sweep saves first,
exits 130 or 143 with the line that resumes it, and the resume says where it starts."""

import json
import os
import signal
import time

import numpy as np
import pytest

from jaxl2.mnist import fused, sigint, train
from tests.mnist.test_rundir import (
    SMALL,
    first_line_of_resume,
    has_checkpoint,
    jaxl2,
    start,
    start_run,
    wait_for_rows,
)


def test_a_deferred_sigterm_is_recorded_named_and_raised_at_the_next_check():
    before = signal.getsignal(signal.SIGTERM)
    with sigint.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        assert sigint.pending() and sigint.last_signal() == signal.SIGTERM
        assert sigint.name() == "stopped by SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            sigint.check()
        assert not sigint.pending()
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_sigterm_saves_and_a_second_process_is_refused_then_resume_says_where(tmp_path):
    out = tmp_path / "r"
    p = start("train", *SMALL, "--epochs", "2000", "--quiet", "--no-refit", "--out", str(out))
    wait_for_rows(out / "metrics.jsonl")
    second = jaxl2("train", "--out", str(out), "--resume", "--quiet")  # while the first trains
    assert second.returncode == 2, second.stderr
    assert f"--out {out} is in use by another jaxl2 process" in second.stderr, second.stderr
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "Traceback" not in err
    stopped = int(err.split("stopped by SIGTERM after epoch ")[1].split(";")[0])
    assert f"continue with: jaxl2 train --out {out} --resume" in err, err
    assert sorted(os.listdir(out / "checkpoints")) == [str(stopped)]  # saved at the epoch it names
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[-1]["epoch"] >= stopped
    assert (
        first_line_of_resume(out)
        == f"jaxl2: resuming {out} after epoch {stopped}: training epochs {stopped + 1} to 2000"
    )


def test_sigterm_during_a_sweep_exits_143_with_its_resume_line(tmp_path):
    out = tmp_path / "s"
    p = start(
        "sweep",
        *SMALL,
        "--epochs",
        "2000",
        "--l2",
        "0,1e-3",
        "--quiet",
        "--execution",
        "vmap",
        "--out",
        str(out),
    )
    wait_for_rows(out / "progress.json", 1)
    time.sleep(1.0)  # training
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "stopped by SIGTERM after epoch" in err and f"jaxl2 sweep --out {out} --resume" in err, err
    assert os.listdir(out / "checkpoints")


def test_sigint_checkpoints_and_exits_130(tmp_path):
    out = tmp_path / "int"
    proc = start_run(out)
    while not has_checkpoint(out) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGINT arrived")
    assert proc.returncode == 130, err
    assert f"jaxl2 train --out {out} --resume" in err and "Traceback" not in err
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(out / "checkpoints")) as m:
        assert m.latest_step() == rows[-1]["epoch"]  # the interrupted epoch was checkpointed
    done = start_run(out, "--resume")
    assert done.wait(timeout=300) == 0


def test_a_signal_in_the_last_compiled_call_stops_after_saving_it():
    """The driver itself: SIGINT arrives while the last call runs; its epochs are kept and
    saved, and the driver stops there instead of going on (to a refit, a summary)."""
    from types import SimpleNamespace as NS

    def program(st, n):
        m = {"loss": np.zeros(n), "nonfinite_step": -np.ones(n, int)}
        best = {"index": n - 1, "val": 0.5, "params": st.params + n}
        return NS(params=st.params + n), m, {"accuracy": np.full(n, 0.5)}, best

    saved, seen = [], []

    def on_epoch(ep):
        seen.append(ep.epoch)
        if ep.epoch == 3:  # the host reads the first epoch of the last call while the call runs
            os.kill(os.getpid(), signal.SIGINT)

    with sigint.deferred():
        with pytest.raises(train.Interrupted, match="interrupted after epoch 4") as e:
            train.train_epochs(
                fused.runner(program, 2),
                NS(params=0),
                range(1, 5),
                train.Best(0, lambda b, p, better: p),
                diverged=str,
                every=None,
                save=lambda epoch, st: saved.append((epoch, st.params)),
                on_epoch=on_epoch,
            )
    assert saved == [(4, 4)] and seen == [1, 2, 3, 4]
    assert e.value.signal == signal.SIGINT


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_sigint_at_any_moment_exits_130_and_leaves_no_half_made_directory(tmp_path, delay):
    out = tmp_path / "r"
    p = start("train", "--hidden", "16", "--epochs", "400", "--quiet", "--no-cache", "--out", str(out))
    time.sleep(delay)  # importing, loading, compiling, or training
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    if out.exists():  # stopped after an epoch: a checkpointed run that says how to resume it
        assert (out / "checkpoints").is_dir() and f"jaxl2 train --out {out} --resume" in err, err


def test_sigint_during_a_sweep_exits_130_with_a_checkpoint_to_resume(tmp_path):
    out = tmp_path / "s"
    p = start("sweep", "--hidden", "32", "--epochs", "400", "--l2", "0,1e-3", "--quiet", "--out", str(out))
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
