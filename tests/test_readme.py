"""The code blocks of the README and of every docs page: the ``python`` blocks of a page run as
pasted, in order, in one fresh process (as if the page were pasted into one session), and every
``jaxl2 …`` / ``python experiments/…`` / ``make …`` line of a ``sh`` block names a real command
with flags that parse (the long ones are not run here: their numbers are in the docs)."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from jaxl2.mnist import cli

ROOT = os.path.join(os.path.dirname(__file__), "..")
PAGES = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
)


def _blocks(page: str) -> list[tuple[str, str]]:
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    return re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = {page: _blocks(page) for page in PAGES}
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
PYTHON_PAGES = [page for page in PAGES if any(lang == "python" for lang, _ in BLOCKS[page])]

# Runs a page's blocks in order in one namespace; names the block that fails.
DRIVER = r"""
import json, sys, traceback
page, blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for i, code in enumerate(blocks):
    try:
        exec(compile(code, f"{page}, python block {i + 1}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"{page}: python block {i + 1} of {len(blocks)} failed")
"""


def test_the_readme_has_blocks_and_starts_with_the_two_commands():
    python = [code for lang, code in BLOCKS["README.md"] if lang == "python"]
    shell = [code for lang, code in BLOCKS["README.md"] if lang == "sh"]
    assert python and shell
    first = shell[0].splitlines()
    assert first[0].startswith("make run") and first[1].startswith("make test")
    assert README.index("```sh") < README.index("```python")
    assert len(README.splitlines()) <= 200


def test_every_page_with_code_is_collected():
    assert "README.md" in PYTHON_PAGES and len(PYTHON_PAGES) >= 8, PYTHON_PAGES


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_of_a_page_run_as_pasted(page, tmp_path):
    blocks = [code for lang, code in BLOCKS[page] if lang == "python"]
    r = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps([page, blocks]),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, f"--- stderr:\n{r.stderr[-4000:]}"


def _commands(block: str) -> list[list[str]]:
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


SHELL_COMMANDS = [
    (page, argv) for page in PAGES for lang, code in BLOCKS[page] if lang == "sh" for argv in _commands(code)
]


@pytest.mark.parametrize(
    "page, argv", SHELL_COMMANDS, ids=[f"{p}: {' '.join(a)[:60]}" for p, a in SHELL_COMMANDS]
)
def test_shell_line_names_a_real_command_whose_flags_parse(page, argv):
    prog = os.path.basename(argv[0])
    if prog == "make":
        assert re.search(rf"^{argv[1]}:", open(os.path.join(ROOT, "Makefile")).read(), re.M)
    elif prog == "jaxl2":
        cli.build_parser().parse_args(argv[1:])  # exits 2 on an unknown flag or command
    elif prog == "python":
        script = os.path.join(ROOT, argv[1])
        assert os.path.isfile(script), script
        r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for flag in [a for a in argv[2:] if a.startswith("--")]:
            assert flag in r.stdout, flag
    elif prog == "pip":
        assert argv[1] == "install"
    else:
        pytest.fail(f"unknown command in a sh block of {page}: {argv}")
