"""docs/options.md is the parsers' own reference and matches ``--help`` (issue 21.13)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from streammerge.recipe import options_doc

DOC = Path(__file__).resolve().parent.parent / "docs" / "options.md"
OPTION = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")


def _help(*sub: str) -> str:
    r = subprocess.run([sys.executable, "-m", "streammerge", *sub, "--help"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_options_doc_is_up_to_date():
    assert DOC.read_text() == options_doc.render(), (
        "docs/options.md drifted: run python -m streammerge.recipe.options_doc > docs/options.md"
    )


@pytest.mark.parametrize("sub", [(), ("sweep",)])
def test_every_option_in_help_is_documented_with_its_help(sub):
    text = _help(*sub)
    # the option column of --help: lines that start (indented) with a flag
    heads = [ln.strip().split("  ")[0] for ln in text.splitlines() if ln.startswith("  -")]
    flags = {m for h in heads for m in OPTION.findall(h)}
    assert "--help" in flags and "--base" in flags and len(flags) > 20
    doc = DOC.read_text()
    section = doc.split("## `streammerge sweep`")[1 if sub else 0]
    documented = set(re.findall(r"`(--?[a-z][a-z0-9-]*)", section))
    assert flags <= documented, sorted(flags - documented)
    # each option's help, as --help prints it, is in the table (whitespace aside)
    words = " ".join(section.split())
    parser = options_doc.build_sweep_parser() if sub else options_doc.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help and action.option_strings:
            expanded = " ".join(formatter._expand_help(action).split()).replace("|", "\\|")
            assert expanded in words, action.option_strings
