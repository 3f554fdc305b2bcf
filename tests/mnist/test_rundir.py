"""A run's checkpoints on orbax's CheckpointManager: its policies decide when to save, its async
saves restore bit for bit, best/ never falls behind the run, and the layout that jaxl2 0.3.0
wrote (a plain orbax manager per store) is read as it is."""

import os

import numpy as np
import pytest

from jaxl2.mnist.config import ConfigError
from jaxl2.mnist.rundir import Checkpoints, StepStore, checkpoint_steps, save_policy


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


def test_the_store_saves_when_orbax_s_policy_says(tmp_path):
    store = StepStore(str(tmp_path / "c"), every=2)
    assert store.should_save(1)  # no checkpoint yet: at once
    store.save(1, {"x": np.zeros(3)})
    assert store.should_save(2) and not store.should_save(3)  # every 2 steps; 30 s have not passed
    assert not store.should_save(1)  # never a step at or before the latest
    store.close()
    with pytest.raises(ConfigError, match=r"checkpoint_every 0 is invalid \(an integer >= 1"):
        save_policy(epochs=0)


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
