"""A run's checkpoints on orbax's CheckpointManager: the loop's save rule, orbax's async saves
restoring bit for bit, best/ never falls behind the run, and the layout that jaxl2 0.3.0
wrote (a plain orbax manager per store) is read as it is."""

import os

import numpy as np
import pytest

from jaxl2.mnist.config import ConfigError
from jaxl2.mnist.rundir import Checkpoints, SaveRule, checkpoint_steps


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
