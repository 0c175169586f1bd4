"""RangeReader: byte ranges land exactly where asked, through O_DIRECT pieces or buffered."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from streammerge.exec.layout import page_aligned
from streammerge.io.ranges import DIRECT_SLACK, RangeReader
from streammerge.io.reader import TensorInfo


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("piece_bytes", [4096, 3 * 4096, 4 * 2**20])
def test_read_rows_puts_every_range_at_the_front_of_its_row(tmp_path: Path, direct, piece_bytes):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=300_001, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.tobytes())
    # tensors at odd offsets, reads of odd lengths, one ending at the end of the file
    infos = [
        TensorInfo("t0", "U8", (90_001,), path, 13, 90_001),
        TensorInfo("t1", "U8", (200_000,), path, 100_001, 200_000),
    ]
    jobs, want = [], []
    for info, off, n in [
        (infos[0], 0, 90_001),
        (infos[0], 4095, 50_000),
        (infos[1], 777, 199_223),
        (infos[1], 0, 1),
    ]:
        row = page_aligned((n + DIRECT_SLACK + 4096,))
        jobs.append((info, off, n, row))
        want.append(data[info.start + off : info.start + off + n])
    reader = RangeReader(direct=direct)
    with ThreadPoolExecutor(4) as pool:
        reader.read_rows(jobs, pool, piece_bytes=piece_bytes)
    reader.close()
    for (_, _, n, row), w in zip(jobs, want):
        assert np.array_equal(row[:n], w)
