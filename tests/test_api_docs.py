"""The API reference covers the public face: every name in ``jaxl2.__all__`` and
``jaxl2.mnist.__all__`` has a ``::: name`` entry in docs/api.md and a docstring of its own, and
the ``TYPE_CHECKING`` imports that type checkers and the API docs read name exactly the lazy
exports."""

import ast
import importlib
import inspect
import os
import re

import pytest

import jaxl2
import jaxl2.mnist

ROOT = os.path.join(os.path.dirname(__file__), "..")
API = open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8").read()
ENTRIES = set(re.findall(r"^::: ([\w.]+)$", API, flags=re.M))
PUBLIC = [f"jaxl2.{n}" for n in jaxl2.__all__] + [f"jaxl2.mnist.{n}" for n in jaxl2.mnist.__all__]


def _object(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("dotted", PUBLIC)
def test_public_name_has_an_api_entry_and_a_docstring(dotted):
    assert dotted in ENTRIES, f"{dotted} has no '::: {dotted}' line in docs/api.md"
    obj = _object(dotted)
    doc = inspect.getdoc(obj) or ""
    name = dotted.rsplit(".", 1)[1]
    generated = doc.startswith(f"{getattr(obj, '__name__', name)}(")  # a NamedTuple's own repr line
    assert doc.strip() and not generated, f"{dotted} has no docstring"


def test_api_page_names_only_public_things():
    stale = {e for e in ENTRIES if e.count(".") == 1 or e.startswith("jaxl2.mnist.")} - set(PUBLIC)
    assert not stale, f"docs/api.md documents names that are not exported: {sorted(stale)}"


def test_each_lazy_export_is_listed_once_and_defined_where_it_says():
    assert len(jaxl2.__all__) == len(set(jaxl2.__all__))
    for name, (module, attr) in jaxl2._EXPORTS.items():
        value = getattr(jaxl2, name)
        assert value is importlib.import_module(f"{module}.{attr}" if module == "jaxl2" else module) or (
            value is getattr(importlib.import_module(module), attr)
        )


@pytest.mark.parametrize("package", ["jaxl2", "jaxl2.mnist"])
def test_type_checking_imports_are_the_lazy_exports(package):
    module = importlib.import_module(package)
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    typed = {}
    for node in guarded.body:
        for alias in node.names:
            typed[alias.asname or alias.name] = (node.module, alias.name)
    exports = {}
    for name, where in module._EXPORTS.items():
        mod, attr = where if isinstance(where, tuple) else (where, name)
        exports[name] = (package, name) if mod == f"{package}.{name}" else (mod, attr)
    assert typed == exports
