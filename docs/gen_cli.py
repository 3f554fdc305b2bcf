"""mkdocs hook: the command reference (docs/app/cli.md) written from the argparse parser itself.

The page's source holds only a marker; every flag, its default and its help come from
``build_parser()`` at build time, so the reference cannot drift from the command.
"""

import argparse

# The one place the docs import the command line (it moves with the CLI: change this line only).
from jaxl2.mnist.cli import build_parser

MARKER = "<!-- generated: the command reference -->"


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    names = action.option_strings or [action.dest]
    text = ", ".join(f"`{n}`" for n in names)
    if action.option_strings and action.nargs != 0:
        text += f" `{action.metavar or action.dest.upper()}`"
    return text


def _help(action: argparse.Action) -> str:
    text = _cell(action.help or "")
    if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS) and "default" not in text:
        text += f" (default {action.default})"
    return text


def _parser_markdown(name: str, parser: argparse.ArgumentParser, summary: str) -> list[str]:
    out = [f"## `{name}`", ""]
    if summary:
        out += [f"*{_cell(summary)}*", ""]
    if parser.description:
        out += [_cell(parser.description), ""]
    out += ["```text", parser.format_usage().strip(), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS and a.dest != "help"]
        actions = [a for a in actions if not isinstance(a, argparse._SubParsersAction)]
        if not actions:
            continue
        out += [f"**{group.title}**", "", "| flag | what it does |", "|---|---|"]
        out += [f"| {_flags(a)} | {_help(a)} |" for a in actions]
        out.append("")
    if parser.epilog:
        out += [_cell(parser.epilog), ""]
    return out


def reference() -> str:
    parser = build_parser()
    out = [_cell(parser.description), "", _cell(parser.epilog), ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                out += _parser_markdown(f"jaxl2 {name}", sub, helps.get(name, ""))
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
