"""jaxl2.audit against hand math: adamw with a zero gradient gives update = −lr·wd·w
(shrink lr·wd), add_decayed_weights(λ) before sgd(lr) gives shrink lr·λ."""

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import jaxl2
from jaxl2 import select
from jaxl2.decay import Audit, AuditRow, audit

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


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.ln = nnx.LayerNorm(4, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, rngs=rngs)


def test_nnx_state():
    lr, wd = 1e-3, 1e-2
    state = nnx.state(NnxNet(nnx.Rngs(0)), nnx.Param)
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
