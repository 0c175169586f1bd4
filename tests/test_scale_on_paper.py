"""bench/scale_on_paper.py's model of a ties run agrees with the engine: the slot size it
predicts is make_layout's for a real ties plan, and the read factor counts tensors larger
than a slot twice (the guessed-window read, then the merge read)."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import make_trio

from streammerge.api import Options, prepare
from streammerge.exec.layout import make_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scale_on_paper


def test_slot_size_is_the_engines(tmp_path):
    base, a, b = make_trio(tmp_path)
    for memory in (64 * 2**20, 256 * 2**20):
        prep = prepare([a, b], base, tmp_path / "o", {"method": "ties", "density": 0.5},
                       Options(memory=memory, threads=2))  # fmt: skip
        want = make_layout(prep.plan, 2, memory, 0, None, 2).chunk_elems
        assert scale_on_paper.chunk_elems(memory, 2) == want


def test_ties_read_factor():
    inv = [(1, 100), (2, 1000)]  # (count, elements): 100 held, 2 x 1000 larger than a slot
    assert scale_on_paper.ties_read_factor(inv, 500) == (100 + 2 * 2 * 1000) / 2100
    assert scale_on_paper.ties_read_factor(inv, 1000) == 1.0
