"""The Laplace evidence against independent references: the closed form of Bayesian linear
regression, a GGN built by brute force (jax.jacobian and jax.hessian), central differences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def linear(params, x):
    return x @ params["dense"]["kernel"] + params["dense"]["bias"]


def regression(n=40, d=5, sigma=0.5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(0.3, 2.0, d)  # unequal feature scales
    w = rng.normal(size=(d, 1))
    y = x @ w + 0.7 + sigma * rng.normal(size=(n, 1))
    return x, y


def closed_form(x, y, b, alpha, sigma):
    """log N(y − b; 0, σ²I + XXᵀ/α) in numpy float64: the exact evidence of w ~ N(0, α⁻¹I)."""
    r = (y - b).ravel()
    cov = sigma**2 * np.eye(len(r)) + x @ x.T / alpha
    sign, logdet = np.linalg.slogdet(cov)
    return -0.5 * (r @ np.linalg.solve(cov, r) + logdet + len(r) * np.log(2 * np.pi))


def posterior_mode(x, y, b, alpha, sigma):
    a = x.T @ x / sigma**2 + alpha * np.eye(x.shape[1])
    return np.linalg.solve(a, x.T @ (y - b) / sigma**2)


def params_of(w, b):
    return {"dense": {"kernel": jnp.asarray(w), "bias": jnp.asarray([b])}}


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_linear_regression_evidence_equals_the_closed_form(structure):
    x, y = regression()
    sigma, b = 0.5, 0.7
    n = len(x)
    for alpha in (0.3, 4.0, 50.0):
        params = params_of(posterior_mode(x, y, b, alpha, sigma), b)
        curv = jaxl2.ggn(linear, params, x, y, likelihood="gaussian", sigma=sigma, structure=structure)
        got = float(jaxl2.log_evidence(curv, params, alpha / n))  # α = n·λ
        if structure == "full":  # Laplace is exact here: the posterior is Gaussian
            assert got == pytest.approx(closed_form(x, y, b, alpha, sigma), rel=1e-8)
        else:  # the diagonal drops XᵀX's off-diagonal: by hand, with numpy
            h = np.diag(x.T @ x) / sigma**2
            w = np.asarray(params["dense"]["kernel"]).ravel()
            r = (y - x @ w[:, None] - b).ravel()
            loglik = -0.5 * r @ r / sigma**2 - 0.5 * n * np.log(2 * np.pi * sigma**2)
            d = len(h)
            want = loglik - 0.5 * alpha * w @ w + 0.5 * d * np.log(alpha) - 0.5 * np.sum(np.log(h + alpha))
            assert got == pytest.approx(want, rel=1e-10)


def test_mackay_fixed_point_finds_the_closed_form_maximiser():
    x, y = regression(n=60, seed=1)
    sigma, b, n = 0.5, 0.7, 60
    # the maximiser of the exact evidence: a log grid, then golden sections (numpy alone)
    grid = np.exp(np.linspace(np.log(1e-3), np.log(1e3), 601))
    i = int(np.argmax([closed_form(x, y, b, a, sigma) for a in grid]))
    assert 0 < i < len(grid) - 1  # inside the grid
    lo, hi = grid[i - 1], grid[i + 1]
    g = (np.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = hi - g * (hi - lo), lo + g * (hi - lo)
        if closed_form(x, y, b, c, sigma) > closed_form(x, y, b, d, sigma):
            hi = d
        else:
            lo = c
    best = (lo + hi) / 2

    # MacKay's scheme as a user runs it: the mode at the current λ, the curvature there, one update
    @jax.jit
    def update(params, lam):
        curv = jaxl2.ggn(linear, params, x, y, likelihood="gaussian", sigma=sigma, structure="full")
        return jaxl2.evidence_l2(curv, params, lam)["dense/kernel"], curv

    lam = 1.0 / n
    for _ in range(100):
        params = params_of(posterior_mode(x, y, b, n * lam, sigma), b)
        lam, curv = update(params, lam)
    assert float(n * lam) == pytest.approx(best, rel=1e-2)
    adam = jaxl2.evidence_l2(curv, params, 1.0 / n, method="adam", steps=400, lr=0.05)["dense/kernel"]
    assert float(adam) == pytest.approx(float(lam), rel=1e-3)  # the same fixed point at the same params


def mlp(params, x):
    h = jnp.tanh(x @ params["l0"]["kernel"] + params["l0"]["bias"])
    return h @ params["l1"]["kernel"] + params["l1"]["bias"]


def tiny_mlp(seed=0, n=10, d=3, hidden=4, classes=3):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    params = {
        "l0": {
            "kernel": jax.random.normal(k[0], (d, hidden)),
            "bias": 0.1 * jax.random.normal(k[1], (hidden,)),
        },
        "l1": {"kernel": jax.random.normal(k[2], (hidden, classes)), "bias": jnp.zeros(classes)},
    }
    x = jax.random.normal(k[3], (n, d))
    y = jax.random.randint(k[4], (n,), 0, classes)
    return params, x, y


def brute_force_ggn(params, x, y):
    """Σ_i J_iᵀ Λ_i J_i over both kernels, with J from jax.jacobian of all logits at once and Λ_i
    from jax.hessian of example i's cross-entropy in its logits."""
    theta = jnp.concatenate([params["l0"]["kernel"].ravel(), params["l1"]["kernel"].ravel()])
    s0 = params["l0"]["kernel"].size

    def logits(theta):
        p = {
            "l0": {**params["l0"], "kernel": theta[:s0].reshape(params["l0"]["kernel"].shape)},
            "l1": {**params["l1"], "kernel": theta[s0:].reshape(params["l1"]["kernel"].shape)},
        }
        return mlp(p, x)

    jac = jax.jacobian(logits)(theta)  # (n, C, P)
    z = logits(theta)
    lam = jax.vmap(jax.hessian(lambda zi, yi: -jax.nn.log_softmax(zi)[yi]))(z, y)  # (n, C, C)
    jac, lam = np.asarray(jac), np.asarray(lam)
    h = sum(jac[i].T @ lam[i] @ jac[i] for i in range(len(x)))
    loglik = float(jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1)))
    return h, loglik


