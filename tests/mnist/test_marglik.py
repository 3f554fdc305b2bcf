"""``l2="evidence"`` in the application: its curvature (the library's K-FAC, EK-FAC and fast exact
diagonal on the MLP) against K-FAC by hand, the exact blocks and the generic per-example diagonal, the λ update against jaxl2.evidence_l2, the run directory, exact resume, refusals."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxl2
from jaxl2.mnist import cli
from jaxl2.mnist import run as _run
from jaxl2.mnist.cli import report
from jaxl2.mnist.config import Config, ConfigError, SweepSettings
from jaxl2.mnist.evaluate import evaluate_run
from jaxl2.mnist.marglik import EvidenceTrainer
from jaxl2.mnist.model import model_of
from jaxl2.mnist.results import RunSummary
from tests.keys import assert_typed
from tests.runs import assert_refused_in_one_line, latest_state, rows_of, stopped_and_resumed

EVIDENCE = Config(l2="evidence", hidden=(16,), epochs=4, batch_size=500, lr=0.1, evidence_every=2)
LAYERS = ["params/Dense_0/kernel", "params/Dense_1/kernel"]
TENSORS = sorted(LAYERS + ["params/Dense_0/bias", "params/Dense_1/bias"])


def curvature_of(cfg, params, x, y):
    """The application's curvature of every tensor (EvidenceTrainer.curvature, ``evidence_prior``
    all) at ``params``: ``{path: block}`` and ``log p(D | w)``."""
    cfg = dataclasses.replace(cfg, l2="evidence", evidence_prior="all", batch_size=4)
    curv = EvidenceTrainer(cfg, num_train=len(y)).curvature(params, x, y)
    return dict(zip(curv.paths, curv.ggn)), curv.log_likelihood


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_the_dense_diagonal_equals_the_generic_per_example_ggn_in_float64(activation):
    """jaxl2.ggn(structure="diag") (per-example Jacobians, itself checked against jax.jacobian and
    jax.hessian by brute force) on every leaf; 37 examples."""
    with jax.enable_x64(True):
        model = model_of(Config(hidden=(7, 5), activation=activation))
        params = model.init(jax.random.key(0), jnp.zeros((1, 784)))
        params = jax.tree_util.tree_map_with_path(  # float64, and non-zero biases
            lambda kp, a: a.astype(jnp.float64) + 0.05 * (kp[-1].key == "bias"), params
        )
        x = jax.random.uniform(jax.random.key(1), (37, 784), jnp.float64)
        y = jax.random.randint(jax.random.key(2), (37,), 0, 10)
        cfg = Config(hidden=(7, 5), activation=activation, evidence_curvature="diag")
        mine, ll = curvature_of(cfg, params, x, y)
        ref = jaxl2.ggn(model.apply, params, x, y, structure="diag", select=".*", batch_size=None)
        assert sorted(mine) == sorted(ref.paths)
        for path, h in zip(ref.paths, ref.ggn):
            # Σ_c p·b² − (Σ_c p·b)² cancels: entries far below the leaf's largest agree to its 1e-12
            np.testing.assert_allclose(mine[path], h, rtol=1e-10, atol=1e-12 * np.abs(h).max(), err_msg=path)
        assert float(ll) == pytest.approx(float(ref.log_likelihood), rel=1e-12)


def test_the_kron_factors_equal_kfac_by_hand_in_float64():
    """A = Σ_i a_i a_iᵀ / n and G = Σ_i B_iᵀ(diag p_i − p_i p_iᵀ)B_i per layer, from per-example
    inputs and Jacobians (jax.jacobian of each example's logits in the layer's output); the
    bias's exact block against jaxl2.ggn(structure="full")."""
    with jax.enable_x64(True):
        model = model_of(Config(hidden=(6,), activation="tanh"))
        params = jax.tree_util.tree_map_with_path(  # float64, non-zero biases: padded rows then
            lambda kp, a: a.astype(jnp.float64) + 0.3 * (kp[-1].key == "bias"),  # need their mask
            model.init(jax.random.key(0), jnp.zeros((1, 784))),
        )
        x = jax.random.uniform(jax.random.key(1), (21, 784), jnp.float64)
        y = jax.random.randint(jax.random.key(2), (21,), 0, 10)
        got, ll = curvature_of(Config(hidden=(6,), activation="tanh"), params, x, y)
        w0, w1 = params["params"]["Dense_0"], params["params"]["Dense_1"]

        def logits_from_z0(z0):  # one example: its first layer's output → logits
            return jnp.tanh(z0) @ w1["kernel"] + w1["bias"]

        z0 = x @ w0["kernel"] + w0["bias"]
        inputs = {"Dense_0": x, "Dense_1": jnp.tanh(z0)}
        jac = {
            "Dense_0": jax.vmap(jax.jacobian(logits_from_z0))(z0),  # (n, C, 6)
            "Dense_1": jnp.broadcast_to(jnp.eye(10), (21, 10, 10)),  # the last layer's z is the logits
        }
        p = jax.nn.softmax(jax.vmap(logits_from_z0)(z0))
        lam = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
        for name in ("Dense_0", "Dense_1"):
            a_hand = inputs[name].T @ inputs[name] / 21
            g_hand = jnp.einsum("nci,ncd,ndj->ij", jac[name], lam, jac[name])
            a, g = got[f"params/{name}/kernel"]
            np.testing.assert_allclose(a, a_hand, rtol=1e-12)
            np.testing.assert_allclose(g, g_hand, rtol=1e-10, atol=1e-12 * np.abs(g_hand).max())
            one, g_bias = got[f"params/{name}/bias"]
            assert one.shape == (1, 1) and float(one[0, 0]) == 1.0
            exact = jaxl2.ggn(model.apply, params, x, y, structure="full", select=f".*{name}/bias")
            np.testing.assert_allclose(g_bias, exact.ggn, rtol=1e-10, atol=1e-12 * np.abs(exact.ggn).max())
        assert float(ll) == pytest.approx(float(exact.log_likelihood), rel=1e-12)


