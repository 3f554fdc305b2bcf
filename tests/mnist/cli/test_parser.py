"""jaxl2/mnist/cli/parser.py: a flag per config field, whose --help is the field's comment; the
command line parsed as the config's types, and back to config fields (paths stored absolute);
`jaxl2 --help` loads no jax."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from jaxl2.mnist.cli.parser import build_parser, field_docs
from jaxl2.mnist.config import Config, RunSettings, SweepSettings
from tests.mnist.cli.command import TINY, jaxl2


@dataclasses.dataclass
class Sample:
    # -- a group header is no field's comment
    # two lines above
    # the field
    above: int = 1
    after: str = "a # not a comment"  # the comment at the end
    # above and
    both: int = 2  # at the end
    bare: int = 3
    spread: tuple = (
        1,
        2,
    )  # after a default of several lines

    def method(self):  # a method's comment is no field's
        return self.above


def test_field_docs_reads_comments_above_and_at_the_end():
    assert field_docs(Sample) == {
        "above": "two lines above the field",
        "after": "the comment at the end",
        "both": "above and at the end",
        "bare": "",
        "spread": "after a default of several lines",
    }


@pytest.mark.parametrize("cls", [Config, RunSettings, SweepSettings])
def test_every_field_has_a_comment(cls):
    docs = field_docs(cls)
    assert list(docs) == [f.name for f in dataclasses.fields(cls)]
    assert all(docs.values()), [k for k, v in docs.items() if not v]


def _help_lines(command, monkeypatch, capsys):
    """``jaxl2 COMMAND --help``, one line per flag: ``{"--flag": "its line"}``."""
    monkeypatch.setenv("COLUMNS", "100000")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    shown, flag = {}, None
    for line in capsys.readouterr().out.splitlines():
        line = line.strip()
        if line.startswith("--"):
            flag = line.split()[0].rstrip(",")
            shown[flag] = line
        elif flag and line and not line.endswith(":"):  # the help below a long flag
            shown[flag] += " " + line
        else:
            flag = None
    return shown


# The config fields that are train flags but no sweep flags (a sweep trains fixed λs).
TRAIN_ONLY = (
    "l2",
    "l2_init",
    "l2_every",
    "l2_lr",
    "evidence_every",
    "evidence_method",
    "evidence_steps",
    "evidence_curvature",
    "evidence_lambda",
    "evidence_prior",
)


def _as_flags(text):
    return re.sub(r"`(\w+)`", lambda m: "--" + m.group(1).replace("_", "-"), text)


@pytest.mark.parametrize(
    "command, settings, own",
    [
        ("train", RunSettings, ("refit", "refit_epochs", "checkpoint_every", "devices")),
        ("sweep", SweepSettings, ("refit", "refit_epochs", "checkpoint_every", "execution")),
    ],
)
def test_each_flag_s_help_is_its_field_s_comment(command, settings, own, monkeypatch, capsys):
    shown = _help_lines(command, monkeypatch, capsys)
    train_only = TRAIN_ONLY if command == "sweep" else ()
    pairs = [(Config, f) for f in field_docs(Config) if f not in train_only] + [(settings, f) for f in own]
    for cls, name in pairs:
        flag = "--" + name.replace("_", "-")
        assert _as_flags(field_docs(cls)[name]) in shown[flag], flag
    if command == "sweep":
        assert field_docs(SweepSettings)["l2s"] in shown["--l2"]
        assert "--l2-init" not in shown and "--evidence-every" not in shown


def test_help_imports_neither_jax_nor_the_application():
    code = "import sys; from jaxl2.mnist import cli; cli.build_parser(); print(' '.join(sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    loaded = {m.split(".")[0] for m in r.stdout.split()}
    assert not {"jax", "flax", "orbax", "numpy"} & loaded


def test_help_offers_no_selection_the_mlp_cannot_match():
    text = jaxl2("train", "--help").stdout
    assert "haiku" not in text and "equinox" not in text


def test_per_layer_l2_items_may_have_spaces(tmp_path):
    r = jaxl2(
        "train", *TINY, "--l2", ".*Dense_0/kernel=1e-3, .*=1e-4", "--out", str(tmp_path / "r"), "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "config.json").read_text())["l2"] == {
        ".*Dense_0/kernel": 1e-3,
        ".*": 1e-4,
    }


def test_each_optimizer_s_default_lr_is_shown_in_help():
    text = jaxl2("train", "--help").stdout
    assert "adam 0.003" in text and "momentum 0.3" in text


def test_idx_dataset_path_is_stored_absolute(tmp_path):
    from tests.mnist.test_data import fake, write_idx

    (tmp_path / "idx").mkdir()
    x, y = fake(60)
    write_idx(tmp_path / "idx", "train", x, y)
    write_idx(tmp_path / "idx", "t10k", x, y)
    r = jaxl2("train", "--dataset", "idx:idx", "--val-size", "10", *TINY[:4], "--batch-size", "10",
              "--out", "r", "--quiet", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "config.json").read_text())["dataset"] == f"idx:{tmp_path / 'idx'}"
    e = jaxl2("eval", "--run", str(tmp_path / "r"), "--json", cwd="/")
    assert e.returncode == 0 and json.loads(e.stdout)["n"] == 60, e.stderr
