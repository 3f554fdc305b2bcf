"""The machine under a run: jaxl2's cache directory, the device's name, work in the background."""

import os
import threading

import jax
import pytest

from jaxl2.mnist.runtime import Background, cache_dir, device_name


def test_the_cache_directory_is_jaxl2_cache_dir_else_under_xdg_cache_home_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXL2_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("JAXL2_CACHE_DIR")
    assert cache_dir() == str(tmp_path / "xdg" / "jaxl2")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == str(tmp_path / ".cache" / "jaxl2")


def test_the_device_name_says_the_platform_and_for_a_cpu_its_cores():
    d, name = jax.devices()[0], device_name()
    if d.platform == "cpu":
        assert name.startswith("cpu: ") and name.endswith(f" ({os.cpu_count()} cores)"), name
    else:
        assert name == f"{d.platform}: {d.device_kind} × {jax.device_count()}"


def test_background_work_runs_beside_the_caller_and_its_error_is_raised_or_not():
    assert Background(threading.get_ident).result() != threading.get_ident()
    assert Background(lambda: 6 * 7).result() == 42
    failed = Background(lambda: 1 / 0)
    failed.join(reraise=False)  # the caller is raising its own error
    with pytest.raises(ZeroDivisionError):
        failed.join()
    Background(None).join()  # nothing to do
