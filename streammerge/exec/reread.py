"""Which reads go through the page cache: a tensor read in several passes is read from the
disk once, its later passes from the cache (``RereadCache``)."""

from __future__ import annotations

from streammerge.exec.layout import Item
from streammerge.exec.ops import read_rows
from streammerge.io.ranges import RangeReader
from streammerge.io.remote import RemoteFile
from streammerge.sysinfo import available_memory_bytes

#: Passes over a tensor from which they read through the page cache (``Item.reads``).
#: Reading 393 MB of a 2 GB trio's embeddings (three files): O_DIRECT 0.21 s of wall and
#: 0.02 s of CPU; buffered from the disk, filling the cache, 0.25 s and 0.26 s of CPU; from
#: the cache 0.04-0.06 s and 0.07 s of CPU. A tensor read twice would pay ~0.6 CPU s per GB
#: to save one disk read (TIES' statistics pass, under issue 22's CPU target); from three
#: reads on, the disk reads saved outweigh it (multislerp: 9.07 GB from the disk -> 5.93).
CACHE_READS = 3


def cache_limit(direct_io: bool) -> int:
    """``RereadCache``'s limit for a run (bytes): half the memory available now
    (``sysinfo.available_memory_bytes``) where the run reads with O_DIRECT; 0 (no cache)
    where every read is buffered anyway."""
    return available_memory_bytes() // 2 if direct_io else 0


class RereadCache:
    """The reader's choice per item: O_DIRECT, or buffered through the page cache.

    A tensor read in ``CACHE_READS`` passes or more whose input bytes (all rows) are at most
    ``limit`` has its local rows (not those by URL) read buffered in every pass: the first
    fills the page cache, the later ones find it there. Once the reader moves on to another
    tensor, ``release`` advises the kernel to drop the tensor's bytes
    (``RangeReader.drop``), so the cache holds at most one tensor's inputs: memory the
    kernel can take back at any time, not resident memory (a cache that was taken back is
    read from the disk again, the same bytes). Bytes of that tensor cached before the run
    are dropped too.

    Args:
        reader: the run's ``RangeReader`` (its ``drop``).
        limit: most input bytes of a cached tensor; 0: every read is O_DIRECT.
    """

    def __init__(self, reader: RangeReader, limit: int) -> None:
        self.reader, self.limit = reader, limit
        self._tensor = None
        self._infos: list = []

    def use(self, item: Item) -> bool:
        """True when ``item``'s rows are to be read buffered; a tensor other than the one
        cached releases that one first."""
        if self._tensor is not None and self._tensor is not item.tensor:
            self.release()
        local = self.cacheable(item)
        if local:
            self._tensor, self._infos = item.tensor, local
        return bool(local)

    def cacheable(self, item: Item) -> list:
        """The local inputs (``TensorInfo``) of ``item``'s tensor where its rows are read
        through the cache, else []."""
        if item.reads < CACHE_READS or not self.limit:
            return []
        t = item.tensor
        srcs = [i for i in (t.base, *t.sources) if i is not None]
        if sum(i.nbytes for i in srcs) > self.limit:
            return []
        return [i for i in srcs if not isinstance(i.file, RemoteFile)]

    def release(self) -> None:
        """Let the kernel drop the cached tensor's bytes (if any)."""
        if self._infos:
            self.reader.drop(self._infos)
        self._tensor, self._infos = None, []


def cached_bytes(items, limit: int) -> int:
    """Bytes of ``items`` (``Item`` and markers, as ``work_items`` yields them) that a run
    whose ``RereadCache`` has ``limit`` reads from the page cache, not the disk: the local
    rows of every pass of a cached tensor after the first over the same chunk (``--plan``;
    rows by URL are fetched again each pass)."""
    probe = RereadCache(None, limit)  # its choice only: nothing is read or dropped
    seen, total = set(), 0
    for item in items:
        if not isinstance(item, Item) or not probe.cacheable(item):
            continue
        key = (id(item.tensor), item.chunk.start, item.chunk.count)
        if key in seen:
            t, c = item.tensor, item.chunk
            total += sum(c.count * info.itemsize for _, info in read_rows(t, c.segment)
                         if not isinstance(info.file, RemoteFile))  # fmt: skip
        seen.add(key)
    return total
