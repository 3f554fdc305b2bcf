"""L2-SP, center=w₀: l2_penalty, regularized, selected and gradcheck against NumPy float64 hand math."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

import jaxl2
from jaxl2 import select
from jaxl2.penalty import check_center
from tests.test_penalty import NnxNet, linen_params


def np64(x):
    return np.asarray(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x, np.float64)


def np_sp_penalty(pairs, lam):
    """Σ λ/2·Σ(w − w₀)² in float64 over (w, w₀) pairs, written out."""
    return sum(lam / 2 * float(np.sum((np64(w) - np64(w0)) ** 2)) for w, w0 in pairs)


def shifted(params, seed=1, scale=0.3):
    """A reference w₀ of the same structure, with every leaf moved by random noise."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return treedef.unflatten(
        [jnp.asarray(np.asarray(x) + scale * rng.normal(size=x.shape), x.dtype) for x in leaves]
    )


def kernels_of(p):
    return [p["params"]["Dense_0"]["kernel"], p["params"]["Dense_1"]["kernel"]]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_penalty_is_half_lambda_squared_distance(jit):
    p, w0 = linen_params(), linen_params(seed=7)  # e.g. "pretrained" weights of the same net
    lam = 0.3
    expected = np_sp_penalty(zip(kernels_of(p), kernels_of(w0)), lam)
    fn = lambda params, center: jaxl2.l2_penalty(params, lam, center=center)  # noqa: E731
    pen = (jax.jit(fn) if jit else fn)(p, w0)
    assert pen.dtype == jnp.float32
    assert float(pen) == pytest.approx(expected, rel=1e-6)
    # not the plain penalty: the reference really is subtracted
    assert abs(float(jaxl2.l2_penalty(p, lam)) - expected) > 0.1 * expected


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_gradient_is_lambda_w_minus_w0_on_kernels_and_zero_elsewhere(jit):
    state = jax.tree_util.tree_map(lambda x: x + 0.5, nnx.state(NnxNet(nnx.Rngs(1)), nnx.Param))
    w0 = nnx.to_pure_dict(nnx.state(NnxNet(nnx.Rngs(2)), nnx.Param))  # a plain dict serves as w₀
    lam = 0.37
    grad = jax.grad(lambda s: jaxl2.l2_penalty(s, lam, center=w0))
    grads = (jax.jit(grad) if jit else grad)(state)
    centers = dict(select.leaves(w0))
    seen = 0
    for (path, w), (gpath, g) in zip(select.leaves(state), select.leaves(grads)):
        assert path == gpath
        if path.endswith("kernel"):
            expected = lam * (np64(w) - np64(centers[path]))
            np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-6, atol=1e-7)
            seen += 1
        else:  # biases, LayerNorm, the embedding: exactly zero
            np.testing.assert_array_equal(np.asarray(g), 0.0)
    assert seen == 2


def test_zero_center_is_the_plain_penalty_bit_for_bit():
    """w − 0 = w exactly, so a zero center gives the same bits as no center; None is the default."""
    p = shifted(linen_params(), seed=3)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
    for lam in (0.3, {".*Dense_0.*": 0.1, ".*": 0.02}):
        plain = jaxl2.l2_penalty(p, lam)
        assert jaxl2.l2_penalty(p, lam, center=None).tobytes() == plain.tobytes()
        assert jaxl2.l2_penalty(p, lam, center=zeros).tobytes() == plain.tobytes()
        g_plain = jax.grad(lambda q, lam=lam: jaxl2.l2_penalty(q, lam))(p)
        g_zero = jax.grad(lambda q, lam=lam: jaxl2.l2_penalty(q, lam, center=zeros))(p)
        for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_zero)):
            assert a.tobytes() == b.tobytes()


def test_bfloat16_params_accumulate_in_float32():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(64, 32)) + 1.5, jnp.bfloat16)
    w0 = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    params, center = {"d": {"kernel": w}}, {"d": {"kernel": w0}}
    lam = 0.25
    pen = jaxl2.l2_penalty(params, lam, center=center)
    assert pen.dtype == jnp.float32
    assert float(pen) == pytest.approx(np_sp_penalty([(w, w0)], lam), rel=1e-6)
    g = jax.jit(jax.grad(lambda q: jaxl2.l2_penalty(q, lam, center=center)))(params)["d"]["kernel"]
    assert g.dtype == jnp.bfloat16
    # λ·(w − w₀) in float64, then one bf16 rounding (relative 2⁻⁸ at most)
    np.testing.assert_allclose(np64(g), lam * (np64(w) - np64(w0)), rtol=2**-8, atol=1e-30)


