"""A sweep's directory: a resume is refused, naming every setting that differs from its config.json."""

import pytest

from jaxl2 import __version__
from jaxl2.mnist.config import Config, ConfigError, SweepSettings
from jaxl2.mnist.rundir import write_json
from jaxl2.mnist.sweep import train_sweep
from jaxl2.mnist.sweepdir import config_json

CFG = Config(hidden=(16,), epochs=4, batch_size=500)


def test_resume_with_other_settings_is_refused(tmp_path):
    write_json(
        str(tmp_path / "config.json"), config_json(CFG, (0.0, 1e-2), (0, 1), __version__, False, "all")
    )
    with pytest.raises(
        ConfigError, match=r"settings differ .*l2 0.0 vs 0.0,0.01; seeds 0 vs 0,1 in the sweep"
    ):
        train_sweep(CFG, SweepSettings((0.0,), (0,)), str(tmp_path), resume=True)
    with pytest.raises(ConfigError, match=r"config.json: epochs 3 vs 4; hidden 8 vs 16 in the sweep"):
        train_sweep(
            Config(hidden=(8,), epochs=3, batch_size=500),
            SweepSettings((0.0, 1e-2), (0, 1)),
            str(tmp_path),
            resume=True,
        )
