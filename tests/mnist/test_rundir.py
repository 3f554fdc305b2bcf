"""A run's directory: its checkpoints on orbax's CheckpointManager (async saves restoring bit for bit,
best/ never behind the run, the layout jaxl2 0.3.0 wrote read as it is), the loop's save rule, the
claim on a directory, a full disk in one line, and exact resume after SIGKILL."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxl2.mnist.config import ConfigError
from jaxl2.mnist.rundir import (
    Checkpoints,
    DiskFull,
    SaveRule,
    check_settings,
    checkpoint_steps,
    disk_errors,
    is_disk_error,
    run_config,
)

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


def first_line_of_resume(out):
    """The first stderr line of ``train --resume`` on ``out``; the resume is then killed."""
    r = start("train", "--out", str(out), "--resume", "--quiet")
    line = r.stderr.readline().strip()
    r.kill()
    r.communicate(timeout=60)
    return line


def _limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


RUN = [
    "--hidden",
    "64",
    "--epochs",
    "24",
    "--batch-size",
    "64",
    "--checkpoint-every",
    "1",
    "--quiet",
    "--no-refit",
]


def start_run(out, *extra):
    """``jaxl2 train`` of :data:`RUN` into ``out``, in the background."""
    return start("train", *RUN, "--out", str(out), *extra)


def final_params(out):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints"))) as m:
        assert m.latest_step() == 24
        return m.restore(m.latest_step())["state"]["params"]


def has_checkpoint(out):
    d = os.path.join(out, "checkpoints")
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def run_state(epoch, best_epoch):
    rng = np.random.default_rng(epoch)
    return {
        "state": {"w": rng.normal(size=(64, 32)).astype(np.float32), "step": np.array(epoch, np.int32)},
        "best_params": {"w": rng.normal(size=(64, 32)).astype(np.float32)},
        "best_val": np.array(0.5, np.float32),
        "best_epoch": np.array(best_epoch, np.int32),
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k])
        else:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_async_saves_restore_bit_for_bit_and_keep_the_latest(tmp_path):
    ckpt = Checkpoints(str(tmp_path), background=True)
    saved = {e: run_state(e, best_epoch=min(e, 2)) for e in (1, 2, 3)}
    for e, st in saved.items():
        ckpt.save(e, st, int(st["best_epoch"]))
    ckpt.close()
    assert checkpoint_steps(str(tmp_path)) == [3] and os.listdir(tmp_path / "best") == ["2"]
    again = Checkpoints(str(tmp_path))
    epoch, restored = again.restore_latest(run_state(0, 0))
    assert epoch == 3
    assert_same(restored, saved[3])
    assert_same(again.restore_best(saved[2]["best_params"]), saved[2]["best_params"])
    assert again.last_good() == "The last good checkpoint (epoch 3) is intact."
    again.close()


def test_a_resume_brings_best_up_to_the_latest_checkpoint(tmp_path):
    """Killed after checkpoints/ was written and before best/ was: the resume writes best/."""
    st = run_state(5, best_epoch=4)
    ckpt = Checkpoints(str(tmp_path))
    ckpt.latest.save(5, st)  # best/ left behind (epoch 4 missing)
    ckpt.close()
    ckpt = Checkpoints(str(tmp_path))
    assert ckpt.restore_latest(run_state(0, 0))[0] == 5
    assert_same(ckpt.restore_best(st["best_params"]), st["best_params"])
    assert ckpt.best.latest() == 4
    ckpt.close()


def test_a_directory_of_jaxl2_0_3_0_is_read_as_it_is(tmp_path):
    """0.3.0 saved each store with a plain orbax manager (synchronous, StandardSave): the same
    steps restore here, and what is written here restores there."""
    import orbax.checkpoint as ocp

    st = run_state(7, best_epoch=6)
    for name, step, tree in (("checkpoints", 7, st), ("best", 6, st["best_params"])):
        opts = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
        with ocp.CheckpointManager(str(tmp_path / name), options=opts) as m:
            m.save(step, args=ocp.args.StandardSave(tree), force=True)
    ckpt = Checkpoints(str(tmp_path), background=True)
    epoch, restored = ckpt.restore_latest(run_state(0, 0))
    assert epoch == 7
    assert_same(restored, st)
    assert_same(ckpt.restore_best(st["best_params"]), st["best_params"])
    later = run_state(8, best_epoch=8)
    ckpt.save(8, later, 8)
    ckpt.close()
    with ocp.CheckpointManager(str(tmp_path / "checkpoints")) as m:
        assert m.latest_step() == 8
        assert_same(m.restore(8), later)


def test_a_config_of_another_format_is_refused_in_one_line_naming_the_version_that_wrote_it():
    with pytest.raises(
        ConfigError, match=r"not a jaxl2 run config \(.*'hidden_sizes'; written by jaxl2 0\.1\.0\)$"
    ):
        run_config({"jaxl2_version": "0.1.0", "hidden_sizes": [16]}, "r/config.json")


def test_a_resume_with_other_settings_is_refused_naming_each_one_with_both_values():
    saved = {"hidden": (16,), "lr": 0.3, "seed": 0}
    check_settings("r", "run", dict(saved), saved)  # the same settings: no error
    with pytest.raises(ConfigError) as e:
        check_settings("r", "run", {"hidden": (8, 8), "lr": 0.1, "seed": 0}, saved)
    assert str(e.value) == (
        "resume: settings differ from r/config.json: hidden 8,8 vs 16; lr 0.1 vs 0.3 in the run "
        "(resume with the run's own settings)"
    )


def test_the_save_rule_is_due_every_n_epochs_or_seconds_and_refuses_a_bad_count():
    rule = SaveRule(epochs=3, seconds=None)
    assert [e for e in range(1, 10) if rule.due(e)] == [3, 6, 9]
    clock = SaveRule(seconds=0.0)  # the time rule alone: due at once, again after each save
    assert clock.due(1)
    clock.saved()
    assert clock.due(2)
    assert not SaveRule(seconds=3600.0).due(1)
    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(ConfigError, match=r"checkpoint_every .* is invalid \(an integer >= 1"):
            SaveRule(bad)


def test_a_claim_is_exclusive_and_a_file_system_without_locks_goes_on_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

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


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    out = tmp_path / "r"
    p = start("train", *SMALL, "--epochs", "2000", "--quiet", "--no-refit", "--out", str(out))
    wait_for_rows(out / "metrics.jsonl")
    p.kill()  # SIGKILL: the kernel releases the lock
    p.communicate(timeout=60)
    assert first_line_of_resume(out).startswith(f"jaxl2: resuming {out}")


def test_resume_without_checkpoint_is_an_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "jaxl2", "train", "--resume", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("jaxl2: error: ")
    assert "config" in r.stderr or "checkpoint" in r.stderr


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
        store.close()
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


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    p = start_run(ref)
    assert p.wait(timeout=300) == 0, p.stderr.read()

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    proc = start_run(out)
    deadline = time.time() + 240
    while kills < 3 and time.time() < deadline:
        while not has_checkpoint(out) and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        proc = start_run(out, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    print(f"killed {kills} times")
    assert kills >= 1
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == list(range(1, 25))
    for u, v in zip(jax.tree.leaves(final_params(ref)), jax.tree.leaves(final_params(out))):
        np.testing.assert_array_equal(u, v)
