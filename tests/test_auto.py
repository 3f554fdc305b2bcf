"""jaxl2.auto_l2: λ tuned online by the hypergradient of the validation loss through one step.

References are independent of the code under test: ridge regression's validation-optimal λ in
closed form (float64 NumPy), float64 central differences of the validation loss after one
optax step, and make_train_step with the same λs fixed.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2

D, N, N_VAL, SIGMA = 10, 40, 200, 2.0


def ridge_problem(isotropic: bool, seed: int = 0):
    """Training inputs with XᵀX = N·I (isotropic) or with feature scales from 0.3 to 3."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(N, D)))
    x = np.sqrt(N) * q
    if not isotropic:
        x = x * np.geomspace(0.3, 3.0, D)
    w_true = rng.normal(size=(D, 1))
    y = x @ w_true + SIGMA * rng.normal(size=(N, 1))
    x_val = rng.normal(size=(N_VAL, D)) * (1.0 if isotropic else np.geomspace(0.3, 3.0, D))
    y_val = x_val @ w_true + SIGMA * rng.normal(size=(N_VAL, 1))
    return x, y, x_val, y_val


def ridge_w(x, y, lam):
    """The minimiser of ½·mean((Xw − y)²) + λ/2·‖w‖²: (XᵀX + nλI)⁻¹Xᵀy, in float64."""
    return np.linalg.solve(x.T @ x + len(x) * lam * np.eye(x.shape[1]), x.T @ y)


def val_mse(x, y, x_val, y_val, lam):
    return float(np.mean((x_val @ ridge_w(x, y, lam) - y_val) ** 2))


def argmin_log_grid(f, lo=1e-4, hi=10.0, n=20001):
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), n))
    return float(grid[np.argmin([f(lam) for lam in grid])])


def half_mse(params, x, y):
    return 0.5 * jnp.mean((x @ params["linear"]["kernel"] - y) ** 2)


def mse(params, x, y):
    return jnp.mean((x @ params["linear"]["kernel"] - y) ** 2)


def train_ridge(problem, tx, hyper_tx, steps):
    x, y, x_val, y_val = (jnp.asarray(a, jnp.float32) for a in problem)
    auto = jaxl2.auto_l2(half_mse, tx, l2=1e-3, val_loss_fn=mse, hyper_tx=hyper_tx)
    params = {"linear": {"kernel": jnp.zeros((D, 1))}}
    opt_state, l2_state = tx.init(params), auto.init(params)

    @jax.jit
    def run(params, opt_state, l2_state):
        def body(carry, _):
            p, o, s = carry
            p, o, s, _ = auto.step(p, o, s, (x, y), (x_val, y_val))
            return (p, o, s), None

        return jax.lax.scan(body, (params, opt_state, l2_state), None, length=steps)[0]

    params, _, l2_state = run(params, opt_state, l2_state)
    return auto.l2(params, l2_state)["linear/kernel"]


def decaying_adam(lr, steps):
    return optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))


@pytest.mark.parametrize("name, tx", [("sgd", optax.sgd(0.5)), ("momentum", optax.sgd(0.1, momentum=0.9))])
def test_ridge_lambda_converges_to_the_closed_form_validation_optimum(name, tx):
    """With XᵀX = n·I, dw(λ)/dλ = −w/(1 + λ): the one-step hypergradient ∝ ⟨∇V, w⟩ has the
    zero of dV/dλ, so λ must end at the validation-optimal ridge λ (float64 closed form)."""
    problem = ridge_problem(isotropic=True)
    lam_star = argmin_log_grid(lambda lam: val_mse(*problem, lam))
    assert 0.05 < lam_star < 0.5  # an interior optimum, far from the start (1e-3)
    lam = train_ridge(problem, tx, decaying_adam(0.05, 3000), 3000)
    assert lam == pytest.approx(lam_star, rel=0.02), (name, lam, lam_star)


