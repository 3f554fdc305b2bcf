"""Running ``python -m jaxl2`` as a user does, for the command-line tests."""

import subprocess
import sys

TINY = [
    "--hidden",
    "16",
    "--epochs",
    "2",
    "--batch-size",
    "500",
    "--no-refit",
]  # refit: test_train, test_refit
FAST = ["--hidden", "32", "--epochs", "2", "--batch-size", "256"]


def jaxl2(*args, timeout=180, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jaxl2", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def one_line_error(r, match):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("jaxl2: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert match in r.stderr, r.stderr
