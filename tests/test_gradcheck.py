"""gradcheck passes on correct gradients, fails on a deliberately wrong one, refuses what it cannot check."""

import json
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxl2


def mlp_problem(sizes=(5, 8, 6, 3), batch=7, seed=0):
    """A hand-written MLP: params {"Dense_i": {"kernel", "bias"}} with non-zero biases."""
    rng = np.random.default_rng(seed)
    params = {
        f"Dense_{i}": {"kernel": rng.normal(size=(a, b)) / np.sqrt(a), "bias": rng.normal(size=b)}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = jnp.asarray(rng.normal(size=(batch, sizes[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, sizes[-1], batch))

    def loss_fn(p, x, y):
        h = x
        for i in range(len(p)):
            layer = p[f"Dense_{i}"]
            h = h @ layer["kernel"] + layer["bias"]
            if i < len(p) - 1:
                h = jnp.tanh(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return loss_fn, params, x, y


def test_pure_jax_mlp_passes():
    loss_fn, params, x, y = mlp_problem()
    assert all(float(jnp.min(jnp.abs(params[k]["bias"]))) > 0 for k in params)
    r = jaxl2.gradcheck(loss_fn, params, x, y, l2=1e-2, directions=4)
    assert r.ok, str(r)
    assert r.penalty_grad_max_abs_err == 0.0
    assert r.finite_difference_max_rel_err < 1e-6
    assert r.n_selected == 3 and r.n_params == 6


def test_user_loss_through_the_api():
    params = {"enc": {"kernel": jnp.ones((3, 2)) * 0.3, "bias": jnp.ones(2)}}
    x = jnp.linspace(-1, 1, 12).reshape(4, 3)

    def loss(p, x):
        return jnp.mean(jnp.tanh(x @ p["enc"]["kernel"] + p["enc"]["bias"]) ** 2)

    r = jaxl2.gradcheck(loss, params, x, l2={".*": 0.5}, directions=3)
    assert r.ok and r.n_selected == 1


def test_a_wrong_gradient_is_caught():
    @jax.custom_vjp
    def bad_square(w):
        return w**2

    bad_square.defvjp(lambda w: (w**2, w), lambda w, g: (g * 3 * w,))  # should be 2·w

    def loss(p):
        return jnp.sum(bad_square(p["layer"]["bias"]))

    params = {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.array([0.5, -1.0])}}
    r = jaxl2.gradcheck(loss, params, l2=0.1)
    assert not r.ok
    # The directional derivative along d of Σ b² is 2·⟨b, d⟩ while the bad vjp claims 3·⟨b, d⟩
    # (plus the same λ·⟨w, d⟩ on the kernel for both): the relative error is far above 1e-6.
    assert r.finite_difference_max_rel_err > 0.1
    assert "False" in str(r)


def test_has_aux_ignores_aux():
    loss_fn, params, x, y = mlp_problem(seed=1)

    def with_aux(p, x, y):
        loss = loss_fn(p, x, y)
        # a metric in float32 does not reach the loss: it must not count as "computing in float32"
        return loss, {"loss32": loss.astype(jnp.float32), "n": x.shape[0]}

    plain = jaxl2.gradcheck(loss_fn, params, x, y, l2=1e-2, directions=3, seed=4)
    aux = jaxl2.gradcheck(with_aux, params, x, y, l2=1e-2, has_aux=True, directions=3, seed=4)
    assert aux.ok, str(aux)
    assert aux.finite_difference_max_rel_err == pytest.approx(plain.finite_difference_max_rel_err, abs=1e-9)
    assert (aux.n_params, aux.n_selected) == (plain.n_params, plain.n_selected)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"returned a tuple of length 2.*needs has_aux=True"):
        jaxl2.gradcheck(with_aux, params, x, y, l2=1e-2, directions=1)
    with pytest.raises(jaxl2.Jaxl2Error, match=r"has_aux.*loss alone needs has_aux=False"):
        jaxl2.gradcheck(loss_fn, params, x, y, l2=1e-2, has_aux=True, directions=1)


def test_equinox_module_with_non_array_leaves():
    mlp = eqx.nn.MLP(3, 2, 8, 2, activation=jax.nn.tanh, use_final_bias=False, key=jax.random.key(0))
    leaves = jax.tree_util.tree_leaves(mlp)
    assert any(callable(leaf) and not hasattr(leaf, "dtype") for leaf in leaves)  # the activations
    assert mlp.layers[-1].bias is None and isinstance(mlp.depth, int)
    x = jnp.linspace(-1, 1, 15).reshape(5, 3)
    y = jnp.cos(x[:, :2])

    def loss(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    r = jaxl2.gradcheck(loss, mlp, x, y, l2=0.1, select=jaxl2.select.equinox, directions=4)
    assert r.ok, str(r)
    assert r.penalty_grad_max_abs_err == 0.0
    assert r.n_selected == 3 and r.n_params == 5  # 3 weights, 2 biases


def test_equinox_wrong_gradient_is_caught():
    """The Equinox path perturbs the float leaves for real: a wrong vjp inside a module shows."""

    @jax.custom_vjp
    def bad_tanh(h):
        return jnp.tanh(h)

    bad_tanh.defvjp(lambda h: (jnp.tanh(h), h), lambda h, g: (g * 0.5,))  # should be g·(1 − tanh²)

    mlp = eqx.nn.MLP(3, 1, 4, 1, activation=bad_tanh, key=jax.random.key(1))
    x = jnp.linspace(-1, 1, 9).reshape(3, 3)

    def loss(model, x):
        return jnp.mean(jax.vmap(model)(x) ** 2)

    r = jaxl2.gradcheck(loss, mlp, x, l2=0.1, select=jaxl2.select.equinox, directions=4)
    assert not r.ok and r.finite_difference_max_rel_err > 1e-3


def float32_layer(p, x):
    return jnp.mean(jnp.tanh((x @ p["d"]["kernel"]).astype(jnp.float32)) ** 2)


@jax.jit
def _to_bf16(h):
    return h.astype(jnp.bfloat16)


def bf16_in_a_jitted_helper(p, x):
    return jnp.mean(jnp.tanh(_to_bf16(x @ p["d"]["kernel"]).astype(x.dtype)) ** 2)


def float32_problem():
    rng = np.random.default_rng(0)
    params = {"d": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}}
    return params, jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)


@pytest.mark.parametrize(
    "loss_fn, match",
    [
        (float32_layer, r"loss_fn computes in float32 \(first: convert_element_type\).*eps=1e-05"),
        (bf16_in_a_jitted_helper, r"loss_fn computes in bfloat16 \(first: convert_element_type\)"),
    ],
)
def test_a_model_that_computes_in_float32_is_refused(loss_fn, match):
    params, x = float32_problem()
    # The premise: with the params' path in float32, central differences at eps=1e-5 are
    # rounding noise. Written out by hand in float64 around the float64 params, the difference
    # quotient is far from the model's own autodiff directional derivative.
    with jax.enable_x64(True):
        w, x64 = jnp.asarray(params["d"]["kernel"], jnp.float64), jnp.asarray(x, jnp.float64)
        d = np.random.default_rng(1).standard_normal(w.shape)
        d /= np.linalg.norm(d)
        plus = float(loss_fn({"d": {"kernel": w + 1e-5 * d}}, x64))
        minus = float(loss_fn({"d": {"kernel": w - 1e-5 * d}}, x64))
        fd = (plus - minus) / 2e-5
        ad = float(np.vdot(np.asarray(jax.grad(loss_fn)({"d": {"kernel": w}}, x64)["d"]["kernel"]), d))
        assert abs(fd - ad) / max(abs(fd), abs(ad)) > 10 * 1e-6  # 10× gradcheck's default rtol
    with pytest.raises(jaxl2.Jaxl2Error, match=match):
        jaxl2.gradcheck(loss_fn, params, x, l2=1e-2)


def test_float32_data_alone_is_not_refused():
    """Casting the batch to float32 leaves the loss float64 in the params: the check is valid."""
    params, x = float32_problem()

    def loss_fn(p, x):
        return jnp.mean(jnp.tanh(x.astype(jnp.float32) @ p["d"]["kernel"]) ** 2)

    r = jaxl2.gradcheck(loss_fn, params, x, l2=1e-2, directions=3)
    assert r.ok, str(r)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": 0.0}, r"eps must be a finite number > 0, got 0.0 \(float\)"),
        ({"eps": -1e-5}, r"eps must be a finite number > 0"),
        ({"eps": float("nan")}, r"eps must be a finite number > 0, got nan"),
        ({"eps": "1e-5"}, r"eps must be a finite number > 0, got '1e-5' \(str\)"),
        ({"directions": 0}, r"directions must be an integer >= 1, got 0 \(int\)"),
        ({"directions": 2.5}, r"directions must be an integer >= 1, got 2.5"),
        ({"directions": True}, r"directions must be an integer >= 1, got True \(bool\)"),
        ({"atol": -1.0}, r"atol must be a finite number >= 0, got -1.0"),
        ({"rtol": float("inf")}, r"rtol must be a finite number >= 0, got inf"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"l2": "1e-3"}, r"l2 must be a finite number >= 0"),
        ({"l2": {}}, r"l2 mapping is empty"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    loss_fn, params, x, y = mlp_problem()
    with pytest.raises(jaxl2.Jaxl2Error, match=match):
        jaxl2.gradcheck(loss_fn, params, x, y, **kwargs)


def test_numpy_scalars_are_accepted():
    loss_fn, params, x, y = mlp_problem()
    r = jaxl2.gradcheck(
        loss_fn,
        params,
        x,
        y,
        l2=np.float32(1e-2),
        directions=np.int64(2),
        eps=np.float64(1e-5),
        seed=np.int32(3),
    )
    assert r.ok, str(r)


def test_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "jaxl2", "gradcheck", "--json", "--hidden", "16", "--directions", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert {"penalty_grad_max_abs_err", "finite_difference_max_rel_err", "ok"} <= set(d)
    assert d["ok"] is True and d["penalty_grad_max_abs_err"] == 0.0


def stacked_problem(seed=0, layers=3, width=4, batch=5):
    """``layers`` tanh layers stacked on axis 0 and run by lax.scan, and a head."""
    rng = np.random.default_rng(seed)
    params = {
        "blocks": {"kernel": jnp.asarray(rng.normal(size=(layers, width, width)) / 2, jnp.float32)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(width, 2)), jnp.float32)},
    }
    x = jnp.asarray(rng.normal(size=(batch, width)), jnp.float32)

    def loss_fn(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["blocks"]["kernel"])
        return jnp.mean((h @ p["head"]["kernel"]) ** 2)

    return loss_fn, params, x


