"""The datasets beside the default mnist5k, which :func:`jaxl2.mnist.data.load` imports only when asked.

* ``mnist`` — full MNIST through ``tfds.data_source`` (ArrayRecord; TensorFlow is not needed);
  offline, one line at once instead of minutes of TFDS retries.
* ``idx:DIR`` — MNIST's raw IDX files, for machines that cannot download. An IDX file is a
  big-endian int32 magic number (2051 for images, 2049 for labels), one int32 per dimension, then
  the uint8 data; ``DIR`` holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` and the
  same for ``t10k`` (each ``.gz`` or not). Every file is checked (magic number, shape, size,
  labels), and a bad one is an error that names it.
"""

from __future__ import annotations

import gzip
import math
import os

import numpy as np

from jaxl2.mnist.config import field
from jaxl2.mnist.data import DataError, Split, scaled

__all__ = ["tfds_mnist", "read_idx", "write_idx", "idx_dir"]


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


def tfds_mnist(data_dir: str | None) -> dict[str, Split]:
    """Full MNIST's train and test splits through ``tfds.data_source``, downloaded if the
    server answers (TFDS would retry an unreachable one for minutes: it is asked once first)."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS warns about absent folders on stderr
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - a dependency of the [mnist] extra
        raise DataError(f"{field('dataset')} mnist needs tensorflow-datasets ({e})") from None

    offline = f"offline, use {field('dataset')} mnist5k (shipped, 5,000 images) or {field('dataset')} idx:DIR (raw IDX files)"
    out = {}
    for split in ("train", "test"):
        try:
            src = tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)
        except Exception:  # noqa: BLE001 - not prepared in data_dir (TFDS raises several kinds)
            from tensorflow_datasets.image_classification import mnist

            why = _reachable(getattr(mnist, "_MNIST_URL", "https://storage.googleapis.com/"))
            if why:
                raise DataError(
                    f"MNIST is not in TensorFlow Datasets' data_dir and {why}; {offline}"
                ) from None
            try:
                src = tfds.data_source("mnist", split=split, data_dir=data_dir, download=True)
            except Exception as e:  # noqa: BLE001 - TFDS raises many kinds when offline
                first = str(e).splitlines()[0][:200] if str(e) else ""
                raise DataError(
                    f"could not load MNIST through TensorFlow Datasets ({type(e).__name__}: {first}); {offline}"
                ) from None
        items = [src[i] for i in range(len(src))]
        x = np.stack([it["image"] for it in items]) if items else np.zeros((0, 28, 28, 1), np.uint8)
        out[split] = scaled(x, np.asarray([it["label"] for it in items]))
    return out


FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str, magic: int) -> np.ndarray:
    """Reads one IDX file (gzip or not), checking its magic number and its size.

    ``magic`` is 2051 for images (``uint8 [N, 28, 28]``) and 2049 for labels (``uint8 [N]``).

    Examples:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "labels")
      >>> _ = open(path, "wb").write((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 0, 9]))
      >>> read_idx(path, 2049)
      array([7, 0, 9], dtype=uint8)
    """
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    ndim = 3 if magic == 2051 else 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    found, *dims = (int.from_bytes(raw[i : i + 4], "big") for i in range(0, header, 4))
    if found != magic:
        kind = "images (2051)" if magic == 2051 else "labels (2049)"
        raise DataError(f"{path}: magic number {found}, expected {kind}: wrong or corrupt file")
    if ndim == 3 and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}×{dims[2]}, expected 28×28")
    if len(raw) - header != math.prod(dims):
        raise DataError(
            f"{path}: {len(raw) - header} data bytes, expected {math.prod(dims)} for shape {dims}: "
            "truncated or corrupt file"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def write_idx(path: str, array: np.ndarray, magic: int) -> None:
    """Writes ``array`` as one IDX file (gzip when ``path`` ends in ``.gz``): :func:`read_idx`'s input.

    Examples:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "labels")
      >>> write_idx(path, np.array([7, 0, 9]), 2049)
      >>> open(path, "rb").read() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9])
      True
    """
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(b"".join(d.to_bytes(4, "big") for d in (magic, *array.shape)))
        f.write(np.ascontiguousarray(array, np.uint8).tobytes())


def _find(directory: str, stem: str) -> str | None:
    """``DIR/stem`` or ``DIR/stem.gz``, whichever exists."""
    return next((p for p in (stem, stem + ".gz") if os.path.isfile(os.path.join(directory, p))), None)


def idx_dir(directory: str, train: bool = True, test: bool = True) -> dict[str, Split]:
    """The ``train`` and ``test`` pairs present in ``directory`` (a pair not asked for is not read)."""
    if not os.path.isdir(directory):
        raise DataError(f"idx:{directory}: no such directory (expected the four MNIST IDX files)")
    out = {}
    for split, (img_stem, lbl_stem) in FILES.items():
        img, lbl = _find(directory, img_stem), _find(directory, lbl_stem)
        if not (train if split == "train" else test) or img is None and lbl is None:
            continue
        if img is None or lbl is None:
            missing = img_stem if img is None else lbl_stem
            raise DataError(f"idx:{directory}: {missing}[.gz] is missing (its pair is present)")
        img, lbl = os.path.join(directory, img), os.path.join(directory, lbl)
        x, y = read_idx(img, 2051), read_idx(lbl, 2049)
        if len(x) != len(y):
            raise DataError(f"{img} has {len(x)} images but {lbl} has {len(y)} labels")
        if y.size and y.max() > 9:
            raise DataError(f"{lbl}: label {int(y.max())} is out of range 0..9")
        out[split] = scaled(x, y)
    if not out:
        names = ", ".join(f"{s}[.gz]" for pair in FILES.values() for s in pair)
        raise DataError(f"idx:{directory}: no IDX files found (looked for {names})")
    return out