def test_full_and_diag_equal_a_brute_force_ggn_of_a_tiny_mlp():
    params, x, y = tiny_mlp()
    want, loglik = brute_force_ggn(params, x, y)
    full = jaxl2.ggn(mlp, params, x, y, structure="full", batch_size=4)  # 2 batches of 4, then 2
    np.testing.assert_allclose(np.asarray(full.ggn), want, rtol=1e-8, atol=1e-12)
    assert float(full.log_likelihood) == pytest.approx(loglik, rel=1e-12)
    diag = jaxl2.ggn(mlp, params, x, y, structure="diag", batch_size=None)
    got = np.concatenate([np.asarray(h).ravel() for h in diag.ggn])
    np.testing.assert_allclose(got, np.diag(want), rtol=1e-8, atol=1e-12)
    # the evidence from that matrix, by hand, per-layer λ
    rules = {"l0/kernel": 0.02, "l1/kernel": 0.5}
    alpha = np.concatenate([np.full(12, 10 * 0.02), np.full(12, 10 * 0.5)])
    w = np.concatenate([np.asarray(params[k]["kernel"]).ravel() for k in ("l0", "l1")])
    base = loglik - 0.5 * np.sum(alpha * w * w) + 0.5 * np.sum(np.log(alpha))
    full_want = base - 0.5 * np.linalg.slogdet(want + np.diag(alpha))[1]
    assert float(jaxl2.log_evidence(full, params, rules)) == pytest.approx(full_want, rel=1e-10)
    diag_want = base - 0.5 * np.sum(np.log(np.diag(want) + alpha))
    assert float(jaxl2.log_evidence(diag, params, rules)) == pytest.approx(diag_want, rel=1e-10)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_the_gradient_in_log_lambda_matches_central_differences(structure):
    params, x, y = tiny_mlp(seed=1)
    curv = jaxl2.ggn(mlp, params, x, y, structure=structure)

    def f(log_lam):
        return jaxl2.log_evidence(
            curv, params, {"l0/kernel": jnp.exp(log_lam[0]), "l1/kernel": jnp.exp(log_lam[1])}
        )

    at = jnp.log(jnp.array([0.05, 0.3]))
    g = jax.grad(f)(at)
    eps = 1e-5
    for i in range(2):
        e = jnp.zeros(2).at[i].set(eps)
        assert float(g[i]) == pytest.approx(float((f(at + e) - f(at - e)) / (2 * eps)), rel=1e-6)


def test_under_jit_and_with_a_center():
    params, x, y = tiny_mlp(seed=2)
    curv = jax.jit(lambda p, x, y: jaxl2.ggn(mlp, p, x, y, structure="diag"))(params, x, y)
    eager = jaxl2.ggn(mlp, params, x, y, structure="diag")
    for a, b in zip(curv.ggn, eager.ggn):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    center = jax.tree.map(lambda w: 0.5 * w, params)
    traced = jax.jit(lambda lam: jaxl2.log_evidence(curv, params, lam, center=center))(0.1)
    # ‖w − w₀‖² = ‖w/2‖²: the same as params halved without a center, but for log p(D|w)
    half = jax.tree.map(lambda w: 0.5 * w, params)
    shifted = jaxl2.log_evidence(curv, half, 0.1) - curv.log_likelihood
    assert float(traced - curv.log_likelihood) == pytest.approx(float(shifted), rel=1e-12)
    new = jax.jit(lambda lam: jaxl2.evidence_l2(curv, params, lam))(0.1)
    assert set(new) == {"l0/kernel", "l1/kernel"} and all(float(v) > 0 for v in new.values())
    # the λs it returns raise the evidence
    assert float(jaxl2.log_evidence(curv, params, new)) > float(jaxl2.log_evidence(curv, params, 0.1))


