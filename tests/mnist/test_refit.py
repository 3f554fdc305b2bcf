"""The refit trains on exactly train ∪ validation, never on test, resumes bit for bit, and
`jaxl2 eval` uses it; a sweep refits its selected λ once per seed."""

import dataclasses
import hashlib

import jax
import numpy as np
import pytest

from jaxl2.mnist.config import Config, ConfigError
from jaxl2.mnist.data import Dataset, Split, load
from jaxl2.mnist.refit import ready, refit, refit_epochs, restore_refit, train_val
from jaxl2.mnist.runtime import enable_compilation_cache

TINY = Config(hidden=(16,), batch_size=50, epochs=6)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    before = jax.config.jax_compilation_cache_dir
    enable_compilation_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def rows(split):
    return sorted(hashlib.sha1(x.tobytes() + bytes([int(y)])).hexdigest() for x, y in zip(*split))


def test_refit_epoch_rules():
    assert refit_epochs("all", best_epoch=7, epochs=30) == 30 and refit_epochs("best", 7, 30) == 7
    with pytest.raises(ConfigError, match=r"refit_epochs 'last' is unknown \(allowed: all, best\)"):
        refit_epochs("last", 7, 30)


def test_refit_data_is_exactly_train_and_validation_never_test():
    d = load("mnist5k")
    tv = train_val(d)
    assert len(tv.y) == 4000 and rows(tv) == sorted(rows(d.train) + rows(d.val))
    assert not set(rows(tv)) & set(rows(d.test))


def toy(rng, classes, n):
    """``n`` images per class: class c lights up pixels 60c … 60c+59 over uniform noise."""
    y = np.repeat(np.asarray(classes, np.int32), n)
    x = rng.uniform(0, 0.3, (len(y), 784)).astype(np.float32)
    for i, c in enumerate(y):
        x[i, 60 * c : 60 * c + 60] += 0.7
    return Split(x, y)


@pytest.fixture(scope="module")
def val_only_class():
    """Class 9 is only in validation; the test images are NaN (one fed to training would
    poison every parameter)."""
    rng = np.random.default_rng(0)
    test = Split(np.full((20, 784), np.nan, np.float32), np.full(20, 9, np.int32))
    return Dataset("toy", toy(rng, range(9), 20), toy(rng, [9], 20), test)


def test_refit_learns_the_validation_examples_and_never_sees_test(val_only_class, tmp_path):
    ds = val_only_class
    res = refit(TINY, ds, 6, str(tmp_path / "r"))
    assert res["refit_examples"] == 200 and res["refit_epochs"] == 6
    params = restore_refit(str(tmp_path / "r"), TINY, 6, 200)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))  # test never fed
    from jaxl2.mnist.model import model_of

    logits = model_of(TINY).apply(params, ds.val.x)
    assert np.mean(np.argmax(logits, -1) == 9) > 0.9  # learned from validation: its only examples of 9
    assert res["refit_train_accuracy"] > 0.9
    again = refit(TINY, ds, 2, str(tmp_path / "r"))  # another epoch count: a new refit, not a resume
    assert again["refit_epochs"] == 2 and again["refit_seconds"] > 0
    shorter = restore_refit(str(tmp_path / "r"), TINY, 2, 200)
    assert not np.array_equal(jax.tree.leaves(shorter)[0], jax.tree.leaves(params)[0])


def test_refit_stopped_and_resumed_is_bit_identical(val_only_class, tmp_path):
    ds = val_only_class
    whole = refit(TINY, ds, 6, str(tmp_path / "a"))

    def stop(epoch, _epochs):
        if epoch == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        refit(TINY, ds, 6, str(tmp_path / "b"), checkpoint_every=3, on_epoch=stop)  # checkpoint at 3
    resumed = refit(TINY, ds, 6, str(tmp_path / "b"))
    assert resumed["refit_test_accuracy"] == whole["refit_test_accuracy"]
    a, b = (restore_refit(str(tmp_path / n), TINY, 6, 200) for n in "ab")
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


def test_a_refit_made_ready_ahead_trains_what_one_made_at_once_does(val_only_class, tmp_path):
    """``ready`` (what ``jaxl2 train`` compiles in the background while the run trains) then
    ``refit(made=...)`` ends with the params of a refit that compiled its own program; one made
    for another epoch count is not used (its schedule spans other steps)."""
    ds = val_only_class
    at_once = refit(TINY, ds, 6, str(tmp_path / "a"))
    made = ready(TINY, ds, 6)
    assert made.program is not None and made.compile_seconds > 0
    ahead = refit(TINY, ds, 6, str(tmp_path / "b"), made=made)
    assert ahead["refit_compile_seconds"] == made.compile_seconds
    other = refit(TINY, ds, 6, str(tmp_path / "c"), made=ready(TINY, ds, 3))
    assert ahead["refit_test_accuracy"] == other["refit_test_accuracy"] == at_once["refit_test_accuracy"]
    want = jax.tree.leaves(restore_refit(str(tmp_path / "a"), TINY, 6, 200))
    for name in "bc":
        for u, v in zip(
            jax.tree.leaves(restore_refit(str(tmp_path / name), TINY, 6, 200)), want, strict=True
        ):
            np.testing.assert_array_equal(u, v)


def test_refit_that_diverges_names_the_refit_epoch_and_step(val_only_class, tmp_path):
    """A NaN in the refit stops it with the run's message shape, prefixed by the refit, at the
    first bad epoch of its compiled call (the epochs before it finished, none saved after)."""
    from jaxl2.mnist.train import Diverged

    seen = []
    hot = dataclasses.replace(TINY, optimizer="sgd", schedule="constant", lr=1e6)
    with pytest.raises(
        Diverged, match=r"^refit on train ∪ validation: the loss became NaN/Inf at epoch 1, step \d+ of 4"
    ):
        refit(hot, val_only_class, 6, str(tmp_path / "r"), on_epoch=lambda e, n: seen.append(e))
    assert seen == []