def test_ekfac_is_the_exact_block_in_the_kfac_eigenbasis_in_float64():
    """Per kernel, ``diag((U ⊗ V)ᵀ H_l (U ⊗ V))`` with ``H_l`` the exact block (jaxl2.ggn, full,
    itself checked against jax.jacobian by brute force) and ``U``, ``V`` the eigenvectors of the
    K-FAC factors (numpy's eigh); its sum is the block's trace; the bias's are its eigenvalues."""
    with jax.enable_x64(True):
        model = model_of(Config(hidden=(5,), activation="tanh"))
        params = jax.tree_util.tree_map_with_path(
            lambda kp, a: a.astype(jnp.float64) + 0.2 * (kp[-1].key == "bias"),
            model.init(jax.random.key(3), jnp.zeros((1, 784))),
        )
        x = jax.random.uniform(jax.random.key(4), (19, 784), jnp.float64)
        y = jax.random.randint(jax.random.key(5), (19,), 0, 10)
        cfg = Config(hidden=(5,), activation="tanh")
        got, ll = curvature_of(dataclasses.replace(cfg, evidence_curvature="ekfac"), params, x, y)
        factors, _ = curvature_of(cfg, params, x, y)
        for name in ("Dense_0", "Dense_1"):
            a, g = (np.asarray(f) for f in factors[f"params/{name}/kernel"])
            u, v = np.linalg.eigh(a)[1], np.linalg.eigh(g)[1]
            exact = jaxl2.ggn(model.apply, params, x, y, structure="full", select=f".*{name}/kernel")
            h = np.asarray(exact.ggn)  # the kernel raveled row-major: index (input, output)
            q = np.kron(u, v)  # column (j, k): u_j ⊗ v_k, in the leaf's row-major order
            want = np.sum(q * (h @ q), axis=0).reshape(a.shape[0], g.shape[0])
            s = np.asarray(got[f"params/{name}/kernel"])
            # A has a null space (19 examples, 784 pixels) whose basis eigh picks freely: s is 0 there
            np.testing.assert_allclose(s, want, rtol=1e-7, atol=1e-10 * np.abs(want).max(), err_msg=name)
            assert s.sum() == pytest.approx(np.trace(h), rel=1e-10)
            bias = jaxl2.ggn(model.apply, params, x, y, structure="full", select=f".*{name}/bias")
            np.testing.assert_allclose(
                np.sort(np.asarray(got[f"params/{name}/bias"])),
                np.linalg.eigvalsh(np.asarray(bias.ggn)),
                rtol=1e-8,
                atol=1e-12 * np.abs(bias.ggn).max(),
            )
        assert float(ll) == pytest.approx(float(exact.log_likelihood), rel=1e-12)


