"""gradcheck passes on correct gradients and fails on a deliberately wrong one."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp

import jaxl2


def test_reference_mlp_passes():
    r = jaxl2.gradcheck(hidden=(32, 16), l2=1e-2, directions=4)
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
    assert r.finite_difference_max_rel_err > 0.1
    assert "False" in str(r)


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
