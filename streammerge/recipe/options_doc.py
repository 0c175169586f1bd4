"""The options reference (docs/options.md), generated from the command's own parsers.

``python -m streammerge.recipe.options_doc > docs/options.md`` rewrites it; a test fails when the
file drifts from ``--help`` (issue 21.13: the README's hand-kept table had drifted).
"""

from __future__ import annotations

import argparse

from streammerge.recipe.parser import build_parser, build_sweep_parser

HEADER = (
    "# Options\n\n"
    "Every option of `streammerge` and `streammerge sweep`, generated from the parsers\n"
    "(`python -m streammerge.recipe.options_doc > docs/options.md`; `tests/test_options_doc.py`\n"
    "fails when this file drifts from `--help`).\n"
)


#: Width of the usage block (fixed: the file must not depend on the terminal).
WIDTH = 100


def _cell(text: str) -> str:
    """``text`` fit for one Markdown table cell (no pipes, no newlines)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action, help_text: str) -> str:
    """The default shown in the table: empty when there is none to show or the help
    already states it."""
    d = action.default
    if d is None or d is argparse.SUPPRESS or isinstance(d, bool) or "default" in help_text:
        return ""
    return f"`{d}`"


def _name(action: argparse.Action) -> str:
    """``--flag VALUE`` / ``-o, --output DIR`` / ``MODEL ...`` as the help names it."""
    if not action.option_strings:
        metavar = action.metavar or action.dest
        return f"`{metavar} ...`" if action.nargs in ("*", "+") else f"`{metavar}`"
    value = ""
    if action.nargs != 0:
        metavar = action.metavar or action.dest.upper()
        value = metavar if isinstance(metavar, str) else " ".join(metavar)
        if action.choices is not None and action.metavar is None:
            value = "{" + ",".join(map(str, action.choices)) + "}"
        value = f" [{value}]" if action.nargs == "?" else f" {value}"
    return ", ".join(f"`{o}{value}`" for o in action.option_strings)


def parser_section(parser: argparse.ArgumentParser) -> str:
    """One parser as Markdown: its usage line, then a table per argument group."""
    formatter = parser.formatter_class(prog=parser.prog, width=WIDTH)  # not the terminal's
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    lines = [f"## `{parser.prog}`", "", "```", formatter.format_help().strip(), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS]
        if not actions:
            continue
        lines += [f"### {group.title}", "", "| option | default | what it does |",
                  "|---|---|---|"]  # fmt: skip
        for action in actions:
            help_text = formatter._expand_help(action) if action.help else ""
            lines.append(f"| {_name(action)} | {_default(action, help_text)} | {_cell(help_text)} |")
        lines.append("")
    return "\n".join(lines)


def render() -> str:
    """docs/options.md's text: the merge command's options, then the sweep's."""
    return "\n".join([HEADER, parser_section(build_parser()),
                      parser_section(build_sweep_parser())])  # fmt: skip


if __name__ == "__main__":
    print(render(), end="")