def test_kron_equals_full_where_the_ggn_is_a_kronecker_product():
    """Multi-output linear regression: H = XᵀX ⊗ I/σ² exactly, so the K-FAC evidence, its MacKay
    λ and its gradient equal those of the full GGN (float64)."""
    rng = np.random.default_rng(3)
    n, d_in, d_out, sigma = 30, 4, 3, 0.4
    x = rng.normal(size=(n, d_in)) * np.linspace(0.5, 2.0, d_in)
    y = x @ rng.normal(size=(d_in, d_out)) + sigma * rng.normal(size=(n, d_out))
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out))), "bias": jnp.zeros(d_out)}}
    full = jaxl2.ggn(linear, params, x, y, likelihood="gaussian", sigma=sigma, structure="full")
    pair = (jnp.asarray(x.T @ x), jnp.eye(d_out) / sigma**2)
    kron = jaxl2.Curvature(full.log_likelihood, (pair,), full.n, full.paths, "kron")
    np.testing.assert_allclose(full.ggn, np.kron(*pair), rtol=1e-12)  # the premise
    for lam in (1e-3, 0.1, 2.0):
        assert float(jaxl2.log_evidence(kron, params, lam)) == pytest.approx(
            float(jaxl2.log_evidence(full, params, lam)), rel=1e-10
        )
    a, b = (jaxl2.evidence_l2(c, params, 0.1, steps=30)["dense/kernel"] for c in (kron, full))
    assert float(a) == pytest.approx(float(b), rel=1e-10)
    ga, gb = (
        jax.grad(lambda t, c=c: jaxl2.log_evidence(c, params, jnp.exp(t)))(jnp.log(0.1)) for c in (kron, full)
    )
    assert float(ga) == pytest.approx(float(gb), rel=1e-9)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_a_stacked_leaf_gets_a_lambda_per_slice_as_its_unrolled_layers_do(structure):
    """Three tanh layers stacked in one (3, 4, 4) kernel (``stacked={"blocks/kernel": 0}``) and the
    same layers as three leaves: the same evidence for per-slice λs, and MacKay's λ per slice
    equal to the unrolled model's λ per leaf."""
    rng = np.random.default_rng(5)
    w = jnp.asarray(0.6 * rng.normal(size=(3, 4, 4)))
    head = jnp.asarray(rng.normal(size=(4, 3)))
    x, y = jnp.asarray(rng.normal(size=(12, 4))), jnp.asarray(rng.integers(0, 3, size=12))

    def stacked_fn(p, x):
        h = x
        for i in range(3):
            h = jnp.tanh(h @ p["blocks"]["kernel"][i])
        return h @ p["head"]["kernel"]

    def unrolled_fn(p, x):
        h = x
        for i in range(3):
            h = jnp.tanh(h @ p[f"l{i}"]["kernel"])
        return h @ p["head"]["kernel"]

    stacked = {"blocks": {"kernel": w}, "head": {"kernel": head}}
    unrolled = {**{f"l{i}": {"kernel": w[i]} for i in range(3)}, "head": {"kernel": head}}
    axis = {"blocks/kernel": 0}
    cs = jaxl2.ggn(stacked_fn, stacked, x, y, structure=structure)
    cu = jaxl2.ggn(unrolled_fn, unrolled, x, y, structure=structure)
    lams = (0.02, 0.3, 0.05, 0.1)
    by_slice = {
        r"blocks/kernel\[0\]": lams[0],
        r"blocks/kernel\[1\]": lams[1],
        r"blocks/kernel\[2\]": lams[2],
    }
    by_leaf = {"l0/kernel": lams[0], "l1/kernel": lams[1], "l2/kernel": lams[2]}
    es = jaxl2.log_evidence(cs, stacked, {**by_slice, "head/kernel": lams[3]}, stacked=axis)
    eu = jaxl2.log_evidence(cu, unrolled, {**by_leaf, "head/kernel": lams[3]})
    assert float(es) == pytest.approx(float(eu), rel=1e-10)
    new_s = jaxl2.evidence_l2(cs, stacked, 0.1, stacked=axis, steps=20)
    new_u = jaxl2.evidence_l2(cu, unrolled, 0.1, steps=20)
    assert sorted(new_s) == [
        r"blocks/kernel\[0\]",
        r"blocks/kernel\[1\]",
        r"blocks/kernel\[2\]",
        "head/kernel",
    ]
    for i in range(3):
        assert float(new_s[rf"blocks/kernel\[{i}\]"]) == pytest.approx(float(new_u[f"l{i}/kernel"]), rel=1e-9)
    assert float(new_s["head/kernel"]) == pytest.approx(float(new_u["head/kernel"]), rel=1e-9)
    assert len({round(float(v), 6) for v in new_s.values()}) == 4  # four different λs
    # the rules go straight back into the penalty, per slice
    assert float(jaxl2.l2_penalty(stacked, new_s, stacked=axis)) == pytest.approx(
        float(
            jaxl2.l2_penalty(
                unrolled,
                {
                    **{f"l{i}/kernel": new_u[f"l{i}/kernel"] for i in range(3)},
                    "head/kernel": new_u["head/kernel"],
                },
            )
        ),
        rel=1e-9,
    )


@pytest.mark.parametrize("structure", ["kron", "ekfac"])
def test_kron_and_ekfac_refuse_a_lambda_per_slice_of_one_basis(structure):
    params = {"blocks": {"kernel": jnp.ones((2, 3, 3))}}
    block = (jnp.eye(6), jnp.eye(3)) if structure == "kron" else jnp.ones(18)  # one for the whole leaf
    curv = jaxl2.Curvature(jnp.zeros(()), (block,), 4, ("blocks/kernel",), structure)
    with pytest.raises(jaxl2.Jaxl2Error, match=f"a {structure} curvature has one basis per leaf"):
        jaxl2.log_evidence(curv, params, 0.1, stacked={"blocks/kernel": 0})


