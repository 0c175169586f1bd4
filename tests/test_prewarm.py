"""The test session's prewarm (conftest) covers every CPU kernel module with a warmup."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import KERNEL_COMPILE_S, _prewarm_groups

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def test_every_kernel_module_with_a_warmup_is_prewarmed():
    with_warmup = {
        p.stem for p in KERNELS.glob("cpu_*.py") if re.search(r"^def warmup\(", p.read_text(), re.M)
    }
    assert with_warmup == set(KERNEL_COMPILE_S)


def test_prewarm_groups_split_the_modules_evenly():
    groups = _prewarm_groups(2)
    assert sorted(m for g in groups for m in g) == sorted(KERNEL_COMPILE_S)
    loads = [sum(KERNEL_COMPILE_S[m] for m in g) for g in groups]
    assert max(loads) - min(loads) <= max(KERNEL_COMPILE_S.values())
