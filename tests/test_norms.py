"""group_norms and make_train_step(norms=True) against norms taken by hand in float64 NumPy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2

RULES = {"enc/.*": 0.1, "dec/.*": 0.01, ".*": 0.0}


@pytest.fixture(scope="module")
def trees():
    rng = np.random.default_rng(0)

    def tree(scale):
        return {
            name: {
                "kernel": jnp.asarray(scale * rng.standard_normal((3, 4)), jnp.float32),
                "bias": jnp.asarray(scale * rng.standard_normal(4), jnp.float32),
            }
            for name in ("enc", "dec", "head")
        }

    return tree(1.0), tree(0.5), tree(0.1)  # params, grads, updates


def norm(*arrays):
    return float(np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in arrays)))


def test_rule_groups_unselected_and_global_norms_are_numpys(trees):
    w, g, u = trees
    n = jax.jit(lambda w, g, u: jaxl2.group_norms(w, g, u, RULES))(w, g, u)
    for pattern, lam, names in ((r"enc/.*", 0.1, ["enc"]), ("dec/.*", 0.01, ["dec"]), (".*", 0.0, ["head"])):
        for key, tree in (("param_norm", w), ("grad_norm", g), ("update_norm", u)):
            assert float(n[f"{key}/{pattern}"]) == pytest.approx(
                norm(*(tree[k]["kernel"] for k in names)), rel=1e-6
            )
        share = lam * norm(*(w[k]["kernel"] for k in names)) / norm(*(g[k]["kernel"] for k in names))
        assert float(n[f"decay_share/{pattern}"]) == pytest.approx(share, rel=1e-6, abs=1e-12)
    biases = ("enc", "dec", "head")
    for key, tree in (("param_norm", w), ("grad_norm", g), ("update_norm", u)):
        assert float(n[f"{key}/unselected"]) == pytest.approx(
            norm(*(tree[k]["bias"] for k in biases)), rel=1e-6
        )
        assert float(n[key]) == pytest.approx(norm(*jax.tree.leaves(tree)), rel=1e-6)
    assert "decay_share/unselected" not in n
    assert len(n) == 3 * 4 + 3 + 3  # 4 groups × 3 norms, 3 shares, 3 globals


def test_one_lambda_gives_a_group_per_selected_leaf(trees):
    w, g, u = trees
    n = jaxl2.group_norms(w, g, u, 0.5)
    assert {k for k in n if k.startswith("decay_share/")} == {
        f"decay_share/{k}/kernel" for k in ("enc", "dec", "head")
    }
    assert float(n["decay_share/dec/kernel"]) == pytest.approx(
        0.5 * norm(w["dec"]["kernel"]) / norm(g["dec"]["kernel"])
    )
    # no λ: the same groups, no decay share
    none = jaxl2.group_norms(w, g, u)
    assert not [k for k in none if k.startswith("decay_share")]
    assert float(none["param_norm/enc/kernel"]) == pytest.approx(norm(w["enc"]["kernel"]))


def test_decay_share_is_toward_the_center_and_zero_for_a_zero_gradient(trees):
    w, g, u = trees
    w0 = jax.tree.map(lambda x: 0.5 * x + 0.25, w)
    n = jaxl2.group_norms(w, g, u, 0.1, center=w0)
    d = np.asarray(w["enc"]["kernel"], np.float64) - np.asarray(w0["enc"]["kernel"], np.float64)
    assert float(n["decay_share/enc/kernel"]) == pytest.approx(
        0.1 * norm(d) / norm(g["enc"]["kernel"]), rel=1e-6
    )
    zero = jax.tree.map(jnp.zeros_like, g)
    n = jaxl2.group_norms(w, zero, u, 0.1)
    assert float(n["decay_share/enc/kernel"]) == 0.0 and float(n["grad_norm"]) == 0.0
    assert not any(np.isnan(float(v)) for v in n.values())


def test_a_schedule_is_read_at_the_step(trees):
    w, g, u = trees
    sched = optax.linear_schedule(0.2, 0.0, 10)
    n = jaxl2.group_norms(w, g, u, sched, step=5)
    assert float(n["decay_share/head/kernel"]) == pytest.approx(
        0.1 * norm(w["head"]["kernel"]) / norm(g["head"]["kernel"]), rel=1e-5
    )


def test_bf16_params_accumulate_in_float32():
    w = {"d": {"kernel": jnp.full((64, 64), 3.0, jnp.bfloat16)}}
    n = jaxl2.group_norms(w, w, w, 1e-3)
    assert n["param_norm"].dtype == jnp.float32
    assert float(n["param_norm/d/kernel"]) == pytest.approx(3.0 * 64)


def test_trees_that_do_not_match_are_errors_that_name_the_path(trees):
    w, g, u = trees
    short = {k: v for k, v in g.items() if k != "dec"}
    with pytest.raises(jaxl2.Jaxl2Error, match=re.escape("grads has no floating-point leaf at 'dec/bias'")):
        jaxl2.group_norms(w, short, u, 0.1)
    with pytest.raises(jaxl2.Jaxl2Error, match="are the arguments swapped"):
        jaxl2.group_norms(0.1, w, u, w)
    with pytest.raises(jaxl2.Jaxl2Error, match="matches no selected parameter"):
        jaxl2.group_norms(w, g, u, {"nothing/.*": 0.1, ".*": 0.0})


def test_make_train_step_norms_are_those_of_its_own_step(trees):
    w, _, _ = trees
    x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 3)), jnp.float32)

    def loss(p, x):
        h = jnp.tanh(x @ p["enc"]["kernel"] + p["enc"]["bias"])
        return jnp.mean((h @ p["dec"]["kernel"].T + h @ p["head"]["kernel"].T) ** 2) + jnp.sum(
            p["dec"]["bias"]
        )

    lr = 0.1
    step = jaxl2.make_train_step(loss, optax.sgd(lr), l2=RULES, norms=True)
    new, _, m = jax.jit(step)(w, step.init(w), x)
    g = jax.grad(jaxl2.regularized(loss, RULES))(w, x)  # the gradient the optimizer saw
    for pattern, lam, k in ((r"enc/.*", 0.1, "enc"), ("dec/.*", 0.01, "dec")):
        assert float(m[f"grad_norm/{pattern}"]) == pytest.approx(norm(g[k]["kernel"]), rel=1e-5)
        assert float(m[f"update_norm/{pattern}"]) == pytest.approx(
            norm(np.asarray(new[k]["kernel"], np.float64) - np.asarray(w[k]["kernel"], np.float64)), rel=1e-4
        )
        assert float(m[f"decay_share/{pattern}"]) == pytest.approx(
            lam * norm(w[k]["kernel"]) / norm(g[k]["kernel"]), rel=1e-5
        )
    assert float(m["param_norm"]) == pytest.approx(norm(*jax.tree.leaves(w)), rel=1e-6)
    # by default: the losses only
    plain = jaxl2.make_train_step(loss, optax.sgd(lr), l2=RULES)
    assert sorted(jax.jit(plain)(w, plain.init(w), x)[2]) == ["data_loss", "loss", "penalty"]