@pytest.mark.parametrize("structure", ["kron", "ekfac"])
def test_layers_stacked_in_a_scan_get_a_lambda_per_slice_as_their_unrolled_layers_do(structure):
    """Three tanh layers stacked in one (3, 4, 4) kernel that ``lax.scan`` runs through, and the
    same layers as three leaves: ``ggn`` gives each slice its own basis, so per-slice λs give the
    unrolled model's evidence and MacKay's λ per slice equals the unrolled one per leaf."""
    rng = np.random.default_rng(5)
    w = jnp.asarray(0.6 * rng.normal(size=(3, 4, 4)))
    head = jnp.asarray(rng.normal(size=(4, 3)))
    x, y = jnp.asarray(rng.normal(size=(12, 4))), jnp.asarray(rng.integers(0, 3, size=12))

    def stacked_fn(p, x):
        h, _ = jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, p["blocks"]["kernel"])
        return h @ p["head"]["kernel"]

    def unrolled_fn(p, x):
        h = x
        for i in range(3):
            h = jnp.tanh(h @ p[f"l{i}"]["kernel"])
        return h @ p["head"]["kernel"]

    stacked = {"blocks": {"kernel": w}, "head": {"kernel": head}}
    unrolled = {**{f"l{i}": {"kernel": w[i]} for i in range(3)}, "head": {"kernel": head}}
    axis = {"blocks/kernel": 0}
    cs = jaxl2.ggn(stacked_fn, stacked, x, y, structure=structure, batch_size=5)
    cu = jaxl2.ggn(unrolled_fn, unrolled, x, y, structure=structure, batch_size=5)
    lams = (0.02, 0.3, 0.05, 0.1)
    by_slice = {rf"blocks/kernel\[{i}\]": lams[i] for i in range(3)}
    by_leaf = {f"l{i}/kernel": lams[i] for i in range(3)}
    es = jaxl2.log_evidence(cs, stacked, {**by_slice, "head/kernel": lams[3]}, stacked=axis)
    eu = jaxl2.log_evidence(cu, unrolled, {**by_leaf, "head/kernel": lams[3]})
    assert float(es) == pytest.approx(float(eu), rel=1e-10)
    new_s = jaxl2.evidence_l2(cs, stacked, 0.1, stacked=axis, steps=20)
    new_u = jaxl2.evidence_l2(cu, unrolled, 0.1, steps=20)
    for i in range(3):
        assert float(new_s[rf"blocks/kernel\[{i}\]"]) == pytest.approx(float(new_u[f"l{i}/kernel"]), rel=1e-9)
    assert len({round(float(v), 6) for v in new_s.values()}) == 4  # four different λs


def test_ekfac_values_in_the_eigenbasis_of_each_block_give_the_exact_evidence():
    """``"ekfac"`` holds a block's diagonal in an orthonormal basis of its leaf: in the basis that
    diagonalises each leaf's exact block (numpy's eigh of jaxl2.ggn's full matrix, no cross-leaf
    terms) it is that block-diagonal matrix's exact evidence, MacKay and Adam λs per leaf, and
    shared bisection λ."""
    params, x, y = tiny_mlp(seed=3)
    full = np.asarray(jaxl2.ggn(mlp, params, x, y, structure="full").ggn)
    blocks = [full[:12, :12], full[12:, 12:]]  # l0/kernel (3×4), l1/kernel (4×3)
    values = tuple(jnp.asarray(np.linalg.eigvalsh(b)) for b in blocks)
    ll = jaxl2.ggn(mlp, params, x, y, structure="diag").log_likelihood
    ekfac = jaxl2.Curvature(ll, values, 10, ("l0/kernel", "l1/kernel"), "ekfac")
    block_diag = np.zeros_like(full)
    block_diag[:12, :12], block_diag[12:, 12:] = blocks
    exact = jaxl2.Curvature(ll, jnp.asarray(block_diag), 10, ("l0/kernel", "l1/kernel"), "full")
    rules = {"l0/kernel": 0.02, "l1/kernel": 0.5}
    assert float(jaxl2.log_evidence(ekfac, params, rules)) == pytest.approx(
        float(jaxl2.log_evidence(exact, params, rules)), rel=1e-10
    )
    for method in ("mackay", "adam"):
        a, b = (jaxl2.evidence_l2(c, params, rules, method=method, steps=20) for c in (ekfac, exact))
        for path in rules:
            assert float(a[path]) == pytest.approx(float(b[path]), rel=1e-8)
    a, b = (
        jaxl2.evidence_l2(c, params, rules, shared=True, method="bisect", steps=60) for c in (ekfac, exact)
    )
    assert float(a["l0/kernel"]) == pytest.approx(float(b["l0/kernel"]), rel=1e-8)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"one value per entry .* 'l1/kernel' has 5 for its 12"):
        bad = jaxl2.Curvature(ll, (values[0], jnp.ones(5)), 10, ekfac.paths, "ekfac")
        jaxl2.log_evidence(bad, params, 0.1)


def two_leaf(w):
    """Linear regression with its 5 features split between two kernels (2 and 3 features)."""
    return {"a": {"kernel": jnp.asarray(w[:2])}, "b": {"kernel": jnp.asarray(w[2:])}}


def split_linear(params, x):
    return x[:, :2] @ params["a"]["kernel"] + x[:, 2:] @ params["b"]["kernel"] + 0.7


