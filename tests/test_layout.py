"""The layout the design asks for, checked on the source: arrows point down (command →
application → library), functions of the application fit on a screen, no private helper is
written twice."""

import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jaxl2"
MAX_LINES = 60


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


def _code_lines(node, source):
    lines = set(range(node.lineno, node.end_lineno + 1))
    for sub in ast.walk(node):
        body = getattr(sub, "body", None)
        if isinstance(sub, ast.FunctionDef | ast.ClassDef) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i in lines if source[i - 1].strip() and not source[i - 1].strip().startswith("#"))


def test_no_function_of_the_application_is_longer_than_a_screen():
    long = []
    for path in (ROOT / "mnist").rglob("*.py"):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, ast.FunctionDef) and _code_lines(node, source) > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.name} {_code_lines(node, source)}")
    assert not long, long


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


def test_a_code_line_counter_that_can_fail():
    source = ["def f():", '    """doc', '    more"""', "    # a comment", "    x = 1", "", "    return x"]
    node = ast.parse("\n".join(source)).body[0]
    assert _code_lines(node, source) == 3  # def, x = 1, return