def test_ridge_anisotropic_design_lands_where_the_one_step_gradient_vanishes():
    """The short-horizon bias, measured: with unequal feature scales the one-step method
    stops where ⟨∇V(w(λ)), w(λ)⟩ = 0 (found here by float64 root finding), not at the
    validation optimum, where ⟨∇V, (XᵀX/n + λI)⁻¹w⟩ = 0."""
    problem = ridge_problem(isotropic=False)
    x, y, x_val, y_val = problem

    def radial(lam):  # ⟨∇V(w), w⟩ at w = w(λ), V = mean((X_val w − y_val)²)
        w = ridge_w(x, y, lam)
        return float((2 / N_VAL * x_val.T @ (x_val @ w - y_val)).ravel() @ w.ravel())

    lo, hi = 1e-4, 10.0
    assert radial(lo) > 0 > radial(hi)  # λ goes up where shrinking w helps, down where it hurts
    for _ in range(200):  # bisection on ln λ
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if radial(mid) > 0 else (lo, mid)
    lam_greedy = math.sqrt(lo * hi)
    lam_star = argmin_log_grid(lambda lam: val_mse(*problem, lam))
    assert lam_greedy > 2 * lam_star  # the two criteria differ here (0.16 vs 0.05)
    lam = train_ridge(problem, optax.sgd(0.05), decaying_adam(0.05, 4000), 4000)
    assert lam == pytest.approx(lam_greedy, rel=0.03), (lam, lam_greedy, lam_star)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_hypergradient_equals_float64_finite_differences_through_the_optimizer(opt):
    """∂/∂ln λ_l of the validation loss after one step, against central differences of the
    same step written with optax directly (gradient ∇J + λ⊙w, then tx.update), in float64."""
    make = {
        "sgd": lambda: optax.sgd(0.3),
        "momentum": lambda: optax.sgd(0.3, momentum=0.9),
        "adam": lambda: optax.adam(0.01),
    }[opt]
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        params = {
            "a": {"kernel": jnp.asarray(rng.normal(size=(4, 3))), "bias": jnp.asarray(rng.normal(size=3))},
            "b": {"kernel": jnp.asarray(rng.normal(size=(3, 2)))},
        }
        x, y = jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.normal(size=(8, 2)))
        xv, yv = jnp.asarray(rng.normal(size=(16, 4))), jnp.asarray(rng.normal(size=(16, 2)))

        def loss(p, x, y):
            h = jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"])
            return jnp.mean((h @ p["b"]["kernel"] - y) ** 2)

        tx = make()
        opt_state = tx.init(params)
        for _ in range(3):  # a non-trivial optimizer state (momentum, Adam's moments)
            opt_state = tx.update(jax.grad(loss)(params, x, y), opt_state, params)[1]
        lams = {"a/kernel": 0.05, "b/kernel": 0.2}

        def val_after(lam_a, lam_b):
            g = jax.grad(loss)(params, x, y)
            g["a"]["kernel"] = g["a"]["kernel"] + lam_a * params["a"]["kernel"]
            g["b"]["kernel"] = g["b"]["kernel"] + lam_b * params["b"]["kernel"]
            updates, _ = tx.update(g, opt_state, params)
            return float(loss(optax.apply_updates(params, updates), xv, yv))

        eps = 1e-5
        fd = []
        for i in range(2):
            up = [math.log(lams["a/kernel"]), math.log(lams["b/kernel"])]
            dn = list(up)
            up[i] += eps
            dn[i] -= eps
            fd.append((val_after(*np.exp(up)) - val_after(*np.exp(dn))) / (2 * eps))

        auto = jaxl2.auto_l2(loss, tx, l2=0.1)
        state = auto.init(params)
        state = state._replace(log_l2=jnp.log(jnp.asarray([lams["a/kernel"], lams["b/kernel"]])))
        *_, metrics = auto.step(params, opt_state, state, (x, y), (xv, yv))
        np.testing.assert_allclose(np.asarray(metrics["hypergrad"]), fd, rtol=1e-6, atol=1e-12)
        assert float(metrics["val_loss"]) == pytest.approx(val_after(0.05, 0.2), rel=1e-12)


def small_problem():
    rng = np.random.default_rng(3)
    params = {
        "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), "bias": jnp.zeros(4)},
        "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(4, 1)), jnp.float32), "bias": jnp.zeros(1)},
    }
    x, y = (
        jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
        jnp.asarray(rng.normal(size=(6, 1)), jnp.float32),
    )

    def loss(p, x, y):
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)

    return loss, params, (x, y)


def test_a_step_is_make_train_step_with_the_current_lambdas_and_compiles_once():
    loss, params, batch = small_problem()
    tx = optax.sgd(0.1, momentum=0.9)
    auto = jaxl2.auto_l2(loss, tx, l2=3e-3, hyper_tx=optax.sgd(10.0))
    state = auto.init(params)
    state = state._replace(log_l2=jnp.log(jnp.asarray([3e-3, 2e-2], jnp.float32)))
    fixed = jaxl2.make_train_step(loss, tx, l2={"Dense_0/kernel": 3e-3, "Dense_1/kernel": 2e-2})
    ref_params, ref_opt, ref_metrics = fixed(params, tx.init(params), *batch)
    step = jax.jit(auto.step)
    for val_batch in (None, batch):  # the λ update does not change this step's update
        new_params, new_opt, new_state, metrics = step(params, tx.init(params), state, batch, val_batch)
        for u, v in zip(jax.tree.leaves((new_params, new_opt)), jax.tree.leaves((ref_params, ref_opt))):
            np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
        assert float(metrics["penalty"]) == pytest.approx(float(ref_metrics["penalty"]), rel=1e-6)
    assert np.array_equal(step(params, tx.init(params), state, batch, None)[2].log_l2, state.log_l2)
    moved = new_state.log_l2 - state.log_l2  # plain SGD on ln λ: −10·hypergrad
    np.testing.assert_allclose(moved, -10.0 * metrics["hypergrad"], rtol=1e-5, atol=1e-9)
    step(params, tx.init(params), new_state, batch, batch)
    step(params, tx.init(params), new_state, batch, None)
    assert step._cache_size() == 2  # one program with, one without the validation batch


