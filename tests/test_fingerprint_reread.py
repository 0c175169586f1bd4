"""A tensor read again by a later pass (a row-wise method's statistics passes over a tensor
larger than a chunk) is fingerprinted once: the reader's xxh3 of its bytes is neither
recomputed nor restarted by the re-reads."""

from __future__ import annotations

import xxhash

from streammerge.io.fingerprints import InputHasher
from streammerge.io.reader import TensorInfo


def test_a_tensor_read_again_is_fingerprinted_once(tmp_path):
    data = bytes(range(256)) * 40
    info = TensorInfo("t", "U8", (len(data),), tmp_path / "x", 0, len(data))
    h = InputHasher()
    for _ in range(2):  # two passes, each in two chunks
        h.update(info, 0, memoryview(data)[:4000])
        h.update(info, 4000, memoryview(data)[4000:])
    assert h.digest(info) == (len(data), xxhash.xxh3_64_hexdigest(data))
    h.update(info, 0, memoryview(b"\0" * 10))  # a later read does not restart it
    assert h.digest(info) == (len(data), xxhash.xxh3_64_hexdigest(data))
