"""l2_penalty, selected, coefficients and regularized against NumPy float64 hand computations, with
center= (L2-SP) too."""

import collections

import equinox as eqx
import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings

import jaxl2
from jaxl2 import select


def np_penalty(named_arrays, lam):
    """λ/2·Σw² in float64 over the given arrays, written out."""
    return sum(lam / 2 * float(np.sum(np.asarray(w, np.float64) ** 2)) for w in named_arrays)


def linen_params(seed=0):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(5)(x)
            x = nn.LayerNorm()(x)
            return nn.Dense(3)(nn.relu(x))

    return Net().init(jax.random.key(seed), jnp.ones((1, 4)))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(7, 4, rngs=rngs)
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.ln = nnx.LayerNorm(6, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(6, 2, rngs=rngs)])


def test_linen_with_and_without_outer_params():
    v = linen_params()
    p = v["params"]
    expected = np_penalty([p["Dense_0"]["kernel"], p["Dense_1"]["kernel"]], 0.3)
    assert float(jaxl2.l2_penalty(v, 0.3)) == pytest.approx(expected, rel=1e-6)
    assert float(jaxl2.l2_penalty(p, 0.3)) == pytest.approx(expected, rel=1e-6)
    assert [r.path for r in jaxl2.selected(v)] == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    assert [r.path for r in jaxl2.selected(p)] == ["Dense_0/kernel", "Dense_1/kernel"]


def test_nnx_state_and_pure_dict():
    m = NnxNet(nnx.Rngs(0))
    state = nnx.state(m, nnx.Param)
    expected = np_penalty([m.l1.kernel[...], m.layers[0].kernel[...]], 1e-2)
    assert float(jaxl2.l2_penalty(state, 1e-2)) == pytest.approx(expected, rel=1e-6)
    pure = nnx.to_pure_dict(state)
    assert float(jaxl2.l2_penalty(pure, 1e-2)) == pytest.approx(expected, rel=1e-6)
    # The trailing `.value` of the Variables is not part of the path.
    assert [r.path for r in jaxl2.selected(state)] == ["l1/kernel", "layers/0/kernel"]
    assert [r.path for r in jaxl2.selected(pure)] == ["l1/kernel", "layers/0/kernel"]


def test_haiku_dict_preset():
    rng = np.random.default_rng(0)
    params = {
        "mlp/~/linear_0": {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)},
        "mlp/~/linear_1": {"w": rng.normal(size=(4, 2)), "b": rng.normal(size=2)},
    }
    params = jax.tree_util.tree_map(jnp.asarray, params)
    expected = np_penalty([params["mlp/~/linear_0"]["w"], params["mlp/~/linear_1"]["w"]], 0.5)
    assert float(jaxl2.l2_penalty(params, 0.5, select=select.haiku)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="matched no parameter.*linear_0/w"):
        jaxl2.l2_penalty(params, 0.5)  # the default looks for `kernel`


def test_equinox_module_preset():
    mlp = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
    expected = np_penalty([layer.weight for layer in mlp.layers], 0.1)
    assert float(jaxl2.l2_penalty(mlp, 0.1, select=select.equinox)) == pytest.approx(expected, rel=1e-6)
    assert [r.path for r in jaxl2.selected(mlp, select=select.equinox)] == [
        "layers/0/weight",
        "layers/1/weight",
        "layers/2/weight",
    ]
    grads = eqx.filter_grad(lambda m: jaxl2.l2_penalty(m, 0.1, select=select.equinox))(mlp)
    for layer, g in zip(mlp.layers, grads.layers):
        np.testing.assert_array_equal(g.weight, 0.1 * layer.weight)
        np.testing.assert_array_equal(g.bias, 0.0)


def test_gradient_is_lambda_w_on_kernels_and_zero_elsewhere():
    m = NnxNet(nnx.Rngs(1))
    state = nnx.state(m, nnx.Param)
    # make biases and norm params non-zero so a leak would show
    state = jax.tree_util.tree_map(lambda x: x + 0.5, state)
    lam = 0.37
    grads = jax.grad(lambda s: jaxl2.l2_penalty(s, lam))(state)
    for (path, w), (gpath, g) in zip(select.leaves(state), select.leaves(grads)):
        assert path == gpath
        if path.endswith("kernel"):
            np.testing.assert_array_equal(np.asarray(g), lam * np.asarray(w))
        else:  # biases, LayerNorm scale/bias, embeddings
            np.testing.assert_array_equal(np.asarray(g), 0.0)
    assert {p for p, _ in select.leaves(state)} >= {"emb/embedding", "ln/scale", "l1/bias"}


