"""The datasets beside mnist5k, through load: IDX files the tests write themselves, TFDS's mock data."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxl2.mnist import data, sources
from tests.mnist.test_data import fake, write_idx


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    xi, yi = fake(60)
    xt, yt = fake(20, 1)
    write_idx(tmp_path, "train", xi, yi, gz=gz)
    write_idx(tmp_path, "t10k", xt, yt, gz=gz)
    d = data.load(f"idx:{tmp_path}", val_size=10)
    assert d.train.x.shape == (50, 784) and d.val.x.shape == (10, 784) and d.test.x.shape == (20, 784)
    assert d.train.x.dtype == np.float32 and d.train.y.dtype == np.int32
    np.testing.assert_array_equal(d.test.x, (xt.reshape(20, 784) / 255).astype(np.float32))
    np.testing.assert_array_equal(d.test.y, yt)
    assert 0.0 <= d.train.x.min() and d.train.x.max() <= 1.0
    # validation is carved from training data, stratified: one per class
    assert sorted(d.val.y.tolist()) == list(range(10))
    both = np.concatenate([d.train.x, d.val.x])
    assert sorted(map(bytes, both)) == sorted(map(bytes, (xi.reshape(60, 784) / 255).astype(np.float32)))
    # the same seed gives the same split; another seed another one
    assert np.array_equal(data.load(f"idx:{tmp_path}", val_size=10).val.x, d.val.x)
    assert not np.array_equal(data.load(f"idx:{tmp_path}", val_size=10, split_seed=1).val.x, d.val.x)


def test_idx_test_pair_only(tmp_path):
    write_idx(tmp_path, "t10k", *fake(15))
    d = data.load(f"idx:{tmp_path}")
    assert d.train is None and d.val is None and d.test.x.shape == (15, 784)


@pytest.mark.parametrize(
    "setup, match",
    [
        (
            lambda p: write_idx(p, "train", *fake(10), truncate=100),
            r"train-images-idx3-ubyte: 7740 data bytes, expected 7840.*truncated",
        ),
        (
            lambda p: write_idx(p, "train", *fake(10), magic=1234),
            r"magic number 1234, expected images \(2051\)",
        ),
        (
            lambda p: write_idx(p, "t10k", fake(10)[0], np.arange(12) % 10),
            r"has 10 images but .* has 12 labels",
        ),
        (
            lambda p: (write_idx(p, "t10k", *fake(10)), os.remove(os.path.join(p, "t10k-labels-idx1-ubyte"))),
            r"t10k-labels-idx1-ubyte\[.gz\] is missing",
        ),
        (lambda p: None, r"no IDX files found"),
        (
            lambda p: (
                open(os.path.join(p, "train-images-idx3-ubyte.gz"), "wb").write(b"not gzip")
                and write_idx(p, "x", *fake(1))
            ),
            r"cannot read",
        ),
    ],
)
def test_idx_errors_name_the_file(tmp_path, setup, match):
    setup(tmp_path)
    if os.path.exists(os.path.join(tmp_path, "train-images-idx3-ubyte.gz")):
        with open(os.path.join(tmp_path, "train-labels-idx1-ubyte"), "wb") as f:
            f.write((2049).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(data.DataError, match=match):
        data.load(f"idx:{tmp_path}", val_size=2)


def test_tfds_mnist_through_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        d = data.load("mnist", val_size=10)
    assert d.train.x.shape == (20, 784) and d.val.x.shape == (10, 784) and d.test.x.shape == (30, 784)
    assert d.train.x.dtype == np.float32 and 0 <= d.train.x.min() and d.train.x.max() <= 1
    assert d.test.y.dtype == np.int32 and d.test.y.min() >= 0 and d.test.y.max() <= 9


def test_tfds_unavailable_is_one_clear_line(monkeypatch):
    import tensorflow_datasets as tfds

    def offline(*a, **k):
        raise ConnectionError("Failed to resolve host\nmore lines")

    monkeypatch.setattr(tfds, "data_source", offline)
    monkeypatch.setattr(sources, "_reachable", lambda url, timeout=10.0: None)  # the server answers
    with pytest.raises(data.DataError) as e:
        data.load("mnist")
    msg = e.value.render(lambda f: "--" + f)
    assert "\n" not in msg and "ConnectionError: Failed to resolve host" in msg
    assert "--dataset mnist5k" in msg and "--dataset idx:DIR" in msg


def test_offline_mnist_fails_within_30_seconds(tmp_path):
    """Not yet downloaded and no network: one line at once, not minutes of TFDS retries."""
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    if sources._reachable(tfds_mnist._MNIST_URL, timeout=5) is None:
        pytest.skip("the MNIST server is reachable from here: this test is for offline machines")
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "jaxl2", "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "tfds")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    seconds = time.perf_counter() - t0
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "unreachable" in r.stderr and "--dataset mnist5k" in r.stderr
    assert seconds < 30, seconds
    assert not (tmp_path / "runs").exists()
