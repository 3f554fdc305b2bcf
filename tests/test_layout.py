"""The layout the design asks for, checked on the source: arrows point down (command →
application → library), no private helper is written twice."""

import ast
import collections
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jaxl2"


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_the_library_imports_no_application_module_and_has_no_exemption():
    for path in ROOT.glob("*.py"):
        names = set(_imports(path))
        assert not {n for n in names if n.startswith(("jaxl2.mnist", "flax"))}, path.name


def test_the_application_never_imports_its_command_line():
    for path in (ROOT / "mnist").glob("*.py"):
        if path.name == "__main__.py":  # `python -m jaxl2.mnist`: the command's own entry point
            continue
        names = set(_imports(path))
        assert not {n for n in names if n.startswith("jaxl2.mnist.cli")}, path.name
        assert "argparse" not in names, path.name


def test_no_private_helper_is_defined_in_two_modules():
    where = collections.defaultdict(list)
    for path in ROOT.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.FunctionDef)
                and node.name.startswith("_")
                and not node.name.startswith("__")
            ):
                where[node.name].append(str(path.relative_to(ROOT)))
    twice = {name: files for name, files in where.items() if len(files) > 1}
    assert not twice, twice


def test_no_application_module_shares_its_name_with_a_library_module():
    library = {p.stem for p in ROOT.glob("*.py")} - {"__init__", "__main__"}
    application = {p.stem for p in (ROOT / "mnist").glob("*.py")}
    assert not library & application, library & application


def test_no_command_module_shares_its_name_with_an_application_module():
    commands = {p.stem for p in (ROOT / "mnist" / "cli").glob("*.py")} - {"__init__"}
    application = {p.stem for p in (ROOT / "mnist").glob("*.py")}
    assert not commands & application, commands & application


def test_the_core_imports_no_feature():
    """config, data, model, train (state, step, epoch, evaluation, the loop) and the run
    directory never import the λ modes, the sweep, the refit, the fused calls, several devices,
    the evaluation, the benchmark, the plots, the TensorBoard events or the
    run that composes them."""
    features = (
        "hypergrad",
        "marglik",
        "sweep",
        "sweepdir",
        "refit",
        "fused",
        "parallel",
        "tensorboard",
        "evaluate",
        "bench",
        "plots",
        "run",
    )
    for name in ("config", "data", "model", "train", "rundir"):
        parts = [n.split(".") for n in _imports(ROOT / "mnist" / f"{name}.py")]
        assert not [p for p in parts if p[:2] == ["jaxl2", "mnist"] and p[2:3] and p[2] in features], name


def test_the_docs_layout_page_names_every_module_and_no_other():
    page = (ROOT.parent / "docs" / "app" / "index.md").read_text()
    block = page.split("```text\n", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"[a-z_]+\.py", block))
    modules = {
        p.name
        for folder in (ROOT, ROOT / "mnist", ROOT / "mnist" / "cli")
        for p in folder.glob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert not modules - named, f"modules the layout page does not name: {sorted(modules - named)}"
    assert not named - modules, f"the layout page names modules that do not exist: {sorted(named - modules)}"


def test_nothing_unpickles():
    for path in ROOT.glob("*.py"):
        text = path.read_text()
        assert "pickle" not in text and "allow_pickle=True" not in text, path.name