@pytest.mark.parametrize("method", ["mackay", "bisect"])
def test_a_shared_lambda_over_two_leaves_finds_the_closed_form_maximiser(method):
    """One α for both kernels is the single-α model whose exact evidence ``closed_form`` gives:
    refit at each λ, update, repeat; both MacKay's iteration and the bisection reach the maximiser
    of the exact evidence (found without jaxl2, by golden sections). Per leaf (``shared=False``)
    the two leaves, of unequal feature scales, get λs of their own."""
    x, y = regression(n=60, seed=1)
    sigma, b, n = 0.5, 0.7, 60
    lo, hi = 1e-3, 1e3
    g = (np.sqrt(5) - 1) / 2
    for _ in range(120):  # the exact evidence is unimodal in log α here
        c, d = np.exp(np.log(hi) - g * np.log(hi / lo)), np.exp(np.log(lo) + g * np.log(hi / lo))
        if closed_form(x, y, b, c, sigma) > closed_form(x, y, b, d, sigma):
            hi = d
        else:
            lo = c
    best = np.sqrt(lo * hi)
    steps = 1 if method == "mackay" else 50

    @jax.jit
    def update(params, lam):
        curv = jaxl2.ggn(split_linear, params, x, y, likelihood="gaussian", sigma=sigma, structure="full")
        return jaxl2.evidence_l2(curv, params, lam, shared=True, method=method, steps=steps)

    lam = {"a/kernel": 1.0 / n, "b/kernel": 3.0 / n}  # unequal: shared starts at their geometric mean
    for _ in range(60 if method == "mackay" else 8):
        params = two_leaf(posterior_mode(x, y, b, n * float(lam["a/kernel"]), sigma))
        lam = update(params, lam)
        assert float(lam["a/kernel"]) == float(lam["b/kernel"])
    assert float(n * lam["a/kernel"]) == pytest.approx(best, rel=1e-2)
    curv = jaxl2.ggn(split_linear, params, x, y, likelihood="gaussian", sigma=sigma, structure="full")
    own = jaxl2.evidence_l2(curv, params, lam, steps=200)
    assert abs(np.log(float(own["a/kernel"]) / float(own["b/kernel"]))) > 0.1


@pytest.mark.parametrize("structure", ["diag", "ekfac", "full"])
def test_bisection_finds_where_the_evidence_stops_rising(structure):
    """At fixed params: the bisection's λs are where the gradient of the log evidence in ln λ
    (autodiff) vanishes, the evidence there beats λ·1.01 and λ/1.01 in every layer, and MacKay's
    iteration run to convergence lands on them. ``"full"`` couples the layers: one shared λ."""
    params, x, y = tiny_mlp(seed=4, n=30)
    curv = jaxl2.ggn(mlp, params, x, y, structure="full" if structure == "full" else "diag")
    if structure == "ekfac":  # the diagonal is an ekfac curvature with the identity as its basis
        curv = jaxl2.Curvature(curv.log_likelihood, curv.ggn, curv.n, curv.paths, "ekfac")
    shared = structure == "full"
    found = jaxl2.evidence_l2(curv, params, 0.1, shared=shared, method="bisect", steps=60)
    log_lam = jnp.log(jnp.stack([found["l0/kernel"], found["l1/kernel"]]))

    def f(log_lam):
        return jaxl2.log_evidence(
            curv, params, {"l0/kernel": jnp.exp(log_lam[0]), "l1/kernel": jnp.exp(log_lam[-1])}
        )

    if shared:
        assert float(log_lam[0]) == float(log_lam[1])
        assert abs(float(jax.grad(lambda t: f(jnp.stack([t, t])))(log_lam[0]))) < 1e-8
    else:
        np.testing.assert_allclose(jax.grad(f)(log_lam), 0.0, atol=1e-8)
    at = float(f(log_lam))
    for i in range(1 if shared else 2):
        for step in (np.log(1.01), -np.log(1.01)):
            moved = log_lam + (step if shared else jnp.zeros(2).at[i].set(step))
            assert float(f(moved)) < at
    mackay = jaxl2.evidence_l2(curv, params, 0.1, shared=shared, steps=500)
    for path in found:
        assert float(mackay[path]) == pytest.approx(float(found[path]), rel=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda p, x, y: jaxl2.evidence_l2(
                jaxl2.ggn(mlp, p, x, y, structure="full"), p, 0.1, method="bisect"
            ),
            "method 'bisect' needs an evidence that separates into one problem per λ",
        ),
        (
            lambda p, x, y: jaxl2.evidence_l2(jaxl2.ggn(mlp, p, x, y), p, 0.1, shared="yes"),
            "shared must be True",
        ),
        (lambda p, x, y: jaxl2.ggn(mlp, p, x, y, structure="block"), "structure must be one of full"),
        (
            lambda p, x, y: jaxl2.log_evidence(
                jaxl2.Curvature(
                    0.0,
                    ((np.eye(3), np.eye(3)), (np.eye(4), np.eye(3))),
                    5,
                    ("l0/kernel", "l1/kernel"),
                    "kron",
                ),
                p,
                0.1,
            ),
            r"the kron factors of 'l0/kernel' are \(3, 3\) and \(3, 3\): .* the leaf's 12 entries",
        ),
        (
            lambda p, x, y: jaxl2.log_evidence(
                jaxl2.Curvature(0.0, (np.eye(3), np.eye(4)), 5, ("l0/kernel", "l1/kernel"), "kron"), p, 0.1
            ),
            "a kron curvature holds a pair",
        ),
        (lambda p, x, y: jaxl2.ggn(mlp, p, x, y, likelihood="poisson"), "likelihood must be one of"),
        (lambda p, x, y: jaxl2.ggn(mlp, p, x, y, likelihood="gaussian", sigma=0.0), "sigma"),
        (lambda p, x, y: jaxl2.ggn(mlp, p, x, y, batch_size=0), "batch_size must be"),
        (lambda p, x, y: jaxl2.ggn(p, p, x, y), "apply_fn must be a function"),
        (lambda p, x, y: jaxl2.ggn(mlp, p, x, y, select="nothing"), "matched no parameter"),
        (lambda p, x, y: jaxl2.log_evidence(p, p, 0.1), "curvature must be what jaxl2.ggn returns"),
        (
            lambda p, x, y: jaxl2.log_evidence(jaxl2.ggn(mlp, p, x, y), p, 0.1, select=".*l0/kernel"),
            r"the curvature is of the leaves l0/kernel, l1/kernel, but this selection picks l0/kernel",
        ),
        (
            lambda p, x, y: jaxl2.log_evidence(jaxl2.ggn(mlp, p, x, y), p, {"l0.*": 0.1, "l1.*": 0.0}),
            r"needs λ > 0 on every selected leaf .* 'l1/kernel' has λ 0.0",
        ),
        (lambda p, x, y: jaxl2.evidence_l2(jaxl2.ggn(mlp, p, x, y), p, 0.1, method="newton"), "method"),
        (lambda p, x, y: jaxl2.evidence_l2(jaxl2.ggn(mlp, p, x, y), p, 0.1, steps=0), "steps must be"),
        (
            lambda p, x, y: jaxl2.log_evidence(jaxl2.ggn(mlp, p, x, y), 0.1, p),
            r"log_evidence\(params, l2\) takes the params first, .* are the arguments swapped\?",
        ),
        (
            lambda p, x, y: jaxl2.evidence_l2(jaxl2.ggn(mlp, p, x, y), 0.1, p),
            r"evidence_l2\(params, l2\) takes the params first, .* are the arguments swapped\?",
        ),
        (
            lambda p, x, y: jaxl2.evidence_l2(jaxl2.ggn(mlp, p, x, y), {".*kernel": 0.1}, p),
            r"evidence_l2\(params, l2\) takes the params first, but got \{'\.\*kernel': 0\.1\} \(dict\) "
            r"as params .* are the arguments swapped\?",
        ),
        (
            lambda p, x, y: jaxl2.ggn(mlp, p, x, jax.nn.one_hot(y, 3)),
            r"y must be integer class indices in \[0, 3\) of shape \(10,\), got an array of dtype float"
            r".* \(one-hot labels\? give y.argmax\(-1\)\)",
        ),
        (
            lambda p, x, y: jaxl2.ggn(mlp, p, x, y.at[0].set(3)),
            r"y must be integer class indices in \[0, 3\) .* holds labels from 0 to 3",
        ),
        (
            lambda p, x, y: jaxl2.ggn_lanczos(mlp, p, x, y.at[0].set(-1), key=jax.random.key(0)),
            r"holds labels from -1 to",
        ),
        (
            lambda p, x, y: jaxl2.ggn(mlp, p, x, jnp.zeros((10, 2)), likelihood="gaussian"),
            r"with likelihood 'gaussian', y must be targets of the outputs' shape \(10, 3\), got an array "
            r"of dtype float\d+ and shape \(10, 2\)",
        ),
    ],
)
def test_bad_arguments_are_named(call, match):
    params, x, y = tiny_mlp()
    with pytest.raises(jaxl2.Jaxl2Error, match=match):
        call(params, x, y)