def test_traced_lambda_under_jit_and_vmap():
    p, w0 = linen_params(), shifted(linen_params(), seed=4)
    lams = jnp.array([0.0, 0.1, 1.0])
    pens = jax.jit(jax.vmap(lambda lam: jaxl2.l2_penalty(p, lam, center=w0)))(lams)
    expected = [np_sp_penalty(zip(kernels_of(p), kernels_of(w0)), float(lam)) for lam in lams]
    np.testing.assert_allclose(pens, expected, rtol=1e-6)
    # the gradient, vmapped over λ
    grads = jax.jit(jax.vmap(lambda lam: jax.grad(lambda q: jaxl2.l2_penalty(q, lam, center=w0))(p)))(lams)
    k, k0 = np64(kernels_of(p)[0]), np64(kernels_of(w0)[0])
    for i, lam in enumerate(np.asarray(lams, np.float64)):
        np.testing.assert_allclose(
            grads["params"]["Dense_0"]["kernel"][i], lam * (k - k0), rtol=1e-6, atol=1e-7
        )
        np.testing.assert_array_equal(grads["params"]["Dense_0"]["bias"][i], 0.0)


def test_per_layer_rules_with_center():
    p, w0 = linen_params(), shifted(linen_params(), seed=5)
    (k0, k1), (c0, c1) = kernels_of(p), kernels_of(w0)
    rules = {".*Dense_0/kernel": 0.1, ".*": 0.02}
    expected = np_sp_penalty([(k0, c0)], 0.1) + np_sp_penalty([(k1, c1)], 0.02)
    assert float(jaxl2.l2_penalty(p, rules, center=w0)) == pytest.approx(expected, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    lam=st.floats(0.0, 10.0),
    seed=st.integers(0, 2**16),
)
def test_penalty_matches_numpy_for_any_shape_and_lambda(shape, lam, seed):
    rng = np.random.default_rng(seed)
    w, w0 = rng.normal(size=shape), rng.normal(size=shape)
    params = {"a": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.ones(shape[-1])}}
    center = {"a": {"kernel": jnp.asarray(w0, jnp.float32), "bias": jnp.zeros(shape[-1])}}
    pen = jaxl2.l2_penalty(params, lam, center=center)
    expected = np_sp_penalty([(params["a"]["kernel"], center["a"]["kernel"])], lam)
    assert float(pen) == pytest.approx(expected, rel=1e-5, abs=1e-30)


def test_float64_params_and_center_stay_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params, center = {"kernel": jnp.asarray(rng.normal(size=(5, 5)))}, {"kernel": rng.normal(size=(5, 5))}
        pen = jaxl2.l2_penalty(params, 1e-3, center=center)  # a NumPy w₀ works too
        assert pen.dtype == jnp.float64
        expected = 1e-3 / 2 * np.sum((np.asarray(params["kernel"]) - center["kernel"]) ** 2)
        assert float(pen) == pytest.approx(expected, rel=1e-14)


def test_regularized_gradient_is_data_gradient_plus_lambda_w_minus_w0():
    p, w0 = linen_params(), shifted(linen_params(), seed=6)

    def data_loss(params, x):
        return jnp.sum(jnp.sin(x @ params["params"]["Dense_0"]["kernel"]))

    x = jnp.linspace(-1, 1, 8).reshape(2, 4)
    lam = 0.2
    loss = jaxl2.regularized(data_loss, lam, center=w0)
    assert "w − w₀" in loss.__doc__
    g_data = jax.grad(data_loss)(p, x)
    g_reg = jax.jit(jax.grad(loss))(p, x)
    centers = dict(select.leaves(w0))
    for (path, w), (_, gd), (_, gr) in zip(select.leaves(p), select.leaves(g_data), select.leaves(g_reg)):
        extra = lam * (np64(w) - np64(centers[path])) if path.endswith("kernel") else 0.0
        np.testing.assert_allclose(gr, np64(gd) + extra, rtol=1e-6, atol=1e-6)
    total, aux = jaxl2.regularized(lambda q, x: (data_loss(q, x), {}), lam, center=w0, has_aux=True)(p, x)
    assert float(aux["penalty"]) == pytest.approx(np_sp_penalty(zip(kernels_of(p), kernels_of(w0)), lam))


def test_jitted_centered_loss_does_not_recompile():
    traces = []

    def data_loss(params, x):
        traces.append(1)
        return jnp.mean(x @ params["params"]["Dense_0"]["kernel"])

    p = linen_params()
    loss = jax.jit(jaxl2.regularized(data_loss, 1e-2, center=shifted(p)))
    a, b = loss(p, jnp.ones((2, 4))), loss(jax.tree_util.tree_map(lambda v: 2 * v, p), jnp.ones((2, 4)))
    assert len(traces) == 1 and loss._cache_size() == 1 and float(a) != float(b)