def test_bfloat16_accumulates_in_float32():
    w = jnp.full((64, 64), 1.5, jnp.bfloat16) + jnp.arange(64, dtype=jnp.bfloat16)[:, None] / 128
    params = {"d": {"kernel": w}}
    pen = jaxl2.l2_penalty(params, 0.25)
    assert pen.dtype == jnp.float32
    expected = np_penalty([np.asarray(w.astype(jnp.float32))], 0.25)
    assert float(pen) == pytest.approx(expected, rel=1e-6)
    g = jax.grad(lambda p: jaxl2.l2_penalty(p, 0.25))(params)["d"]["kernel"]
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(g), np.asarray((0.25 * w.astype(jnp.float32)).astype(jnp.bfloat16))
    )


def test_float64_params_stay_float64():
    with jax.enable_x64(True):
        params = {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(5, 5)))}
        pen = jaxl2.l2_penalty(params, 1e-3)
        assert pen.dtype == jnp.float64
        assert float(pen) == pytest.approx(np_penalty([params["kernel"]], 1e-3), rel=1e-14)


def test_per_layer_first_match_wins_and_catch_all():
    p = linen_params()
    k0, k1 = p["params"]["Dense_0"]["kernel"], p["params"]["Dense_1"]["kernel"]
    rules = collections.OrderedDict([(".*Dense_0/kernel", 0.1), (".*", 0.02)])
    expected = np_penalty([k0], 0.1) + np_penalty([k1], 0.02)
    assert float(jaxl2.l2_penalty(p, rules)) == pytest.approx(expected, rel=1e-6)
    # order matters: a catch-all first takes everything (and a pattern behind it is an error, below)
    rows = jaxl2.selected(p, rules)
    assert [(r.path, r.l2) for r in rows] == [("params/Dense_0/kernel", 0.1), ("params/Dense_1/kernel", 0.02)]
    g = jax.grad(lambda q: jaxl2.l2_penalty(q, rules))(p)
    np.testing.assert_array_equal(g["params"]["Dense_0"]["kernel"], 0.1 * k0)
    np.testing.assert_array_equal(g["params"]["Dense_1"]["kernel"], 0.02 * k1)
    # an explicit zero leaves a layer unpenalised on purpose
    only0 = {".*Dense_0/kernel": 0.1, ".*": 0.0}
    assert float(jaxl2.l2_penalty(p, only0)) == pytest.approx(np_penalty([k0], 0.1), rel=1e-6)


def test_a_pattern_partly_behind_an_earlier_one_applies_where_it_is_first():
    p = linen_params()
    k0, k1 = p["params"]["Dense_0"]["kernel"], p["params"]["Dense_1"]["kernel"]
    # '.*kernel' also matches Dense_0, which '.*Dense_0.*' takes; it is first for Dense_1 only
    rules = {".*Dense_0.*": 0.1, ".*kernel": 0.02}
    expected = np_penalty([k0], 0.1) + np_penalty([k1], 0.02)
    assert float(jaxl2.l2_penalty(p, rules)) == pytest.approx(expected, rel=1e-6)
    assert [r.l2 for r in jaxl2.selected(p, rules)] == [0.1, 0.02]


def _shadowed_calls(params, l2):
    """Every public entry point that applies {regex: λ} rules to params."""
    from jaxl2.decay import add_decayed_weights

    return {
        "l2_penalty": lambda: jaxl2.l2_penalty(params, l2),
        "selected": lambda: jaxl2.selected(params, l2),
        "coefficients": lambda: jaxl2.coefficients(params, l2),
        "regularized": lambda: jaxl2.regularized(lambda q: 0.0, l2)(params),
        "jit(regularized)": lambda: jax.jit(jaxl2.regularized(lambda q: 0.0, l2))(params),
        "add_decayed_weights.init": lambda: add_decayed_weights(l2).init(params),
    }


@pytest.mark.parametrize("entry", list(_shadowed_calls(None, None)))
def test_a_pattern_hidden_behind_an_earlier_catch_all_is_an_error(entry):
    """First match wins, so a pattern never first for any selected path could never apply."""
    p = linen_params()
    catch_all_first = {".*": 1e-3, ".*Dense_0/kernel": 1e-4}
    with pytest.raises(jaxl2.Jaxl2Error) as e:
        _shadowed_calls(p, catch_all_first)[entry]()
    assert str(e.value) == (
        "l2 pattern '.*Dense_0/kernel' never applies: the first match wins, and every selected path it "
        "matches (params/Dense_0/kernel) is taken by an earlier pattern ('.*'); remove it, or narrow "
        "the earlier pattern if it was meant to take some of them"
    )
    # hidden behind two patterns, each taking one of its paths: both are named, in rule order
    three = {"params": {**p["params"], "Dense_2": p["params"]["Dense_0"]}}
    two = {".*Dense_1.*": 0.1, ".*Dense_0.*": 0.2, ".*Dense_[01]/kernel": 0.3, ".*": 0.0}
    with pytest.raises(jaxl2.Jaxl2Error) as e:
        _shadowed_calls(three, two)[entry]()
    assert str(e.value).startswith(
        "l2 pattern '.*Dense_[01]/kernel' never applies: the first match wins, and every selected path "
        "it matches (params/Dense_0/kernel, params/Dense_1/kernel) is taken by earlier patterns "
        "('.*Dense_1.*', '.*Dense_0.*'); remove it"
    )
    # put first, it applies
    fixed = {".*Dense_0/kernel": 1e-4, ".*": 1e-3}
    _shadowed_calls(p, fixed)[entry]()


