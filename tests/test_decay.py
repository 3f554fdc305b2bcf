"""jaxl2.add_decayed_weights against optax's own transforms and hand math; coefficients against the
penalty; jaxl2.audit against hand math and hand-written accumulation loops."""

import collections

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import jaxl2
from jaxl2 import select
from jaxl2.decay import Audit, AuditRow, add_decayed_weights, audit
from jaxl2.penalty import coefficients
from tests.test_conventions import problem


def mask_where(params, keep):
    """A bool tree, built by hand from the dict keys: ``keep(layer, name)``."""
    return {layer: {name: keep(layer, name) for name in leaves} for layer, leaves in params.items()}


def run(tx, loss, params, *batch, steps=8):
    """``steps`` jitted steps of ``tx`` on ``jax.grad(loss)``."""

    @jax.jit
    def step(params, state):
        g = jax.grad(loss)(params, *batch)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    (la, ta), (lb, tb) = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=str(path))


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("l2", [0.05, {".*Dense_0.*": 0.1, ".*": 0.01}], ids=["one-lambda", "per-layer"])
@pytest.mark.parametrize("centered", [False, True], ids=["zero", "center"])
def test_coupled_decay_before_the_optimizer_is_l2_in_the_loss(opt, l2, centered):
    """chain(add_decayed_weights(λ), opt) on the data loss == opt on jaxl2.regularized(loss, λ)."""
    params, data_loss, x, y = problem()
    center = jax.tree_util.tree_map(lambda a: 0.5 - a, params) if centered else None
    via_loss = run(OPTIMIZERS[opt](), jaxl2.regularized(data_loss, l2, center=center), params, x, y)
    tx = optax.chain(add_decayed_weights(l2, center=center), OPTIMIZERS[opt]())
    via_tx = run(tx, data_loss, params, x, y)
    plain = run(OPTIMIZERS[opt](), data_loss, params, x, y)
    assert max_diff(via_loss, plain) > 1e-3  # the decay did something
    assert_trees_close(via_tx, via_loss)


def test_decoupled_decay_between_scale_by_adam_and_the_lr_is_adamw():
    params, data_loss, x, y = problem(1)
    lr, wd = 1e-2, 0.3
    kernels = mask_where(params, lambda layer, name: name == "kernel")
    adamw = run(optax.adamw(lr, weight_decay=wd, mask=kernels), data_loss, params, x, y, steps=20)
    ours = run(
        optax.chain(
            optax.scale_by_adam(),
            add_decayed_weights(wd, select=r".*/kernel"),
            optax.scale_by_learning_rate(lr),
        ),
        data_loss,
        params,
        x,
        y,
        steps=20,
    )
    assert max_diff(adamw, run(optax.adam(lr), data_loss, params, x, y, steps=20)) > 1e-3
    assert_trees_close(ours, adamw)


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_per_layer_rules_equal_a_hand_built_chain_of_masked_optax_decays(opt):
    params, data_loss, x, y = problem(2)
    rules = collections.OrderedDict([(".*Dense_0.*", 1e-2), (".*", 1e-3)])
    dense0 = mask_where(params, lambda layer, name: layer == "Dense_0" and name == "kernel")
    others = mask_where(params, lambda layer, name: layer != "Dense_0" and name == "kernel")
    by_hand = optax.chain(
        optax.add_decayed_weights(1e-2, mask=dense0),
        optax.add_decayed_weights(1e-3, mask=others),
        OPTIMIZERS[opt](),
    )
    ours = optax.chain(add_decayed_weights(rules), OPTIMIZERS[opt]())
    assert_trees_close(run(ours, data_loss, params, x, y), run(by_hand, data_loss, params, x, y))
    # decoupled, with per-layer rates: the same two masked decays between Adam and the lr
    decoupled_by_hand = optax.chain(
        optax.scale_by_adam(),
        optax.add_decayed_weights(1e-2, mask=dense0),
        optax.add_decayed_weights(1e-3, mask=others),
        optax.scale_by_learning_rate(1e-2),
    )
    decoupled = optax.chain(
        optax.scale_by_adam(), add_decayed_weights(rules), optax.scale_by_learning_rate(1e-2)
    )
    assert_trees_close(
        run(decoupled, data_loss, params, x, y), run(decoupled_by_hand, data_loss, params, x, y)
    )