def test_equinox_module_centered_on_a_pretrained_module():
    mlp = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
    pretrained = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(1))
    lam = 0.1
    pairs = [(a.weight, b.weight) for a, b in zip(mlp.layers, pretrained.layers)]
    pen = jaxl2.l2_penalty(mlp, lam, select=select.equinox, center=pretrained)
    assert float(pen) == pytest.approx(np_sp_penalty(pairs, lam), rel=1e-6)
    grads = eqx.filter_grad(lambda m: jaxl2.l2_penalty(m, lam, select=select.equinox, center=pretrained))(mlp)
    for layer, ref, g in zip(mlp.layers, pretrained.layers, grads.layers):
        np.testing.assert_allclose(
            g.weight, lam * (np64(layer.weight) - np64(ref.weight)), rtol=1e-6, atol=1e-7
        )
        np.testing.assert_array_equal(g.bias, 0.0)
    # the filtered module (None at the non-array leaves) is a valid w₀ for the full module
    filtered = eqx.filter(pretrained, eqx.is_array)
    pen_f = jaxl2.l2_penalty(mlp, lam, select=select.equinox, center=filtered)
    assert float(pen_f) == pytest.approx(np_sp_penalty(pairs, lam), rel=1e-6)


def test_selected_shows_the_reference_norm_and_the_distance():
    p, w0 = linen_params(), shifted(linen_params(), seed=8)
    rows = jaxl2.selected(p, 1e-3, center=w0)
    for row, w, c in zip(rows, kernels_of(p), kernels_of(w0)):
        assert row.center_norm == pytest.approx(np.sqrt(np.sum(np64(c) ** 2)), rel=1e-12)
        assert row.center_dist == pytest.approx(np.sqrt(np.sum((np64(w) - np64(c)) ** 2)), rel=1e-12)
    lines = str(rows).splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "λ", "‖w₀‖", "‖w−w₀‖"]
    assert lines[2].split()[:4] == ["params/Dense_0/kernel", "4×5", "float32", "0.001"]
    assert float(lines[2].split()[4]) == pytest.approx(rows[0].center_norm, rel=1e-3)
    # at the reference itself the distance is 0
    assert [r.center_dist for r in jaxl2.selected(p, 1e-3, center=p)] == [0.0, 0.0]
    # without a center the table keeps its four columns, and the rows their None
    plain = jaxl2.selected(p, 1e-3)
    assert str(plain).splitlines()[0].split() == ["path", "shape", "dtype", "λ"]
    assert plain[0].center_norm is None and plain[0].center_dist is None


def without(tree, *path):
    """A copy of a nested dict without the leaf at ``path``."""
    tree = jax.tree_util.tree_map(lambda x: x, tree)  # a copy
    node = tree
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]
    return tree


@pytest.mark.parametrize(
    "make_center, match",
    [
        (
            lambda p: without(p, "params", "Dense_1", "kernel"),
            r"^center must have the structure of params \(e\.g\. the pretrained params\), but params has "
            r"a floating-point leaf at 'params/Dense_1/kernel' and center has no leaf there$",
        ),
        (
            lambda p: without(p, "params", "LayerNorm_0", "scale"),  # unselected, still a structure error
            r"params has a floating-point leaf at 'params/LayerNorm_0/scale' and center has no leaf there",
        ),
        (
            lambda p: {**p, "extra": {"kernel": jnp.ones(3)}},
            r"center has a floating-point leaf at 'extra/kernel' that params lacks",
        ),
        (
            lambda p: jax.tree_util.tree_map_with_path(
                lambda kp, x: jnp.zeros(x.shape, jnp.int32) if kp[-1].key == "bias" else x, p
            ),
            r"params has a floating-point leaf at 'params/Dense_0/bias' and center has an array of dtype "
            r"int32 and shape \(5,\) there",
        ),
        (
            lambda p: jax.tree_util.tree_map_with_path(lambda kp, x: 0.0 if kp[-1].key == "kernel" else x, p),
            r"at 'params/Dense_0/kernel' and center has 0\.0 \(float\) there",
        ),
        (
            lambda p: jax.tree_util.tree_map_with_path(
                lambda kp, x: x.T if kp[-2].key == "Dense_1" and kp[-1].key == "kernel" else x, p
            ),
            r"^center must have the shapes of params on the selected leaves, but at 'params/Dense_1/kernel' "
            r"center has shape \(3, 5\) and params \(5, 3\)$",
        ),
    ],
    ids=["missing-kernel", "missing-unselected", "extra", "int-leaf", "float-leaf", "shape"],
)
def test_a_center_that_does_not_fit_names_the_first_differing_path(make_center, match):
    p = linen_params()
    center = make_center(p)
    for call in (
        lambda: jaxl2.l2_penalty(p, 0.1, center=center),
        lambda: jaxl2.regularized(lambda q: 0.0, 0.1, center=center)(p),
        lambda: jaxl2.selected(p, 0.1, center=center),
        lambda: check_center(p, center),
    ):
        with pytest.raises(jaxl2.Jaxl2Error, match=match):
            call()