@pytest.mark.parametrize("entry", list(_shadowed_calls(None, None)))
def test_a_trailing_catch_all_is_accepted_and_means_the_rest(entry):
    """The README's {'.*kernel': λ, '.*': 0.0}: '.*' takes nothing here, on purpose; accepted."""
    p = linen_params()
    _shadowed_calls(p, {".*kernel": 1e-3, ".*": 0.0})[entry]()
    w = p["params"]
    want = (
        1e-3
        / 2
        * sum(float(np.sum(np.asarray(w[k]["kernel"], np.float64) ** 2)) for k in ("Dense_0", "Dense_1"))
    )
    got = jaxl2.l2_penalty(p, {".*Dense_0.*": 1e-3, ".*kernel": 1e-3, ".*": 0.0})
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.mark.parametrize(
    "l2, select_, match",
    [
        (-1.0, None, r"l2 must be a finite number >= 0 \(a float or a 0-d array\), got -1.0 \(float\)"),
        (float("nan"), None, r"l2 must be a finite number >= 0 .*, got nan \(float\)"),
        (float("inf"), None, r"l2 must be a finite number >= 0 .*, got inf \(float\)"),
        ("abc", None, r"l2 must be a finite number >= 0"),
        ({".*Dense_0/kernel": 0.1}, None, r"'params/Dense_1/kernel' matches no l2 pattern.*catch-all"),
        ({"Dense_[0": 0.1}, None, r"l2 pattern 'Dense_\[0' is not a valid regular expression"),
        (
            {"nomatch": 0.1, ".*": 0.1},
            None,
            r"l2 pattern 'nomatch' matches no selected parameter.*Dense_0/kernel",
        ),
        ({".*bias": 0.1, ".*": 0.1}, None, r"l2 pattern '\.\*bias' matches no selected parameter"),
        ({".*": 0.1, ".*Dense_1.*": 0.2}, None, r"^l2 pattern '\.\*Dense_1\.\*' never applies"),
        ({".*": -0.5}, None, r"l2\['\.\*'\] must be a finite number >= 0 .*, got -0.5 \(float\)"),
        ({}, None, r"l2 mapping is empty"),
        (
            0.1,
            "embedding",
            r"select='embedding' matched no parameter; the paths that exist are: params/Dense_0/bias",
        ),
        (0.1, "Dense_[", r"select pattern 'Dense_\[' is not a valid regular expression"),
        (0.1, lambda path, leaf: False, r"matched no parameter"),
        (0.1, 42, r"select must be None \(kernels\), a regex string or a predicate"),
    ],
)
def test_errors_name_the_cause(l2, select_, match):
    with pytest.raises(ValueError, match=match):
        jaxl2.l2_penalty(linen_params(), l2, select=select_)


W = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.5]])


@pytest.mark.parametrize(
    "lam",
    [
        2,
        0,
        0.3,
        np.float32(0.3),
        np.float64(0.3),
        np.int64(2),
        np.array(0.3),
        jnp.array(0.3),
        jnp.array(2),
        jnp.asarray(0.3, jnp.bfloat16),
    ],
    ids=repr,
)
def test_l2_accepts_real_scalars_and_0d_arrays(lam):
    expected = float(lam) / 2 * float(np.sum(W**2))  # NumPy float64 by hand
    pen = jaxl2.l2_penalty({"d": {"kernel": jnp.asarray(W, jnp.float32)}}, lam)
    assert float(pen) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "lam, shown",
    [
        ("1e-3", r"'1e-3' \(str\)"),
        (b"1e-3", r"b'1e-3' \(bytes\)"),
        (True, r"True \(bool\)"),
        (np.bool_(True), r"\(bool_?\)"),
        (None, r"None \(NoneType\)"),
        (1e-3 + 0j, r"\(complex\)"),
        (np.complex64(1e-3), r"\(complex64\)"),
        (np.array([1e-3]), r"\(ndarray\)"),
        (jnp.ones(2), r"\(ArrayImpl\)"),
        (jnp.array(-1.0), r"\(ArrayImpl\)"),
        (np.array(np.inf), r"\(ndarray\)"),
        (jnp.array(True), r"\(ArrayImpl\)"),
    ],
    ids=repr,
)
def test_l2_refuses_non_numbers(lam, shown):
    params = {"d": {"kernel": jnp.asarray(W)}}
    with pytest.raises(
        jaxl2.Jaxl2Error, match=r"^l2 must be a finite number >= 0 \(a float or a 0-d array\), got .*" + shown
    ):
        jaxl2.l2_penalty(params, lam)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"^l2\['\.\*'\] must be a finite number >= 0"):
        jaxl2.l2_penalty(params, {".*": lam})
    with pytest.raises(jaxl2.Jaxl2Error, match=r"^l2 must be a finite number >= 0"):
        jaxl2.regularized(lambda p: 0.0, lam)