def test_lambdas_stay_within_bounds():
    loss, params, batch = small_problem()
    tx = optax.sgd(0.1)
    auto = jaxl2.auto_l2(loss, tx, l2=1e-2, hyper_tx=optax.sign_sgd(5.0), bounds=(1e-3, 0.1))
    state, opt_state = auto.init(params), tx.init(params)
    for _ in range(3):
        params, opt_state, state, _ = auto.step(params, opt_state, state, batch, batch)
        lam = np.asarray(list(auto.l2(params, state).values()))
        assert np.all(lam >= 1e-3 * (1 - 1e-6)) and np.all(lam <= 0.1 * (1 + 1e-6)), lam


def test_an_equinox_module_with_non_array_leaves():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 1, width_size=4, depth=1, key=jax.random.key(0))
    x, y = jnp.ones((5, 3)), jnp.zeros((5, 1))

    def loss(m, x, y):
        return jnp.mean((jax.vmap(m)(x) - y) ** 2)

    tx = optax.adam(1e-2)
    auto = jaxl2.auto_l2(loss, tx, l2=1e-2, select=jaxl2.select.equinox)
    state = auto.init(model)
    assert auto.paths(model) == ["layers/0/weight", "layers/1/weight"]
    step = eqx.filter_jit(auto.step)
    new, _, state, metrics = step(model, tx.init(eqx.filter(model, eqx.is_array)), state, (x, y), (x, y))
    assert new.activation is model.activation and metrics["hypergrad"].shape == (2,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"l2": 0.0}, r"l2 \(the initial λ\) must be > 0"),
        ({"l2": -1.0}, r"l2 \(the initial λ\) must be a finite number >= 0"),
        ({"l2": 2.0}, r"l2 \(the initial λ\) 2.0 is outside bounds \(1e-08, 1\)"),
        ({"bounds": (1.0, 0.1)}, r"bounds must be \(lo, hi\) with 0 < lo < hi < inf"),
        ({"tx": "adam"}, r"^tx must be an optax GradientTransformation, got 'adam' \(str\)$"),
        ({"hyper_tx": 0.1}, r"^hyper_tx must be an optax GradientTransformation, got 0.1 \(float\)$"),
        ({"has_aux": 1}, "has_aux must be True or False"),
        ({"select": 3}, "select must be None"),
    ],
)
def test_bad_arguments_are_refused_at_once(kwargs, match):
    kwargs = {"tx": optax.sgd(0.1), **kwargs}
    with pytest.raises(jaxl2.Jaxl2Error, match=match):
        jaxl2.auto_l2(lambda p, x: jnp.sum(x), **kwargs)


def test_empty_selection_and_bad_batches_are_refused():
    loss, params, batch = small_problem()
    auto = jaxl2.auto_l2(loss, optax.sgd(0.1), select="nothing")
    with pytest.raises(jaxl2.Jaxl2Error, match="select='nothing' matched no parameter"):
        auto.init(params)
    auto = jaxl2.auto_l2(loss, optax.sgd(0.1))
    with pytest.raises(jaxl2.Jaxl2Error, match="batch and val_batch must be tuples"):
        auto.step(params, optax.sgd(0.1).init(params), auto.init(params), list(batch))


@pytest.mark.parametrize("key", ["loss", "val_loss", "hypergrad"])
def test_aux_keys_that_clash_with_the_metrics_are_refused(key):
    params = {"linear": {"kernel": jnp.ones((2, 1))}}
    x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    auto = jaxl2.auto_l2(lambda p, x, y: (mse(p, x, y), {key: 1.0}), optax.sgd(0.1), has_aux=True)
    with pytest.raises(jaxl2.Jaxl2Error, match=f"aux has a '{key}' entry, which the step's metrics hold"):
        auto.step(params, optax.sgd(0.1).init(params), auto.init(params), (x, y), (x, y))


def test_large_or_swapped_arguments_are_summarised_in_a_short_message():
    params = {f"layer_{i}": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)} for i in range(1000)}
    with pytest.raises(jaxl2.Jaxl2Error) as e:  # the params where tx goes
        jaxl2.auto_l2(lambda p, x: jnp.sum(x), params)
    assert (
        str(e.value)
        == "tx must be an optax GradientTransformation, got a pytree (dict) of 2,000 arrays; the params go to the step, not to auto_l2"
    )
    with pytest.raises(jaxl2.Jaxl2Error, match=r"got an optax \w+; are loss_fn and tx swapped\?"):
        jaxl2.auto_l2(optax.sgd(0.1), lambda p, x: jnp.sum(x))
