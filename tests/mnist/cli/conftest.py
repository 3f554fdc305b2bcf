import pytest

from tests.mnist.cli.command import TINY, jaxl2


@pytest.fixture(scope="package")
def finished(tmp_path_factory):
    """A finished two-epoch run without refit: its directory and its human summary."""
    out = tmp_path_factory.mktemp("runs") / "done"
    r = jaxl2("train", *TINY, "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    return out, r.stdout