def test_l2_string_message_in_full():
    with pytest.raises(jaxl2.Jaxl2Error) as e:
        jaxl2.l2_penalty({"d": {"kernel": jnp.asarray(W)}}, "1e-3")
    assert str(e.value) == "l2 must be a finite number >= 0 (a float or a 0-d array), got '1e-3' (str)"


@pytest.mark.parametrize(
    "l2, select_, match",
    [
        ({}, None, r"l2 mapping is empty"),
        ({1: 0.1}, None, r"l2 mapping keys must be regex strings, got 1 \(int\)"),
        ({"Dense_[0": 0.1}, None, r"l2 pattern 'Dense_\[0' is not a valid regular expression"),
        ({".*": -1.0}, None, r"l2\['\.\*'\] must be a finite number >= 0"),
        ({".*": "1e-3"}, None, r"l2\['\.\*'\] must be a finite number >= 0 .*'1e-3' \(str\)"),
        ({".*Dense_0/kernel": 0.1, ".*": None}, None, r"l2\['\.\*'\] must be a finite number >= 0"),
        (0.1, 42, r"select must be None \(kernels\), a regex string or a predicate"),
    ],
)
def test_regularized_checks_the_mapping_when_wrapping(l2, select_, match):
    calls = []

    def data_loss(params):
        calls.append(1)
        return 0.0

    with pytest.raises(jaxl2.Jaxl2Error, match=match):
        jaxl2.regularized(data_loss, l2, select=select_)
    assert not calls


def test_regularized_pattern_that_matches_nothing_fails_at_the_call():
    """Which paths exist is known only with the params: that check stays at call time."""
    loss = jaxl2.regularized(lambda p: 0.0, {"nomatch": 0.1, ".*": 0.1})
    with pytest.raises(jaxl2.Jaxl2Error, match=r"l2 pattern 'nomatch' matches no selected parameter"):
        loss(linen_params())


def test_no_float_leaves_is_an_error():
    with pytest.raises(jaxl2.Jaxl2Error, match=r"no floating-point leaves"):
        jaxl2.l2_penalty({"w": jnp.arange(3)}, 0.1)


