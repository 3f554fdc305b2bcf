"""Each conversion reproduces the other framework's formula, written out in NumPy or run in optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2
from jaxl2 import conventions


def problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "Dense_0": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=4)},
        "Dense_1": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
    }
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16))

    def data_loss(p, x, y):
        h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, data_loss, x, y


def kernel_mask(params):
    return jax.tree_util.tree_map_with_path(lambda kp, _: kp[-1].key == "kernel", params)


def run(tx, loss, params, x, y, steps=10):
    state = tx.init(params)
    for _ in range(steps):
        g = jax.grad(loss)(params, x, y)
        upd, state = tx.update(g, state, params)
        params = optax.apply_updates(params, upd)
    return params


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_l2_in_loss_equals_optax_add_decayed_weights_under_sgd(momentum):
    params, data_loss, x, y = problem()
    lam, lr = 0.05, 0.1
    via_loss = run(optax.sgd(lr, momentum=momentum), jaxl2.regularized(data_loss, lam), params, x, y)
    via_tx = run(
        optax.chain(optax.add_decayed_weights(lam, mask=kernel_mask), optax.sgd(lr, momentum=momentum)),
        data_loss,
        params,
        x,
        y,
    )
    assert max_diff(via_loss, params) > 1e-2  # it trained
    assert max_diff(via_loss, via_tx) < 1e-6


def test_l2_in_loss_differs_from_adamw_under_adam():
    params, data_loss, x, y = problem()
    lam, lr = 0.05, 0.01
    l2_adam = run(optax.adam(lr), jaxl2.regularized(data_loss, lam), params, x, y, steps=50)
    adamw = run(optax.adamw(lr, weight_decay=lam, mask=kernel_mask), data_loss, params, x, y, steps=50)
    plain = run(optax.adam(lr), data_loss, params, x, y, steps=50)
    print(
        f"max |L2+Adam − AdamW| = {max_diff(l2_adam, adamw):.4f}, "
        f"|L2+Adam − Adam| = {max_diff(l2_adam, plain):.4f}, |AdamW − Adam| = {max_diff(adamw, plain):.4f}"
    )
    # Under Adam the λ·w gradient term is divided by the adaptive denominator, so L2 in the
    # loss is a different method from decoupled decay: the two end up further apart than
    # decoupled decay moved the params away from plain Adam.
    assert max_diff(l2_adam, adamw) > 2 * max_diff(adamw, plain)


def test_keras_formula():
    params, *_ = problem()
    keras_l2 = 3e-4
    kernels = [params["Dense_0"]["kernel"], params["Dense_1"]["kernel"]]
    keras_penalty = sum(keras_l2 * np.sum(np.square(np.asarray(w, np.float64))) for w in kernels)
    lam = conventions.from_keras(keras_l2)
    assert lam == 2 * keras_l2 and conventions.to_keras(lam) == keras_l2
    assert float(jaxl2.l2_penalty(params, lam)) == pytest.approx(keras_penalty, rel=1e-6)
    g = jax.grad(lambda p: jaxl2.l2_penalty(p, lam))(params)
    np.testing.assert_allclose(g["Dense_0"]["kernel"], 2 * keras_l2 * np.asarray(kernels[0]), rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_torch_sgd_weight_decay_update_written_out(momentum):
    """torch.optim.SGD: d_p = g + wd·p; buf = μ·buf + d_p (buf = d_p at step 1); p -= lr·buf."""
    params, data_loss, x, y = problem(1)
    wd, lr, steps = 1e-2, 0.1, 5
    lam = conventions.from_torch_weight_decay(wd)
    # PyTorch's update with the weight decay applied to the kernels only (a param group without biases).
    p_np = jax.tree_util.tree_map(np.asarray, params)
    bufs = None
    for _ in range(steps):
        g = jax.tree_util.tree_map(
            np.asarray, jax.grad(data_loss)(jax.tree_util.tree_map(jnp.asarray, p_np), x, y)
        )
        d_p = {k: {"kernel": g[k]["kernel"] + wd * p_np[k]["kernel"], "bias": g[k]["bias"]} for k in g}
        bufs = d_p if bufs is None else jax.tree_util.tree_map(lambda b, d: momentum * b + d, bufs, d_p)
        step = bufs if momentum else d_p
        p_np = jax.tree_util.tree_map(lambda p, s: p - lr * s, p_np, step)
    ours = run(
        optax.sgd(lr, momentum=momentum or None), jaxl2.regularized(data_loss, lam), params, x, y, steps
    )
    assert max_diff(ours, p_np) < 1e-6


@pytest.mark.parametrize("scaled", [True, False])
def test_decoupled_decay_under_plain_sgd(scaled):
    params, data_loss, x, y = problem(2)
    wd, lr = 1e-3 if not scaled else 1e-2, 0.2
    g = jax.grad(data_loss)(params, x, y)
    k = np.asarray(params["Dense_0"]["kernel"])
    decay = lr * wd * k if scaled else wd * k  # optax/PyTorch AdamW-style vs big_vision-style
    expected = k - lr * np.asarray(g["Dense_0"]["kernel"]) - decay
    lam = conventions.from_decoupled(wd, lr, scaled_by_lr=scaled)
    ours = run(optax.sgd(lr), jaxl2.regularized(data_loss, lam), params, x, y, steps=1)
    np.testing.assert_allclose(ours["Dense_0"]["kernel"], expected, rtol=1e-5, atol=1e-7)


def test_sklearn_ridge_minimiser_is_stationary_for_jaxl2_loss():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    n, d, alpha = 50, 5, 3.0
    X, y = rng.normal(size=(n, d)), rng.normal(size=n)
    coef = Ridge(alpha=alpha, fit_intercept=False, solver="cholesky").fit(X, y).coef_
    lam = conventions.from_sklearn_alpha(alpha, n)
    with jax.enable_x64(True):

        def mse(p):
            return jnp.mean((jnp.asarray(X) @ p["kernel"] - jnp.asarray(y)) ** 2)

        g = jax.grad(jaxl2.regularized(mse, lam))({"kernel": jnp.asarray(coef)})["kernel"]
        g_wrong = jax.grad(jaxl2.regularized(mse, alpha / n))({"kernel": jnp.asarray(coef)})["kernel"]
        assert float(jnp.max(jnp.abs(g))) < 1e-10
        assert float(jnp.max(jnp.abs(g_wrong))) > 1e-3  # the factor 2 matters


@pytest.mark.parametrize("n", [100, np.int64(100), np.int32(100), np.uint16(100)], ids=repr)
def test_sklearn_alpha_accepts_any_integer(n):
    assert conventions.from_sklearn_alpha(1.5, n) == pytest.approx(2 * 1.5 / 100, rel=1e-15)


@pytest.mark.parametrize(
    "n", [0, -3, np.int64(0), 2.5, 100.0, np.float64(100), True, np.bool_(True), "100", None]
)
def test_sklearn_alpha_refuses_non_positive_or_non_integer_n(n):
    with pytest.raises(jaxl2.Jaxl2Error, match=r"n_samples must be a positive integer .*n·k for k targets"):
        conventions.from_sklearn_alpha(1.0, n)


def test_sklearn_ridge_with_k_targets_takes_n_times_k():
    """Ridge with Y of shape (n, k) minimises ‖XW − Y‖² + alpha·‖W‖² (sums over all n·k entries);
    its minimiser (XᵀX + alpha·I)⁻¹XᵀY, solved in NumPy, is stationary for jaxl2's mean MSE over
    the n·k entries + λ/2·‖W‖² with λ = from_sklearn_alpha(alpha, n·k), and not with n alone."""
    assert "n·k" in conventions.from_sklearn_alpha.__doc__
    rng = np.random.default_rng(3)
    n, d, k, alpha = 40, 6, 3, 2.5
    X, Y = rng.normal(size=(n, d)), rng.normal(size=(n, k))
    W = np.linalg.solve(X.T @ X + alpha * np.eye(d), X.T @ Y)
    # W is Ridge's minimiser: the gradient of the sum objective, written out, vanishes.
    np.testing.assert_allclose(2 * X.T @ (X @ W - Y) + 2 * alpha * W, 0.0, atol=1e-10)
    with jax.enable_x64(True):

        def mse(p):
            return jnp.mean((jnp.asarray(X) @ p["kernel"] - jnp.asarray(Y)) ** 2)

        def grad_at_w(lam):
            return np.asarray(jax.grad(jaxl2.regularized(mse, lam))({"kernel": jnp.asarray(W)})["kernel"])

        scale = np.abs(2 / (n * k) * X.T @ Y).max()  # the size of the data gradient at W = 0
        assert (
            np.abs(grad_at_w(conventions.from_sklearn_alpha(alpha, np.prod(Y.shape)))).max() < 1e-12 * scale
        )
        assert np.abs(grad_at_w(conventions.from_sklearn_alpha(alpha, n))).max() > 1e-2 * scale


def test_decoupled_decay_under_momentum_is_not_l2():
    """Decoupled decay w ← w − lr·buf − lr·wd·w, with buf = μ·buf + g (NumPy, by hand): L2 with
    λ = wd (the only λ that matches step 1) is off at step 2 by exactly lr·μ·wd·w₀, and the
    steady-state λ = (1 − μ)·wd is off at step 1 already."""
    assert "rescaling" not in conventions.__doc__ and "not L2 for any λ" in conventions.__doc__
    params, data_loss, x, y = problem(4)
    wd, lr, mu = 0.05, 0.1, 0.9

    def grad_np(p):
        g = jax.grad(data_loss)(jax.tree_util.tree_map(jnp.asarray, p), x, y)
        return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), g)

    mask = {k: {"kernel": 1.0, "bias": 0.0} for k in params}
    w0 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    w, buf, decoupled = w0, None, []
    for _ in range(2):
        g = grad_np(w)
        buf = g if buf is None else jax.tree_util.tree_map(lambda b, gg: mu * b + gg, buf, g)
        w = jax.tree_util.tree_map(lambda p, b, m: p - lr * b - lr * wd * m * p, w, buf, mask)
        decoupled.append(w)

    def l2_steps(lam, steps):
        return run(optax.sgd(lr, momentum=mu), jaxl2.regularized(data_loss, lam), params, x, y, steps)

    k0 = w0["Dense_0"]["kernel"]
    one, two = l2_steps(wd, 1), l2_steps(wd, 2)
    np.testing.assert_allclose(one["Dense_0"]["kernel"], decoupled[0]["Dense_0"]["kernel"], atol=1e-6)
    gap = np.asarray(two["Dense_0"]["kernel"], np.float64) - decoupled[1]["Dense_0"]["kernel"]
    np.testing.assert_allclose(gap, -lr * mu * wd * k0, rtol=1e-3, atol=1e-6)
    assert np.abs(gap).max() > 100 * 1e-6
    steady = l2_steps((1 - mu) * wd, 1)["Dense_0"]["kernel"]
    assert np.abs(steady - decoupled[0]["Dense_0"]["kernel"]).max() > 100 * 1e-6


@pytest.mark.parametrize(
    "fn, args, match",
    [
        (conventions.from_keras, (-1.0,), "keras l2 must be a finite number >= 0"),
        (conventions.to_keras, (float("nan"),), "lam must be a finite number >= 0"),
        (conventions.from_torch_weight_decay, (float("inf"),), "weight_decay must be a finite number"),
        (conventions.from_decoupled, (1e-3, 0.0), r"^lr must be a finite number > 0 .*, got 0.0 \(float\)$"),
        (conventions.from_decoupled, (1e-3, -1), r"^lr must be a finite number > 0 .*, got -1 \(int\)$"),
        (conventions.from_decoupled, (1e-3, float("nan")), r"^lr must be a finite number > 0 .*, got nan"),
        (conventions.from_decoupled, (1e-3, "0.1"), r"^lr must be a finite number > 0 .*'0.1' \(str\)$"),
        (conventions.from_keras, ("5e-4",), "keras l2 must be a finite number >= 0 .*'5e-4' \\(str\\)"),
        (conventions.from_sklearn_alpha, (1.0, 0), "n_samples must be a positive integer"),
    ],
)
def test_conversion_errors(fn, args, match):
    with pytest.raises(jaxl2.Jaxl2Error, match=match):
        fn(*args)


def test_decoupled_lr_messages_agree():
    """lr = 0 and lr < 0 are refused for the same reason, in the same words."""
    messages = []
    for lr in (0, -1, 0.0, -0.1):
        with pytest.raises(jaxl2.Jaxl2Error) as e:
            conventions.from_decoupled(1e-4, lr)
        messages.append(str(e.value).split(", got")[0])
    assert set(messages) == {"lr must be a finite number > 0 (a float or a 0-d array)"}


@pytest.mark.parametrize("flag", ["no", "False", 0, 1, None, np.array(False)], ids=repr)
def test_decoupled_scaled_by_lr_must_be_a_bool(flag):
    with pytest.raises(jaxl2.Jaxl2Error, match=r"^scaled_by_lr must be True or False, got "):
        conventions.from_decoupled(1e-4, 0.1, scaled_by_lr=flag)


def test_decoupled_scaled_by_lr_message_in_full_and_numpy_bools_accepted():
    with pytest.raises(jaxl2.Jaxl2Error) as e:
        conventions.from_decoupled(1e-4, 0.1, scaled_by_lr="no")
    assert str(e.value) == "scaled_by_lr must be True or False, got 'no' (str)"
    # λ = wd when scaled by lr, wd/lr when not (hand arithmetic)
    assert conventions.from_decoupled(1e-4, 0.5, scaled_by_lr=np.bool_(True)) == pytest.approx(1e-4)
    assert conventions.from_decoupled(1e-4, 0.5, scaled_by_lr=np.bool_(False)) == pytest.approx(2e-4)
