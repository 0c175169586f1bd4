"""bench/bench_sweep.py runs end to end on a tiny trio (harness check, no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_trio

BENCH = Path(__file__).parent.parent / "bench" / "bench_sweep.py"


@pytest.mark.skipif(not os.path.exists("/usr/bin/time"), reason="needs /usr/bin/time")
def test_bench_sweep_smoke(tmp_path):
    make_trio(tmp_path / "trio")
    r = subprocess.run([sys.executable, str(BENCH), "--data", str(tmp_path / "trio"), "--draws",
                        "2", "--method", "ties", "--density", "0.5", "--memory", "32MiB"],
                       capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "| sweep, K = 2" in r.stdout and "| 2 separate merges |" in r.stdout
    assert "x faster than 2 separate merges" in r.stdout
    assert not (tmp_path / "trio" / "sweep-bench").exists()
