"""The train step, the scanned epoch, evaluation, and the loop: calls of several epochs, divergence, the params it keeps."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2
from jaxl2.mnist.config import Config, ConfigError
from jaxl2.mnist.model import model_of
from jaxl2.mnist.train import Trainer, kernel_sq_norm

SMALL = Config(hidden=(32,), epochs=3, batch_size=64, lr=0.1)


@pytest.fixture(scope="module")
def small_data():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(200, 784)).astype(np.float32)
    y = (np.arange(200) % 10).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def test_train_step_matches_hand_written_sgd(small_data):
    """One step of jaxl2's train_step equals w ← w − lr·(∇CE + λ·w) on kernels, − lr·∇CE on biases."""
    x, y = small_data
    cfg = Config(hidden=(16,), optimizer="sgd", schedule="constant", lr=0.5, l2=0.1, batch_size=64)
    tr = Trainer(cfg, 200)
    state = tr.init()
    params0 = jax.tree_util.tree_map(np.asarray, state.params)

    def ce(p):
        return optax.softmax_cross_entropy_with_integer_labels(tr.model.apply(p, x[:64]), y[:64]).mean()

    g = jax.tree_util.tree_map(np.asarray, jax.grad(ce)(state.params))
    new, metrics = tr.train_step(state, (x[:64], y[:64]))
    for layer in ("Dense_0", "Dense_1"):
        w, b = params0["params"][layer]["kernel"], params0["params"][layer]["bias"]
        gw, gb = g["params"][layer]["kernel"], g["params"][layer]["bias"]
        np.testing.assert_allclose(
            new.params["params"][layer]["kernel"], w - 0.5 * (gw + 0.1 * w), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(new.params["params"][layer]["bias"], b - 0.5 * gb, rtol=1e-5, atol=1e-6)
    pen = (
        0.1
        / 2
        * sum(
            float(np.sum(params0["params"][k]["kernel"].astype(np.float64) ** 2))
            for k in ("Dense_0", "Dense_1")
        )
    )
    assert float(metrics["penalty"]) == pytest.approx(pen, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(float(metrics["data_loss"]) + pen, rel=1e-5)
    assert int(new.step) == 1


def test_scanned_epoch_equals_step_by_step(small_data):
    """The epoch's params equal step-by-step training; its data loss and accuracy are the mean
    of the steps'; penalty, norms and the total loss are those of the epoch's final params (in
    float64 by hand), its update norm the epoch's displacement."""
    x, y = small_data
    tr = Trainer(SMALL, 200)
    a = tr.init()
    b = tr.init()
    start = [np.asarray(v, np.float64) for v in jax.tree.leaves(a.params)]
    idx = np.asarray(tr.batches(b, 200))
    assert idx.shape == (3, 64)  # 200 // 64 steps; the last partial batch (8) is dropped
    assert len(set(idx.ravel())) == 192
    a, m_epoch = tr.train_epoch(a, x, y)
    data_losses, hits = [], []
    for row in idx:
        logits = np.asarray(tr.model.apply(b.params, x[row]), np.float64)
        hits.append(np.mean(np.argmax(logits, -1) == np.asarray(y[row])))
        b, m = tr.train_step(b, (x[row], y[row]))
        data_losses.append(float(m["data_loss"]))
        assert float(m["accuracy"]) == pytest.approx(hits[-1])
    end = [np.asarray(v, np.float64) for v in jax.tree.leaves(a.params)]
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert float(m_epoch["data_loss"]) == pytest.approx(np.mean(data_losses), rel=1e-5)
    assert float(m_epoch["accuracy"]) == pytest.approx(np.mean(hits), rel=1e-6)
    kernels = [
        k for k in jax.tree_util.tree_leaves_with_path(a.params) if "kernel" in jax.tree_util.keystr(k[0])
    ]
    penalty = SMALL.l2 / 2 * sum(np.sum(np.asarray(w, np.float64) ** 2) for _, w in kernels)
    assert float(m_epoch["penalty"]) == pytest.approx(penalty, rel=1e-5)
    assert float(m_epoch["loss"]) == pytest.approx(np.mean(data_losses) + penalty, rel=1e-5)
    assert float(m_epoch["param_norm"]) == pytest.approx(np.sqrt(sum(np.sum(e**2) for e in end)), rel=1e-5)
    displacement = np.sqrt(sum(np.sum((e - s) ** 2) for e, s in zip(end, start)))
    assert float(m_epoch["update_norm"]) == pytest.approx(displacement, rel=1e-4)
    assert int(m_epoch["nonfinite_step"]) == -1
    # the next epoch is shuffled differently
    assert not np.array_equal(np.asarray(tr.batches(a, 200)), idx)


def test_accuracy_counts_the_label_logit_being_the_largest():
    """cross_entropy's accuracy against NumPy's argmax (no ties), and a tie counts as a hit."""
    from jaxl2.mnist.train import cross_entropy

    logits = np.random.default_rng(1).normal(size=(64, 10)).astype(np.float32)
    y = np.random.default_rng(2).integers(0, 10, 64).astype(np.int32)
    _, acc = cross_entropy(jnp.asarray(logits), jnp.asarray(y))
    assert float(acc) == pytest.approx(np.mean(np.argmax(logits, -1) == y))
    _, tie = cross_entropy(jnp.zeros((1, 10)), jnp.asarray([3]))
    assert float(tie) == 1.0


def test_per_example_cross_entropy_against_float64_and_optax():
    """Each row's cross-entropy against float64 NumPy's log-softmax, its gradient against optax's
    integer-label cross-entropy (another implementation), its hits against NumPy's argmax; a
    logit of 1e4 (exp overflows without the max subtracted) stays finite."""
    from jaxl2.mnist.train import per_example

    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(64, 10)).astype(np.float32)
    logits[0, 4] = 1e4
    y = rng.integers(0, 10, 64).astype(np.int32)
    ce, hit = per_example(jnp.asarray(logits), jnp.asarray(y))
    z = logits.astype(np.float64)
    m = z.max(-1, keepdims=True)
    log_softmax = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    np.testing.assert_allclose(ce, -log_softmax[np.arange(64), y], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(hit, np.argmax(logits, -1) == y)
    ours = jax.grad(lambda lg: per_example(lg, jnp.asarray(y))[0].mean())(jnp.asarray(logits))
    theirs = jax.grad(lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, jnp.asarray(y)).mean())(
        jnp.asarray(logits)
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-8)


def test_epoch_reports_the_first_step_whose_loss_is_not_finite(small_data):
    """An lr that blows up mid-epoch: ``nonfinite_step`` is the first step whose data loss,
    stepped one batch at a time through ``train_step`` on the same batches, is NaN/Inf."""
    x, y = small_data
    cfg = Config(hidden=(32,), optimizer="sgd", schedule="constant", lr=1e4, batch_size=8)
    tr = Trainer(cfg, 200)
    state = tr.init()
    _, m_epoch = tr.train_epoch(state, x, y)
    first = -1
    for i, row in enumerate(np.asarray(tr.batches(state, 200))):
        state, m = tr.train_step(state, (x[row], y[row]))
        if not np.isfinite(float(m["data_loss"])):
            first = i
            break
    assert 0 < first < 24  # diverged after a finite start, before the epoch's last step
    assert int(m_epoch["nonfinite_step"]) == first


def test_train_step_and_epoch_compile_once(small_data):
    x, y = small_data
    tr = Trainer(SMALL, 200)
    s = tr.init()
    for _ in range(3):
        s, _ = tr.train_step(s, (x[:64], y[:64]))
    for _ in range(2):
        s, _ = tr.train_epoch(s, x, y)
    assert tr.train_step._cache_size() == 1
    assert tr.train_epoch._cache_size() == 1


def test_adamw_decays_selected_leaves_only(small_data):
    x, y = small_data
    cfg = Config(hidden=(16,), optimizer="adamw", weight_decay=0.5, l2=0.0, schedule="constant", lr=0.01)
    tr = Trainer(cfg, 200)
    s0 = tr.init()
    p0 = jax.tree_util.tree_map(np.asarray, s0.params)
    s1, _ = tr.train_step(s0, (x[:64] * 0, y[:64]))  # zero inputs: kernels get no data gradient
    k0, k1 = p0["params"]["Dense_0"]["kernel"], np.asarray(s1.params["params"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(k1, k0 * (1 - 0.01 * 0.5), rtol=1e-6)


def test_kernel_sq_norm_matches_numpy(tmp_path):
    cfg = Config(hidden=(8,))
    params = model_of(cfg).init(jax.random.PRNGKey(3), jnp.zeros((1, 784)))
    norms = kernel_sq_norm(params, cfg)
    k = params["params"]["Dense_0"]["kernel"]
    assert norms["params/Dense_0/kernel"] == pytest.approx(float(np.sum(np.asarray(k, np.float64) ** 2)))
    assert float(jaxl2.l2_penalty(params, 2.0)) == pytest.approx(sum(norms.values()), rel=1e-6)


def test_sgdw_equals_l2_in_the_loss_under_momentum(small_data):
    x, y = small_data
    base = Config(hidden=(16,), batch_size=50, lr=0.1)
    l2 = Trainer(dataclasses.replace(base, l2=0.01), 200)
    wd = Trainer(dataclasses.replace(base, optimizer="sgdw", l2=0.0, weight_decay=0.01), 200)
    a, b = l2.init(), wd.init()
    for _ in range(2):
        a, _ = l2.train_epoch(a, x, y)
        b, _ = wd.train_epoch(b, x, y)
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_states_of_earlier_epochs_stay_valid(small_data):
    """The epoch does not donate its state: the run loop reads epoch k's params (best params,
    checkpoint) after epoch k + 1 was dispatched from them."""
    x, y = small_data
    tr = Trainer(SMALL, 200)
    s0 = tr.init()
    s1, _ = tr.train_epoch(s0, x, y)
    s2, _ = tr.train_epoch(s1, x, y)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves((s0.params, s1.params, s2.params)))


def test_divergence_stops_with_message_and_checkpoint_loads(tmp_path):
    out = tmp_path / "nan"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxl2",
            "train",
            "--hidden",
            "32",
            "--epochs",
            "30",
            "--optimizer",
            "sgd",
            "--schedule",
            "constant",
            "--lr",
            "0.5",
            "--l2",
            "5",
            "--checkpoint-every",
            "1",
            "--quiet",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    assert (
        "the loss became NaN/Inf at epoch" in r.stderr and "lower --lr" in r.stderr and "λ·lr 2.5" in r.stderr
    )
    assert "Traceback" not in r.stderr
    epoch = int(r.stderr.split("at epoch ")[1].split(",")[0])
    assert epoch > 1  # |1 − lr·λ| = 1.5: the kernels grow 1.5× a step and overflow in epoch 2
    if epoch > 1:
        assert f"last good checkpoint (epoch {epoch - 1})" in r.stderr
        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(os.path.abspath(out / "checkpoints")) as m:
            params = m.restore(m.latest_step())["state"]["params"]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_a_trainer_validates_the_config_it_is_given():
    """A Config built in Python enters the application at Trainer: a bad field is a ConfigError
    that names it, and the optimizer's default lr is filled in (Config().lr is None)."""
    with pytest.raises(ConfigError, match="optimizer"):
        Trainer(Config(optimizer="bogus"), 100)
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(Config(batch_size=0), 100)
    assert Config().lr is None and Trainer(Config(), 3500).cfg.lr > 0