def test_center_moves_w_by_minus_lr_lambda_w_minus_w0():
    params, *_ = problem(3)
    center = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a) * -0.5 + 1.0, a.dtype), params)
    lr, lam = 0.1, 0.4
    tx = optax.chain(add_decayed_weights(lam, center=center), optax.sgd(lr))
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for layer in params:
        w, w0 = (
            np.asarray(params[layer]["kernel"], np.float64),
            np.asarray(center[layer]["kernel"], np.float64),
        )
        np.testing.assert_allclose(new[layer]["kernel"], w - lr * lam * (w - w0), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(new[layer]["bias"], params[layer]["bias"])  # not selected


def test_unselected_updates_pass_through_bit_for_bit():
    params, *_ = problem(4)
    g = jax.tree_util.tree_map(lambda a: jnp.sin(a) * 1e-3, params)
    tx = add_decayed_weights(0.5)
    updates, state = tx.update(g, tx.init(params), params)
    assert state == optax.EmptyState()
    for layer in params:
        assert updates[layer]["bias"].tobytes() == g[layer]["bias"].tobytes()
        expected = np.asarray(g[layer]["kernel"], np.float64) + 0.5 * np.asarray(
            params[layer]["kernel"], np.float64
        )
        np.testing.assert_allclose(updates[layer]["kernel"], expected, rtol=1e-6, atol=1e-8)


def test_bfloat16_params_keep_their_dtype():
    rng = np.random.default_rng(5)
    params = {"d": {"kernel": jnp.asarray(rng.normal(size=(8, 8)) + 2, jnp.bfloat16)}}
    zero = {"d": {"kernel": jnp.zeros((8, 8), jnp.bfloat16)}}
    tx = add_decayed_weights(0.25)
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    u = updates["d"]["kernel"]
    assert u.dtype == jnp.bfloat16
    w = np.asarray(params["d"]["kernel"].astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(u.astype(jnp.float32)), 0.25 * w, rtol=2**-8)


def test_traced_lambda_under_vmap():
    params, *_ = problem(6)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    lams = jnp.array([0.0, 0.1, 2.0])

    def kernel_after_one_sgd_step(lam):
        tx = optax.chain(add_decayed_weights(lam), optax.sgd(0.5))
        updates, _ = tx.update(zero, tx.init(params), params)
        return optax.apply_updates(params, updates)["Dense_1"]["kernel"]

    out = jax.jit(jax.vmap(kernel_after_one_sgd_step))(lams)
    w = np.asarray(params["Dense_1"]["kernel"], np.float64)
    for got, lam in zip(out, np.asarray(lams, np.float64)):
        np.testing.assert_allclose(got, w - 0.5 * lam * w, rtol=1e-6, atol=1e-7)


def test_jitted_step_does_not_recompile():
    params, data_loss, x, y = problem(7)
    tx = optax.chain(add_decayed_weights({".*Dense_0.*": 1e-2, ".*": 1e-3}), optax.adam(1e-3))
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = tx.update(jax.grad(data_loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    p1, state = step(params, state)
    p2, state = step(p1, state)
    assert len(traces) == 1 and step._cache_size() == 1
    assert max_diff(p1, p2) > 0


def test_linen_params_with_the_outer_params_key():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))

    variables = Net().init(jax.random.key(0), jnp.ones((1, 4)))
    x = jnp.linspace(-1, 1, 12).reshape(3, 4)

    def data_loss(v, x):
        return jnp.mean(Net().apply(v, x) ** 2)

    rules = {".*Dense_0.*": 0.2, ".*": 0.05}
    via_loss = run(optax.sgd(0.1, momentum=0.9), jaxl2.regularized(data_loss, rules), variables, x)
    via_tx = run(
        optax.chain(add_decayed_weights(rules), optax.sgd(0.1, momentum=0.9)), data_loss, variables, x
    )
    assert_trees_close(via_tx, via_loss)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(6, 2, rngs=rngs)])

    def __call__(self, x):
        return self.layers[0](jnp.tanh(self.l1(x)))


