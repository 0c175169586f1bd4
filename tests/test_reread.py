"""exec.reread.RereadCache: a tensor read in three passes or more is read through the page
cache (the disk once), then dropped from it; the output bytes are those of O_DIRECT reads."""

from __future__ import annotations

import ctypes
import mmap
import os
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_trio, output_bytes

from streammerge.exec.reread import CACHE_READS, RereadCache
from streammerge.io.ranges import RangeReader
from streammerge.io.reader import TensorInfo

BIG = "layers.2.big.weight"  # make_trio's tensor larger than a 16MB run's chunk


def _merge(tmp_path, monkeypatch, method: str, limit: int | None):
    """Merge the big trio at 16MB with ``method``; returns (output bytes, [(tensor name,
    buffered, bytes)] per row read, [names dropped])."""
    import streammerge
    from streammerge.api import Options
    from streammerge.exec import reread

    reads, drops = [], []
    real_read, real_drop = RangeReader.read_rows, RangeReader.drop

    def read_rows(self, jobs, pool, *a, buffered=False, **kw):
        reads.extend((j[0].name, buffered, j[2]) for j in jobs)
        return real_read(self, jobs, pool, *a, buffered=buffered, **kw)

    def drop(infos):
        drops.extend(i.name for i in infos)
        real_drop(infos)

    monkeypatch.setattr(RangeReader, "read_rows", read_rows)
    monkeypatch.setattr(RangeReader, "drop", staticmethod(drop))
    if limit is not None:
        monkeypatch.setattr(reread, "available_memory_bytes", lambda: 2 * limit)
    if not (tmp_path / "in").exists():
        make_trio(tmp_path / "in", big=1_500_000)
    base, a, b = (tmp_path / "in" / n for n in ("base", "a", "b"))
    out = tmp_path / f"{method}-{limit}"
    streammerge.merge([a, b], base, out, options=Options(memory="16MB"), method=method,
                      weights=[1.0, 2.0])  # fmt: skip
    return output_bytes(out), reads, drops


def test_a_tensor_read_in_many_passes_reads_the_cache_and_is_dropped(tmp_path, monkeypatch):
    """multislerp reads a tensor larger than a chunk in five passes: every read of it is
    buffered, it is dropped once, and nothing else is read buffered. The bytes are those of
    a run with no cache (every pass O_DIRECT)."""
    got, reads, drops = _merge(tmp_path, monkeypatch, "multislerp", None)
    buffered = {name for name, b, _ in reads if b}
    assert buffered == {BIG}
    assert all(b for name, b, _ in reads if name == BIG)
    assert sum(1 for name, _, _ in reads if name == BIG) >= 3 * CACHE_READS  # 3 rows a pass
    assert sorted(drops) == [BIG] * 3  # its three inputs, once, after its last pass
    # --plan counts the passes after the first (three bf16 rows of BIG) as read from the cache
    from streammerge import dryrun
    from streammerge.api import Options, layout_for, prepare

    base, a, b = (tmp_path / "in" / n for n in ("base", "a", "b"))
    prep = prepare([a, b], base, tmp_path / "plan", {"method": "multislerp"},
                   Options(memory="16MB"))  # fmt: skip
    d = dryrun.describe(prep, layout_for(prep, SimpleNamespace(depth=0)), measure_read=False)
    from_disk = 3 * 2 * 1_500_000
    assert d["bytes_read_cached"] == sum(n for _, b, n in reads if b) - from_disk > 0
    assert "from the page cache" in dryrun.format_plan(d)
    prep = prepare([a, b], base, tmp_path / "plan", {"method": "multislerp"},
                   Options(memory="16MB", direct_io=False))  # fmt: skip
    d = dryrun.describe(prep, layout_for(prep, SimpleNamespace(depth=0)), measure_read=False)
    assert d["bytes_read_cached"] == 0  # buffered reads throughout: no cache of its own
    plain, reads0, drops0 = _merge(tmp_path, monkeypatch, "multislerp", 0)
    assert not any(b for _, b, _ in reads0) and not drops0
    assert got.keys() == plain.keys()
    assert all(np.array_equal(got[k], plain[k]) for k in got)


