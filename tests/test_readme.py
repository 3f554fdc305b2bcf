"""The README's code blocks: every ``python`` block runs as pasted (each in a fresh process),
and every ``jaxl2 …`` / ``python experiments/…`` line of a ``sh`` block names a real command
with flags that parse (the long ones are not run here: their numbers are in the README)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from jaxl2.mnist import cli

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang == "sh"]


def test_the_readme_has_blocks_and_starts_with_the_two_commands():
    assert len(PYTHON) >= 5 and SHELL
    first = SHELL[0].splitlines()
    assert first[0].startswith("make run") and first[1].startswith("make test")
    assert README.index("```sh") < README.index("```python")


@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_block_runs_as_pasted(code, tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert r.returncode == 0, f"{code}\n--- stderr:\n{r.stderr[-3000:]}"


def _commands(block: str) -> list[list[str]]:
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


SHELL_COMMANDS = [argv for block in SHELL for argv in _commands(block)]


@pytest.mark.parametrize("argv", SHELL_COMMANDS, ids=[" ".join(a)[:60] for a in SHELL_COMMANDS])
def test_shell_line_names_a_real_command_whose_flags_parse(argv):
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
        pytest.fail(f"unknown command in a README sh block: {argv}")