@pytest.mark.parametrize(
    "lam, method, steps, prior",
    [
        ("shared", "bisect", 30, "kernels"),
        ("layer", "mackay", 3, "kernels"),
        ("shared", "bisect", 30, "all"),
        ("layer", "mackay", 3, "all"),
        ("layer", "adam", 5, "all"),
    ],
)
def test_the_trainers_update_is_evidence_l2_shared_or_per_tensor(lam, method, steps, prior):
    """``evidence_lambda`` shared: one λ for every leaf of the prior, ``evidence_l2(shared=True)``
    on jaxl2.ggn's exact diagonal; layer: one each (float32, so to 1e-4); by the bisection,
    MacKay's iteration or Adam (learning rate 0.1); ``evidence_prior`` kernels: the kernels, the
    biases held fixed; all: every tensor (jaxl2.ggn and evidence_l2 with ``select=".*"``)."""
    cfg = dataclasses.replace(
        EVIDENCE,
        hidden=(8,),
        evidence_steps=steps,
        evidence_curvature="diag",
        evidence_lambda=lam,
        evidence_method=method,
        evidence_prior=prior,
    )
    select = ".*" if prior == "all" else None
    x = jax.random.uniform(jax.random.key(1), (40, 784))
    y = jax.random.randint(jax.random.key(2), (40,), 0, 10)
    trainer = EvidenceTrainer(cfg, num_train=40)
    state = trainer.init()
    new = jax.jit(trainer.update)(state, x, y)
    curv = jaxl2.ggn(trainer.model.apply, state.params, x, y, structure="diag", select=select)
    rules = jaxl2.evidence_l2(
        curv,
        state.params,
        cfg.l2_init,
        select=select,
        shared=lam == "shared",
        method=method,
        steps=steps,
        bounds=(1e-8, 1.0),
        lr=0.1,
    )
    got = trainer.lambdas(new)
    paths = TENSORS if prior == "all" else LAYERS
    assert sorted(got) == sorted(rules) == paths
    for path in paths:
        assert got[path] == pytest.approx(float(rules[path]), rel=1e-4)
        assert got[path] != pytest.approx(cfg.l2_init, rel=1e-2)  # it moved
    assert (len(set(got.values())) == 1) == (lam == "shared")
    assert float(new.log_evidence) == pytest.approx(
        float(jaxl2.log_evidence(curv, state.params, rules, select=select)), rel=1e-4
    )


