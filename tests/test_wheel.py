"""The package as users get it: ``python -m build`` makes a wheel and an sdist, ``twine check``
passes, and the wheel alone (no extras) installed into a fresh virtualenv runs the library's
docstring examples and the library-only docs pages from outside the source tree.

About a minute (a build, a venv and jax's install), so it is marked ``wheel`` and runs in
``make wheel-check`` (which .ci/run calls), not in ``make test``."""

import glob
import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.test_readme import BLOCKS

pytestmark = pytest.mark.wheel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LIBRARY = [  # every module of the library (the application and the command need the mnist extra)
    "jaxl2",
    "jaxl2.auto",
    "jaxl2.check",
    "jaxl2.conventions",
    "jaxl2.decay",
    "jaxl2.errors",
    "jaxl2.norms",
    "jaxl2.penalty",
    "jaxl2.rules",
    "jaxl2.select",
    "jaxl2.step",
    "jaxl2.table",
]
LIBRARY_PAGES = [  # pages whose blocks import nothing beyond jax, numpy, optax and jaxl2
    "docs/guide/auto.md",
    "docs/guide/conventions.md",
    "docs/guide/gradcheck.md",
    "docs/guide/l2-sp.md",
    "docs/guide/large-models.md",
]
# One process (jax is imported once): the modules' docstring examples, then each page's blocks in
# a namespace of its own; prints where jaxl2 came from and whether flax was loaded.
EXAMPLES = r"""
import doctest, importlib, json, sys
modules, pages = json.load(sys.stdin)
failed = sum(doctest.testmod(importlib.import_module(m), optionflags=doctest.ELLIPSIS).failed for m in modules)
for page, blocks in pages:
    namespace = {"__name__": "__main__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page}, python block {i + 1}", "exec"), namespace)
import jaxl2
print(jaxl2.__file__, jaxl2.__version__, sorted(m for m in sys.modules if m.split(".")[0] == "flax"))
sys.exit(failed)
"""


def _run(argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{argv}\n--- stdout:\n{r.stdout[-3000:]}\n--- stderr:\n{r.stderr[-3000:]}"
    return r.stdout


def test_the_wheel_builds_passes_twine_and_runs_the_library_examples_alone(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), ROOT])
    wheel, sdist = glob.glob(str(dist / "*.whl")), glob.glob(str(dist / "*.tar.gz"))
    assert len(wheel) == 1 and len(sdist) == 1
    _run([sys.executable, "-m", "twine", "check", "--strict", *wheel, *sdist])
    assert "jaxl2/py.typed" in zipfile.ZipFile(wheel[0]).namelist()

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", wheel[0]])
    work = tmp_path / "work"  # outside the checkout, so `import jaxl2` is the installed one
    work.mkdir()
    pages = [(page, [code for lang, code in BLOCKS[page] if lang == "python"]) for page in LIBRARY_PAGES]
    out = _run([python, "-c", EXAMPLES], input=json.dumps([LIBRARY, pages]), cwd=work)
    where, version, flax = out.split()[-3:]
    assert where.startswith(str(venv)) and version == "0.3.0" and flax == "[]", out
