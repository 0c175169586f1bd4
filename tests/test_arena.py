"""exec.arena.SlotArena: slots carved per chunk from one buffer (first fit), the bytes of
Layout.slots fixed slots; and a merge that carves its slots writes the bytes of one with
fixed slots."""

from __future__ import annotations

from itertools import combinations
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_trio, output_bytes

from streammerge.exec.arena import SlotArena
from streammerge.exec.layout import Layout, page_aligned
from streammerge.io.ranges import DIRECT_ALIGN, DIRECT_SLACK

CHUNK = 64 * 1024  # elements of a fixed slot's chunk


def _layout(slots: int = 2, outputs: int = 1) -> Layout:
    return Layout(rows=3, slots=slots, chunk_elems=CHUNK, cap_in_bytes=2 * CHUNK,
                  cap_out_bytes=2 * CHUNK, block_bytes=DIRECT_ALIGN, outputs=outputs)  # fmt: skip


def _item(n: int, op: str = "merge", dtype: str = "BF16"):
    t = SimpleNamespace(name="t", dtype=dtype, base=SimpleNamespace(itemsize=2))
    return SimpleNamespace(tensor=t, chunk=SimpleNamespace(count=n), op=op)


def _span(slot) -> list[np.ndarray]:
    return [slot.inputs[r] for r in range(slot.inputs.shape[0])] + list(slot.outs)


def test_a_slot_is_the_size_of_its_chunk_with_aligned_rows():
    lay = _layout()
    arena = SlotArena(lay, page_aligned, 1)
    assert arena.total == lay.slots * lay.slot_bytes
    s = arena.take(_item(1000), 0.0)
    assert s.inputs.shape == (3, -(-(2000 + DIRECT_SLACK) // DIRECT_ALIGN) * DIRECT_ALIGN)
    assert s.inputs.flags.c_contiguous and s.out is s.outs[0]
    assert s.out.nbytes >= 2000 + DIRECT_SLACK
    for a in _span(s):
        assert a.ctypes.data % DIRECT_ALIGN == 0
    for a, b in combinations(_span(s), 2):
        assert not np.shares_memory(a, b)


def test_small_slots_fit_where_two_fixed_ones_did_and_come_back_in_any_order():
    arena = SlotArena(_layout(), page_aligned, 2)  # a sweep: two output buffers a slot
    small = [arena.take(_item(CHUNK // 8), 0.0) for _ in range(8)]
    assert all(s is not None and len(s.outs) == 2 for s in small)
    for a, b in combinations([x for s in small for x in _span(s)], 2):
        assert not np.shares_memory(a, b)
    assert arena.take(_item(CHUNK), 0.01) is None  # no room for a whole chunk yet
    freed = small[3]
    arena.give(freed)  # out of order: its bytes are free at once
    again = arena.take(_item(CHUNK // 8), 0.0)
    assert again.inputs.ctypes.data == freed.inputs.ctypes.data  # the lowest free range
    for s in small[:3] + small[4:] + [again]:
        arena.give(s)
    whole = [arena.take(_item(CHUNK), 0.0) for _ in range(2)]
    assert whole[0].inputs.ctypes.data == arena.buffer.ctypes.data and whole[1] is not None
    assert arena.take(_item(CHUNK), 0.01) is None


def test_a_copy_reads_into_its_output_only_and_an_oversized_chunk_is_refused():
    arena = SlotArena(_layout(), page_aligned, 1)
    s = arena.take(_item(2 * CHUNK, op="copy", dtype="I8"), 0.0)  # 1-byte elements
    assert s.out.nbytes >= 2 * CHUNK * 2 + DIRECT_SLACK  # the base's itemsize, 2
    assert s.inputs.shape[1] == DIRECT_SLACK
    with pytest.raises(ValueError, match="needs more than a slot"):
        arena.take(_item(CHUNK + 4096), 0.0)


def test_a_merge_carving_its_slots_writes_the_bytes_of_fixed_slots(tmp_path, monkeypatch):
    """The CPU backend carves its slots (``elastic_slots``); with fixed slots instead the
    output is the same, for a method with statistics passes and one without, chunked."""
    import streammerge
    from streammerge.api import Options
    from streammerge.exec import arena, backends

    takes = []
    real = arena.SlotArena.take

    def counting(self, item, timeout):
        takes.append(item.chunk.count)
        return real(self, item, timeout)

    monkeypatch.setattr(arena.SlotArena, "take", counting)
    base, a, b = make_trio(tmp_path, big=1_500_000)
    got = {}
    for elastic in (True, False):
        monkeypatch.setattr(backends.NumbaBackend, "elastic_slots", elastic)
        for method in ("ties", "nuslerp"):
            out = tmp_path / f"{method}-{elastic}"
            streammerge.merge([a, b], base if method == "ties" else None, out,
                              options=Options(memory="16MB"), method=method,
                              weights=[1.0, 2.0])  # fmt: skip
            got[method, elastic] = {k: v.tobytes() for k, v in output_bytes(out).items()}
        if elastic:
            assert len(set(takes)) > 1  # the arena carved slots of several sizes
            takes.clear()
    assert not takes  # fixed slots: none carved
    for method in ("ties", "nuslerp"):
        assert got[method, True] == got[method, False]


def test_a_stopped_run_takes_no_more_slots():
    """Once a stage failed (``Stream.stop``), the reader gets no slot even where the arena
    has room: it reads nothing more before the run ends."""
    from streammerge.exec.stages import StageFailed, Stream

    stream = Stream(arena=SlotArena(_layout(), page_aligned, 1))
    assert stream.take_slot(_item(100)) is not None
    stream.stop.set()
    with pytest.raises(StageFailed):
        stream.take_slot(_item(100))