def test_gamma_keeps_float32_precision_on_a_large_leaf():
    """300,000 float32 entries, most far below α: γ ≈ 1,800 is what remains of ``P − α·Σ(H + A)⁻¹``
    after cancelling 298,000, and XLA's sequential scatter-add loses it (5% here); γ from
    ``h/(h + α)`` summed per leaf keeps it. One MacKay step and the log evidence against numpy
    float64."""
    with jax.enable_x64(False):
        rng = np.random.default_rng(0)
        w = (0.05 * rng.normal(size=(600, 500))).astype(np.float32)
        lam, n = 1e-3, 4000
        h = (n * lam * 10 ** rng.uniform(-8, -1, size=w.shape)).astype(np.float32)
        params = {"dense": {"kernel": jnp.asarray(w)}}
        curv = jaxl2.Curvature(jnp.float32(-100.0), (jnp.asarray(h),), n, ("dense/kernel",), "diag")
        h64, sq = h.astype(np.float64), np.sum(w.astype(np.float64) ** 2)
        gamma = np.sum(h64 / (h64 + n * lam))
        assert 1000 < gamma < 3000  # the regime of the reference MLP on mnist5k
        got = float(jaxl2.evidence_l2(curv, params, lam)["dense/kernel"])
        assert got == pytest.approx(gamma / sq / n, rel=1e-5)
        want = -100.0 - 0.5 * n * lam * sq - 0.5 * np.sum(np.log1p(h64 / (n * lam)))
        assert float(jaxl2.log_evidence(curv, params, lam)) == pytest.approx(want, abs=0.01)


