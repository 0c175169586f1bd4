"""``streammerge sweep`` hardening: evaluator scores must be finite and sweep.json strict
JSON, the evaluator runs without a shell and within a timeout, the disk must hold every
output at once, errors are one line, ``--plan`` writes nothing, one seed repeats a sweep,
and the command is reachable as ``python -m streammerge``."""

from __future__ import annotations

import subprocess
import sys

from conftest import make_trio, run_cli  # noqa: F401


def _run_module(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streammerge", *argv], check=False,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_python_dash_m_and_help_name_the_sweep():
    top = _run_module("--help")
    assert top.returncode == 0, top.stderr
    assert "streammerge sweep --help" in " ".join(top.stdout.split())  # however it wraps
    sub = _run_module("sweep", "--help")
    assert sub.returncode == 0, sub.stderr
    assert sub.stdout.startswith("usage: streammerge sweep") and "--eval" in sub.stdout
