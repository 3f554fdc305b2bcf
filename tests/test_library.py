"""The library (jaxl2/*.py) stays light and says "bad input" with one error type."""

import ast
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

import jaxl2
from jaxl2 import conventions, select

LIBRARY = [
    "select",
    "rules",
    "penalty",
    "norms",
    "conventions",
    "check",
    "errors",
    "decay",
    "step",
    "table",
    "auto",
]
ROOT = pathlib.Path(__file__).resolve().parent.parent / "jaxl2"
APPLICATION_PACKAGES = {
    "flax",
    "orbax",
    "tensorflow",
    "tensorflow_datasets",
    "matplotlib",
    "rich",
    "mlxtend",
    "equinox",
    "sklearn",
}


def test_the_library_imports_no_application_package():
    code = (
        "import json, sys\n"
        f"for m in {LIBRARY!r}: __import__('jaxl2.' + m)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout))
    assert "jax" in loaded and "jaxl2" in loaded
    assert not loaded & APPLICATION_PACKAGES, loaded & APPLICATION_PACKAGES


def test_the_library_source_names_no_application_package():
    for name in LIBRARY:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= {"__future__", "jax", "jaxl2", "numpy", "optax"} | set(sys.stdlib_module_names), (
                f"jaxl2/{name}.py:{node.lineno} imports {roots}"
            )


def test_every_raise_in_the_library_is_a_jaxl2error():
    for name in LIBRARY:
        for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
            if isinstance(node, ast.Raise):
                exc = node.exc
                assert isinstance(exc, ast.Call) and getattr(exc.func, "id", None) == "Jaxl2Error", (
                    f"jaxl2/{name}.py:{node.lineno}: {ast.unparse(node)}"
                )


PARAMS = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}


def mse(p, x):
    return jnp.mean((x @ p["Dense_0"]["kernel"]) ** 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda: jaxl2.l2_penalty(PARAMS, "1e-3"),
        lambda: jaxl2.l2_penalty(PARAMS, 1e-3, select=42),
        lambda: jaxl2.l2_penalty(PARAMS, 1e-3, select="("),
        lambda: jaxl2.l2_penalty(PARAMS, 1e-3, select="nomatch"),
        lambda: jaxl2.l2_penalty(PARAMS, {".*": 0.1, "x": 0.1}),
        lambda: jaxl2.l2_penalty(PARAMS, {".*bias": 0.1}),
        lambda: jaxl2.selected(PARAMS, [1e-3]),
        lambda: jaxl2.regularized(mse, {"(": 1e-3}),
        lambda: jaxl2.regularized(mse, 1e-3, select=3.0),
        lambda: jaxl2.regularized(5, 1e-3),
        lambda: jaxl2.regularized(mse, 1e-3, has_aux="yes"),
        lambda: jaxl2.regularized(mse, 1e-3, has_aux=True)(PARAMS, jnp.ones((4, 2))),
        lambda: jaxl2.regularized(lambda p: (0.0, {"penalty": 1}), 1e-3, has_aux=True)(PARAMS),
        lambda: jaxl2.l2_penalty(PARAMS, {".*": 1e-3, ".*Dense_0/kernel": 1e-4}),
        lambda: jaxl2.l2_penalty(PARAMS, 1e-3, select=lambda path, leaf: "no"),
        lambda: select.predicate(object()),
        lambda: select.resolve({"kernel": jnp.arange(3)}),
        lambda: select.compile_regex("["),
        lambda: conventions.from_keras(None),
        lambda: conventions.to_keras(-1),
        lambda: conventions.from_torch_weight_decay("1e-4"),
        lambda: conventions.from_decoupled(1e-3, "0.1"),
        lambda: conventions.from_decoupled(1e-3, -0.1),
        lambda: conventions.from_decoupled(1e-3, 0.1, scaled_by_lr="no"),
        lambda: conventions.from_sklearn_alpha(1.0, 2.5),
        lambda: jaxl2.gradcheck(mse, PARAMS, jnp.ones((4, 2)), eps=0),
        lambda: jaxl2.gradcheck(mse, PARAMS, jnp.ones((4, 2)), directions="8"),
        lambda: jaxl2.gradcheck(mse, PARAMS, jnp.ones((4, 2)), l2=True),
    ],
)
def test_bad_input_is_a_jaxl2error(call):
    with pytest.raises(jaxl2.Jaxl2Error):
        call()
