"""The fused multi-epoch calls: the next call dispatched before the last one's metrics are
read, divergence inside a call, the params a call keeps, and the same training as one epoch
per call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jaxl2.mnist.fused import epochs_program, run_epochs


class _Recorded:
    """A metric whose host read (``np.asarray``) is logged."""

    def __init__(self, log, tag, value):
        self.log, self.tag, self.value = log, tag, value

    def __array__(self, dtype=None, copy=None):
        self.log.append(("read", self.tag))
        return np.asarray(self.value, dtype)


def _fake_program(log, nan_epoch):
    """A stand-in for :func:`epochs_program`: each call logs its dispatch, returns metrics that
    log when they are read, a NaN loss at ``nan_epoch``, and validation accuracy = epoch / 100."""
    from types import SimpleNamespace

    def program(state, n):
        first = state.k + 1
        log.append(("call", first))
        ks = np.arange(first, first + n)
        loss = np.where(ks == nan_epoch, np.nan, 1.0)
        m = {
            "loss": _Recorded(log, first, loss),
            "nonfinite_step": _Recorded(log, first, np.where(ks == nan_epoch, 0, -1)),
        }
        val = {"accuracy": ks / 100, "data_loss": np.ones(n)}
        good = ks < nan_epoch
        last_good = int(np.flatnonzero(good)[-1]) if good.any() else -1
        best = {
            "index": np.int32(last_good),
            "val": np.float32(ks[last_good] / 100),
            "params": int(ks[last_good]),
        }
        return SimpleNamespace(k=state.k + n, params=state.k + n), m, val, best

    return program


def _run_until_diverged(nan_epoch, epochs, size, match):
    """Runs :func:`_fake_program` through ``run_epochs`` until it raises ``Diverged`` (message
    ``epoch E, steps [S]`` matching ``match``); returns the call log, the yielded epochs, the best."""
    from types import SimpleNamespace

    from jaxl2.mnist.train import Best, Diverged

    log, seen = [], []
    best = Best(params=0, keep=lambda b, p, better: p if better else b)
    with pytest.raises(Diverged, match=match):
        for ep in run_epochs(
            _fake_program(log, nan_epoch),
            SimpleNamespace(k=0, params=0),
            range(1, epochs + 1),
            best,
            lambda e, bad, steps: f"epoch {e}, steps {[int(s) for s in steps]}",
            size=size,
        ):
            seen.append(ep)
    return log, seen, best


def test_run_epochs_dispatches_the_next_call_before_reading_the_last():
    """Call k + 1 is queued before call k's metrics are read; a NaN in epoch 2 raises before
    epoch 2's state is yielded, and the already-dispatched epoch 3 is never read."""
    log, seen, best = _run_until_diverged(2, 4, 1, "epoch 2")
    assert [ep.epoch for ep in seen] == [1]
    assert log[:3] == [("call", 1), ("call", 2), ("read", 1)]
    assert ("call", 3) in log and ("read", 3) not in log
    assert log.index(("call", 3)) < log.index(("read", 2))
    assert (best.epoch, best.params) == (1, 1)


def test_run_epochs_in_calls_of_several_epochs():
    """Calls of 3 epochs: only a call's last epoch carries its state; a NaN in epoch 5 yields
    epoch 4 and raises for epoch 5 (step 1), with the best epoch (4) from the call's best."""
    log, seen, best = _run_until_diverged(5, 6, 3, r"epoch 5, steps \[0\]")
    got = [(ep.epoch, None if ep.state is None else ep.state.k, float(ep.val["accuracy"])) for ep in seen]
    assert got == [(1, None, 0.01), (2, None, 0.02), (3, 3, 0.03), (4, None, 0.04)]
    assert [e for e in log if e[0] == "call"] == [("call", 1), ("call", 4)]
    assert (best.epoch, best.val, best.params) == (4, pytest.approx(0.04), 4)


@pytest.mark.parametrize("latest, kept", [(False, 0), (True, 2)])
def test_a_call_keeps_its_last_epoch_with_latest_and_its_best_without(latest, kept):
    """Three epochs in one compiled call whose validation accuracy falls (1/2, 1/3, 1/4): by
    validation the first epoch's params are kept; with ``latest`` (an evidence run) the last's."""

    class State(struct.PyTreeNode):
        params: jax.Array

    def epoch_fn(st):
        return st.replace(params=st.params + 1), {"loss": jnp.float32(0), "nonfinite_step": jnp.int32(-1)}

    def evaluate_fn(params):
        return {"accuracy": 1 / (1 + params), "data_loss": params}

    program = jax.jit(epochs_program(epoch_fn, evaluate_fn, 3, latest), static_argnums=())
    _, _, _, best = program(State(jnp.float32(0)), 3)
    assert int(best["index"]) == kept and float(best["params"]) == kept + 1


def test_fused_calls_train_as_one_epoch_per_call():
    """Three epochs in one fused call give the rows, the final params and the best epoch that
    three calls of one epoch give (the core's plain way, :func:`one_epoch_per_call`)."""
    from jaxl2.mnist.config import Config
    from jaxl2.mnist.fused import fused_epochs
    from jaxl2.mnist.train import Best, Trainer, one_epoch_per_call

    rng = np.random.default_rng(0)
    x, xv = (jnp.asarray(rng.uniform(size=(n, 784)), jnp.float32) for n in (200, 50))
    y, yv = jnp.arange(200) % 10, jnp.arange(50) % 10
    trainer = Trainer(Config(hidden=(32,), epochs=3, batch_size=64, lr=0.1), 200)
    runs = []
    for make in (one_epoch_per_call, fused_epochs):
        state = trainer.init()
        best = Best(state.params, keep=lambda b, p, better: p if better else b)
        run = make(trainer.run_epoch, lambda p, x, y, xv, yv: trainer.eval_fn(p, xv, yv), state, x, y, xv, yv)
        epochs = list(run(state, range(1, 4), best, str, None))
        rows = [{**e.train, **{f"val_{k}": v for k, v in e.val.items()}} for e in epochs]
        runs.append((rows, epochs[-1].state.params, best.epoch, [e.state is None for e in epochs]))
    (plain, p_plain, best_plain, _), (fused, p_fused, best_fused, inside) = runs
    assert inside == [True, True, False]  # one call: only its last epoch has its state on hand
    for a, b in zip(plain, fused, strict=True):
        assert a.keys() == b.keys()
        assert all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a), (a, b)
    for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_fused)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert best_plain == best_fused