def test_a_tensor_read_twice_or_above_the_limit_reads_the_disk(tmp_path, monkeypatch):
    """TIES reads a chunked tensor twice (statistics, then merge): O_DIRECT both times; a
    limit below the tensor's bytes keeps multislerp's reads O_DIRECT too."""
    _, reads, drops = _merge(tmp_path, monkeypatch, "ties", None)
    assert any(name == BIG for name, _, _ in reads)
    assert not any(b for _, b, _ in reads) and not drops
    _, reads, drops = _merge(tmp_path, monkeypatch, "multislerp", 3 * 2 * 1_500_000 - 1)
    assert not any(b for _, b, _ in reads) and not drops


def test_the_cache_follows_the_tensor_and_releases_it():
    dropped = []
    reader = SimpleNamespace(drop=lambda infos: dropped.append([i.name for i in infos]))
    cache = RereadCache(reader, limit=1000)

    def info(name, nbytes):
        return TensorInfo(name, "BF16", (nbytes // 2,), "f", 0, nbytes)

    t1 = SimpleNamespace(base=info("x", 400), sources=[info("x", 400), None])
    t2 = SimpleNamespace(base=info("y", 400), sources=[info("y", 800)])
    assert cache.use(SimpleNamespace(tensor=t1, reads=CACHE_READS))
    assert cache.use(SimpleNamespace(tensor=t1, reads=CACHE_READS)) and not dropped
    assert not cache.use(SimpleNamespace(tensor=t2, reads=CACHE_READS))  # 1200 > 1000 bytes
    assert dropped == [["x", "x"]]
    assert not cache.use(SimpleNamespace(tensor=t1, reads=CACHE_READS - 1))
    cache.release()
    assert dropped == [["x", "x"]]  # nothing cached: nothing more to drop


def _resident_pages(path) -> int:
    """Pages of ``path`` in the page cache (``mincore`` of a private mapping of it)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        anchor = ctypes.c_char.from_buffer(m)
        vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        rc = libc.mincore(ctypes.addressof(anchor), size, vec)
        del anchor
    finally:
        m.close()
    if rc != 0:
        pytest.skip(f"mincore failed: errno {ctypes.get_errno()}")
    return sum(v & 1 for v in vec)


def test_drop_takes_a_buffered_read_out_of_the_page_cache(tmp_path):
    """The tensor's pages leave the cache, but for the large folios (up to 2 MiB here) it
    shares with its neighbours at either end."""
    path = tmp_path / "w.bin"
    data = os.urandom(16 * 2**20)
    path.write_bytes(data)
    os.sync()
    info = TensorInfo("w", "BF16", (6 * 2**20,), path, 4096, 12 * 2**20)
    reader = RangeReader(direct=True)
    buf = bytearray(info.nbytes)
    reader.read_into(info, 0, memoryview(buf))
    assert bytes(buf) == data[4096 : 4096 + info.nbytes]
    before = _resident_pages(path)
    if before == 0:
        pytest.skip("this filesystem keeps no page cache")
    reader.drop([info])
    after = _resident_pages(path)
    if after == before:
        pytest.skip("this filesystem ignores POSIX_FADV_DONTNEED (tmpfs)")
    assert after <= before - (info.nbytes - 2 * 2 * 2**20) // mmap.PAGESIZE
    reader.close()


def test_a_cgroups_room_counts_its_inactive_page_cache_as_free(tmp_path):
    """The cache limit's memory: a cgroup limit minus its usage plus the page cache it would
    reclaim first; none where the limit is "max" (v2) or v1's huge "no limit"."""
    from streammerge.sysinfo import _cgroup_room

    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("900000\n")
    (tmp_path / "memory.stat").write_text("anon 100000\ninactive_file 300000\nfile 800000\n")
    files = (tmp_path / "memory.max", tmp_path / "memory.current", "inactive_file")
    assert _cgroup_room(*map(str, files[:2]), files[2]) == 1000000 - 900000 + 300000
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_room(*map(str, files[:2]), files[2]) is None
    (tmp_path / "memory.max").write_text("9223372036854771712\n")
    assert _cgroup_room(*map(str, files[:2]), files[2]) is None
    assert _cgroup_room(str(tmp_path / "none"), str(tmp_path / "memory.current"), "x") is None
