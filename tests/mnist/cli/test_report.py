"""jaxl2/mnist/cli/report.py: what the commands print besides results (a warning at chance)."""

from jaxl2.mnist.cli import report
from jaxl2.mnist.config import Config


def test_a_run_at_chance_warns(capsys):
    report.warn_if_chance([(0.11, 0.3, 1e-3)], Config(optimizer="adam"))
    err = capsys.readouterr().err
    assert "near chance" in err and "--lr" in err and err.count("\n") == 1