def test_nnx_state_from_split():
    graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param)
    x = jnp.linspace(-1, 1, 12).reshape(3, 4)

    def data_loss(s, x):
        return jnp.mean(nnx.merge(graphdef, s)(x) ** 2)

    via_loss = run(optax.adam(1e-2), jaxl2.regularized(data_loss, 0.1), state, x)
    via_tx = run(optax.chain(add_decayed_weights(0.1), optax.adam(1e-2)), data_loss, state, x)
    assert isinstance(via_tx, nnx.State)
    assert_trees_close(via_tx, via_loss)


def test_nnx_optimizer_inits_with_variables_and_updates_with_arrays():
    x = jnp.linspace(-1, 1, 12).reshape(3, 4)

    def data_loss(model, x):
        return jnp.mean(model(x) ** 2)

    def penalised(model, x):
        return data_loss(model, x) + jaxl2.l2_penalty(nnx.state(model, nnx.Param), 0.1)

    ours, ref = NnxNet(nnx.Rngs(0)), NnxNet(nnx.Rngs(0))
    opt = nnx.Optimizer(
        ours, optax.chain(add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9)), wrt=nnx.Param
    )
    opt_ref = nnx.Optimizer(ref, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    for _ in range(3):
        opt.update(ours, nnx.grad(data_loss)(ours, x))
        opt_ref.update(ref, nnx.grad(penalised)(ref, x))
    assert_trees_close(nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param))


