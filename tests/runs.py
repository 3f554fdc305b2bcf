"""What the tests of a run directory share: its rows, its latest checkpointed state, and a
command refused in one line before anything is written."""

import json
import os

from jaxl2.mnist import cli


def rows_of(out):
    """The ``metrics.jsonl`` rows of the run in ``out``."""
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def latest_state(out):
    """The training state of the run's latest checkpoint."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints"))) as m:
        return m.restore(m.latest_step())["state"]


def assert_refused_in_one_line(argv, out, capsys, match):
    """``jaxl2 ARGV --out OUT`` exits 2 with one ``jaxl2: error:`` line holding ``match``, and
    creates nothing at ``out``."""
    try:
        code = cli.main([*argv, "--out", str(out)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("jaxl2: error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert not out.exists()


def stopped_and_resumed(cfg, out, stop_after=3, every=2):
    """Trains ``cfg`` into ``out``, stopped by Ctrl-C after epoch ``stop_after`` (its checkpoint at
    ``every``), then resumed to the end; returns the resumed run's summary and its metrics rows."""
    import pytest

    from jaxl2.mnist import run
    from jaxl2.mnist.config import RunSettings

    def stop(row):
        if row["epoch"] == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(cfg, out, RunSettings(checkpoint_every=every), on_epoch=stop)
    summary = run.train_and_evaluate(cfg, out, RunSettings(checkpoint_every=every), resume=True)
    return summary, rows_of(out)