@pytest.mark.parametrize("prior", ["kernels", "all"])
def test_the_penalty_covers_the_priors_tensors_its_gradient_on_a_bias_is_lambda_b(prior):
    """An ``evidence_prior`` all run (hidden 8, 2 epochs, an update after each) records a λ for
    every tensor; then one training step of its penalty alone (the data loss 0) moves each leaf by
    ``−lr·λ·w`` (momentum's first step, cosine's lr at step 0), biases included; kernels only
    with ``evidence_prior`` kernels, the biases untouched."""
    cfg = dataclasses.replace(
        EVIDENCE, hidden=(8,), epochs=2, evidence_every=1, evidence_prior=prior, evidence_lambda="layer"
    )
    x = jax.random.uniform(jax.random.key(1), (1000, 784))
    y = jax.random.randint(jax.random.key(2), (1000,), 0, 10)
    trainer = EvidenceTrainer(cfg, num_train=1000)
    state = trainer.init()
    for _ in range(2):
        state, metrics = trainer.train_epoch(state, x, y)
    lams = trainer.lambdas(state)
    assert sorted(lams) == (TENSORS if prior == "all" else LAYERS)
    assert sorted(k for k in metrics if k.startswith("l2/")) == [f"l2/{p}" for p in sorted(lams)]
    assert len(set(lams.values())) == len(lams)  # one each, every one updated

    def no_data(params, x_BxD, y_B):
        return 0.0 * jnp.sum(params["params"]["Dense_0"]["bias"]), {}

    fresh = trainer.state_of(state.params, state.rng)  # step 0: lr is cfg.lr, no momentum yet
    after, _ = trainer.step_fn(fresh, (x[:4], y[:4]), trainer.rules(state.log_l2), no_data)
    before, moved = dict(jaxl2.select.leaves(state.params)), dict(jaxl2.select.leaves(after.params))
    for path, w in before.items():
        want = w * (1 - cfg.lr * lams.get(path, 0.0))
        np.testing.assert_allclose(moved[path], want, rtol=1e-6, atol=1e-9, err_msg=path)
        assert (path in lams) or np.array_equal(moved[path], w)


@pytest.mark.parametrize("prior", ["kernels", "all"])
def test_a_lanczos_update_is_evidence_l2_on_the_librarys_quadrature(prior):
    """``evidence_curvature`` lanczos: the update's λ and evidence are jaxl2.evidence_l2 and
    jaxl2.log_evidence on jaxl2.ggn_lanczos with the probes' key the state gives, over the
    kernels or every tensor (``select=".*"``)."""
    from jaxl2.mnist.marglik import LANCZOS_PROBES, LANCZOS_STEPS

    cfg = dataclasses.replace(EVIDENCE, hidden=(8,), evidence_curvature="lanczos", evidence_prior=prior)
    select = ".*" if prior == "all" else None
    x = jax.random.uniform(jax.random.key(1), (40, 784))
    y = jax.random.randint(jax.random.key(2), (40,), 0, 10)
    trainer = EvidenceTrainer(cfg, num_train=40)
    state = trainer.init()
    new = jax.jit(trainer.update)(state, x, y)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
    curv = jaxl2.ggn_lanczos(
        trainer.model.apply,
        state.params,
        x,
        y,
        key=key,
        probes=LANCZOS_PROBES,
        steps=LANCZOS_STEPS,
        select=select,
    )
    rules = jaxl2.evidence_l2(
        curv,
        state.params,
        cfg.l2_init,
        select=select,
        shared=True,
        method="bisect",
        steps=30,
        bounds=(1e-8, 1.0),
    )
    got = trainer.lambdas(new)
    assert sorted(got) == (TENSORS if prior == "all" else LAYERS)
    for path in got:
        assert got[path] == pytest.approx(float(rules[path]), rel=1e-4)
        assert got[path] != pytest.approx(cfg.l2_init, rel=1e-2)
    assert float(new.log_evidence) == pytest.approx(
        float(jaxl2.log_evidence(curv, state.params, rules, select=select)), rel=1e-4
    )