def test_equinox_filtered_module():
    model = eqx.nn.MLP(3, 2, 8, 2, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    x = jnp.linspace(-1, 1, 15).reshape(5, 3)

    def data_loss(p, x):
        return jnp.mean(jax.vmap(eqx.combine(p, static))(x) ** 2)

    pretrained = eqx.filter(eqx.nn.MLP(3, 2, 8, 2, activation=jnp.tanh, key=jax.random.key(1)), eqx.is_array)
    kw = dict(select=select.equinox, center=pretrained)
    via_loss = run(optax.sgd(0.1, momentum=0.9), jaxl2.regularized(data_loss, 0.2, **kw), params, x)
    via_tx = run(
        optax.chain(add_decayed_weights(0.2, **kw), optax.sgd(0.1, momentum=0.9)), data_loss, params, x
    )
    assert_trees_close(via_tx, via_loss)
    assert via_tx.layers[0].bias is not None and jax.tree.structure(via_tx) == jax.tree.structure(params)


def test_update_without_params_is_an_error():
    params, *_ = problem()
    tx = add_decayed_weights(1e-3)
    state = tx.init(params)
    with pytest.raises(
        jaxl2.Jaxl2Error, match=r"params must be given .* call tx\.update\(updates, state, params\)"
    ):
        tx.update(params, state)
    chained = optax.chain(add_decayed_weights(1e-3), optax.sgd(0.1))
    with pytest.raises(jaxl2.Jaxl2Error, match=r"params must be given"):
        chained.update(params, chained.init(params))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"l2": 0.1, "select": "nomatch"},
            r"select='nomatch' matched no parameter; the paths that exist are",
        ),
        ({"l2": 0.1, "select": select.haiku}, r"matched no parameter.*Dense_0/kernel"),
        ({"l2": {"nomatch": 0.1, ".*": 0.1}}, r"l2 pattern 'nomatch' matches no selected parameter"),
        ({"l2": {".*Dense_0.*": 0.1}}, r"'Dense_1/kernel' matches no l2 pattern"),
        (
            {"l2": 0.1, "center": {"Dense_0": {"kernel": jnp.ones((6, 4))}}},
            r"center must have the structure of params .* at 'Dense_0/bias' and center has no leaf there",
        ),
        (
            {"l2": 0.1, "center": jax.tree_util.tree_map(lambda a: a.T, problem()[0])},
            r"at 'Dense_0/kernel' center has shape \(4, 6\) and params \(6, 4\)",
        ),
    ],
)
def test_what_matches_nothing_fails_at_init(kwargs, match):
    params, *_ = problem()
    tx = add_decayed_weights(**kwargs)  # the paths are not known yet: no error here
    with pytest.raises(jaxl2.Jaxl2Error, match=match):
        tx.init(params)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"l2": -1.0}, r"^l2 must be a finite number >= 0 \(a float or a 0-d array\), got -1.0 \(float\)"),
        ({"l2": float("nan")}, r"^l2 must be a finite number >= 0 .*got nan"),
        ({"l2": "1e-3"}, r"^l2 must be a finite number >= 0 .*'1e-3' \(str\)"),
        ({"l2": None}, r"^l2 must be a finite number >= 0 .*None \(NoneType\)"),
        ({"l2": {}}, r"^l2 mapping is empty"),
        ({"l2": {".*": -0.5}}, r"^l2\['\.\*'\] must be a finite number >= 0"),
        ({"l2": {"Dense_[0": 0.1}}, r"^l2 pattern 'Dense_\[0' is not a valid regular expression"),
        ({"l2": 0.1, "select": 42}, r"^select must be None \(kernels\), a regex string or a predicate"),
        ({"l2": 0.1, "center": 0.0}, r"^center must be None or a pytree of arrays"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(jaxl2.Jaxl2Error, match=match):
        add_decayed_weights(**kwargs)


# coefficients: the per-leaf λ of the penalty, as a pytree


def np_half_sum(coeffs, params):
    """Σ c/2·Σw² over the array leaves, in float64."""
    total = 0.0
    for c, w in zip(jax.tree.leaves(coeffs), jax.tree.leaves(params)):
        if hasattr(w, "dtype"):
            total += float(c) / 2 * float(np.sum(np.asarray(w, np.float64) ** 2))
    return total


@pytest.mark.parametrize("l2", [0.3, {".*Dense_0.*": 0.1, ".*": 0.02}], ids=["one", "rules"])
def test_coefficients_agree_with_the_penalty(l2):
    params, *_ = problem(8)
    c = coefficients(params, l2)
    assert jax.tree.structure(c) == jax.tree.structure(params)
    lam0, lam1 = (0.3, 0.3) if not isinstance(l2, dict) else (0.1, 0.02)
    assert c == {"Dense_0": {"kernel": lam0, "bias": 0.0}, "Dense_1": {"kernel": lam1, "bias": 0.0}}
    assert float(jaxl2.l2_penalty(params, l2)) == pytest.approx(np_half_sum(c, params), rel=1e-6)
    g = jax.grad(lambda p: jaxl2.l2_penalty(p, l2))(params)
    for gl, cl, wl in zip(jax.tree.leaves(g), jax.tree.leaves(c), jax.tree.leaves(params)):
        np.testing.assert_allclose(gl, cl * np.asarray(wl, np.float64), rtol=1e-6, atol=1e-8)


def test_coefficients_keep_the_structure_of_nnx_and_equinox_params():
    state = nnx.state(NnxNet(nnx.Rngs(0)), nnx.Param)
    c = coefficients(state, 0.1)
    assert isinstance(c, nnx.State) and jax.tree.structure(c) == jax.tree.structure(state)
    assert {p: x for p, x in select.leaves(jax.tree.map(jnp.asarray, c))} == {
        "l1/bias": 0.0,
        "l1/kernel": 0.1,
        "layers/0/bias": 0.0,
        "layers/0/kernel": 0.1,
    }
    assert float(jaxl2.l2_penalty(state, 0.1)) == pytest.approx(np_half_sum(c, state), rel=1e-6)

    mlp = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=jax.random.key(0))
    whole = coefficients(mlp, 0.1, select=select.equinox)  # the activations are kept as they are
    assert jax.tree.structure(whole) == jax.tree.structure(mlp) and whole.activation is jnp.tanh
    assert [whole.layers[i].weight for i in range(2)] == [0.1, 0.1] and whole.layers[0].bias == 0.0
    filtered = eqx.filter(mlp, eqx.is_array)
    fc = coefficients(filtered, 0.1, select=select.equinox)
    assert jax.tree.structure(fc) == jax.tree.structure(filtered) and fc.activation is None
    assert float(jaxl2.l2_penalty(mlp, 0.1, select=select.equinox)) == pytest.approx(
        np_half_sum(fc, filtered), rel=1e-6
    )


