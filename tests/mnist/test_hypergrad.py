"""``l2="auto"`` in the application: the run directory, exact resume, and the command's checks."""

import json
import os

import jax
import numpy as np
import pytest

from jaxl2.mnist import cli
from jaxl2.mnist import run as _run
from jaxl2.mnist.cli import report
from jaxl2.mnist.config import Config, ConfigError, SweepSettings
from jaxl2.mnist.evaluate import evaluate_run
from jaxl2.mnist.results import RunSummary
from tests.keys import assert_typed
from tests.runs import assert_refused_in_one_line, latest_state, rows_of, stopped_and_resumed

AUTO = Config(l2="auto", hidden=(16,), epochs=4, batch_size=500, lr=0.1, l2_every=2, l2_lr=0.1)
LAYERS = ["params/Dense_0/kernel", "params/Dense_1/kernel"]


def test_auto_run_writes_lambdas_and_resumes_exactly(tmp_path):
    out_a = str(tmp_path / "a")
    summary = _run.train_and_evaluate(AUTO, out_a)  # one checkpoint, at the end
    assert_typed(summary, RunSummary)  # with l2_final and the refit's keys
    rows = rows_of(out_a)
    lams = np.array([[r[f"l2/{p}"] for p in LAYERS] for r in rows])
    assert lams.shape == (4, 2) and np.all(lams > 0)
    assert not np.allclose(lams, 1e-4, rtol=1e-3)  # the λs moved from l2_init
    assert all(f"hypergrad/{p}" in rows[0] for p in LAYERS)
    assert summary["l2_final"] == {p: pytest.approx(lams[-1, i], rel=1e-6) for i, p in enumerate(LAYERS)}
    on_disk = json.load(open(os.path.join(out_a, "summary.json")))
    assert on_disk["l2_final"] == summary["l2_final"]
    assert open(os.path.join(out_a, "lambda.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the last row's penalty and norm are those of the final params (float64, by hand)
    final = latest_state(out_a)["params"]["params"]
    sq = {f"params/{k}/kernel": np.sum(np.asarray(v["kernel"], np.float64) ** 2) for k, v in final.items()}
    assert rows[-1]["train_penalty"] == pytest.approx(
        sum(lam / 2 * sq[p] for lam, p in zip(lams[-1], LAYERS)), rel=1e-5
    )
    every = [np.asarray(a, np.float64) for a in jax.tree.leaves(final)]
    assert rows[-1]["train_param_norm"] == pytest.approx(np.sqrt(sum(np.sum(a * a) for a in every)), rel=1e-5)
    # the best params' penalty with the λs of their epoch: Σ_l λ_l/2·‖W_l‖²
    at_best = lams[summary["best_epoch"] - 1]
    expected = sum(lam / 2 * summary["kernel_sq_norm"][p] for lam, p in zip(at_best, LAYERS))
    assert summary["penalty"] == pytest.approx(expected, rel=1e-5)
    best = evaluate_run(out_a, refit=False)  # jaxl2 eval reads an auto run's best checkpoint
    assert best["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    # and by default its refit, trained with the run's final λs fixed
    assert evaluate_run(out_a)["accuracy"] == pytest.approx(summary["refit_test_accuracy"], abs=1e-6)

    # stopped after epoch 3 (checkpoint at 2), resumed: the same λs and the same params
    out_b = str(tmp_path / "b")

    summary_b, rows_b = stopped_and_resumed(AUTO, out_b)
    assert [r["epoch"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows, rows_b):
        assert {k: ra[k] for k in ra if "/" in k} == {k: rb[k] for k in rb if "/" in k}
        assert ra["train_loss"] == rb["train_loss"] and ra["val_accuracy"] == rb["val_accuracy"]
    sa, sb = latest_state(out_a), latest_state(out_b)
    for u, v in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(u, v)
    assert summary_b["l2_final"] == summary["l2_final"]
    assert summary_b["test_accuracy"] == summary["test_accuracy"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["sweep", "--l2", "auto"],
            "--l2 auto tunes λ within one run, so it is for jaxl2 train, not for a sweep",
        ),
        (["sweep", "--l2", "0,auto"], "not for a sweep"),
        (["train", "--l2", "auto", "--select", "nothing"], "--select 'nothing' matched no parameter"),
        (
            ["train", "--l2", "auto", "--optimizer", "adamw", "--weight-decay", "1e-4"],
            "--weight-decay with --l2 auto: auto tunes the penalty's λ per layer",
        ),
        (["train", "--l2-every", "8"], "--l2-every is a setting of --l2 auto, which this run does not use"),
        (["train", "--l2", "auto", "--l2-init", "2"], "--l2-init 2.0 is invalid (the starting λ of auto"),
        (
            ["train", "--l2", "autox"],
            "--l2 'autox' is neither a number, PATTERN=λ[,PATTERN=λ...], auto nor evidence",
        ),
    ],
)
def test_command_refuses_bad_auto_combinations_in_one_line(tmp_path, capsys, argv, match):
    assert_refused_in_one_line(argv, tmp_path / "out", capsys, match)


def test_the_summary_shows_the_final_lambdas():
    summary = {
        "out": "runs/x",
        "epochs": 2,
        "best_epoch": 2,
        "penalty": 0.01,
        "train_loss": 0.2,
        "kernel_sq_norm": {"params/Dense_0/kernel": 10.0},
        "l2_final": {"params/Dense_0/kernel": 0.00123456},
        "seconds": 1.0,
        "examples_per_second": 100.0,
        "compile_seconds": 1.0,
        "device": "cpu",
        **{f"{k}_{m}": 0.5 for k in ("train", "val", "test") for m in ("accuracy", "data_loss")},
    }
    text = report.format_summary(summary)
    assert "λ per layer (auto, at the end): params/Dense_0/kernel 0.00123\n" in text


def test_help_explains_auto():
    text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "or auto: one λ per selected kernel, tuned during the run by the hypergradient" in text
    assert "Luketina et al., ICML 2016" in text and "--l2-every" in text and "lambda.png" in text
    sweep = cli.build_parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    assert "--l2-init" not in sweep


def test_a_sweep_refuses_auto_before_loading_anything(tmp_path):
    from jaxl2.mnist.sweep import train_sweep

    for cfg, l2s in ((Config(), [0.0, "auto"]), (Config(l2="auto"), [1e-3])):
        with pytest.raises(ConfigError, match="l2 auto tunes λ within one run"):
            train_sweep(cfg, SweepSettings(tuple(l2s), (0,)), str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_the_refit_of_an_auto_run_uses_its_final_lambdas_fixed():
    """Σ_l λ_l/2·‖W_l‖² with the run's final λ per layer, by hand, equals the refit config's penalty."""
    import jaxl2
    from jaxl2.mnist.hypergrad import AutoTrainer
    from jaxl2.mnist.model import selector_of
    from jaxl2.mnist.train import Trainer

    final = {LAYERS[0]: 3e-3, LAYERS[1]: 2e-4}
    auto = AutoTrainer(AUTO, 100)
    assert auto.refit_config(None) is None  # unknown before the run has its final λs
    rcfg = auto.refit_config({"l2_final": final})
    assert rcfg is not None and not rcfg.l2_auto
    params = Trainer(rcfg, 100).init().params
    w = {p: np.asarray(v, np.float64) for p, v in jaxl2.select.leaves(params)}
    by_hand = sum(lam / 2 * np.sum(w[p] ** 2) for p, lam in final.items())
    assert float(jaxl2.l2_penalty(params, rcfg.l2, select=selector_of(rcfg))) == pytest.approx(
        by_hand, rel=1e-5
    )
