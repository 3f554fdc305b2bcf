"""The TensorBoard event files hold the numbers of metrics.jsonl and of a sweep's members, each
epoch once after a resume; read back with the writer package's own protobufs (no TensorFlow)."""

import glob
import json
import struct

import pytest
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from jaxl2.mnist.tensorboard import write_run, write_sweep


def read_events(logdir):
    """The events of the one event file in ``logdir``, from its TFRecord framing: a little-endian
    uint64 length, its 4-byte CRC, the serialized ``Event``, the data's 4-byte CRC."""
    (path,) = glob.glob(f"{logdir}/events.out.tfevents.*")
    data, events, i = open(path, "rb").read(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return events


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


def test_sweep_members_are_runs_with_their_l2_and_seed(tmp_path):
    members = [
        {
            "l2": lam,
            "seed": seed,
            "val_accuracy": 0.9 + lam,
            "kernel_sq_norm": {"params/Dense_0/kernel": 10.0 + seed},
            "best_epoch": 2 + seed,
        }  # fmt: skip
        for seed in (0, 1)
        for lam in (0.0, 1e-3)
    ]
    logdir = write_sweep(str(tmp_path), members)
    for m in members:
        events = read_events(f"{logdir}/l2={m['l2']:g},seed={m['seed']}")
        assert scalars(events) == {
            ("val_accuracy", m["best_epoch"]): pytest.approx(m["val_accuracy"]),
            ("best_epoch", m["best_epoch"]): m["best_epoch"],
            ("kernel_sq_norm/params/Dense_0/kernel", m["best_epoch"]): 10.0 + m["seed"],
        }
        hparams = {}
        for e in events:
            for v in e.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    hparams.update({k: h.number_value for k, h in data.session_start_info.hparams.items()})
        assert hparams == {"l2": m["l2"], "seed": m["seed"]}


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