def test_lanczos_quadrature_estimates_the_full_ggn_evidence_with_one_lambda():
    """Stochastic Lanczos quadrature on a tiny MLP (P = 24, steps = P: each probe's quadrature is
    exact, the spread is Hutchinson's): over 2,000 probes, the log evidence, γ (one MacKay step)
    and the shared λ that maximises the evidence agree with the full GGN's (jaxl2.ggn, itself
    checked against a brute-force GGN) to within the estimator's spread (0.5% over keys)."""
    params, x, y = tiny_mlp(seed=5, n=30)
    full = jaxl2.ggn(mlp, params, x, y, structure="full")
    slq = jaxl2.ggn_lanczos(mlp, params, x, y, key=jax.random.key(0), probes=2000, steps=24)
    assert float(slq.log_likelihood) == pytest.approx(float(full.log_likelihood), rel=1e-12)
    for lam in (0.01, 0.1, 1.0):
        got, want = (float(jaxl2.log_evidence(c, params, lam) - c.log_likelihood) for c in (slq, full))
        assert got == pytest.approx(want, rel=2e-2)  # 2,000 probes: a spread of about 0.5%
        one, ref = (jaxl2.evidence_l2(c, params, lam, shared=True)["l0/kernel"] for c in (slq, full))
        assert float(one) == pytest.approx(float(ref), rel=2e-2)  # γ(α) / (n·Σ‖w‖²)
    best, ref = (
        jaxl2.evidence_l2(c, params, 0.1, shared=True, method="bisect", steps=50)["l1/kernel"]
        for c in (slq, full)
    )
    assert float(best) == pytest.approx(float(ref), rel=3e-2)
    few = jaxl2.ggn_lanczos(mlp, params, x, y, key=jax.random.key(1), probes=3, steps=6)
    assert few.ggn[0].shape == few.ggn[1].shape == (3, 6)
    np.testing.assert_allclose(np.sum(few.ggn[1], axis=1), 1.0, rtol=1e-10)  # the weights: a distribution
    with pytest.raises(
        jaxl2.Jaxl2Error, match=r"need one λ for all the selected leaves \(l0/kernel, l1/kernel\)"
    ):
        jaxl2.log_evidence(slq, params, {"l0/kernel": 0.1, "l1/kernel": 0.2})
    with pytest.raises(jaxl2.Jaxl2Error, match="give shared=True"):
        jaxl2.evidence_l2(slq, params, 0.1)


def test_bisection_needs_no_steps_argument():
    """The module's example: MacKay iterated 50 times gives 0.2743; the bisection's default steps
    reach the same root from any start."""
    params = {"dense": {"kernel": jnp.array([[0.9], [-0.9]])}}
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    curv = jaxl2.ggn(
        lambda p, x: x @ p["dense"]["kernel"],
        params,
        x,
        jnp.array([[1.0], [-1.0], [0.0]]),
        likelihood="gaussian",
        structure="full",
    )
    mackay = float(jaxl2.evidence_l2(curv, params, 0.1, steps=50)["dense/kernel"])
    for start in (1e-6, 0.1, 100.0):
        bisect = float(jaxl2.evidence_l2(curv, params, start, method="bisect")["dense/kernel"])
        assert bisect == pytest.approx(mackay, rel=1e-8)


def test_lanczos_is_exact_on_a_breakdown_and_nan_for_unequal_traced_lambdas():
    """Linear regression with orthogonal features of equal norm: ``H = 4I``, so every probe's
    Krylov space is one vector and Lanczos breaks down after one step; with 5 steps the later
    nodes carry no weight, and ``γ = P·4/(4 + α)``, the Occam term ``P·log(1 + 4/α)`` exactly.
    Under ``jit`` (traced λs) unequal λs give NaN rather than a mixed evidence."""
    x = np.zeros((8, 4))
    x[:4] = 2 * np.eye(4)  # XᵀX = 4I
    y = np.arange(8.0)[:, None] / 8
    params = {"a": {"kernel": jnp.full((2, 1), 0.3)}, "b": {"kernel": jnp.full((2, 1), -0.2)}}

    def f(p, x):
        return x[:, :2] @ p["a"]["kernel"] + x[:, 2:] @ p["b"]["kernel"]

    slq = jaxl2.ggn_lanczos(f, params, x, y, key=jax.random.key(0), probes=3, steps=5, likelihood="gaussian")
    nodes, weights = (np.asarray(a) for a in slq.ggn)
    np.testing.assert_allclose(np.sum(weights, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.sum(weights * nodes, axis=1), 4.0, rtol=1e-12)
    n, lam, p = 8, 0.1, 4
    alpha = n * lam
    sq = 2 * 0.3**2 + 2 * 0.2**2
    got = float(jaxl2.evidence_l2(slq, params, lam, shared=True)["a/kernel"])
    assert got == pytest.approx(p * 4 / (4 + alpha) / sq / n, rel=1e-12)  # one MacKay step: γ/(n·‖w‖²)
    occam = float(jaxl2.log_evidence(slq, params, lam) - slq.log_likelihood) + 0.5 * alpha * sq
    assert occam == pytest.approx(-0.5 * p * np.log(1 + 4 / alpha), rel=1e-12)
    unequal = jax.jit(lambda a, b: jaxl2.log_evidence(slq, params, {"a/kernel": a, "b/kernel": b}))
    assert np.isnan(float(unequal(0.1, 0.2))) and float(unequal(0.1, 0.1)) == pytest.approx(
        float(jaxl2.log_evidence(slq, params, 0.1)), rel=1e-12
    )


@pytest.mark.parametrize("fn", [jaxl2.log_evidence, jaxl2.evidence_l2])
@pytest.mark.parametrize("l2", [optax.linear_schedule(1.0, 0.0, 4), {".*": optax.constant_schedule(0.1)}])
def test_a_schedule_is_read_at_a_step_before_the_evidence(fn, l2):
    """Neither function takes step=: the message says to read the schedule first, and that works."""
    params, x, y = tiny_mlp()
    curv = jaxl2.ggn(mlp, params, x, y)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"read the schedule at the step .* l2=schedule\(step\)") as e:
        fn(curv, params, l2)
    assert "step=" not in str(e.value)
    at = l2(2) if callable(l2) else {k: v(2) for k, v in l2.items()}
    want = jaxl2.log_evidence(curv, params, 0.5 if callable(l2) else 0.1)
    if fn is jaxl2.log_evidence:
        assert float(fn(curv, params, at)) == pytest.approx(float(want), rel=1e-12)