def test_coefficients_give_zero_to_integer_arrays_and_pass_traced_lambdas():
    params = {"d": {"kernel": jnp.ones((2, 2)), "count": jnp.arange(3)}}
    assert coefficients(params, 0.5) == {"d": {"kernel": 0.5, "count": 0.0}}
    out = jax.jit(jax.vmap(lambda lam: coefficients(params, lam)["d"]["kernel"]))(jnp.array([0.1, 0.2]))
    np.testing.assert_allclose(out, [0.1, 0.2], rtol=1e-7)


@pytest.mark.parametrize(
    "l2, select_, match",
    [
        ({".*Dense_0/kernel": 0.1}, None, r"'Dense_1/kernel' matches no l2 pattern"),
        ({"nomatch": 0.1, ".*": 0.1}, None, r"l2 pattern 'nomatch' matches no selected parameter"),
        ({}, None, r"l2 mapping is empty"),
        (-1.0, None, r"l2 must be a finite number >= 0"),
        (0.1, "embedding", r"select='embedding' matched no parameter"),
    ],
)
def test_coefficients_raise_what_the_penalty_raises(l2, select_, match):
    params, *_ = problem()
    for fn in (coefficients, jaxl2.l2_penalty):
        with pytest.raises(jaxl2.Jaxl2Error, match=match):
            fn(params, l2, select=select_)


# -------------------- audit --------------------
# jaxl2.audit against hand math: adamw with a zero gradient gives update = −lr·wd·w
# (shrink lr·wd), add_decayed_weights(λ) before sgd(lr) gives shrink lr·λ.


KERNELS = {"Dense_0/kernel", "Dense_1/kernel"}


def params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    p = {
        "Dense_0": {"kernel": rng.normal(size=(4, 5)), "bias": rng.normal(size=5)},
        "LayerNorm_0": {"scale": 1 + 0.1 * rng.normal(size=5), "bias": rng.normal(size=5)},
        "Dense_1": {"kernel": rng.normal(size=(5, 3)), "bias": np.zeros(3)},  # a zero bias
    }
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), p)


def by_path(rows):
    return {r.path: r for r in rows}


def test_adamw_without_mask_decays_everything_and_flags_the_rest():
    lr, wd = 1e-3, 1e-2
    rows = audit(optax.adamw(lr, weight_decay=wd), params())
    assert isinstance(rows, Audit) and all(isinstance(r, AuditRow) for r in rows)
    assert [r.path for r in rows] == [p for p, _ in select.leaves(params())]
    for r in rows:
        assert r.decayed  # the zero bias too: a decay of 0 is 0, the audit still shows it
        assert r.shrink == pytest.approx(lr * wd, rel=1e-6)  # update = −lr·wd·w
        assert r.selected == (r.path in KERNELS)
        assert r.mismatch == (r.path not in KERNELS)
        assert r.note == ("" if r.path in KERNELS else "decayed but not selected")
    assert {r.path for r in rows.mismatches} == {
        "Dense_0/bias",
        "Dense_1/bias",
        "LayerNorm_0/bias",
        "LayerNorm_0/scale",
    }