PER_SLICE = {r"blocks/kernel\[0\]": 0.5, r"blocks/kernel\[2\]": 0.02, ".*": 0.1}


def test_per_slice_lambdas_of_stacked_layers_are_checked():
    loss_fn, params, x = stacked_problem()
    r = jaxl2.gradcheck(loss_fn, params, x, l2=PER_SLICE, stacked={"blocks/.*": 0})
    assert r.ok, str(r)
    assert r.n_selected == 2 and r.penalty_grad_max_abs_err <= 1e-15
    # check 2 by hand: the slope of L along one direction, float64 central differences
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        lam = np.array([0.5, 0.1, 0.02])[:, None, None]

        def total(p):
            k = p["blocks"]["kernel"]
            pen = jnp.sum(lam / 2 * k**2) + 0.1 / 2 * jnp.sum(p["head"]["kernel"] ** 2)
            return loss_fn(p, x64) + pen

        d = jax.tree_util.tree_map(jnp.ones_like, p64)
        at = lambda t: total(jax.tree_util.tree_map(lambda a, b: a + t * b, p64, d))  # noqa: E731
        fd = (at(1e-6) - at(-1e-6)) / 2e-6
        g = jax.grad(jaxl2.regularized(loss_fn, PER_SLICE, stacked={"blocks/.*": 0}))(p64, x64)
        slope = sum(float(jnp.sum(a)) for a in jax.tree.leaves(g))
    assert slope == pytest.approx(float(fd), rel=1e-7)


def test_a_wrong_gradient_on_one_stacked_slice_is_caught():
    @jax.custom_vjp
    def scaled(k):
        return k

    scaled.defvjp(lambda k: (k, None), lambda _, g: (g.at[1].multiply(1.5),))  # slice 1 is wrong

    loss_fn, params, x = stacked_problem()
    bad = lambda p, x: loss_fn({**p, "blocks": {"kernel": scaled(p["blocks"]["kernel"])}}, x)  # noqa: E731
    r = jaxl2.gradcheck(bad, params, x, l2=PER_SLICE, stacked={"blocks/.*": 0})
    assert not r.ok and r.finite_difference_max_rel_err > 1e-3
    assert r.penalty_grad_max_abs_err <= 1e-15  # the penalty's own gradient is right per slice


@pytest.mark.parametrize("eps", ["1e-30", "1e-13"])
def test_gradcheck_refuses_a_step_below_float64_resolution(eps):
    r = subprocess.run(
        [sys.executable, "-m", "jaxl2", "gradcheck", "--hidden", "8", "--batch", "8", "--eps", eps],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--eps {eps} is below what float64 resolves here" in r.stderr, r.stderr
