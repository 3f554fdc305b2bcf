"""jaxl2.rules, the plan's λ: one λ per layer slice of stacked leaves (against the same layers
unrolled) and λ on optax schedules (against optax's own transforms and float64 loops)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2

# -------------------- stacked layers --------------------
# Stacked layers (``stacked=``): every function equals the same model with its layers unrolled.
#
# The stacked model holds its 3 blocks in ``blocks/kernel`` (3, 4, 4) and ``blocks/bias`` (3, 4),
# run by ``jax.lax.scan``; the unrolled one holds ``blocks_0`` … ``blocks_2`` and runs a Python
# loop. The rules give the first block its own λ, in both spellings.


L, D = 3, 4
STACKED = {"blocks/.*": 0}
RULES_STACKED = {r"blocks/kernel\[0\]": 0.1, "blocks/kernel": 0.02, ".*": 0.005}
RULES_UNROLLED = {"blocks_0/kernel": 0.1, "blocks_./kernel": 0.02, ".*": 0.005}
LAMS = (0.1, 0.02, 0.02)  # the blocks' λs
LAM_HEAD = 0.005


@pytest.fixture(scope="module")
def stacked():
    rng = np.random.default_rng(0)
    return {
        "blocks": {
            "kernel": jnp.asarray(rng.standard_normal((L, D, D)) / 2, jnp.float32),
            "bias": jnp.asarray(rng.standard_normal((L, D)) / 4, jnp.float32),
        },
        "head": {
            "kernel": jnp.asarray(rng.standard_normal((D, 2)), jnp.float32),
            "bias": jnp.zeros(2, jnp.float32),
        },
    }


def unroll(p):
    """The same params with blocks_i in place of the stack."""
    out = {
        f"blocks_{i}": {"kernel": p["blocks"]["kernel"][i], "bias": p["blocks"]["bias"][i]} for i in range(L)
    }
    out["head"] = p["head"]
    return out


def restack(u):
    blocks = {k: jnp.stack([u[f"blocks_{i}"][k] for i in range(L)]) for k in ("kernel", "bias")}
    return {"blocks": blocks, "head": u["head"]}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.standard_normal((8, D)), jnp.float32), jnp.asarray(rng.standard_normal((8, 2)))


def loss_stacked(p, x, y):
    def block(h, layer):
        return jnp.tanh(h @ layer["kernel"] + layer["bias"]), None

    h, _ = jax.lax.scan(block, x, p["blocks"])
    return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"] - y) ** 2)


def loss_unrolled(p, x, y):
    h = x
    for i in range(L):
        h = jnp.tanh(h @ p[f"blocks_{i}"]["kernel"] + p[f"blocks_{i}"]["bias"])
    return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"] - y) ** 2)


def hand_penalty(p):
    """Σ_i λ_i/2·‖W_i‖² + λ_head/2·‖W_head‖², in float64."""
    k = np.asarray(p["blocks"]["kernel"], np.float64)
    head = np.asarray(p["head"]["kernel"], np.float64)
    return sum(lam / 2 * np.sum(k[i] ** 2) for i, lam in enumerate(LAMS)) + LAM_HEAD / 2 * np.sum(head**2)


def close(a, b, rtol=1e-5, atol=1e-7):
    for (pa, x), (pb, y) in zip(jaxl2.select.leaves(a), jaxl2.select.leaves(b)):
        assert pa == pb
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=pa)


def test_penalty_is_the_unrolled_one_and_the_hand_sum(stacked):
    ours = jaxl2.l2_penalty(stacked, RULES_STACKED, stacked=STACKED)
    unrolled = jaxl2.l2_penalty(unroll(stacked), RULES_UNROLLED)
    np.testing.assert_allclose(float(ours), hand_penalty(stacked), rtol=1e-6)
    np.testing.assert_allclose(float(ours), float(unrolled), rtol=1e-6)
    jitted = jax.jit(lambda p: jaxl2.l2_penalty(p, RULES_STACKED, stacked=STACKED))(stacked)
    np.testing.assert_allclose(float(jitted), hand_penalty(stacked), rtol=1e-6)


def test_penalty_gradient_is_lambda_i_times_each_slice(stacked):
    g = jax.grad(lambda p: jaxl2.l2_penalty(p, RULES_STACKED, stacked=STACKED))(stacked)
    k = np.asarray(stacked["blocks"]["kernel"], np.float64)
    want = np.stack([lam * k[i] for i, lam in enumerate(LAMS)])
    np.testing.assert_allclose(np.asarray(g["blocks"]["kernel"]), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(g["blocks"]["bias"]), 0.0)
    np.testing.assert_allclose(
        np.asarray(g["head"]["kernel"]), LAM_HEAD * np.asarray(stacked["head"]["kernel"])
    )


def test_regularized_gradients_are_the_unrolled_ones(stacked, batch):
    ours = jax.grad(jaxl2.regularized(loss_stacked, RULES_STACKED, stacked=STACKED))(stacked, *batch)
    theirs = jax.grad(jaxl2.regularized(loss_unrolled, RULES_UNROLLED))(unroll(stacked), *batch)
    close(ours, restack(theirs))


def test_add_decayed_weights_adds_lambda_i_w_i_like_the_unrolled_chain(stacked, batch):
    tx = jaxl2.add_decayed_weights(RULES_STACKED, stacked=STACKED)
    zero = jax.tree.map(jnp.zeros_like, stacked)
    u, _ = tx.update(zero, tx.init(stacked), stacked)
    k = np.asarray(stacked["blocks"]["kernel"], np.float64)
    np.testing.assert_allclose(
        np.asarray(u["blocks"]["kernel"]), np.stack([lam * k[i] for i, lam in enumerate(LAMS)])
    )
    np.testing.assert_array_equal(np.asarray(u["blocks"]["bias"]), 0.0)

    # Three AdamW-like steps (decay between Adam and the lr), stacked vs unrolled.
    def chain(l2, **kw):
        return optax.chain(
            optax.scale_by_adam(), jaxl2.add_decayed_weights(l2, **kw), optax.scale_by_learning_rate(0.1)
        )

    results = []
    for p, loss, tx in (
        (stacked, loss_stacked, chain(RULES_STACKED, stacked=STACKED)),
        (unroll(stacked), loss_unrolled, chain(RULES_UNROLLED)),
    ):
        state = tx.init(p)
        for _ in range(3):
            updates, state = tx.update(jax.grad(loss)(p, *batch), state, p)
            p = optax.apply_updates(p, updates)
        results.append(p)
    close(results[0], restack(results[1]))


def test_make_train_step_trains_as_the_unrolled_model(stacked, batch):
    out = []
    for p, loss, rules, kw in (
        (stacked, loss_stacked, RULES_STACKED, {"stacked": STACKED}),
        (unroll(stacked), loss_unrolled, RULES_UNROLLED, {}),
    ):
        step = jaxl2.make_train_step(loss, optax.adam(0.05), l2=rules, **kw)
        jitted, state, ms = jax.jit(step), step.init(p), []
        for _ in range(4):
            p, state, m = jitted(p, state, *batch)
            ms.append(float(m["penalty"]))
        out.append((p, ms))
    close(out[0][0], restack(out[1][0]))
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)


def test_selected_has_one_row_per_slice_as_the_unrolled_model_has_per_leaf(stacked):
    ours = jaxl2.selected(stacked, RULES_STACKED, stacked=STACKED)
    theirs = jaxl2.selected(unroll(stacked), RULES_UNROLLED)
    assert [r.path for r in ours] == [
        "blocks/kernel[0]",
        "blocks/kernel[1]",
        "blocks/kernel[2]",
        "head/kernel",
    ]
    assert [r.path for r in theirs] == [
        "blocks_0/kernel",
        "blocks_1/kernel",
        "blocks_2/kernel",
        "head/kernel",
    ]
    assert [(r.shape, r.dtype, r.l2) for r in ours] == [(r.shape, r.dtype, r.l2) for r in theirs]
    assert [r.l2 for r in ours] == [*LAMS, LAM_HEAD]
    assert "blocks/kernel[1]  4×4" in str(ours)


def test_audit_shrink_per_slice_is_lr_times_lambda_i(stacked):
    lr = 0.1
    tx = optax.chain(jaxl2.add_decayed_weights(RULES_STACKED, stacked=STACKED), optax.sgd(lr))
    rows = {r.path: r for r in jaxl2.audit(tx, stacked, stacked=STACKED)}
    for i, lam in enumerate(LAMS):
        r = rows[f"blocks/kernel[{i}]"]
        assert r.selected and r.decayed and not r.mismatch and r.shape == (D, D)
        np.testing.assert_allclose(r.shrink, lr * lam, rtol=1e-5)
    np.testing.assert_allclose(rows["head/kernel"].shrink, lr * LAM_HEAD, rtol=1e-5)
    assert not rows["blocks/bias"].decayed and not rows["blocks/bias"].mismatch
    # optax's own decay on the whole stack: one λ, so the audit shows the same shrink on every slice
    plain = optax.chain(optax.add_decayed_weights(0.02, mask=jaxl2.mask(stacked)), optax.sgd(lr))
    shrinks = [
        r.shrink for r in jaxl2.audit(plain, stacked, stacked=STACKED) if r.path.startswith("blocks/kernel")
    ]
    np.testing.assert_allclose(shrinks, [lr * 0.02] * L, rtol=1e-5)


def test_group_norms_per_slice_are_the_unrolled_ones_and_numpy(stacked, batch):
    grads = jax.grad(loss_stacked)(stacked, *batch)
    updates = jax.tree.map(lambda g: -0.1 * g, grads)
    ours = jaxl2.group_norms(stacked, grads, updates, 0.01, stacked=STACKED)
    theirs = jaxl2.group_norms(unroll(stacked), unroll(grads), unroll(updates), 0.01)

    def renamed(key):  # "param_norm/blocks/kernel[1]" -> "param_norm/blocks_1/kernel"
        return re.sub(r"blocks/kernel\[(\d)\]", r"blocks_\1/kernel", key)

    assert sorted(map(renamed, ours)) == sorted(theirs)
    for i in range(L):
        for kind in ("param_norm", "grad_norm", "update_norm", "decay_share"):
            np.testing.assert_allclose(
                float(ours[f"{kind}/blocks/kernel[{i}]"]),
                float(theirs[f"{kind}/blocks_{i}/kernel"]),
                rtol=1e-5,
            )
        k = np.asarray(stacked["blocks"]["kernel"][i], np.float64)
        g = np.asarray(grads["blocks"]["kernel"][i], np.float64)
        np.testing.assert_allclose(
            float(ours[f"param_norm/blocks/kernel[{i}]"]), np.linalg.norm(k), rtol=1e-6
        )
        np.testing.assert_allclose(
            float(ours[f"decay_share/blocks/kernel[{i}]"]),
            0.01 * np.linalg.norm(k) / np.linalg.norm(g),
            rtol=1e-5,
        )
    # the unselected group holds both biases, stacked or not
    b = np.concatenate([np.ravel(stacked["blocks"]["bias"]), np.ravel(stacked["head"]["bias"])])
    np.testing.assert_allclose(float(ours["param_norm/unselected"]), np.linalg.norm(b), rtol=1e-6)
    np.testing.assert_allclose(float(ours["param_norm/unselected"]), float(theirs["param_norm/unselected"]))


def test_group_norms_per_rule_group_gather_the_slices_a_pattern_gives_its_lambda(stacked):
    grads = jax.tree.map(lambda w: 0.5 * w + 1.0, stacked)
    ours = jaxl2.group_norms(stacked, grads, grads, RULES_STACKED, stacked=STACKED)
    k = np.asarray(stacked["blocks"]["kernel"], np.float64)
    g = np.asarray(grads["blocks"]["kernel"], np.float64)
    np.testing.assert_allclose(float(ours[r"param_norm/blocks/kernel\[0\]"]), np.linalg.norm(k[0]), rtol=1e-6)
    np.testing.assert_allclose(float(ours["param_norm/blocks/kernel"]), np.linalg.norm(k[1:]), rtol=1e-6)
    np.testing.assert_allclose(
        float(ours["decay_share/blocks/kernel"]),
        0.02 * np.linalg.norm(k[1:]) / np.linalg.norm(g[1:]),
        rtol=1e-5,
    )
    theirs = jaxl2.group_norms(unroll(stacked), unroll(grads), unroll(grads), RULES_UNROLLED)
    for kind in ("param_norm", "grad_norm", "update_norm", "decay_share"):
        np.testing.assert_allclose(
            float(ours[f"{kind}/blocks/kernel"]), float(theirs[f"{kind}/blocks_./kernel"]), rtol=1e-5
        )
        np.testing.assert_allclose(float(ours[f"{kind}/.*"]), float(theirs[f"{kind}/.*"]), rtol=1e-5)


def test_coefficients_broadcast_along_the_layer_axis_and_sum_to_the_penalty(stacked):
    c = jaxl2.coefficients(stacked, RULES_STACKED, stacked=STACKED)
    assert jnp.shape(c["blocks"]["kernel"]) == (L, 1, 1)
    np.testing.assert_allclose(np.ravel(c["blocks"]["kernel"]), LAMS, rtol=1e-6)
    assert c["blocks"]["bias"] == 0.0 and c["head"]["kernel"] == LAM_HEAD
    total = sum(float(jnp.sum(ci / 2 * w * w)) for ci, w in zip(jax.tree.leaves(c), jax.tree.leaves(stacked)))
    np.testing.assert_allclose(total, hand_penalty(stacked), rtol=1e-6)
    # one λ for every slice: a scalar, as for an unstacked leaf
    assert jnp.ndim(jaxl2.coefficients(stacked, 0.3, stacked=STACKED)["blocks"]["kernel"]) == 0


def test_a_negative_axis_names_the_last_axis(stacked):
    last = {
        "blocks": {
            "kernel": jnp.moveaxis(stacked["blocks"]["kernel"], 0, -1),
            "bias": stacked["blocks"]["bias"],
        },
        "head": stacked["head"],
    }
    pen = jaxl2.l2_penalty(last, RULES_STACKED, stacked={"blocks/kernel": -1})
    np.testing.assert_allclose(float(pen), hand_penalty(stacked), rtol=1e-6)
    rows = jaxl2.selected(last, RULES_STACKED, stacked={"blocks/kernel": -1})
    assert [r.path for r in rows][:3] == [f"blocks/kernel[{i}]" for i in range(L)]
    g = jax.grad(lambda p: jaxl2.l2_penalty(p, RULES_STACKED, stacked={"blocks/kernel": 2}))(last)
    want = np.stack([lam * np.asarray(stacked["blocks"]["kernel"][i]) for i, lam in enumerate(LAMS)], axis=-1)
    np.testing.assert_allclose(np.asarray(g["blocks"]["kernel"]), want, rtol=1e-6)


@pytest.mark.parametrize(
    "stacked_arg, message",
    [
        ({"layers/.*": 0}, "stacked pattern 'layers/.*' matches no selected parameter"),
        ({"blocks/bias": 0}, "stacked pattern 'blocks/bias' matches no selected parameter"),
        ({"blocks/.*": 3}, "layer axis 3, but it has shape (3, 4, 4)"),
        ({"blocks/.*": -4}, "layer axis -4"),
        ({"blocks/.*": "0"}, "must be an int"),
        ({"blocks/.*": True}, "must be an int"),
        ({}, "non-empty mapping"),
        ([("blocks/.*", 0)], "non-empty mapping"),
    ],
)
def test_bad_stacked_is_an_error_that_says_what_is_wrong(stacked, stacked_arg, message):
    with pytest.raises(jaxl2.Jaxl2Error, match=re.escape(message)):
        jaxl2.l2_penalty(stacked, 1e-3, stacked=stacked_arg)


def test_a_slice_pattern_that_matches_nothing_is_an_error(stacked):
    with pytest.raises(jaxl2.Jaxl2Error, match=r"matches no selected parameter"):
        jaxl2.l2_penalty(stacked, {r"blocks/kernel\[7\]": 0.1, ".*": 0.0}, stacked=STACKED)
    # without stacked= there are no slices: the message says to pass stacked=
    with pytest.raises(jaxl2.Jaxl2Error, match=r"matches no selected parameter") as e:
        jaxl2.l2_penalty(stacked, {r"blocks/kernel\[0\]": 0.1, ".*": 0.0})
    assert "(a typo?)" not in str(e.value)
    assert "names the layer slice 'blocks/kernel[0]' of a leaf that is not stacked" in str(e.value)
    assert "pass stacked={'blocks/kernel': 0}" in str(e.value)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"pass stacked=\{'blocks/kernel': 0\}"):
        jaxl2.l2_penalty(stacked, {r".*kernel\[2\]": 0.1, ".*": 0.0})


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.tanh(nn.Dense(D)(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        x, _ = scan()(x, None)
        return nn.Dense(2)(x)


def test_flax_nn_scan_model_gets_one_lambda_per_layer(batch):
    model = Scanned()
    params = model.init(jax.random.key(0), batch[0])
    rules = {r".*ScanBlock_0/Dense_0/kernel\[2\]": 0.3, ".*": 0.01}
    spec = {".*ScanBlock_0/.*": 0}
    kernels = np.asarray(params["params"]["ScanBlock_0"]["Dense_0"]["kernel"], np.float64)
    assert kernels.shape == (L, D, D)
    head = np.asarray(params["params"]["Dense_0"]["kernel"], np.float64)
    want = 0.01 / 2 * (np.sum(kernels[:2] ** 2) + np.sum(head**2)) + 0.3 / 2 * np.sum(kernels[2] ** 2)
    np.testing.assert_allclose(float(jaxl2.l2_penalty(params, rules, stacked=spec)), want, rtol=1e-6)

    def mse(p, x, y):
        return jnp.mean((model.apply(p, x) - y) ** 2)

    step = jax.jit(jaxl2.make_train_step(mse, optax.sgd(0.1), l2=rules, stacked=spec))
    new, _, _ = step(params, optax.sgd(0.1).init(params), *batch)
    g = jax.grad(mse)(params, *batch)["params"]["ScanBlock_0"]["Dense_0"]["kernel"]
    lam = np.array([0.01, 0.01, 0.3])[:, None, None]
    np.testing.assert_allclose(
        np.asarray(new["params"]["ScanBlock_0"]["Dense_0"]["kernel"]),
        kernels - 0.1 * (np.asarray(g, np.float64) + lam * kernels),
        rtol=1e-5,
        atol=1e-7,
    )


# -------------------- schedules --------------------
# λ on an optax schedule: equal to optax's own scheduled decay, to ``inject_hyperparams`` and to
# hand-written float64 loops.


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


def close64(a, b, rtol=1e-6):
    for (pa, x), (pb, y) in zip(jaxl2.select.leaves(a), jaxl2.select.leaves(b)):
        assert pa == pb
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=1e-7)


def test_scheduled_decay_equals_optax_masked_and_inject_hyperparams(params):
    sgd = optax.sgd(0.1, momentum=0.9)
    ours, state = run(optax.chain(jaxl2.add_decayed_weights(SCHED), sgd), params)
    optax_own, _ = run(optax.chain(optax.add_decayed_weights(SCHED, mask=jaxl2.mask(params)), sgd), params)
    injected, _ = run(optax.chain(optax.inject_hyperparams(jaxl2.add_decayed_weights)(l2=SCHED), sgd), params)
    close64(ours, optax_own)
    close64(ours, injected)
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
    close64(ours, p, rtol=1e-5)


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
    close64(p, h, rtol=1e-5)


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
    with pytest.raises(jaxl2.Jaxl2Error, match=r"step \(the step count\) must be an integer >= 0"):
        jaxl2.audit(tx, params, step=-1)


def test_bad_schedules_are_errors_that_say_what_is_wrong(params):
    with pytest.raises(jaxl2.Jaxl2Error, match="value at step 0 is -1.0"):
        jaxl2.add_decayed_weights(optax.linear_schedule(-1.0, 0.0, 10))

    def broken(count):
        raise KeyError("oops")

    with pytest.raises(jaxl2.Jaxl2Error, match=r"l2\['a/.\*'\]\(0\) raised KeyError"):
        jaxl2.add_decayed_weights({"a/.*": broken, ".*": 0.0})
