"""λ on an optax schedule: equal to optax's own scheduled decay, to ``inject_hyperparams`` and to
hand-written float64 loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2

SCHED = optax.linear_schedule(0.2, 0.0, 4)  # 0.2, 0.15, 0.1, 0.05, 0, 0, ...
STEPS = 6


def sched64(t):
    return 0.2 * max(0.0, 1 - t / 4)


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    return {
        "a": {"kernel": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "bias": jnp.ones(2)},
        "b": {"kernel": jnp.asarray(rng.standard_normal((2, 2)), jnp.float32), "bias": jnp.ones(2)},
    }


def grads_at(t, params):
    """A gradient that changes from step to step."""
    return jax.tree.map(lambda w: jnp.sin(w + t), params)


def run(tx, params, steps=STEPS):
    update = jax.jit(tx.update)
    state, p = tx.init(params), params
    for t in range(steps):
        u, state = update(grads_at(t, p), state, p)
        p = optax.apply_updates(p, u)
    return p, state


def close(a, b, rtol=1e-6):
    for (pa, x), (pb, y) in zip(jaxl2.select.leaves(a), jaxl2.select.leaves(b)):
        assert pa == pb
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=1e-7)


def test_scheduled_decay_equals_optax_masked_and_inject_hyperparams(params):
    sgd = optax.sgd(0.1, momentum=0.9)
    ours, state = run(optax.chain(jaxl2.add_decayed_weights(SCHED), sgd), params)
    optax_own, _ = run(optax.chain(optax.add_decayed_weights(SCHED, mask=jaxl2.mask(params)), sgd), params)
    injected, _ = run(optax.chain(optax.inject_hyperparams(jaxl2.add_decayed_weights)(l2=SCHED), sgd), params)
    close(ours, optax_own)
    close(ours, injected)
    assert isinstance(state[0], jaxl2.ScheduleState) and int(state[0].count) == STEPS


def test_scheduled_decay_is_the_hand_loop_in_float64(params):
    lr = 0.1
    ours, _ = run(optax.chain(jaxl2.add_decayed_weights(SCHED), optax.sgd(lr)), params)
    p = {k: {n: np.asarray(w, np.float64) for n, w in v.items()} for k, v in params.items()}
    for t in range(STEPS):
        g = {k: {n: np.sin(w + t) for n, w in v.items()} for k, v in p.items()}
        p = {
            k: {n: w - lr * (g[k][n] + (sched64(t) * w if n == "kernel" else 0.0)) for n, w in v.items()}
            for k, v in p.items()
        }
    close(ours, p, rtol=1e-5)


def test_a_schedule_as_one_value_of_a_rule_mapping(params):
    tx = jaxl2.add_decayed_weights({"a/.*": SCHED, ".*": 0.01})
    zero = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    for t in range(STEPS):
        u, state = jax.jit(tx.update)(zero, state, params)
        np.testing.assert_allclose(
            u["a"]["kernel"], sched64(t) * np.asarray(params["a"]["kernel"]), atol=1e-7
        )
        np.testing.assert_allclose(u["b"]["kernel"], 0.01 * np.asarray(params["b"]["kernel"]), rtol=1e-6)
        np.testing.assert_array_equal(u["a"]["bias"], 0.0)


def test_a_schedule_on_one_slice_of_a_stacked_leaf():
    stack = {"blocks": {"kernel": jnp.ones((2, 2, 2))}}
    tx = jaxl2.add_decayed_weights({r"blocks/kernel\[1\]": SCHED, ".*": 0.0}, stacked={"blocks/.*": 0})
    state, zero = tx.init(stack), jax.tree.map(jnp.zeros_like, stack)
    for t in range(3):
        u, state = tx.update(zero, state, stack)
        np.testing.assert_allclose(u["blocks"]["kernel"][0], 0.0)
        np.testing.assert_allclose(u["blocks"]["kernel"][1], sched64(t), rtol=1e-6)


def mse(p, x):
    return jnp.mean((x @ p["a"]["kernel"] + p["a"]["bias"]) ** 2)


def test_make_train_step_with_a_scheduled_lambda_is_the_hand_sgd_loop(params):
    lr, x = 0.1, jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)), jnp.float32)
    step = jaxl2.make_train_step(mse, optax.sgd(lr), l2=SCHED)
    jitted, state, p = jax.jit(step), step.init(params), params
    assert isinstance(state, jaxl2.ScheduledState)
    # float64 by hand: w ← w − lr·(∇J + λ_t·w) on both kernels, ∇J of the mean square by hand
    h = jax.tree.map(lambda w: np.asarray(w, np.float64), params)
    x64 = np.asarray(x, np.float64)
    for t in range(STEPS):
        p, state, m = jitted(p, state, x)
        pen = sum(sched64(t) / 2 * np.sum(h[k]["kernel"] ** 2) for k in h)
        np.testing.assert_allclose(float(m["penalty"]), pen, rtol=1e-5, atol=1e-8)
        r = x64 @ h["a"]["kernel"] + h["a"]["bias"]
        g = jax.tree.map(np.zeros_like, h)
        g["a"] = {"kernel": 2 / r.size * x64.T @ r, "bias": 2 / r.size * r.sum(0)}
        h = {
            k: {n: w - lr * (g[k][n] + (sched64(t) * w if n == "kernel" else 0.0)) for n, w in v.items()}
            for k, v in h.items()
        }
    assert int(state.count) == STEPS
    close(p, h, rtol=1e-5)


def test_a_scheduled_step_refuses_the_state_of_tx_init(params):
    tx = optax.sgd(0.1)
    step = jaxl2.make_train_step(mse, tx, l2=SCHED)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"step.init\(params\).*not tx.init\(params\)"):
        step(params, tx.init(params), jnp.ones((1, 3)))


def test_penalty_selected_coefficients_read_the_schedule_at_step(params):
    sq = sum(float(np.sum(np.asarray(params[k]["kernel"], np.float64) ** 2)) for k in params)
    with pytest.raises(jaxl2.Jaxl2Error, match="give l2_penalty the step="):
        jaxl2.l2_penalty(params, SCHED)
    for t in (0, 2, 5):
        np.testing.assert_allclose(
            float(jaxl2.l2_penalty(params, SCHED, step=t)), sched64(t) / 2 * sq, rtol=1e-6
        )
        assert [r.l2 for r in jaxl2.selected(params, SCHED, step=t)] == pytest.approx([sched64(t)] * 2)
        assert float(jaxl2.coefficients(params, SCHED, step=t)["a"]["kernel"]) == pytest.approx(sched64(t))
    assert [r.l2 for r in jaxl2.selected(params, SCHED)] == pytest.approx([0.2, 0.2])  # step 0 by default
    with pytest.raises(jaxl2.Jaxl2Error, match="a loss function has no step count"):
        jaxl2.regularized(mse, SCHED)


def test_audit_reads_every_schedule_at_the_step_it_is_given(params):
    lr = 0.1
    tx = optax.chain(jaxl2.add_decayed_weights(SCHED), optax.sgd(lr))
    for t in (0, 1, 3, 9):
        rows = {r.path: r for r in jaxl2.audit(tx, params, step=t)}
        np.testing.assert_allclose(rows["a/kernel"].shrink, lr * sched64(t), rtol=1e-5, atol=1e-12)
        assert rows["a/kernel"].decayed == (sched64(t) > 0)
    # a learning-rate schedule too: AdamW's shrink is lr_t·wd
    lr_sched = optax.linear_schedule(1e-2, 1e-3, 10)
    adamw = optax.adamw(lr_sched, weight_decay=0.1, mask=jaxl2.mask(params))
    rows = {r.path: r for r in jaxl2.audit(adamw, params, step=5)}
    np.testing.assert_allclose(rows["b/kernel"].shrink, float(lr_sched(5)) * 0.1, rtol=1e-5)
    with pytest.raises(jaxl2.Jaxl2Error, match="step must be an int >= 0"):
        jaxl2.audit(tx, params, step=-1)


def test_bad_schedules_are_errors_that_say_what_is_wrong(params):
    with pytest.raises(jaxl2.Jaxl2Error, match="value at step 0 is -1.0"):
        jaxl2.add_decayed_weights(optax.linear_schedule(-1.0, 0.0, 10))

    def broken(count):
        raise KeyError("oops")

    with pytest.raises(jaxl2.Jaxl2Error, match=r"l2\['a/.\*'\]\(0\) raised KeyError"):
        jaxl2.add_decayed_weights({"a/.*": broken, ".*": 0.0})
