"""Rows read where their O_DIRECT read landed: the CPU merge and histogram kernels take each
row's byte offset (``offsets``) and give the bytes and counts of rows moved into place."""

from __future__ import annotations

import numpy as np
import pytest
from streammerge.kernels import cpu_merge, cpu_stats

ITEM = {"F32": 4, "F16": 2, "BF16": 2}


def _rows(n: int, dtypes: list[str], seed: int) -> list[np.ndarray]:
    """Raw bytes of a base and fine-tunes (base + small noise), one per dtype."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(n) * 0.02).astype(np.float32)
    out = []
    for k, dt in enumerate(dtypes):
        x = base if k == 0 else base + (rng.standard_normal(n) * 0.002).astype(np.float32)
        if dt == "F32":
            raw = x.astype(np.float32)
        elif dt == "F16":
            raw = x.astype(np.float16)
        else:
            raw = (x.view(np.uint32) >> 16).astype(np.uint16)
        out.append(raw.view(np.uint8))
    return out


def _slot(rows: list[np.ndarray], offsets: list[int]) -> np.ndarray:
    """[R, cap] uint8 with row r's bytes from offsets[r]; the bytes around are garbage."""
    cap = max(o + r.size for r, o in zip(rows, offsets)) + 64
    slot = np.random.default_rng(1).integers(0, 256, (len(rows), cap), dtype=np.uint8)
    for r, (row, o) in enumerate(zip(rows, offsets)):
        slot[r, o : o + row.size] = row
    return slot


CASES = [
    (["BF16"] * 3, [0, 96, 4094], "BF16"),
    (["BF16", "F16", "F32"], [4092, 2, 8], "F32"),
    (["F32"] * 3, [12, 0, 2052], "F16"),
]


@pytest.mark.parametrize("dtypes, offsets, compute", CASES)
@pytest.mark.parametrize("n", [1, 5000, 70001])
def test_merge_with_offsets_equals_rows_in_place(dtypes, offsets, compute, n):
    rows = _rows(n, dtypes, n)
    placed, shifted = _slot(rows, [0] * 3), _slot(rows, offsets)
    kw = dict(key=7, start=3, drop=[0.3, 0.0], weights=[0.6, 0.5], scale=1.0)
    variants = [
        dict(),  # v1
        dict(keep_lo=[0x3A000000, 0], consensus="sign", normalize=True, compute_dtype=compute),
    ]  # fmt: skip
    for extra in variants:
        outs = []
        for slot, offs in ((placed, None), (shifted, offsets)):
            out = np.zeros(n * 2, np.uint8)
            cpu_merge.merge_chunk(slot, dtypes, 0, [1, 2], [0, 1], kw["drop"], kw["weights"],
                                  kw["scale"], out, "BF16", n, kw["key"], kw["start"],
                                  offsets=offs, **extra)  # fmt: skip
            outs.append(out)
        assert np.array_equal(outs[0], outs[1]), extra


@pytest.mark.parametrize("dtypes, offsets, compute", CASES)
def test_histograms_with_offsets_equal_rows_in_place(dtypes, offsets, compute):
    n = 40_000
    rows = _rows(n, dtypes, 3)
    placed, shifted = _slot(rows, [0] * 3), _slot(rows, offsets)
    highs, lows = [], []
    for slot, offs in ((placed, None), (shifted, offsets)):
        h = np.zeros((2, cpu_stats.HIGH_BINS), np.int64)
        cpu_stats.hist_high(slot, dtypes, 0, [1, 2], n, h, compute_dtype=compute, offsets=offs)
        buckets = np.array([[int(np.argmax(h[0]))], [int(np.argmax(h[1]))]], np.int64)
        lo = np.zeros((2, 1, cpu_stats.LOW_BINS), np.int64)
        cpu_stats.hist_low(slot, dtypes, 0, [1, 2], n, buckets, lo, compute_dtype=compute,
                           offsets=offs)  # fmt: skip
        highs.append(h)
        lows.append(lo)
    assert highs[0].sum() == 2 * n and np.array_equal(highs[0], highs[1])
    assert lows[0].sum() > 0 and np.array_equal(lows[0], lows[1])


def test_an_offset_past_the_row_is_refused():
    rows = _rows(100, ["BF16"] * 3, 0)
    slot = _slot(rows, [0, 0, 0])
    cap = slot.shape[1]
    out = np.zeros(200, np.uint8)
    with pytest.raises(ValueError, match="too few for 100 BF16 elements after offset"):
        cpu_merge.merge_chunk(slot, ["BF16"] * 3, 0, [1, 2], [0, 1], [0.0, 0.0], [0.5, 0.5],
                              1.0, out, "BF16", 100, 1, 0, offsets=[0, cap - 100, 0])  # fmt: skip
    with pytest.raises(ValueError, match="offsets must be 3 integers >= 0"):
        cpu_stats.hist_high(slot, ["BF16"] * 3, 0, [1, 2], 100,
                            np.zeros((2, cpu_stats.HIGH_BINS), np.int64), offsets=[0, -2, 0])  # fmt: skip