def test_an_evidence_run_trains_on_everything_records_and_resumes_exactly(tmp_path):
    out_a = str(tmp_path / "a")
    summary = _run.train_and_evaluate(EVIDENCE, out_a)  # one checkpoint, at the end
    assert_typed(summary, RunSummary)
    assert not any(k.startswith("refit") for k in summary)  # it trained on train ∪ validation
    assert json.load(open(os.path.join(out_a, "config.json")))["refit"] is False
    rows = rows_of(out_a)
    assert [r["step"] for r in rows] == [8, 16, 24, 32]  # 4,000 examples / 500 per step
    assert summary["best_epoch"] == 4  # the last epoch's params: nothing was held out
    lams = np.array([[r[f"l2/{p}"] for p in LAYERS] for r in rows])
    np.testing.assert_allclose(lams[0], EVIDENCE.l2_init, rtol=1e-6)  # no update after epoch 1
    assert not np.allclose(lams[1], lams[0]) and np.array_equal(lams[2], lams[1])  # updates: 2, 4
    assert not np.allclose(lams[3], lams[2]) and np.all((lams >= 1e-8) & (lams <= 1.0))
    evidence = [r["log_evidence"] for r in rows]
    assert evidence[0] is None and evidence[1] == evidence[2] and np.isfinite(evidence[3])
    assert summary["log_evidence"] == pytest.approx(evidence[3], rel=1e-6)
    # the summary's penalty: the final params with the λs that trained them (the last update's came after)
    assert summary["penalty"] == pytest.approx(rows[-1]["train_penalty"], rel=1e-5)
    assert summary["l2_final"] == {p: pytest.approx(lams[-1, i], rel=1e-6) for i, p in enumerate(LAYERS)}
    assert open(os.path.join(out_a, "lambda.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert evaluate_run(out_a)["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    text = report.format_summary(summary)
    assert "the last epoch's params, 4 of 4: val was part of the training data" in text
    assert "λ per layer (evidence, at the end)" in text and "log evidence at the last λ update" in text

    # stopped after epoch 3 (checkpoint at 2), resumed: the same λs, evidence and params
    out_b = str(tmp_path / "b")

    summary_b, rows_b = stopped_and_resumed(EVIDENCE, out_b)
    assert [r["epoch"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows, rows_b):
        assert {k: v for k, v in ra.items() if k != "epoch_seconds"} == {
            k: v for k, v in rb.items() if k != "epoch_seconds"
        }
    for u, v in zip(jax.tree.leaves(latest_state(out_a)), jax.tree.leaves(latest_state(out_b))):
        np.testing.assert_array_equal(u, v)
    assert (
        summary_b["l2_final"] == summary["l2_final"]
        and summary_b["test_accuracy"] == summary["test_accuracy"]
    )


@pytest.mark.parametrize(
    "argv, match",
    [
        (["sweep", "--l2", "evidence"], "--l2 evidence tunes λ within one run, so it is for jaxl2 train"),
        (["train", "--l2", "evidence", "--select", "nothing"], "--select 'nothing' matched no parameter"),
        (
            ["train", "--l2", "evidence", "--optimizer", "sgdw", "--weight-decay", "1e-4"],
            "--weight-decay with --l2 evidence: evidence tunes the penalty's λ per layer",
        ),
        (["train", "--evidence-every", "2"], "--evidence-every is a setting of --l2 evidence, which this"),
        (["train", "--l2", "evidence", "--evidence-steps", "0"], "--evidence-steps 0 is invalid"),
        (
            ["train", "--l2", "evidence", "--evidence-prior", "all", "--select", "kernels"],
            "--evidence-prior all covers every tensor, so it leaves nothing for --select 'kernels' to choose",
        ),
        (["train", "--evidence-prior", "all"], "--evidence-prior is a setting of --l2 evidence, which this"),
    ],
)
def test_command_refuses_bad_evidence_combinations_in_one_line(tmp_path, capsys, argv, match):
    assert_refused_in_one_line(argv, tmp_path / "out", capsys, match)


def test_a_sweep_refuses_evidence_before_loading_anything(tmp_path):
    from jaxl2.mnist.sweep import train_sweep

    with pytest.raises(ConfigError, match="l2 evidence tunes λ within one run"):
        train_sweep(Config(l2="evidence"), SweepSettings((1e-3,), (0,)), str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_help_explains_evidence():
    train = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    text = " ".join(train.split())
    assert (
        "or evidence: one λ or one per layer (--evidence-lambda), set every --evidence-every epochs by"
        in text
    )
    assert "--evidence-steps" in text
    assert (
        "--evidence-prior EVIDENCE_PRIOR with --l2 evidence: the tensors the prior and the penalty cover"
        in text
    )
    sweep = cli.build_parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    assert "--evidence-every" not in sweep
