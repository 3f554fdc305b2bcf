"""The faults a machine sends, each through the command as a user meets it: a scheduler's SIGTERM,
Ctrl-C in the last compiled call, a full disk, a second process on the same directory, and
input that cannot mean what it says (a λ twice, a finite-difference step below float64's
resolution, a training file that ``eval --split test`` does not need)."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxl2.mnist import sigint, train
from jaxl2.mnist.fused import runner
from jaxl2.mnist.rundir import DiskFull, disk_errors, is_disk_error

SMALL = ["--hidden", "16", "--batch-size", "500", "--no-cache"]


def jaxl2(*args, timeout=180, **kw):
    return subprocess.run(
        [sys.executable, "-m", "jaxl2", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


def start(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "jaxl2", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_rows(path, n=1, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} got no {n} rows in {timeout} s")


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


def first_line_of_resume(out):
    """The first stderr line of ``train --resume`` on ``out``; the resume is then killed."""
    r = start("train", "--out", str(out), "--resume", "--quiet")
    line = r.stderr.readline().strip()
    r.kill()
    r.communicate(timeout=60)
    return line


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    out = tmp_path / "r"
    p = start("train", *SMALL, "--epochs", "2000", "--quiet", "--no-refit", "--out", str(out))
    wait_for_rows(out / "metrics.jsonl")
    p.kill()  # SIGKILL: the kernel releases the lock
    p.communicate(timeout=60)
    assert first_line_of_resume(out).startswith(f"jaxl2: resuming {out}")


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
                runner(program, 2),
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


def _limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_ends_in_one_line_that_keeps_the_run_and_the_resume_finishes(tmp_path):
    out = tmp_path / "r"
    # every file may hold 64 kB: config.json and the metrics fit, the first checkpoint does not
    r = jaxl2(
        "train",
        "--no-cache",
        "--hidden",
        "128",
        "--epochs",
        "3",
        "--no-refit",
        "--quiet",
        "--out",
        str(out),
        preexec_fn=_limit_file_size(64_000),
    )
    assert r.returncode == 74 and r.stderr.count("\n") == 1, r.stderr  # no traceback, ours or orbax's
    line = r.stderr.rstrip("\n")
    assert line.startswith(f"jaxl2: error: cannot write {out}/"), r.stderr
    assert "File too large" in line and f"kept in {out}: config.json" in line, line
    assert line.endswith(f"then continue with: jaxl2 train --out {out} --resume")
    assert (out / "config.json").exists()
    resumed = jaxl2("train", "--out", str(out), "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs_trained"] == 3


_ECHOES = """
import logging, sys
from jaxl2.mnist.rundir import StepStore

StepStore(sys.argv[1]).close()
StepStore(sys.argv[1]).close()  # twice: still one filter and one hook


class Raises:
    def __init__(self, message):
        self.message = message

    def __del__(self):
        raise RuntimeError(self.message)


Raises("Event loop is closed")
Raises("a different error")
absl = logging.getLogger("absl")
for where in ("/site-packages/orbax/checkpoint/x.py", "/elsewhere/y.py"):
    absl.handle(absl.makeRecord("absl", logging.ERROR, where, 1, "a thread of " + where, (), (ValueError, ValueError(), None)))
print(len(absl.filters))
"""


def test_the_echoes_of_a_failed_save_are_dropped_and_nothing_else(tmp_path):
    # tensorstore calls back into orbax's closed event loop (an unraisable error) and orbax's
    # threads log the error that the caller then raises: a full disk prints one line, not these
    r = subprocess.run(
        [sys.executable, "-c", _ECHOES, str(tmp_path / "c")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout == "1\n", r.stderr
    assert "Event loop is closed" not in r.stderr and "orbax/checkpoint" not in r.stderr, r.stderr
    assert "a different error" in r.stderr and "a thread of /elsewhere" in r.stderr, r.stderr


_FULL = """
import sys
import numpy as np
from jaxl2.mnist.rundir import StepStore, disk_errors

out = sys.argv[1]
store = StepStore(out + "/best", background=True)
try:
    with disk_errors(out):  # 360 kB of noise: no compression fits it in a 64 kB file
        store.save(1, {"w": np.random.default_rng(0).normal(size=(300, 300)).astype(np.float32)})
        store.wait()
except OSError as e:
    print(type(e).__name__, e)
"""


def test_a_write_the_disk_refuses_is_one_disk_full_error_that_names_the_store(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", _FULL, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_file_size(64_000),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"DiskFull cannot write {tmp_path}/best (File too large); kept in"), r.stdout
    with pytest.raises(ValueError, match="shapes differ"):
        with disk_errors(str(tmp_path)):
            raise ValueError("shapes differ")
    assert not is_disk_error(ValueError("shapes differ"))
    assert is_disk_error(OSError(28, "No space left on device")) and is_disk_error(DiskFull("x"))


def test_a_sweep_refuses_a_lambda_given_twice():
    r = jaxl2("sweep", "--l2", "0,1e-3,0.001", "--epochs", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--l2 gives λ 0.001 more than once" in r.stderr and "--seeds" in r.stderr, r.stderr


@pytest.mark.parametrize("eps", ["1e-30", "1e-13"])
def test_gradcheck_refuses_a_step_below_float64_resolution(eps):
    r = jaxl2("gradcheck", "--hidden", "8", "--batch", "8", "--eps", eps)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--eps {eps} is below what float64 resolves here" in r.stderr, r.stderr


def test_eval_of_the_test_split_reads_no_training_file(tmp_path):
    from tests.mnist.test_data import fake, write_idx

    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx(idx, "t10k", *fake(50))
    (idx / "train-images-idx3-ubyte").write_bytes(b"unreadable")
    (idx / "train-labels-idx1-ubyte").write_bytes(b"unreadable")
    out = tmp_path / "r"
    assert jaxl2("train", *SMALL, "--epochs", "1", "--no-refit", "--quiet", "--out", str(out)).returncode == 0
    r = jaxl2("eval", "--run", str(out), "--dataset", f"idx:{idx}", "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 50
    bad = jaxl2("eval", "--run", str(out), "--dataset", f"idx:{idx}", "--split", "val")
    assert bad.returncode == 2 and "train-images-idx3-ubyte" in bad.stderr, bad.stderr


def test_a_claim_is_exclusive_and_a_file_system_without_locks_goes_on_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    from jaxl2.mnist.config import ConfigError
    from jaxl2.mnist.rundir import Claim

    with Claim.take(str(tmp_path), created=True) as held:
        assert held.fd is not None
        with pytest.raises(ConfigError, match="is in use by another jaxl2 process"):
            Claim.take(str(tmp_path), created=False)
    Claim.take(str(tmp_path), created=False).release()  # released: free again

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert Claim.take(str(tmp_path), created=False).fd is None
