"""Data parallelism over a mesh of fake CPU devices, and over two local processes."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

ENV4 = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4"}

SCRIPT = r"""
import json, sys, jax, numpy as np
from jaxl2.mnist import parallel, run, runtime
from jaxl2.mnist.config import Config, RunSettings
from jaxl2.mnist.train import Trainer
assert jax.device_count() == 4
cfg = Config(hidden=(64,), epochs=2, batch_size=128)
out = {}
for n in (1, 4):
    out[n] = run.train_and_evaluate(cfg, f"{sys.argv[1]}/d{n}", RunSettings(False, checkpoint_every=1, devices=n))
# look inside: the batch is split, the params replicated, the gradient all-reduced
mesh = parallel.make_mesh(4)
tr = Trainer(cfg, 3500, mesh=mesh)
s = runtime.replicate(tr.init(), mesh)
x = runtime.put(np.zeros((3500, 784), np.float32), mesh)
y = runtime.put(np.zeros(3500, np.int32), mesh)
hlo = tr.train_epoch.lower(s, x, y).compile().as_text()
s2, _ = tr.train_epoch(s, x, y)
print(json.dumps({
    "summaries": out,
    "x_shards": [list(sh.data.shape) for sh in x.addressable_shards],
    "params_replicated": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(s2.params)),
    "all_reduce": "all-reduce" in hlo,
}))
"""


DIFF = r"""
import json, sys, os, jax, numpy as np
import orbax.checkpoint as ocp
def params(out, which):
    with ocp.CheckpointManager(os.path.abspath(os.path.join(out, which))) as m:
        r = m.restore(m.latest_step())
        return r if which == "best" else r["state"]["params"]