def test_a_selected_integer_leaf_is_an_error_naming_it():
    """An int8 'kernel' (a quantized layer) would be silently skipped; it is named instead."""
    p = {"q": {"kernel": jnp.ones((2, 2), jnp.int8)}, "d": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(
        jaxl2.Jaxl2Error, match=r"names 'q/kernel', an array of dtype int8: only floating-point"
    ):
        jaxl2.l2_penalty(p, 0.1)
    assert float(jaxl2.l2_penalty(p, 0.1, select="d/.*")) == pytest.approx(0.2)


def test_regularized_checks_l2_and_regex_up_front():
    with pytest.raises(ValueError, match="got -1"):
        jaxl2.regularized(lambda p: 0.0, -1.0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        jaxl2.regularized(lambda p: 0.0, 0.1, select="(")


def test_select_by_regex_and_predicate():
    p = linen_params()
    by_rx = jaxl2.selected(p, select=r"params/Dense_\d+/(kernel|bias)")
    assert [r.path for r in by_rx] == [
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
    ]
    by_pred = jaxl2.selected(p, select=lambda path, leaf: leaf.ndim == 1 and "LayerNorm" in path)
    assert [r.path for r in by_pred] == ["params/LayerNorm_0/bias", "params/LayerNorm_0/scale"]
    ln = p["params"]["LayerNorm_0"]
    expected = np_penalty([ln["bias"], ln["scale"]], 2.0)
    pen = jaxl2.l2_penalty(p, 2.0, select=lambda path, leaf: "LayerNorm" in path)
    assert float(pen) == pytest.approx(expected, rel=1e-6)


def test_selected_prints_a_table():
    table = str(jaxl2.selected(linen_params(), 1e-3))
    lines = table.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "λ"]
    assert lines[2].split() == ["params/Dense_0/kernel", "4×5", "float32", "0.001"]
    assert lines[3].split() == ["params/Dense_1/kernel", "5×3", "float32", "0.001"]


def test_traced_l2_under_jit_and_vmap():
    p = linen_params()
    k = [p["params"]["Dense_0"]["kernel"], p["params"]["Dense_1"]["kernel"]]
    lams = jnp.array([0.0, 0.1, 1.0])
    pens = jax.jit(jax.vmap(lambda lam: jaxl2.l2_penalty(p, lam)))(lams)
    np.testing.assert_allclose(pens, [np_penalty(k, float(lam)) for lam in lams], rtol=1e-6)
    # a traced λ is not value-checked (it cannot be), but a concrete bad one is
    assert np.isnan(float(jax.jit(lambda lam: jaxl2.l2_penalty(p, lam))(jnp.nan)))


def test_regularized_gradient_is_data_gradient_plus_lambda_w():
    p = linen_params()

    def data_loss(params, x):
        return jnp.sum(jnp.sin(jnp.asarray(x) @ params["params"]["Dense_0"]["kernel"]))

    x = jnp.linspace(-1, 1, 8).reshape(2, 4)
    lam = 0.2
    g_data = jax.grad(data_loss)(p, x)
    g_reg = jax.grad(jaxl2.regularized(data_loss, lam))(p, x)
    for (path, w), (_, gd), (_, gr) in zip(select.leaves(p), select.leaves(g_data), select.leaves(g_reg)):
        extra = lam * np.asarray(w) if path.endswith("kernel") else 0.0
        np.testing.assert_allclose(gr, np.asarray(gd) + extra, rtol=1e-6, atol=1e-7)


def test_regularized_has_aux():
    p = linen_params()

    def loss_fn(params, x):
        return jnp.float32(1.5), {"acc": 0.5}

    total, aux = jaxl2.regularized(loss_fn, 0.1, has_aux=True)(p, None)
    assert float(aux["data_loss"]) == 1.5 and aux["acc"] == 0.5
    assert float(total) == pytest.approx(1.5 + float(aux["penalty"]), rel=1e-6)
    assert float(aux["penalty"]) == pytest.approx(float(jaxl2.l2_penalty(p, 0.1)), rel=1e-6)
    _, aux2 = jaxl2.regularized(lambda params: (jnp.float32(0), 7), 0.1, has_aux=True)(p)
    assert aux2["aux"] == 7


def test_jitted_loss_does_not_recompile_on_new_params():
    traces = []

    def data_loss(params, x):
        traces.append(1)
        return jnp.mean(x @ params["params"]["Dense_0"]["kernel"])

    loss = jax.jit(jaxl2.regularized(data_loss, 1e-3))
    x = jnp.ones((2, 4))
    p1 = linen_params()
    p2 = jax.tree_util.tree_map(lambda a: a * 2, p1)
    a, b = loss(p1, x), loss(p2, x)
    assert len(traces) == 1
    assert loss._cache_size() == 1
    assert float(a) != float(b)


def test_regularized_refuses_a_loss_fn_that_is_not_callable():
    with pytest.raises(jaxl2.Jaxl2Error) as e:
        jaxl2.regularized(5, 1e-3)
    assert str(e.value) == "loss_fn must be callable, a function loss_fn(params, *args) -> loss, got 5 (int)"
    with pytest.raises(jaxl2.Jaxl2Error, match=r"^loss_fn must be callable.*got None \(NoneType\)"):
        jaxl2.regularized(None, 1e-3, has_aux=True)
    with pytest.raises(jaxl2.Jaxl2Error) as e:  # regularized(params, loss_fn)
        jaxl2.regularized(big_params(), lambda p: 0.0)
    assert str(e.value) == (
        "loss_fn must be callable, a function loss_fn(params, *args) -> loss, got a pytree (dict) of "
        "2,000 arrays: are the arguments swapped?"
    )


@pytest.mark.parametrize("flag", ["yes", "False", 1, 0, None, np.array(True), jnp.array(False)], ids=repr)
def test_regularized_has_aux_must_be_a_bool(flag):
    with pytest.raises(jaxl2.Jaxl2Error, match=r"^has_aux must be True or False, got .* \(\w+\)$"):
        jaxl2.regularized(lambda p: (0.0, {}), 1e-3, has_aux=flag)


def test_regularized_has_aux_message_in_full_and_numpy_bools_accepted():
    with pytest.raises(jaxl2.Jaxl2Error) as e:
        jaxl2.regularized(lambda p: (0.0, {}), 1e-3, has_aux="yes")
    assert str(e.value) == "has_aux must be True or False, got 'yes' (str)"
    p = {"d": {"kernel": jnp.asarray(W)}}
    total, aux = jaxl2.regularized(lambda q: (jnp.float32(1.0), {}), 0.5, has_aux=np.bool_(True))(p)
    assert float(total) == pytest.approx(1.0 + np_penalty([W], 0.5), rel=1e-6)
    assert float(jaxl2.regularized(lambda q: jnp.float32(1.0), 0.5, has_aux=np.bool_(False))(p)) == float(
        total
    )


@pytest.mark.parametrize(
    "out, shown",
    [
        (jnp.float32(1.0), "an ArrayImpl of dtype float32 and shape ()"),
        (1.0, "a float"),
        ((jnp.float32(1.0), {}, 3), "a tuple of length 3"),
        ([jnp.float32(1.0)], "a list of length 1"),
    ],
    ids=repr,
)
def test_has_aux_loss_that_does_not_return_a_pair_is_a_jaxl2error(out, shown):
    p = {"d": {"kernel": jnp.asarray(W)}}
    loss = jaxl2.regularized(lambda q: out, 1e-3, has_aux=True)
    with pytest.raises(jaxl2.Jaxl2Error) as e:
        loss(p)
    hint = " (a loss_fn that returns the loss alone needs has_aux=False)" if "length" not in shown else ""
    assert str(e.value) == f"with has_aux=True, loss_fn must return (loss, aux); it returned {shown}{hint}"


def test_has_aux_loss_that_returns_a_scalar_fails_the_same_under_jit_and_grad():
    p = {"d": {"kernel": jnp.asarray(W)}}
    loss = jaxl2.regularized(lambda q: jnp.sum(q["d"]["kernel"]), 1e-3, has_aux=True)
    for call in (jax.jit(loss), jax.grad(loss, has_aux=True)):
        with pytest.raises(jaxl2.Jaxl2Error, match=r"^with has_aux=True, loss_fn must return \(loss, aux\)"):
            call(p)


@pytest.mark.parametrize("key", ["data_loss", "penalty"])
def test_has_aux_mapping_that_already_has_an_added_key_is_an_error(key):
    p = {"d": {"kernel": jnp.asarray(W)}}
    loss = jaxl2.regularized(lambda q: (jnp.float32(1.0), {key: 7.0, "acc": 0.5}), 1e-3, has_aux=True)
    with pytest.raises(jaxl2.Jaxl2Error, match=rf"^loss_fn's aux already has a '{key}' entry"):
        loss(p)
    # other keys pass through untouched, next to the two that are added
    ok = jaxl2.regularized(lambda q: (jnp.float32(1.0), {"acc": 0.5}), 0.5, has_aux=True)
    total, aux = ok(p)
    assert sorted(aux) == ["acc", "data_loss", "penalty"]
    assert float(aux["penalty"]) == pytest.approx(np_penalty([W], 0.5), rel=1e-6)
    assert float(total) == pytest.approx(1.0 + np_penalty([W], 0.5), rel=1e-6)


@pytest.mark.parametrize(
    "returned, shown",
    [
        ("no", r"'no' \(str\)"),
        ("", r"'' \(str\)"),
        (1, r"1 \(int\)"),
        (None, r"None \(NoneType\)"),
        (jnp.array(True), r"\(ArrayImpl\)"),
        (np.array(True), r"\(ndarray\)"),
    ],
    ids=repr,
)
def test_select_predicate_must_return_a_bool(returned, shown):
    p = linen_params()

    def pred(path, leaf):
        return returned

    calls = {
        "l2_penalty": lambda: jaxl2.l2_penalty(p, 1e-3, select=pred),
        "selected": lambda: jaxl2.selected(p, select=pred),
        "coefficients": lambda: jaxl2.coefficients(p, 1e-3, select=pred),
        "regularized": lambda: jaxl2.regularized(lambda q: 0.0, 1e-3, select=pred)(p),
        "mask": lambda: select.mask(p, select=pred),
    }
    for name, call in calls.items():
        with pytest.raises(jaxl2.Jaxl2Error, match=r"^select predicate returned (.* )?" + shown) as e:
            call()
        assert "for path 'params/Dense_0/bias'; it must return True or False" in str(e.value), name


def test_select_predicate_message_in_full_and_numpy_bools_accepted():
    p = {"params": {"Dense_0": {"kernel": jnp.asarray(W)}}}
    with pytest.raises(jaxl2.Jaxl2Error) as e:
        jaxl2.l2_penalty(p, 1e-3, select=lambda path, leaf: "no")
    assert str(e.value) == (
        "select predicate returned 'no' (str) for path 'params/Dense_0/kernel'; it must return True or False"
    )
    pen = jaxl2.l2_penalty(p, 0.5, select=lambda path, leaf: np.bool_(leaf.ndim == 2))
    assert float(pen) == pytest.approx(np_penalty([W], 0.5), rel=1e-6)


@pytest.mark.parametrize("fn", ["l2_penalty", "selected", "coefficients"])
def test_swapped_arguments_are_an_error_that_says_so(fn):
    p = {"d": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(
        jaxl2.Jaxl2Error, match=rf"^{fn}\(params, l2\) takes the params first.*arguments swapped\?$"
    ):
        getattr(jaxl2, fn)(1e-3, p)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"takes the params first, but got the number 0.5"):
        getattr(jaxl2, fn)(jnp.float32(0.5), p)


def test_a_loss_returning_loss_and_aux_without_has_aux_is_an_error_saying_which_flag():
    p = {"d": {"kernel": jnp.ones((2, 2))}}
    loss = jaxl2.regularized(lambda q: (jnp.sum(q["d"]["kernel"]), {"acc": 1.0}), 1e-3)
    for call in (loss, jax.jit(loss), jax.grad(loss)):
        with pytest.raises(jaxl2.Jaxl2Error, match=r"returned a tuple of length 2.*needs has_aux=True"):
            call(p)


def big_params(n=1000):
    """A pytree of 2·n arrays: what a large model's params look like in a message."""
    return {f"layer_{i}": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)} for i in range(n)}


