"""From parsed flags to what the application takes: the config fields given, absolute data
paths, the refit choice of a resumed run, the compilation cache, stdout kept for ``--json``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from jaxl2.mnist.config import FIELDS, REFIT_EPOCHS

__all__ = ["given", "refit_choice", "enable_cache", "fd1_to_stderr"]


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, ``--dataset idx:DIR`` and ``--data-dir`` as
    absolute paths (so that the run's config.json still finds them from another working
    directory: ``jaxl2 eval --run``)."""
    out = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    if str(out.get("dataset", "")).startswith("idx:") and len(out["dataset"]) > 4:
        out["dataset"] = "idx:" + os.path.abspath(os.path.expanduser(out["dataset"][4:]))
    if out.get("data_dir"):
        out["data_dir"] = os.path.abspath(os.path.expanduser(out["data_dir"]))
    return out


def refit_choice(args: argparse.Namespace, saved: dict[str, Any] | None, default: bool) -> dict[str, Any]:
    """``refit`` and ``refit_epochs``: the flags, else (``--resume``) what the run was started
    with (its ``config.json``), else the command's ``default`` and :data:`REFIT_EPOCHS`."""
    refit, epochs = args.refit, args.refit_epochs
    if saved is not None:
        refit = saved.get("refit", default) if refit is None else refit
        epochs = epochs or saved.get("refit_epochs")
    return {"refit": default if refit is None else refit, "refit_epochs": epochs or REFIT_EPOCHS}


def enable_cache(args: argparse.Namespace) -> None:
    """JAX's persistent compilation cache, unless ``--no-cache``."""
    if not getattr(args, "no_cache", False):
        from jaxl2.mnist.runtime import enable_compilation_cache

        enable_compilation_cache()


@contextlib.contextmanager
def fd1_to_stderr(on: bool) -> Iterator[None]:
    """While ``on``, file descriptor 1 (stdout, where native libraries write) goes to stderr."""
    if not on:
        yield
        return
    sys.stdout.flush()
    kept = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(kept, 1)
        os.close(kept)