def test_adamw_with_jaxl2_mask_has_no_mismatch():
    lr, wd = 1e-3, 1e-2
    p = params()
    rows = audit(optax.adamw(lr, weight_decay=wd, mask=jaxl2.select.mask(p)), p)
    assert rows.mismatches == []
    for r in rows:
        assert r.decayed == (r.path in KERNELS)
        assert r.shrink == (pytest.approx(lr * wd, rel=1e-6) if r.decayed else 0.0)


def test_inverted_mask_flags_kernels_and_biases():
    """transformers#11936: an inverted decay mask decayed the biases and LayerNorm and spared the
    kernels, silently; the audit flags every leaf."""
    p = params()
    inverted = jax.tree.map(lambda b: not b, jaxl2.select.mask(p))
    rows = by_path(audit(optax.adamw(1e-3, weight_decay=1e-2, mask=inverted), p))
    assert all(r.mismatch for r in rows.values())
    for path in KERNELS:
        assert not rows[path].decayed and rows[path].note == "selected but not decayed"
    for path in ("Dense_0/bias", "Dense_1/bias", "LayerNorm_0/scale"):
        assert rows[path].decayed and rows[path].note == "decayed but not selected"


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_add_decayed_weights_before_sgd_shrinks_by_lr_lambda(momentum):
    lr, lam = 0.1, 1e-3
    tx = optax.chain(optax.add_decayed_weights(lam), optax.sgd(lr, momentum=momentum))
    rows = audit(tx, params())
    for r in rows:
        assert r.decayed and r.shrink == pytest.approx(lr * lam, rel=1e-6)  # the first step: lr·λ
    assert {r.path for r in rows.mismatches} == {r.path for r in rows} - KERNELS


def test_plain_sgd_decays_nothing():
    rows = audit(optax.sgd(0.1), params())
    assert not any(r.decayed for r in rows)
    assert {r.path for r in rows.mismatches} == KERNELS  # L2 belongs in the loss then


def test_schedule_is_read_at_step_zero():
    wd = 1e-2
    sched = optax.linear_schedule(3e-3, 0.0, 100)
    rows = audit(optax.adamw(sched, weight_decay=wd, mask=jaxl2.select.mask(params())), params())
    assert by_path(rows)["Dense_0/kernel"].shrink == pytest.approx(3e-3 * wd, rel=1e-6)


def test_float64_shrink_is_lr_wd_to_rounding():
    with jax.enable_x64(True):
        lr, wd = 1e-3, 1e-2
        rows = audit(optax.adamw(lr, weight_decay=wd), params(jnp.float64))
        for r in rows:
            assert r.dtype == "float64"
            assert r.shrink == pytest.approx(lr * wd, rel=1e-13)


def test_bfloat16_decay_below_resolution_is_noted():
    """OneTrainer#996: in bf16, lr·wd = 1e-7 is far below half an ulp (2⁻⁸ relative), so
    w·(1 − 1e-7) rounds back to w and the decay does nothing."""
    p = params(jnp.bfloat16)
    rows = by_path(audit(optax.adamw(1e-3, weight_decay=1e-4, mask=jaxl2.select.mask(p)), p))
    k = rows["Dense_0/kernel"]
    assert k.decayed and not k.mismatch
    assert k.shrink == pytest.approx(1e-7, rel=1e-2)  # computed in bf16: a few ulps off
    assert "< eps(bfloat16)/2 = 0.00391" in k.note and "== w on 100% of entries" in k.note
    # the claim, checked by hand in NumPy: w·(1 − 1e-7), rounded to bf16, is w
    w = np.asarray(p["Dense_0"]["kernel"])
    np.testing.assert_array_equal((w.astype(np.float64) * (1 - 1e-7)).astype(ml_dtypes.bfloat16), w)
    assert ml_dtypes.finfo(ml_dtypes.bfloat16).eps / 2 == 2.0**-8
    assert rows["Dense_0/bias"].note == ""  # not decayed: nothing to warn about
    # the same optimizer on float32 weights: 1e-7 > eps(float32)/2 ≈ 6e-8, no warning
    f32 = by_path(audit(optax.adamw(1e-3, weight_decay=1e-4), params()))
    assert f32["Dense_0/kernel"].note == ""


class AuditNnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.ln = nnx.LayerNorm(4, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, rngs=rngs)


def test_nnx_state():
    lr, wd = 1e-3, 1e-2
    state = nnx.state(AuditNnxNet(nnx.Rngs(0)), nnx.Param)
    rows = audit(optax.adamw(lr, weight_decay=wd), state)
    assert [r.path for r in rows] == ["l1/bias", "l1/kernel", "l2/bias", "l2/kernel", "ln/bias", "ln/scale"]
    assert {r.path for r in rows.mismatches} == {"l1/bias", "l2/bias", "ln/bias", "ln/scale"}
    assert all(r.shrink == pytest.approx(lr * wd, rel=1e-6) for r in rows)
    masked = audit(optax.adamw(lr, weight_decay=wd, mask=jaxl2.select.mask(state)), state)
    assert masked.mismatches == []
    assert {r.path for r in masked if r.decayed} == {"l1/kernel", "l2/kernel"}


def test_equinox_with_its_preset():
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    p = eqx.filter(mlp, eqx.is_array)
    tx = optax.adamw(1e-3, weight_decay=1e-2, mask=jaxl2.select.mask(p, select=select.equinox))
    rows = audit(tx, p, select=select.equinox)
    assert rows.mismatches == []
    assert {r.path for r in rows if r.decayed} == {"layers/0/weight", "layers/1/weight"}
    with pytest.raises(jaxl2.Jaxl2Error, match=r"default selection .* matched no parameter.*layers/0/weight"):
        audit(tx, p)  # the default selection is Flax's kernels


def test_prints_a_table():
    lines = str(audit(optax.adamw(1e-3, weight_decay=1e-2), params())).splitlines()
    assert lines[0].split() == [
        "path",
        "shape",
        "dtype",
        "selected",
        "decayed",
        "shrink/step",
        "mismatch",
        "note",
    ]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == [
        "Dense_0/bias",
        "5",
        "float32",
        "no",
        "yes",
        "1e-05",
        "MISMATCH",
        "decayed",
        "but",
        "not",
        "selected",
    ]
    assert lines[3].split() == ["Dense_0/kernel", "4×5", "float32", "yes", "yes", "1e-05", "-"]


@pytest.mark.parametrize("k", [1, 4])
def test_audit_under_gradient_accumulation_reports_the_real_update_at_the_real_step(k):
    """optax.MultiSteps returns zeros until its k-th micro-step; the audit reports the real update
    at real step 3, against a hand-written accumulation loop on optax's own transforms."""
    lr = optax.linear_schedule(1e-3, 0.0, 10)  # the real step shows: lr(3) = 7e-4
    wd, step = 1e-2, 3
    p = jax.tree.map(lambda x: jnp.where(x == 0, 1.0, x), params())  # no zero weight hides a decay
    tx = optax.MultiSteps(optax.adamw(lr, weight_decay=wd), every_k_schedule=k)
    rows = audit(tx, p, step=step)
    # by hand: k·step micro-steps with a zero gradient, then the k micro-steps of real step 3
    state, zeros, update = tx.init(p), jax.tree.map(jnp.zeros_like, p), jax.jit(tx.update)
    for _ in range(k * step):
        _, state = update(zeros, state, p)
    for _ in range(k):
        updates, state = update(zeros, state, p)
    for r in rows:
        w, u = (np.asarray(dict(select.leaves(t))[r.path], np.float64) for t in (p, updates))
        assert r.decayed  # no mask: the bias is decayed too
        assert r.shrink == pytest.approx(float(np.mean(-u / w)), rel=1e-5)
        assert r.shrink == pytest.approx(float(lr(step)) * wd, rel=1e-5)
        assert r.note == ("" if r.path in KERNELS else "decayed but not selected")
    # the same under a wrapper around the wrapper: the real step is still found
    wrapped = optax.chain(optax.identity(), tx)
    assert [r.shrink for r in audit(wrapped, p, step=step)] == [r.shrink for r in rows]
