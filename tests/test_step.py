"""make_train_step against hand-written updates, on Linen, NNX and Equinox params, jitted."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxl2


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.uniform(size=(16, 6)), jnp.float32), jnp.asarray(np.arange(16) % 3)


class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(5)(x)))


def hand_sgd(params, grads, lr, lam, selected):
    """w − lr·(g + λ·w) on selected leaves, w − lr·g elsewhere, in float64."""
    out = {}
    for (path, w), (_, g) in zip(jaxl2.select.leaves(params), jaxl2.select.leaves(grads)):
        w64, g64 = np.asarray(w, np.float64), np.asarray(g, np.float64)
        out[path] = w64 - lr * (g64 + (lam * w64 if path in selected else 0.0))
    return out


def test_linen_step_is_hand_written_sgd_with_l2(batch):
    x, y = batch
    model = Linen()
    params = model.init(jax.random.key(0), x)
    params = jax.tree_util.tree_map(lambda a: a + 0.1, params)  # non-zero biases
    data_loss = lambda p, x, y: ce(model.apply(p, x), y)  # noqa: E731
    tx = optax.sgd(0.3)
    step = jax.jit(jaxl2.make_train_step(data_loss, tx, l2=0.05), donate_argnums=(0, 1))
    grads = jax.grad(data_loss)(params, x, y)  # the data gradient alone
    want = hand_sgd(params, grads, 0.3, 0.05, {"params/Dense_0/kernel", "params/Dense_1/kernel"})
    pen = (
        0.05
        / 2
        * sum(
            float(np.sum(np.asarray(w, np.float64) ** 2))
            for p, w in jaxl2.select.leaves(params)
            if "kernel" in p
        )
    )
    ref_loss = float(data_loss(params, x, y)) + pen
    new, _, m = step(params, tx.init(params), x, y)
    for path, w in jaxl2.select.leaves(new):
        np.testing.assert_allclose(np.asarray(w), want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert float(m["penalty"]) == pytest.approx(pen, rel=1e-5)
    assert float(m["loss"]) == pytest.approx(ref_loss, rel=1e-5)


def test_metrics_norms_against_numpy(batch):
    x, y = batch
    model = Linen()
    params = model.init(jax.random.key(1), x)
    flat0 = np.concatenate([np.asarray(w, np.float64).ravel() for w in jax.tree.leaves(params)])
    data_loss = lambda p, x, y: ce(model.apply(p, x), y)  # noqa: E731
    step = jaxl2.make_train_step(data_loss, optax.sgd(0.5), l2=1e-2, norms=True)
    grads = jax.grad(jaxl2.regularized(data_loss, 1e-2))(params, x, y)
    new, _, m = step(params, optax.sgd(0.5).init(params), x, y)
    flat1 = np.concatenate([np.asarray(w, np.float64).ravel() for w in jax.tree.leaves(new)])
    g = np.concatenate([np.asarray(w, np.float64).ravel() for w in jax.tree.leaves(grads)])
    assert float(m["param_norm"]) == pytest.approx(np.linalg.norm(flat0), rel=1e-5)
    assert float(m["grad_norm"]) == pytest.approx(np.linalg.norm(g), rel=1e-5)
    assert float(m["update_norm"]) == pytest.approx(np.linalg.norm(flat1 - flat0), rel=1e-4)


def test_jitted_step_compiles_once_and_donates(batch):
    x, y = batch
    model = Linen()
    params = model.init(jax.random.key(0), x)
    data_loss = lambda p, x, y: ce(model.apply(p, x), y)  # noqa: E731
    tx = optax.adam(1e-2)
    step = jax.jit(jaxl2.make_train_step(data_loss, tx, l2=1e-3), donate_argnums=(0, 1))
    state = tx.init(params)
    old = params
    for _ in range(3):
        params, state, _ = step(params, state, x, y)
    assert step._cache_size() == 1
    assert jax.tree.leaves(old)[0].is_deleted()  # the first params' buffers were donated


def test_has_aux_metrics_pass_through(batch):
    x, y = batch
    model = Linen()
    params = model.init(jax.random.key(0), x)

    def data_loss(p, x, y):
        logits = model.apply(p, x)
        return ce(logits, y), {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

    _, _, m = jaxl2.make_train_step(data_loss, optax.sgd(0.1), l2=1e-3, has_aux=True)(
        params, optax.sgd(0.1).init(params), x, y
    )
    logits = model.apply(params, x)
    assert float(m["accuracy"]) == pytest.approx(float(np.mean(np.argmax(logits, -1) == np.asarray(y))))
    assert float(m["loss"]) == pytest.approx(float(m["data_loss"]) + float(m["penalty"]), rel=1e-6)


def test_nnx_state_step(batch):
    x, y = batch
    model = nnx.Sequential(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), nnx.tanh, nnx.Linear(5, 3, rngs=nnx.Rngs(1)))
    graphdef, params = nnx.split(model, nnx.Param)
    data_loss = lambda p, x, y: ce(nnx.merge(graphdef, p)(x), y)  # noqa: E731
    tx = optax.sgd(0.2)
    grads = jax.grad(data_loss)(params, x, y)
    want = hand_sgd(params, grads, 0.2, 0.1, {"layers/0/kernel", "layers/2/kernel"})
    new, _, _ = jax.jit(jaxl2.make_train_step(data_loss, tx, l2=0.1))(params, tx.init(params), x, y)
    for path, w in jaxl2.select.leaves(new):
        np.testing.assert_allclose(np.asarray(w), want[path], rtol=1e-5, atol=1e-6, err_msg=path)


def test_equinox_module_step_keeps_non_array_leaves(batch):
    x, y = batch
    model = eqx.nn.MLP(6, 3, width_size=5, depth=1, key=jax.random.key(0))
    data_loss = lambda m, x, y: ce(jax.vmap(m)(x), y)  # noqa: E731
    tx = optax.sgd(0.2)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    step = eqx.filter_jit(jaxl2.make_train_step(data_loss, tx, l2=0.1, select=jaxl2.select.equinox))
    grads = eqx.filter_grad(data_loss)(model, x, y)
    want = hand_sgd(model, grads, 0.2, 0.1, {"layers/0/weight", "layers/1/weight"})
    new, _, m = step(model, opt_state, x, y)
    for path, w in jaxl2.select.leaves(new):
        np.testing.assert_allclose(np.asarray(w), want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert new.activation is model.activation and new.final_activation is model.final_activation
    assert float(m["penalty"]) > 0


def test_l2_zero_selects_nothing_but_a_positive_l2_must_match(batch):
    x, y = batch
    model = eqx.nn.MLP(6, 3, width_size=5, depth=1, key=jax.random.key(0))
    data_loss = lambda m, x, y: ce(jax.vmap(m)(x), y)  # noqa: E731
    tx = optax.sgd(0.1)
    _, _, m = jaxl2.make_train_step(data_loss, tx)(model, tx.init(eqx.filter(model, eqx.is_array)), x, y)
    assert float(m["penalty"]) == 0.0
    with pytest.raises(jaxl2.Jaxl2Error, match="matched no parameter"):  # default: 'kernel' leaves
        jaxl2.make_train_step(data_loss, tx, l2=1e-3)(model, tx.init(eqx.filter(model, eqx.is_array)), x, y)


def test_vmapped_lambda_equals_separate_steps(batch):
    x, y = batch
    model = Linen()
    params = model.init(jax.random.key(0), x)
    data_loss = lambda p, x, y: ce(model.apply(p, x), y)  # noqa: E731
    tx = optax.sgd(0.3, momentum=0.9)

    def one(lam):
        return jaxl2.make_train_step(data_loss, tx, l2=lam)(params, tx.init(params), x, y)[0]

    lams = jnp.array([0.0, 1e-2, 1e-1])
    stacked = jax.vmap(one)(lams)
    for i, lam in enumerate([0.0, 1e-2, 1e-1]):
        alone = jaxl2.make_train_step(data_loss, tx, l2=lam)(params, tx.init(params), x, y)[0]
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(stacked)):
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(a), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_fn": 3}, "loss_fn must be a function"),
        ({"tx": "sgd"}, "tx must be an optax"),
        ({"l2": -1.0}, "l2"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"loss_fn": lambda p: 0.0, "tx": optax.sgd(0.1), **kwargs}
    with pytest.raises(jaxl2.Jaxl2Error, match=match):
        jaxl2.make_train_step(args.pop("loss_fn"), args.pop("tx"), **args)


def test_center_pulls_toward_reference_weights():
    w0 = {"dense": {"kernel": jnp.full((2, 2), 0.5), "bias": jnp.zeros(2)}}
    params = {"dense": {"kernel": jnp.array([[1.0, 2.0], [0.0, -1.0]]), "bias": jnp.ones(2)}}
    step = jaxl2.make_train_step(
        lambda p: 0.0 * jnp.sum(p["dense"]["bias"]), optax.sgd(0.1), l2=0.5, center=w0
    )
    new, _, m = step(params, optax.sgd(0.1).init(params))
    k, k0 = np.asarray(params["dense"]["kernel"], np.float64), 0.5
    np.testing.assert_allclose(np.asarray(new["dense"]["kernel"]), k - 0.1 * 0.5 * (k - k0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["dense"]["bias"]), np.ones(2))
    assert float(m["penalty"]) == pytest.approx(0.5 / 2 * np.sum((k - k0) ** 2), rel=1e-6)


@pytest.mark.parametrize("l2", [0.0, 1e-3])
def test_aux_errors_are_the_same_with_and_without_a_penalty(l2):
    params = {"dense": {"kernel": jnp.ones((2, 2))}}
    tx = optax.sgd(0.1)
    scalar = jaxl2.make_train_step(lambda p: jnp.sum(p["dense"]["kernel"]), tx, l2=l2, has_aux=True)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"must return \(loss, aux\)"):
        scalar(params, tx.init(params))
    clash = jaxl2.make_train_step(
        lambda p: (jnp.sum(p["dense"]["kernel"]), {"penalty": 0.0}), tx, l2=l2, has_aux=True
    )
    with pytest.raises(jaxl2.Jaxl2Error, match="already has a 'penalty' entry"):
        clash(params, tx.init(params))
    with pytest.raises(jaxl2.Jaxl2Error, match="has_aux must be True or False"):
        jaxl2.make_train_step(lambda p: 0.0, tx, l2=l2, has_aux="yes")


def test_a_lambda_schedule_counts_real_updates_under_multisteps():
    """MultiSteps applies one update every 2 micro-batches; λ = 1, 0.75, 0.5, 0.25 at updates 0..3, as
    its learning-rate schedule counts them, against a hand-written accumulation loop in float64."""
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((8, 3, 2))  # 8 micro-batches of 3 examples
    w = np.array([[1.0, -2.0], [0.5, 3.0]])
    loss = lambda p, x: jnp.sum((x @ p["dense"]["kernel"]) ** 2)  # noqa: E731
    tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
    step = jaxl2.make_train_step(loss, tx, l2=optax.linear_schedule(1.0, 0.0, 4))
    params = {"dense": {"kernel": jnp.asarray(w, jnp.float32)}}
    state, jstep, penalties = step.init(params), jax.jit(step), []
    for x in xs:
        params, state, m = jstep(params, state, jnp.asarray(x, jnp.float32))
        penalties.append(float(m["penalty"]))
    want = []
    for k in range(4):  # the hand loop: one real update per two micro-batches
        lam = 1.0 - 0.25 * k
        grads = [2 * x.T @ (x @ w) + lam * w for x in xs[2 * k : 2 * k + 2]]
        want += [lam / 2 * np.sum(w**2)] * 2
        w = w - 0.1 * np.mean(grads, axis=0)
    np.testing.assert_allclose(penalties, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(params["dense"]["kernel"]), w, rtol=1e-5)
    assert int(state.count) == 4 and int(state.opt_state.gradient_step) == 4


def _big_tree(n):
    return {"params": {f"Dense_{i}": {"kernel": jnp.ones((2, 2))} for i in range(n)}}


@pytest.mark.parametrize(
    "l2, what",
    [
        (_big_tree(2000), "a pytree (dict) of 2,000 arrays"),
        (optax.adam(1e-3).init(_big_tree(1000)), "a pytree (tuple) of 2,001 arrays"),
    ],
)
def test_params_or_an_optimizer_state_as_l2_are_summarised_not_printed(l2, what):
    with pytest.raises(jaxl2.Jaxl2Error) as e:
        jaxl2.make_train_step(lambda p: 0.0, optax.sgd(0.1), l2=l2)
    assert len(str(e.value)) < 400
    assert what in str(e.value) and "step(params, opt_state, *batch)" in str(e.value)


def test_swapped_loss_fn_and_tx_say_so():
    tx, loss = optax.sgd(0.1), lambda p: 0.0
    with pytest.raises(jaxl2.Jaxl2Error, match="loss_fn must be a function.*are loss_fn and tx swapped"):
        jaxl2.make_train_step(tx, loss)
    with pytest.raises(
        jaxl2.Jaxl2Error, match=r"tx must be an optax .*of 2,000 arrays; the params go to"
    ) as e:
        jaxl2.make_train_step(loss, _big_tree(2000))
    assert len(str(e.value)) < 400


@pytest.mark.parametrize(
    "key, norms", [("loss", False), ("grad_norm", True), ("param_norm/unselected", True)]
)
def test_aux_keys_that_clash_with_the_metrics_are_refused(key, norms):
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    loss = lambda p: (jnp.sum(p["dense"]["kernel"]), {key: 1.0})  # noqa: E731
    step = jaxl2.make_train_step(loss, optax.sgd(0.1), l2=0.1, has_aux=True, norms=norms)
    with pytest.raises(jaxl2.Jaxl2Error, match=f"aux has a '{key}' entry, which the step's metrics hold"):
        step(params, step.init(params))


def test_a_scheduled_step_under_eqx_filter_jit_takes_the_state_of_the_plain_steps_init():
    """eqx.filter_jit's wrapper does not carry step.init (jax.jit's does): the documented idiom
    builds the state from the plain step, then runs the compiled one; λ 0.5 then 0.25, by hand."""
    model = eqx.nn.Linear(2, 2, use_bias=False, key=jax.random.key(0))
    loss = lambda m, x: jnp.sum(m.weight * x)  # noqa: E731  # gradient x
    step = jaxl2.make_train_step(
        loss, optax.sgd(0.1), l2=optax.linear_schedule(0.5, 0.0, 2), select=jaxl2.select.equinox
    )
    assert jax.jit(step).init is step.init
    state, jstep = step.init(model), eqx.filter_jit(step)
    w, x = np.asarray(model.weight, np.float64), np.full((2, 2), 0.3)
    for lam in (0.5, 0.25):
        model, state, m = jstep(model, state, jnp.asarray(x, jnp.float32))
        w = w - 0.1 * (x + lam * w)
    np.testing.assert_allclose(np.asarray(model.weight), w, rtol=1e-6)
    assert int(state.count) == 2
