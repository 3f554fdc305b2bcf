"""The TensorBoard event files hold the numbers of metrics.jsonl and of a sweep's members, each
epoch once after a resume; read back with the writer package's own protobufs (no TensorFlow)."""

import dataclasses
import glob
import json
import struct

import pytest
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from jaxl2.mnist import run as _run
from jaxl2.mnist.config import Config, RunSettings, SweepSettings
from jaxl2.mnist.sweep import train_sweep
from jaxl2.mnist.tensorboard import write_run


def read_file(path):
    """The events of one event file, from its TFRecord framing: a little-endian uint64 length,
    its 4-byte CRC, the serialized ``Event``, the data's 4-byte CRC."""
    data, events, i = open(path, "rb").read(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return events


def read_events(logdir):
    """The events of the one event file in ``logdir``."""
    (path,) = glob.glob(f"{logdir}/events.out.tfevents.*")
    return read_file(path)


def shown(logdir):
    """``{(tag, step): value}`` as TensorBoard shows ``logdir``: its event files in name order, a
    session start at step s dropping the points at steps >= s that earlier events had; a point
    shown twice fails."""
    out = {}
    for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
        for e in read_file(path):
            if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
                out = {key: v for key, v in out.items() if key[1] < e.step}
            for key, value in scalars([e]).items():
                assert key not in out, f"{key} shown twice in {logdir}"
                out[key] = value
    return out


def hparams_of(events):
    """The hyperparameters of the HParams plugin's session start."""
    hparams = {}
    for e in events:
        for v in e.summary.value:
            if v.metadata.plugin_data.plugin_name == "hparams":
                data = plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                hparams.update({k: h.number_value for k, h in data.session_start_info.hparams.items()})
    return hparams


def scalars(events):
    """``{(tag, step): value}`` of the scalar events; a tag written twice at one step fails."""
    out = {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                assert (v.tag, e.step) not in out, (v.tag, e.step)
                out[v.tag, e.step] = v.simple_value
    return out


def row(epoch, loss):
    return {
        "epoch": epoch,
        "step": 31 * epoch,
        "train_loss": loss,
        "train_accuracy": 1 - loss / 10,
        "l2/params/Dense_0/kernel": 1e-3 * epoch,
        "log_evidence": None,  # before the first λ update: no point
        "val_accuracy": 0.9 + epoch / 100,
        "epoch_seconds": 0.25,
    }


def write_metrics(out, rows, torn=""):
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def expected(rows):
    return {
        (k, r["epoch"]): v for r in rows for k, v in r.items() if k not in ("epoch", "step") and v is not None
    }


def test_run_events_hold_every_number_of_metrics_jsonl_at_its_epoch(tmp_path):
    rows = [row(1, 2.0), row(2, 1.5), row(3, 1.25)]
    write_metrics(tmp_path, rows, torn='{"epoch": 4, "tra')  # a line torn by a kill is no epoch
    got = scalars(read_events(write_run(str(tmp_path))))
    assert got.keys() == expected(rows).keys()
    for key, value in expected(rows).items():
        assert got[key] == pytest.approx(value, rel=1e-7), key  # float32 in the event file


def test_a_resumed_run_shows_each_epoch_once_and_purges_what_a_viewer_had(tmp_path):
    write_metrics(tmp_path, [row(1, 2.0), row(2, 1.5), row(3, 1.25)])
    write_run(str(tmp_path))
    resumed = [row(1, 2.0), row(2, 1.5), row(3, 1.2), row(4, 1.0)]  # epoch 3 trained again after a kill
    write_metrics(tmp_path, resumed)
    events = read_events(write_run(str(tmp_path)))  # one event file: the old one is gone
    start = [e for e in events if e.HasField("session_log")]
    assert [(e.session_log.status, e.step) for e in start] == [(event_pb2.SessionLog.START, 1)]
    got = scalars(events)
    assert sorted({step for _, step in got}) == [1, 2, 3, 4]
    assert got["train_loss", 3] == pytest.approx(1.2)


def test_a_run_from_python_writes_its_events_beside_metrics_jsonl(tmp_path):
    """train_and_evaluate (not only the command) leaves out/tensorboard/ holding every number of
    metrics.jsonl at its epoch."""
    s = _run.train_and_evaluate(
        Config(hidden=(16,), epochs=2, batch_size=500), str(tmp_path / "run"), RunSettings(refit=False)
    )
    rows = [json.loads(line) for line in open(f"{s['out']}/metrics.jsonl")]
    got = shown(f"{s['out']}/tensorboard")
    assert got.keys() == expected(rows).keys() and len(rows) == 2
    for key, value in expected(rows).items():
        assert got[key] == pytest.approx(value, rel=1e-7), key  # float32 in the event file


def test_sweep_members_are_runs_with_a_row_per_epoch_equal_to_the_run_s_metrics_jsonl(tmp_path):
    """Each member is the run `jaxl2 train --l2 λ --seed s` makes: its events hold that run's
    metrics.jsonl, tag for tag and epoch for epoch (to the vmapped sweep's rounding)."""
    cfg = Config(hidden=(16,), epochs=3, batch_size=500)
    s = train_sweep(cfg, SweepSettings((0.0, 1e-2), (0, 1), "vmap"), str(tmp_path / "sweep"))
    one = _run.train_and_evaluate(
        dataclasses.replace(cfg, l2=1e-2, seed=1), str(tmp_path / "run"), RunSettings(refit=False)
    )
    rows = [json.loads(line) for line in open(f"{one['out']}/metrics.jsonl")]
    assert sorted(glob.glob(f"{s['out']}/tensorboard/*")) == [
        f"{s['out']}/tensorboard/l2={lam},seed={seed}" for lam in ("0", "0.01") for seed in (0, 1)
    ]
    member = f"{s['out']}/tensorboard/l2=0.01,seed=1"
    got = shown(member)
    assert got.keys() == expected(rows).keys()
    for (tag, epoch), value in expected(rows).items():
        if tag != "epoch_seconds":
            assert got[tag, epoch] == pytest.approx(value, rel=1e-3, abs=2e-3), (tag, epoch)
    assert hparams_of(read_events(member)) == pytest.approx({"l2": 1e-2, "seed": 1})


def test_a_full_disk_is_the_run_s_disk_error_naming_what_was_kept(tmp_path, monkeypatch):
    import errno

    from tensorboardX.event_file_writer import EventsWriter

    from jaxl2.mnist.rundir import DiskFull

    def full(self, event):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "tensorboard"))

    write_metrics(tmp_path, [row(1, 2.0)])
    monkeypatch.setattr(EventsWriter, "write_event", full)
    with pytest.raises(
        DiskFull, match=r"cannot write .*tensorboard \(No space left on device\); kept in"
    ) as e:
        write_run(str(tmp_path))
    assert e.value.out == str(tmp_path)  # the command says: free some space, then resume it
