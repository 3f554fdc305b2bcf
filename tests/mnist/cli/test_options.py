"""jaxl2/mnist/cli/options.py: from flags to config fields (paths stored absolute)."""

import json

from tests.mnist.cli.command import TINY, jaxl2


def test_idx_dataset_path_is_stored_absolute(tmp_path):
    from tests.mnist.test_data import fake, write_idx

    (tmp_path / "idx").mkdir()
    x, y = fake(60)
    write_idx(tmp_path / "idx", "train", x, y)
    write_idx(tmp_path / "idx", "t10k", x, y)
    r = jaxl2("train", "--dataset", "idx:idx", "--val-size", "10", *TINY[:4], "--batch-size", "10",
              "--out", "r", "--quiet", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "config.json").read_text())["dataset"] == f"idx:{tmp_path / 'idx'}"
    e = jaxl2("eval", "--run", str(tmp_path / "r"), "--json", cwd="/")
    assert e.returncode == 0 and json.loads(e.stdout)["n"] == 60, e.stderr