@pytest.mark.parametrize("lam", [jnp.array([1e-3]), jnp.ones(3)], ids=["shape-1", "shape-3"])
@pytest.mark.parametrize("fn", ["l2_penalty", "regularized", "add_decayed_weights", "make_train_step"])
def test_a_traced_lambda_of_the_wrong_shape_is_refused_at_trace_time_as_outside_jit(fn, lam):
    import optax

    p = {"d": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}

    def call(l2):
        if fn == "l2_penalty":
            return jaxl2.l2_penalty(p, l2)
        if fn == "regularized":
            return jaxl2.regularized(lambda q: jnp.sum(q["d"]["bias"]), l2)(p)
        if fn == "add_decayed_weights":
            tx = jaxl2.add_decayed_weights(l2)
            return tx.update(p, tx.init(p), p)[0]
        step = jaxl2.make_train_step(lambda q: jnp.sum(q["d"]["bias"]), optax.sgd(0.1), l2=l2)
        return step(p, step.init(p))[0]

    shape = ", ".join(map(str, lam.shape)) + ","
    said = rf"^l2 must be a finite number >= 0 \(a float or a 0-d array\), got an array of dtype float32 and shape \({shape}\)"
    with pytest.raises(jaxl2.Jaxl2Error, match=said + r" \(ArrayImpl\)"):
        call(lam)
    with pytest.raises(jaxl2.Jaxl2Error, match=said + r" \(traced\)"):
        jax.jit(call)(lam)


