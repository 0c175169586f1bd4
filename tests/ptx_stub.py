"""Compiling the Triton kernels for an NVIDIA target without a GPU, in a child process:
a stub driver names the target (Triton ships ptxas), nothing is launched. Shared by the
PTX checks of ``test_triton_kernel.py``, ``test_triton_stats.py`` and
``test_compiled_kernels.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def stub_driver_preamble(arch: str, device: str) -> str:
    """The first lines of a child script: ``TRITON_INTERPRET`` dropped, torch imported, and
    a stub driver for target ``sm_<arch>`` (``arch`` is Python source, e.g. ``"90"`` or
    ``"int(sys.argv[1])"``) whose active torch device is ``device``; ``os`` and ``sys`` are
    imported."""
    return textwrap.dedent(
        f"""
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        import torch
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver

        class StubDriver:  # names the target; nothing is launched
            def get_current_device(self): return 0
            def get_current_stream(self, device=None): return 0
            def get_current_target(self): return GPUTarget("cuda", {arch}, 32)
            def get_active_torch_device(self): return torch.device("{device}")

        driver.set_active(StubDriver())
        """
    )


def compile_in_child(script: str, *args: str, cache: Path) -> subprocess.CompletedProcess:
    """Run ``script`` with ``args`` in a child without ``TRITON_INTERPRET``, Triton's cache
    in ``cache``; skips without Triton's NVIDIA backend, fails the test on an error."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    r = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                       text=True, timeout=600, check=False)  # fmt: skip
    if r.returncode != 0:
        pytest.fail(f"compiling {args} failed:\n{r.stderr[-4000:]}")
    return r
