"""The application's Config: each λ mode's settings refused with one message naming the field,
errors that name fields (flags on the command line), each optimizer's default lr, the settings'
type checked, and every valid config round-tripped through config.json."""

import dataclasses
import json

import pytest

from jaxl2.mnist.cli import report
from jaxl2.mnist.config import OPTIMIZERS, Config, ConfigError, validate


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"l2": "automatic"}, "l2 'automatic' is invalid (a number >= 0, REGEX=λ entries, auto or evidence)"),
        (
            {"l2_init": 1e-3},
            "l2_init is a setting of l2 auto or evidence, which this run does not use (l2 0.001)",
        ),
        (
            {"l2": "auto", "l2_init": 0.0},
            "l2_init 0.0 is invalid (the starting λ of auto and evidence, a number from 1e-08",
        ),
        ({"l2": "auto", "l2_every": 0}, "l2_every 0 is invalid (training steps per λ update"),
        ({"l2": "auto", "l2_lr": -1.0}, "l2_lr -1.0 is invalid"),
        (
            {"l2": "auto", "optimizer": "adamw", "weight_decay": 1e-4, "allow_both": True},
            "weight_decay with l2 auto: auto tunes the penalty's λ per layer",
        ),
        ({"evidence_every": 3}, "evidence_every is a setting of l2 evidence, which this run does not use"),
        ({"l2": "auto", "evidence_steps": 2}, "evidence_steps is a setting of l2 evidence, which this run"),
        ({"l2": "evidence", "evidence_every": 0}, "evidence_every 0 is invalid (epochs per λ update"),
        ({"l2": "evidence", "epochs": 3}, "evidence_every 5 is more than epochs 3: λ would never be updated"),
        ({"l2": "evidence", "evidence_steps": 1.5}, "evidence_steps 1.5 is invalid (iterations per λ update"),
        ({"l2": "evidence", "l2_every": 8}, "l2_every is a setting of l2 auto, which this run does not use"),
        (
            {"l2": "evidence", "evidence_curvature": "full"},
            "evidence_curvature 'full' is unknown (allowed: kron, ekfac, diag, lanczos)",
        ),
        (
            {"l2": "evidence", "evidence_lambda": "per-layer"},
            "evidence_lambda 'per-layer' is unknown (allowed: shared, layer)",
        ),
        ({"evidence_lambda": "layer"}, "evidence_lambda is a setting of l2 evidence, which this run"),
        (
            {"l2": "evidence", "evidence_curvature": "lanczos", "evidence_lambda": "layer"},
            "evidence_curvature lanczos estimates the evidence of one λ for all the selected leaves: it "
            "needs evidence_lambda shared, not layer",
        ),
        (
            {"l2": "evidence", "evidence_method": "newton"},
            "evidence_method 'newton' is unknown (allowed: bisect, mackay, adam)",
        ),
        (
            {"evidence_prior": "all"},
            "evidence_prior is a setting of l2 evidence, which this run does not use",
        ),
        (
            {"l2": "evidence", "evidence_prior": "biases"},
            "evidence_prior 'biases' is unknown (allowed: kernels, all)",
        ),
        (
            {"l2": "evidence", "evidence_prior": "all", "select": ".*kernel"},
            "evidence_prior all covers every tensor, so it leaves nothing for select '.*kernel' to choose",
        ),
        (
            {"l2": "evidence", "optimizer": "adamw", "weight_decay": 1e-4, "allow_both": True},
            "weight_decay with l2 evidence: evidence tunes the penalty's λ per layer",
        ),
    ],
)
def test_bad_lambda_mode_settings_are_refused_naming_the_field(changes, match):
    with pytest.raises(ConfigError) as e:
        validate(dataclasses.replace(Config(), **changes))
    assert match in str(e.value)


def test_auto_and_evidence_configs_round_trip_through_json():
    auto = validate(Config(l2="auto", l2_init=1e-3, l2_every=8, l2_lr=0.05))
    assert auto.l2_auto and auto.l2_on
    evidence = validate(Config(l2="evidence", l2_init=1e-3, evidence_every=2, evidence_steps=9))
    assert evidence.l2_evidence and evidence.l2_on and not evidence.l2_auto
    every = validate(
        Config(l2="evidence", evidence_prior="all", evidence_lambda="layer", evidence_method="adam")
    )
    for cfg in (auto, evidence, every):
        assert Config.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    # a config.json written before evidence_prior existed reads as the kernels-only prior it ran with
    old = {k: v for k, v in evidence.to_json().items() if k != "evidence_prior"}
    assert Config.from_json(old).evidence_prior == "kernels"


def test_each_optimizer_has_its_own_default_lr():
    assert validate(Config(optimizer="adam")).lr == OPTIMIZERS["adam"].lr == 3e-3
    assert validate(Config()).lr == 0.3 and validate(Config(optimizer="adam", lr=0.01)).lr == 0.01


def test_config_errors_name_fields_and_the_cli_names_flags():
    with pytest.raises(ConfigError) as e:
        validate(Config(batch_size=0))
    assert str(e.value) == "batch_size 0 is invalid (an integer >= 1)"
    assert e.value.render(report.flag) == "--batch-size 0 is invalid (an integer >= 1)"


def test_val_size_error_from_data_names_the_field():
    from jaxl2.mnist.data import load

    with pytest.raises(ConfigError, match="val_size 4000 is invalid for a training split of 4000 images"):
        load("mnist5k", val_size=4000)


def test_settings_of_another_type_name_the_fields_before_anything_runs(tmp_path):
    from jaxl2.mnist import train_and_evaluate, train_sweep

    with pytest.raises(
        ConfigError, match=r"settings must be a SweepSettings \(its fields: l2s, seeds, .*got list"
    ):
        train_sweep(Config(), [0.0, 1e-3], str(tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"settings must be a RunSettings \(its fields: refit, .*got dict"):
        train_and_evaluate(Config(), str(tmp_path / "r"), {"refit": False})
    assert not list(tmp_path.iterdir())