def test_a_traced_scalar_lambda_is_still_taken_unchecked():
    p = {"d": {"kernel": jnp.ones((2, 2))}}
    assert float(jax.jit(lambda lam: jaxl2.l2_penalty(p, lam))(jnp.float32(0.5))) == 1.0  # 0.5/2·4
    assert (
        float(jax.jit(lambda lam: jaxl2.l2_penalty(p, lam))(jnp.float32(-1.0))) == -2.0
    )  # sign unknown at trace


@pytest.mark.parametrize(
    "call",
    [
        lambda big: jaxl2.l2_penalty({"d": {"kernel": jnp.ones(2)}}, big),
        lambda big: jaxl2.selected({"d": {"kernel": jnp.ones(2)}}, big),
        lambda big: jaxl2.coefficients({"d": {"kernel": jnp.ones(2)}}, big),
        lambda big: jaxl2.regularized(lambda p: 0.0, big),
        lambda big: jaxl2.add_decayed_weights(big),
        lambda big: jaxl2.l2_penalty({"d": {"kernel": jnp.ones(2)}}, {"rules": big}),
        lambda big: jaxl2.l2_penalty({"d": {"kernel": jnp.ones(2)}}, [big]),
    ],
    ids=[
        "l2_penalty",
        "selected",
        "coefficients",
        "regularized",
        "add_decayed_weights",
        "in-mapping",
        "list",
    ],
)
def test_params_where_lambda_goes_are_summarised_and_called_swapped(call):
    with pytest.raises(jaxl2.Jaxl2Error) as e:
        call(big_params())
    assert len(str(e.value)) < 400
    assert "a pytree (" in str(e.value) and "2,000 arrays" in str(e.value)
    assert "are the arguments swapped?" in str(e.value)


def test_an_optimizer_where_params_go_is_called_swapped():
    import optax

    tx = optax.adamw(1e-3, weight_decay=1e-2)
    for call in (
        lambda: jaxl2.mask(tx),
        lambda: jaxl2.l2_penalty(tx, 1e-3),
        lambda: jaxl2.audit(big_params(), tx),
    ):
        with pytest.raises(jaxl2.Jaxl2Error, match=r"are the arguments swapped\?$") as e:
            call()
        assert len(str(e.value)) < 400