class Pair(eqx.Module):
    b: dict
    a: dict


def test_paths_are_compared_not_containers_or_order():
    params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
    as_list = [jnp.zeros((2, 2)), jnp.zeros((2, 2))]  # paths '0', '1'
    with pytest.raises(jaxl2.Jaxl2Error, match=r"params has a floating-point leaf at 'a/kernel'"):
        jaxl2.l2_penalty(params, 0.1, center=as_list)
    # the same paths in a module whose fields come in another order: w₀ is matched by path
    center = Pair(b={"kernel": jnp.full((2, 2), 3.0)}, a={"kernel": jnp.zeros((2, 2))})
    pen = jaxl2.l2_penalty(params, 0.1, center=center)
    assert float(pen) == pytest.approx(0.1 / 2 * (4 * 1.0**2 + 4 * 2.0**2), rel=1e-6)


def test_a_shape_mismatch_on_an_unselected_leaf_is_allowed():
    """Only the selected leaves' w₀ is used: an unselected leaf's shape does not matter."""
    p = linen_params()
    center = jax.tree_util.tree_map_with_path(lambda kp, x: x[:1] if kp[-1].key == "bias" else x, p)
    assert float(jaxl2.l2_penalty(p, 0.1, center=center)) == 0.0


@pytest.mark.parametrize("center", [0.0, "w0", jnp.arange(3), {"kernel": None}], ids=repr)
def test_a_center_without_arrays_fails_when_wrapping(center):
    with pytest.raises(jaxl2.Jaxl2Error, match=r"^center must be None or a pytree of arrays .* got "):
        jaxl2.regularized(lambda q: 0.0, 0.1, center=center)


def gradcheck_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        f"Dense_{i}": {"kernel": jnp.asarray(rng.normal(size=(a, b)), jnp.float32), "bias": jnp.ones(b)}
        for i, (a, b) in enumerate([(4, 6), (6, 3)])
    }
    w0 = jax.tree_util.tree_map(lambda x: x + jnp.asarray(rng.normal(size=x.shape) + 2.0, x.dtype), params)
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)

    def loss(p, x):
        h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]) ** 2)

    return loss, params, w0, x


def test_gradcheck_with_center_checks_lambda_w_minus_w0():
    loss, params, w0, x = gradcheck_problem()
    r = jaxl2.gradcheck(loss, params, x, l2=0.5, center=w0, directions=4)
    assert r.ok, str(r)
    assert r.penalty_grad_max_abs_err <= 1e-15 and r.n_selected == 2
    # The analytic side really is λ·(w − w₀): w₀ is ≈ 2 away from w everywhere, so an analytic
    # λ·w would be off by ≈ λ·2 = 1, and a penalty that ignored w₀ would fail check 1 the same way.
    k, k0 = np64(params["Dense_0"]["kernel"]), np64(w0["Dense_0"]["kernel"])
    assert np.abs(0.5 * k - 0.5 * (k - k0)).max() > 0.5
    # regularized(center=) against a central difference of the centered loss written out in float64
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        c64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), w0)
        x64 = jnp.asarray(x, jnp.float64)
        d = np.random.default_rng(9).standard_normal(4 * 6)
        d /= np.linalg.norm(d)

        def along(t, center):
            q = {
                **p64,
                "Dense_0": {**p64["Dense_0"], "kernel": p64["Dense_0"]["kernel"] + t * d.reshape(4, 6)},
            }
            return float(loss(q, x64)) + sum(
                0.5 / 2 * float(np.sum((np.asarray(q[k]["kernel"]) - np.asarray(center[k]["kernel"])) ** 2))
                for k in q
            )

        fd = (along(1e-5, c64) - along(-1e-5, c64)) / 2e-5  # by hand, in float64
        g = jax.grad(jaxl2.regularized(loss, 0.5, center=c64))(p64, x64)["Dense_0"]["kernel"]
        assert abs(fd - float(np.vdot(np.asarray(g), d))) < 1e-7 * max(1.0, abs(fd))


def test_gradcheck_with_a_center_that_does_not_fit():
    loss, params, w0, x = gradcheck_problem()
    bad = {**w0, "Dense_1": {"kernel": w0["Dense_1"]["kernel"].T, "bias": w0["Dense_1"]["bias"]}}
    with pytest.raises(
        jaxl2.Jaxl2Error, match=r"at 'Dense_1/kernel' center has shape \(3, 6\) and params \(6, 3\)"
    ):
        jaxl2.gradcheck(loss, params, x, l2=0.5, center=bad)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"center must be None or a pytree of arrays"):
        jaxl2.gradcheck(loss, params, x, l2=0.5, center=1.0)
