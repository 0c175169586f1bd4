"""The options reference (docs/options.md), generated from the command's own parsers.

``python -m streammerge.recipe.options_doc > docs/options.md`` rewrites it; a test fails when the
file drifts from ``--help`` (issue 21.13: the README's hand-kept table had drifted).
"""

from __future__ import annotations

import argparse

from streammerge.methods.registry import METHODS
from streammerge.recipe.parser import (
    build_apply_lora_parser,
    build_parser,
    build_sweep_parser,
    flag_params,
)

HEADER = (
    "# Options\n\n"
    "Every option of `streammerge`, `streammerge sweep` and `streammerge apply-lora`,\n"
    "generated from the parsers\n"
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


def _param_cell(p, method) -> str:
    """One parameter of one method: its YAML key and flag, default and range."""
    d = method.param(p.name).default
    shown = "derived" if d is None else (str(d).lower() if isinstance(d, bool) else f"{d:g}")
    where = "per model" if p.per_model else "global"
    if p.layered:
        where += ", per layer"
    rng = f", {p.range_text()}" if p.range_text() else ""
    flag = f" / `{p.flag}`" if p.name in {q.name for q in flag_params()} or p.name == "weight" \
        else ""  # fmt: skip
    key = f"`{p.key}`" if p.in_yaml else "(flag only)"
    return f"{key}{flag} = {shown} ({where}{rng})"


def methods_section() -> str:
    """The methods and the parameters each declares (``streammerge.methods``), as a table."""
    lines = ["## Methods and their parameters", "",
             "Generated from each method's declaration (`streammerge/methods/<name>.py`): the",
             "YAML key / flag, default, whether it is per model and may vary by layer, range.",
             "", "| method | base | M3 draws | parameters | source |", "|---|---|---|---|---|"]  # fmt: skip
    for m in METHODS.values():
        params = "<br>".join(_param_cell(p, m) for p in m.params)
        m3 = {"weights": "the weights", "t": "`t`"}.get(m.m3, "nothing")
        base = "yes" if m.uses_base else ("model 0" if m.base_is_input else
                                          ("optional" if m.base_optional else "no"))
        lines.append(f"| `{m.name}` | {base} | {m3} | {params} | {_cell(m.source)} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    """docs/options.md's text: the merge command's options, the sweep's, apply-lora's, then
    the methods' parameters."""
    return "\n".join([HEADER, parser_section(build_parser()),
                      parser_section(build_sweep_parser()),
                      parser_section(build_apply_lora_parser()), methods_section()])  # fmt: skip


if __name__ == "__main__":
    print(render(), end="")
