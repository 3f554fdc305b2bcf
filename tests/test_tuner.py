"""The evidence tuner against independent references: Bayesian linear regression's exact evidence
and its maximiser (NumPy, float64), the Laplace evidence written out by hand, a count of due
epochs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxl2

SIGMA = 0.5


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def linear(params, x):
    return x @ params["dense"]["kernel"]


def regression(n=40, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(0.3, 2.0, d)  # unequal feature scales
    y = x @ rng.normal(size=(d, 1)) + SIGMA * rng.normal(size=(n, 1))
    return x, y


def mode(x, y, lam):
    """The ridge solution, the posterior mode of w ~ N(0, α⁻¹I) with α = n·λ."""
    alpha = len(x) * lam
    w = np.linalg.solve(x.T @ x / SIGMA**2 + alpha * np.eye(x.shape[1]), x.T @ y / SIGMA**2)
    return {"dense": {"kernel": jnp.asarray(w)}}


def exact_log_evidence(x, y, alpha):
    """log N(y; 0, σ²I + XXᵀ/α), by slogdet."""
    cov = SIGMA**2 * np.eye(len(x)) + x @ x.T / alpha
    r = y.ravel()
    return -0.5 * (r @ np.linalg.solve(cov, r) + np.linalg.slogdet(cov)[1] + len(r) * np.log(2 * np.pi))


def best_alpha(x, y):
    """The maximiser of the exact evidence: with s_j, u_j the eigenpairs of XXᵀ and
    c_j = σ² + s_j/α, its derivative in α is ½α⁻²·(Σ_j s_j/c_j − Σ_j s_j(u_jᵀy)²/c_j²): a log
    grid brackets the sign change, bisection refines it."""
    s, u = np.linalg.eigh(x @ x.T)
    proj = (u.T @ y.ravel()) ** 2

    def slope(alpha):
        c = SIGMA**2 + s / alpha
        return np.sum(s / c) - np.sum(s * proj / c**2)

    grid = np.exp(np.linspace(np.log(1e-4), np.log(1e4), 801))
    signs = np.sign([slope(a) for a in grid])
    i = int(np.argmax(signs < 0))  # the first α where the evidence falls
    assert i > 0 and signs[i - 1] > 0
    lo, hi = grid[i - 1], grid[i]
    for _ in range(100):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return np.sqrt(lo * hi)


@pytest.mark.parametrize("method, steps, epochs", [("mackay", 1, 100), ("bisect", 40, 60), ("adam", 10, 60)])
def test_iterated_as_a_user_would_it_reaches_the_maximiser_of_the_exact_evidence(method, steps, epochs):
    x, y = regression()
    n = len(x)
    alpha = best_alpha(x, y)
    assert exact_log_evidence(x, y, alpha) > max(exact_log_evidence(x, y, alpha * f) for f in (0.99, 1.01))
    tuner = jaxl2.evidence_tuner(
        linear, l2=1e-3, likelihood="gaussian", sigma=SIGMA, structure="full", method=method, steps=steps
    )
    update = jax.jit(tuner.update)
    state = tuner.init(mode(x, y, 1e-3))
    for _ in range(epochs):  # each epoch trains to the mode at the current λ, then updates λ
        params = mode(x, y, tuner.l2(state)["dense/kernel"])
        state = update(state, params, x, y)
    assert n * tuner.l2(state)["dense/kernel"] == pytest.approx(alpha, rel=1e-2)


def test_adam_goes_on_from_the_moments_of_the_last_update():
    """Two updates of one Adam step at the same params are evidence_l2's two steps of Adam, whose
    own loop starts its moments once; one λ per leaf, and one shared by both."""
    x, y = regression(seed=5)
    params = {
        "dense": {"kernel": jnp.asarray(mode(x, y, 0.1)["dense"]["kernel"])},
        "head": {"kernel": jnp.ones((1, 1))},
    }

    def two_layers(p, x):
        return x @ p["dense"]["kernel"] @ p["head"]["kernel"]

    for shared in (False, True):
        tuner = jaxl2.evidence_tuner(
            two_layers, l2=0.1, likelihood="gaussian", sigma=SIGMA, structure="diag", steps=1, shared=shared
        )
        state, update = tuner.init(params), jax.jit(tuner.update)
        for _ in range(2):
            state = update(state, params, x, y)
        curv = jaxl2.ggn(two_layers, params, x, y, likelihood="gaussian", sigma=SIGMA, structure="diag")
        want = jaxl2.evidence_l2(curv, params, 0.1, method="adam", steps=2, shared=shared)
        assert tuner.l2(state) == pytest.approx({p: float(v) for p, v in want.items()}, rel=1e-10)


def test_updates_come_on_due_epochs_only_and_record_the_laplace_evidence():
    x, y = regression(seed=1)
    n, d = x.shape
    tuner = jaxl2.evidence_tuner(
        linear,
        l2=1.0,
        likelihood="gaussian",
        sigma=SIGMA,
        structure="full",
        method="mackay",
        steps=1,
        burn_in=2,
        every=3,
    )
    update = jax.jit(tuner.update)
    state = tuner.init(mode(x, y, 1.0))
    changed = []
    for epoch in range(1, 11):
        before = tuner.l2(state)["dense/kernel"]
        params = mode(x, y, before)
        state = update(state, params, x, y)
        lam = tuner.l2(state)["dense/kernel"]
        assert int(state.epoch) == epoch
        if lam != before:
            changed.append(epoch)
            # the Laplace evidence at the new λ, by hand: exact Gaussian integral around params
            w, alpha = np.asarray(params["dense"]["kernel"]).ravel(), n * lam
            r = y.ravel() - x @ w
            loglik = -0.5 * r @ r / SIGMA**2 - 0.5 * n * np.log(2 * np.pi * SIGMA**2)
            occam = np.linalg.slogdet(x.T @ x / SIGMA**2 + alpha * np.eye(d))[1] - d * np.log(alpha)
            want = loglik - 0.5 * alpha * w @ w - 0.5 * occam
            assert float(state.log_evidence) == pytest.approx(want, rel=1e-10)
        elif epoch < 3:
            assert np.isnan(float(state.log_evidence))  # no update yet
    assert changed == [3, 6, 9]  # e > burn_in and e % every == 0
    assert update._cache_size() == 1  # compiled once


def test_keep_best_keeps_the_params_and_lambdas_of_the_highest_evidence():
    x, y = regression(seed=2)
    tuner = jaxl2.evidence_tuner(
        linear, l2=0.05, likelihood="gaussian", sigma=SIGMA, structure="diag", method="mackay", keep_best=True
    )
    start = mode(x, y, 0.05)
    state = tuner.init(start)
    assert (
        state.best_evidence == -np.inf
        and state.best_params["dense"]["kernel"] is not start["dense"]["kernel"]
    )
    good = mode(x, y, 0.05)
    state = jax.jit(tuner.update)(state, good, x, y)
    first, first_l2 = float(state.log_evidence), tuner.l2(state)
    bad = jax.tree.map(lambda w: 3.0 * w, good)  # far from the mode: the evidence drops
    state = tuner.update(state, bad, x, y)
    assert float(state.log_evidence) < first
    assert float(state.best_evidence) == first
    np.testing.assert_array_equal(state.best_params["dense"]["kernel"], good["dense"]["kernel"])
    assert {p: float(np.exp(v)) for p, v in state.best_log_l2.items()} == pytest.approx(first_l2, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"apply_fn": {"w": 1}}, "apply_fn must be a function"),
        ({"likelihood": "poisson"}, "likelihood must be one of classification, gaussian, got 'poisson'"),
        ({"structure": "lanczos"}, "structure must be one of full, diag, kron, ekfac, got 'lanczos'"),
        ({"method": "newton"}, "method must be one of mackay, bisect, adam, got 'newton'"),
        ({"bounds": 1.0}, r"bounds must be a pair \(lo, hi\), got 1.0 \(float\)"),
        ({"bounds": (0.0, 1.0)}, r"bounds\[0\] \(the least λ\) must be a finite number > 0, got 0.0"),
        ({"bounds": (1.0, 0.5)}, r"bounds\[1\] \(the largest λ\) must be a finite number > 1, got 0.5"),
        ({"l2": 0.0}, r"l2 \(the initial λ\) must be a finite number > 0, got 0.0"),
        ({"l2": 1e5}, r"l2 \(the initial λ\) 100000.0 is outside bounds \(1e-08, 10000\)"),
        ({"sigma": -1.0}, "sigma .* must be a finite number > 0"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        ({"every": 1.5}, "every must be an integer >= 1, got 1.5"),
        ({"burn_in": -1}, "burn_in must be an integer >= 0, got -1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"shared": 1}, "shared must be True or False, got 1"),
        ({"keep_best": "yes"}, "keep_best must be True or False, got 'yes'"),
        ({"select": 3}, "select"),
        ({"stacked": {"dense/.*": "0"}}, r"stacked\['dense/\.\*'\] must be an int"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    kwargs = {"apply_fn": linear, **kwargs}
    with pytest.raises(jaxl2.Jaxl2Error, match=match):
        jaxl2.evidence_tuner(kwargs.pop("apply_fn"), **kwargs)


@pytest.mark.parametrize("shared", [False, True])
def test_a_stacked_leaf_gets_the_lambdas_of_its_layers_unrolled(shared):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 3))
    kernels = rng.normal(size=(2, 3, 3))
    stacked = {"blocks": {"kernel": jnp.asarray(kernels)}}
    unrolled = {"b0": {"kernel": jnp.asarray(kernels[0])}, "b1": {"kernel": jnp.asarray(kernels[1])}}

    def tune(apply_fn, params, **kwargs):
        tuner = jaxl2.evidence_tuner(
            apply_fn, l2=0.1, likelihood="gaussian", structure="diag", shared=shared, **kwargs
        )
        state, update = tuner.init(params), jax.jit(tuner.update)
        for _ in range(3):
            state = update(state, params, x, y)
        return tuner, state

    tuner, state = tune(
        lambda p, x: x @ p["blocks"]["kernel"][0] @ p["blocks"]["kernel"][1],
        stacked,
        stacked={"blocks/kernel": 0},
    )
    want_tuner, want_state = tune(lambda p, x: x @ p["b0"]["kernel"] @ p["b1"]["kernel"], unrolled)
    got, want = tuner.l2(state), want_tuner.l2(want_state)
    assert got == pytest.approx(
        {"blocks/kernel[0]": want["b0/kernel"], "blocks/kernel[1]": want["b1/kernel"]}, rel=1e-10
    )
    assert (got["blocks/kernel[0]"] == got["blocks/kernel[1]"]) == shared
    assert float(state.log_evidence) == pytest.approx(float(want_state.log_evidence), rel=1e-10)
    # the rules feed the penalty of the stacked leaf, slice by slice
    penalty = jaxl2.l2_penalty(stacked, tuner.rules(state), stacked={"blocks/kernel": 0})
    want_penalty = sum(want[f"b{i}/kernel"] / 2 * np.sum(kernels[i] ** 2) for i in range(2))
    assert float(penalty) == pytest.approx(want_penalty, rel=1e-10)


def test_an_equinox_model_keeps_its_functions_and_its_best_params_under_filter_jit():
    eqx = pytest.importorskip("equinox")
    rng = np.random.default_rng(4)
    x, y = jnp.asarray(rng.normal(size=(16, 3))), jnp.asarray(rng.integers(0, 2, size=16))
    model = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=jax.random.key(0))
    tuner = jaxl2.evidence_tuner(
        lambda m, x: jax.vmap(m)(x), l2=1e-2, structure="diag", select=jaxl2.select.equinox, keep_best=True
    )
    update = eqx.filter_jit(tuner.update)
    state = update(tuner.init(model), model, x, y)
    first = float(state.log_evidence)
    worse = jax.tree.map(lambda w: 5.0 * w if eqx.is_array(w) else w, model)
    state = update(state, worse, x, y)
    assert float(state.log_evidence) < first == float(state.best_evidence)
    assert state.best_params.activation is jnp.tanh
    for got, want in zip(
        jax.tree.leaves(eqx.filter(state.best_params, eqx.is_array)),
        jax.tree.leaves(eqx.filter(model, eqx.is_array)),
    ):
        np.testing.assert_array_equal(got, want)
