"""bench/gpu_smoke.py, the one command a person with a GPU runs first: without a GPU it
says so (status 2); its end-to-end step, run CPU against CPU, produces the table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_smoke.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)  # fmt: skip


@pytest.mark.skipif(
    os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg"), reason="a GPU is here"
)
def test_without_a_gpu_it_says_so():
    r = _run("--skip-tests")
    assert r.returncode == 2 and r.stderr.startswith("gpu_smoke:") and "GPU" in r.stderr


def test_end_to_end_table(tmp_path):
    """The end-to-end rows on a 3 MB trio, the "GPU" side on the CPU: both merges ran, the
    shards compared byte for byte, one markdown row per method."""
    r = _run("--gpu-device", "cpu", "--size-gb", "0.003", "--data", str(tmp_path / "trio"),
             "--work", str(tmp_path / "out"), "--methods", "dare_linear,ties")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| e2e")]
    assert len(rows) == 2 and all("byte-identical" in ln and "MiB" in ln for ln in rows), rows
    assert all("read_s" in ln for ln in rows)  # --profile's stage seconds