def test_a_path_mapping_is_taken_as_it_is_without_regex_escaping():
    stack = {
        "blocks": {"kernel": jnp.stack([jnp.ones((2, 2)), 2 * jnp.ones((2, 2))])},
        "head": {"kernel": jnp.asarray(W)},
    }
    by_path = {"blocks/kernel[1]": 0.5, "blocks/kernel[0]": 0.25, "head/kernel": 0.1}
    got = float(jaxl2.l2_penalty(stack, by_path, stacked={"blocks/kernel": 0}))
    assert got == pytest.approx(0.25 / 2 * 4 + 0.5 / 2 * 16 + np_penalty([W], 0.1), rel=1e-6)
    assert [r.l2 for r in jaxl2.selected(stack, by_path, stacked={"blocks/kernel": 0})] == [0.25, 0.5, 0.1]


# -------------------- center= (L2-SP) --------------------
# L2-SP, center=w₀: l2_penalty, regularized, selected and gradcheck against NumPy float64 hand math.


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
        lambda: jaxl2.add_decayed_weights(0.1, center=center).init(p),
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


def test_messages_that_list_paths_name_a_dozen_of_a_large_model_and_count_the_rest():
    params = big_params()  # 2,000 leaves
    kernels = {f"layer{i}": {"kernel": jnp.ones((2, 2))} for i in range(2000)}
    cases = [
        lambda: jaxl2.l2_penalty(params, 1e-3, select="nothing/.*"),  # the paths that exist
        lambda: jaxl2.l2_penalty(kernels, {"typo/kernel": 1e-3}),  # the selected paths
        lambda: jaxl2.l2_penalty(kernels, 1e-3, stacked={"typo": 0}),
    ]
    for case in cases:
        with pytest.raises(jaxl2.Jaxl2Error) as e:
            case()
        assert len(str(e.value)) < 800 and "… and 1,988 more" in str(e.value), str(e.value)[:300]


# -- property tests: the penalty on random pytrees ------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)
dtypes = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float64])


@st.composite
def pytrees(draw, depth=0):
    """Nested dicts/lists whose leaves are arrays of random shape and float dtype."""
    if depth >= 3 or draw(st.booleans()) and depth > 0:
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
        seed = draw(st.integers(0, 2**16))
        return ("leaf", shape, draw(dtypes), seed)
    if draw(st.booleans()):
        keys = draw(st.lists(names, min_size=1, max_size=3, unique=True))
        return {k: draw(pytrees(depth + 1)) for k in keys}
    return [draw(pytrees(depth + 1)) for _ in range(draw(st.integers(1, 3)))]


def materialize(spec):
    def build(s):
        if isinstance(s, tuple) and s and s[0] == "leaf":
            _, shape, dtype, seed = s
            return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)
        if isinstance(s, dict):
            return {k: build(v) for k, v in s.items()}
        return [build(v) for v in s]

    return build(spec)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# λ from 1e-6: XLA on CPU flushes subnormal products (λ·w below ~1e-38) to zero.
@given(spec=pytrees(), lam=st.one_of(st.just(0.0), st.floats(1e-6, 10)), pick=st.integers(0, 2**16))
def test_penalty_and_gradient_properties(spec, lam, pick):
    with jax.enable_x64(True):
        params = materialize(spec)
        leaves = select.leaves(params)
        paths = [p for p, _ in leaves]
        chosen = {p for i, p in enumerate(paths) if (pick >> (i % 16)) & 1}
        pred = lambda path, leaf: path in chosen  # noqa: E731
        if not chosen:
            with pytest.raises(ValueError, match="matched no parameter"):
                jaxl2.l2_penalty(params, lam, select=pred)
            return
        expected = sum(lam / 2 * np.sum(np.asarray(w, np.float64) ** 2) for p, w in leaves if p in chosen)
        pen = jaxl2.l2_penalty(params, lam, select=pred)
        assert float(pen) == pytest.approx(expected, rel=1e-5, abs=1e-12)
        assert pen.dtype in (jnp.float32, jnp.float64)
        grads = jax.grad(lambda q: jaxl2.l2_penalty(q, lam, select=pred))(params)
        for (path, w), (_, g) in zip(leaves, select.leaves(grads)):
            assert g.dtype == w.dtype
            if path in chosen:
                want = (
                    (lam * np.asarray(w, np.float64)).astype(np.asarray(w).dtype)
                    if w.dtype != jnp.bfloat16
                    else np.asarray(
                        (jnp.asarray(lam, jnp.float32) * w.astype(jnp.float32)).astype(jnp.bfloat16)
                    )
                )
                np.testing.assert_allclose(
                    np.asarray(g, np.float64),
                    np.asarray(want, np.float64),
                    rtol=2e-7 if w.dtype == jnp.float32 else 1e-15,
                )
            else:
                assert not np.asarray(g, np.float64).any()