a, b = params(sys.argv[1], sys.argv[3]), params(sys.argv[2], sys.argv[3])
print(max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
"""


def max_param_diff(a, b, which="checkpoints"):
    """Both runs' final (or best) params, restored in a 4-device process like the one that saved them."""
    r = subprocess.run(
        [sys.executable, "-c", DIFF, str(a), str(b), which],
        env=ENV4,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.strip().splitlines()[-1])


def test_four_devices_equal_one(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], env=ENV4, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["x_shards"] == [[875, 784]] * 4  # the epoch's data is split along "data"
    assert d["params_replicated"] and d["all_reduce"]
    s1, s4 = d["summaries"]["1"], d["summaries"]["4"]
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert abs(s1[key] - s4[key]) <= 2e-3, key
    assert abs(s1["penalty"] - s4["penalty"]) <= 1e-4 * s1["penalty"]
    assert max_param_diff(tmp_path / "d1", tmp_path / "d4") < 1e-4


def test_batch_must_divide_over_devices(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "jaxl2", "train", "--devices", "3", "--out", str(tmp_path / "x")],
        env=ENV4,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        r.returncode == 2
        and "--batch-size 128 does not divide over 3 devices (nearest valid: 126 or 129)" in r.stderr
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(command):
    """``command(port, i)`` as processes 0 and 1 of one distributed job, 2 CPU devices each."""
    env2 = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"}
    port = free_port()
    return [
        subprocess.Popen(
            command(port, i), env=env2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]


def start_two_processes(out, flags):
    """``jaxl2 train --distributed`` as processes 0 and 1 of one run."""
    return start_two(
        lambda port, i: (
            [sys.executable, "-m", "jaxl2", "train", *flags, "--out", str(out), "--distributed"]
            + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
        )
    )


def finish(procs, timeout=240):
    """Both processes' ``(stdout, stderr)``; a hang is killed (SIGTERM is caught by JAX's
    preemption notifier) and fails the test."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"the two processes were still running after {timeout} s (a hang)") from None


def skip_without_collectives(procs, outs):
    err = outs[0][1] + outs[1][1]
    if any(p.returncode not in (0, 130) for p in procs) and (
        "collectives" in err.lower() or "not implemented" in err.lower()
    ):
        pytest.skip(f"JAX's CPU backend here lacks multi-process collectives: {err.strip().splitlines()[-1]}")


def test_two_processes_agree_with_one(tmp_path):
    # several calls, each ending in a checkpoint: the saves (orbax syncs the processes with a
    # collective) must not interleave with the next call's collectives (this hung before)
    flags = ["--hidden", "64", "--epochs", "5", "--checkpoint-every", "2", "--json", "--no-refit"]
    procs = start_two_processes(tmp_path / "multi", flags)
    outs = finish(procs)
    skip_without_collectives(procs, outs)
    assert all(p.returncode == 0 for p in procs), (outs[0][1] + outs[1][1])[-3000:]
    # --json: stdout is the one JSON object (gloo's own lines go to stderr)
    assert [json.loads(out)["epochs"] for out, _ in outs] == [5, 5]
    single = subprocess.run(
        [sys.executable, "-m", "jaxl2", "train", *flags, "--out", str(tmp_path / "single")],
        env=ENV4,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["5"]
    # best/ is saved from the host (no device topology to match on restore)
    assert os.listdir(tmp_path / "multi" / "best") == os.listdir(tmp_path / "single" / "best")
    assert max_param_diff(tmp_path / "multi", tmp_path / "single", "best") < 1e-4
    rows_m = [json.loads(line) for line in open(tmp_path / "multi" / "metrics.jsonl")]
    rows_s = [json.loads(line) for line in open(tmp_path / "single" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows_m] == [1, 2, 3, 4, 5]  # only process 0 wrote it
    for m, s in zip(rows_m, rows_s):
        assert abs(m["val_accuracy"] - s["val_accuracy"]) <= 2e-3


def test_ctrl_c_on_one_process_stops_both(tmp_path):
    """Ctrl-C reaches one process only: both stop after the same epoch, with a checkpoint of it
    (a process that stopped alone left the other waiting in a collective forever)."""
    out = tmp_path / "run"
    procs = start_two_processes(
        out, ["--hidden", "64", "--epochs", "200", "--checkpoint-every", "1", "--quiet", "--no-refit"]
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip()):  # training has begun
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGINT)
    outs = finish(procs)
    skip_without_collectives(procs, outs)
    assert [p.returncode for p in procs] == [130, 130], (outs[0][1] + outs[1][1])[-3000:]
    said = [re.search(r"interrupted after epoch (\d+)", err) for _, err in outs]
    assert all(said), (outs[0][1] + outs[1][1])[-3000:]
    epoch = int(said[0].group(1))
    assert int(said[1].group(1)) == epoch < 200
    assert os.listdir(out / "checkpoints") == [str(epoch)]
    assert len(metrics.read_text().splitlines()) == epoch


def test_a_refused_out_dir_stops_every_process(tmp_path):
    """Only process 0 prepares --out; when it refuses, the others stop too (they hung in their
    first collective, waiting for process 0)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a run")
    procs = start_two_processes(out, ["--hidden", "64", "--epochs", "1", "--quiet", "--no-refit"])
    outs = finish(procs, timeout=120)
    assert [p.returncode for p in procs] == [2, 2], (outs[0][1] + outs[1][1])[-3000:]
    assert "holds files that are not a jaxl2 run's (notes.txt)" in outs[0][1]
    assert f"process 0 could not prepare --out {out} (its error says why)" in outs[1][1]
    assert sorted(os.listdir(out)) == ["notes.txt"]


ANY = r"""
import sys, jax
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from jaxl2.mnist import runtime
i = jax.process_index()
print(runtime.any_process(i == 1, False, i == 0), runtime.any_process(False))
"""


def test_any_process_ors_the_flags_of_all_processes():
    procs = start_two(lambda port, i: [sys.executable, "-c", ANY, str(port), str(i)])
    outs = finish(procs, timeout=120)
    skip_without_collectives(procs, outs)
    assert all(p.returncode == 0 for p in procs), (outs[0][1] + outs[1][1])[-3000:]
    for out, _ in outs:  # each process sees every process's flags
        assert out.strip().splitlines()[-1] == "(True, False, True) (False,)"


def test_a_ctrl_c_on_another_process_interrupts_this_one(monkeypatch):
    from jaxl2.mnist import runtime, sigint, train

    assert not sigint.pending()
    train.check_interrupt()  # nobody was interrupted
    monkeypatch.setattr(runtime, "any_process", lambda *flags: (True,) * len(flags))  # another process was
    with pytest.raises(KeyboardInterrupt):
        train.check_interrupt()


def test_a_save_another_process_asked_for_restarts_this_clock(monkeypatch):
    from jaxl2.mnist import runtime, train
    from jaxl2.mnist.rundir import SaveRule

    rule = SaveRule(seconds=30)
    rule.last -= 20  # this process's clock: 20 s of 30
    assert train.call_end(rule, 1, last=False) == (False, False)
    monkeypatch.setattr(runtime, "any_process", lambda *flags: (True,) + flags[1:])  # another's fired
    assert train.call_end(rule, 2, last=False) == (True, False)
    assert time.monotonic() - rule.last < 5  # restarted here too: the processes' clocks stay together
    rule.last -= 31
    assert rule.due(3) and rule.due(3)  # asking does not restart it; only a save does