def test_gaussian_targets_may_drop_a_trailing_axis_of_one():
    x, y = regression()
    params = params_of(np.zeros((x.shape[1], 1)), 0.7)
    a = jaxl2.ggn(linear, params, x, y, likelihood="gaussian", sigma=0.5)
    b = jaxl2.ggn(linear, params, x, y[:, 0], likelihood="gaussian", sigma=0.5)
    assert float(a.log_likelihood) == float(b.log_likelihood)


def test_labels_closed_over_by_jit_are_checked_and_traced_ones_are_documented_as_unchecked():
    params, x, y = tiny_mlp()
    bad = y.at[0].set(3)
    with pytest.raises(jaxl2.Jaxl2Error, match="holds labels from 0 to 3"):
        jax.jit(lambda p: jaxl2.ggn(mlp, p, x, bad).log_likelihood)(params)
    # traced labels: their range is not known when ggn runs (its docstring says so)
    assert np.isnan(float(jax.jit(lambda y: jaxl2.ggn(mlp, params, x, y).log_likelihood)(bad)))


def test_a_prior_per_tensor_with_biases_equals_the_brute_force_evidence_of_a_tiny_mlp():
    """Kernels and biases selected, one λ per tensor: the evidence equals the formula built by
    brute force (jax.jacfwd of the logits in all selected entries raveled, numpy's slogdet), for
    the full GGN and its diagonal, to 1e-8; evidence_l2 gives each tensor, biases included, its
    own λ, where the brute-force γ_l equals α_l·‖w_l‖²."""
    params, x, y = tiny_mlp(seed=3)
    params["l1"]["bias"] = jnp.array([0.3, -0.2, 0.1])  # no zero tensor: each has its own MacKay λ
    n, select = len(x), r"l[01]/(kernel|bias)"
    paths = [("l0", "kernel"), ("l0", "bias"), ("l1", "kernel"), ("l1", "bias")]
    rules = {"l0/kernel": 0.02, "l0/bias": 0.7, "l1/kernel": 0.1, "l1/bias": 3.0}
    sizes = [params[a][b].size for a, b in paths]
    theta = np.concatenate([np.asarray(params[a][b]).ravel() for a, b in paths])
    chunks = np.split(np.arange(theta.size), np.cumsum(sizes)[:-1])  # each tensor's entries in theta

    def logits(t):
        p = {a: dict(params[a]) for a in params}
        for (a, b), chunk in zip(paths, chunks):
            p[a][b] = t[chunk].reshape(params[a][b].shape)
        return mlp(p, x)

    jac = np.asarray(jax.jacfwd(logits)(jnp.asarray(theta)))  # (n, C, P)
    z = np.asarray(logits(jnp.asarray(theta)))
    prob = np.exp(z - z.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    h = sum(jac[i].T @ (np.diag(prob[i]) - np.outer(prob[i], prob[i])) @ jac[i] for i in range(n))
    loglik = np.sum(np.log(prob[np.arange(n), np.asarray(y)]))
    alpha = np.concatenate([np.full(s, n * rules[f"{a}/{b}"]) for (a, b), s in zip(paths, sizes)])
    base = loglik - 0.5 * np.sum(alpha * theta**2) + 0.5 * np.sum(np.log(alpha))
    want = {
        "full": base - 0.5 * np.linalg.slogdet(h + np.diag(alpha))[1],
        "diag": base - 0.5 * np.sum(np.log(np.diag(h) + alpha)),
    }

    @jax.jit
    def evidence_and_lambdas(params, rules):  # one compiled call: eager ops compile one by one
        full, diag = (jaxl2.ggn(mlp, params, x, y, structure=s, select=select) for s in ("full", "diag"))
        found = jaxl2.evidence_l2(full, params, rules, select=select, shared=False, steps=500)
        return {
            s: jaxl2.log_evidence(c, params, rules, select=select)
            for s, c in (("full", full), ("diag", diag))
        }, found

    got, found = evidence_and_lambdas(params, rules)
    for structure in ("full", "diag"):
        assert float(got[structure]) == pytest.approx(want[structure], rel=1e-8)
    assert set(found) == {f"{a}/{b}" for a, b in paths}  # the escaped paths: nothing to escape here
    alpha = np.concatenate([np.full(s, n * float(found[f"{a}/{b}"])) for (a, b), s in zip(paths, sizes)])
    shares = 1 - alpha * np.diag(np.linalg.inv(h + np.diag(alpha)))
    for (a, b), chunk in zip(paths, chunks):
        gamma, fit = np.sum(shares[chunk]), alpha[chunk[0]] * np.sum(theta[chunk] ** 2)
        assert gamma == pytest.approx(fit, rel=1e-9), f"{a}/{b}"
