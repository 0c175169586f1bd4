"""Read byte ranges of tensors into caller buffers with ``os.preadv`` (``RangeReader``),
buffered or ``O_DIRECT``, in pieces read in parallel, file descriptors kept within the open-file
limit.

Nothing here memory-maps a file: reads go through ``os.preadv`` into the caller's buffer,
so resident memory does not grow with the model.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from streammerge.errors import MergeError
from streammerge.io.reader import TensorInfo
from streammerge.sysinfo import open_file_limit


#: Alignment of O_DIRECT reads: buffer address, file offset and length (bytes).
DIRECT_ALIGN = 4096
#: Extra bytes a destination needs beyond the data for an aligned (O_DIRECT) read.
DIRECT_SLACK = 2 * DIRECT_ALIGN


def anon_map(nbytes: int) -> mmap.mmap:
    """Fresh page-aligned memory: a private anonymous mapping. Python's default
    (``mmap.mmap(-1, n)``) is a *shared* mapping, which the kernel backs with shmem pages:
    pinning them for every O_DIRECT read and write (``gup_fast_fallback``) was ~4% of a
    2 GB merge's CPU (perf). No ``MADV_HUGEPAGE``: with the common THP ``defrag`` setting
    ``madvise`` it makes page faults compact memory synchronously, a stall of seconds of
    system CPU on a loaded workstation (two such runs were seen in bench/cpu_cost.py)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    return mmap.mmap(-1, nbytes, flags=flags) if flags else mmap.mmap(-1, nbytes)


def align_up(n: int) -> int:
    """``n`` rounded up to a multiple of DIRECT_ALIGN."""
    return -(-n // DIRECT_ALIGN) * DIRECT_ALIGN


#: O_DIRECT reads are cut into pieces of this many bytes, read in parallel.
DIRECT_PIECE = 4 * 2**20


class RangeReader:
    """Reads byte ranges of tensors into caller buffers with ``os.preadv`` (GIL released).

    With ``direct=True`` reads bypass the page cache (``O_DIRECT``): the device writes
    straight into the caller's buffer, which saves the kernel's copy out of the page cache.
    On the reference 2-core VM, reading a 6 GB trio cost 2.3-4.5 s of system CPU buffered
    against 0.2 s direct, at the same or better speed; on a 2-core machine that CPU is what
    the kernel and sha256 need. Files or filesystems that refuse ``O_DIRECT`` fall back to
    buffered reads with sequential read-ahead advice.

    Descriptors are opened on first use and kept in a least-recently-used set of at most
    ``max_open`` (default: a quarter of ``ulimit -n``, at most 256), so a model of any number
    of shards reads within the limit; one still needed by a read in flight is never closed.
    Safe to share between threads (``preadv`` takes an explicit offset).

    Args:
        direct: read with O_DIRECT where allowed.
        hasher: given every range read (``InputHasher.update``), for content fingerprints.
        max_open: most descriptors kept open.
    """

    def __init__(self, direct: bool = False, hasher=None, max_open: int | None = None) -> None:
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.hasher = hasher
        self.max_open = max_open or max(8, min(256, open_file_limit() // 4))
        self._fds: OrderedDict[Path, tuple[int, bool]] = OrderedDict()
        self._used: dict[Path, int] = {}  # path -> the read_rows call that last used it
        self._call = 0
        self._lock = threading.Lock()
        self.moved_bytes = 0  # bytes memmoved into place after O_DIRECT reads

    def _evict(self) -> None:
        """Close least recently used descriptors no read in flight uses (lock held)."""
        for path in list(self._fds):
            if len(self._fds) < self.max_open:
                return
            if self._used.get(path, -1) < self._call:
                fd, _ = self._fds.pop(path)
                self._used.pop(path, None)
                os.close(fd)

    def _fd(self, path: Path) -> tuple[int, bool]:
        with self._lock:
            entry = self._fds.get(path)
            if entry is None:
                self._evict()
                if self.direct:
                    try:
                        entry = (os.open(path, os.O_RDONLY | os.O_DIRECT), True)
                    except OSError:
                        entry = None
                if entry is None:
                    fd = os.open(path, os.O_RDONLY)
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    entry = (fd, False)
                self._fds[path] = entry
            else:
                self._fds.move_to_end(path)
            self._used[path] = self._call
            return entry

    def _fallback(self, path: Path) -> int:
        """Replace a file's O_DIRECT descriptor by a buffered one (the read was refused)."""
        with self._lock:
            fd, direct = self._fds[path]
            if direct:
                os.close(fd)
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = (fd, False)
            self._used[path] = self._call
            return fd

    @staticmethod
    def _check(info: TensorInfo, byte_offset: int, n: int) -> None:
        if byte_offset < 0 or byte_offset + n > info.nbytes:
            raise MergeError(
                f"read of {n} bytes at {byte_offset} outside the tensor",
                info.file,
                info.name,
                "report this bug",
            )

    @staticmethod
    def _pread_full(fd: int, buf: memoryview, pos: int, need: int, info: TensorInfo) -> None:
        done = 0
        while done < need:
            got = os.preadv(fd, [buf[done:]], pos + done)
            if got <= 0:
                raise MergeError(
                    "file ended early (changed or truncated while merging)",
                    info.file,
                    info.name,
                    "do not modify inputs during a merge; re-run",
                )
            done += got

    def _read_buffered(
        self, info: TensorInfo, byte_offset: int, nbytes: int, row: np.ndarray
    ) -> None:
        self.read_into(info, byte_offset, memoryview(row)[:nbytes])

    def read_into(self, info: TensorInfo, byte_offset: int, buf: memoryview) -> None:
        """Fill ``buf`` (writable, ``len(buf)`` bytes) from ``info``'s bytes at ``byte_offset``
        (buffered read; any buffer).

        Raises:
            MergeError: the range is outside the tensor or the file ended early
                (truncated or changed since it was validated).
        """
        self._check(info, byte_offset, len(buf))
        fd, direct = self._fd(info.file)
        if not direct:
            self._pread_full(fd, buf, info.start + byte_offset, len(buf), info)
            return
        # the shared descriptor is O_DIRECT and other reads may be using it: a private one
        fd = os.open(info.file, os.O_RDONLY)
        try:
            self._pread_full(fd, buf, info.start + byte_offset, len(buf), info)
        finally:
            os.close(fd)

    def read_rows(self, jobs, pool, piece_bytes: int = DIRECT_PIECE, in_place: bool = True,
                  buffered: bool = False) -> list[int]:  # fmt: skip
        """Put ``nbytes`` of each ``info``'s bytes from ``byte_offset`` at ``row[:nbytes]``,
        O_DIRECT ranges cut into ``piece_bytes`` pieces that ``pool`` reads in parallel.

        A ``row`` whose address is DIRECT_ALIGN-aligned and whose length is at least
        ``nbytes + DIRECT_SLACK`` takes an O_DIRECT read: the aligned pages around the range
        are read into it and the range is moved to the front (``memmove``, GIL released).
        Other rows, ranges O_DIRECT refuses (EINVAL), and every row with ``buffered``, are
        read buffered: through the page cache, where a range read again soon is found
        (``drop`` lets it go).

        With ``in_place=False`` nothing is moved: the bytes stay at ``row[d : d + nbytes]``
        for the returned offset ``d`` (< DIRECT_ALIGN; 0 for buffered reads), which a GPU
        backend copies from directly. ``moved_bytes`` counts the bytes memmoved.

        Returns:
            the offset ``d`` of each job's bytes in its row (all 0 with ``in_place``).

        More requests in flight read faster from the reference VM's disk: three 10 MiB
        O_DIRECT reads at a time ran at 1.24 / 1.50 / 1.62 GB/s, the same cut in four pieces
        each at 1.46 / 1.58 / 1.68 GB/s (pairs measured back to back). End to end on the
        2 GB trio the difference was lost in the VM's +-20% run-to-run noise (4.8-6.7 s
        either way over three alternating pairs).

        Args:
            jobs: (info, byte_offset, nbytes, row) tuples; row a uint8 array.
            pool: a ``concurrent.futures`` executor.

        Raises:
            MergeError: as ``read_into``.
        """
        with self._lock:
            self._call += 1
        pieces, moves, whole = [], [], []
        for job in jobs:
            info, byte_offset, nbytes, row = job
            self._check(info, byte_offset, nbytes)
            fd, direct = self._fd(info.file)
            pos = info.start + byte_offset
            addr = row.ctypes.data
            if buffered or not (direct and addr % DIRECT_ALIGN == 0
                                and len(row) >= nbytes + DIRECT_SLACK):  # fmt: skip
                whole.append(job)
                continue
            lo = pos - pos % DIRECT_ALIGN
            need = pos - lo + nbytes  # bytes from lo that must arrive
            length = align_up(need)
            view = memoryview(row)
            for s in range(0, length, piece_bytes):
                e = min(length, s + piece_bytes)
                pieces.append((job, fd, view[s:e], lo + s, min(e, need) - s, info))
            moves.append((job, addr, pos - lo, nbytes))
        failed = set()
        futures = [(p[0], True, pool.submit(self._pread_full, *p[1:])) for p in pieces]
        futures += [(job, False, pool.submit(self._read_buffered, *job)) for job in whole]
        for job, is_direct, fut in futures:
            try:
                fut.result()
            except OSError as e:
                if e.errno != errno.EINVAL or not is_direct:
                    raise
                failed.add(id(job))  # O_DIRECT refused after all: read that range buffered
        offsets = {}
        for job, addr, delta, nbytes in moves:
            if id(job) in failed:
                self._fallback(job[0].file)  # no read in flight now: replace it for good
                self._read_buffered(*job)
            elif delta and not in_place:
                offsets[id(job)] = delta
            elif delta:
                ctypes.memmove(addr, addr + delta, nbytes)
                self.moved_bytes += nbytes
        deltas = [offsets.get(id(job), 0) for job in jobs]
        if self.hasher is not None:
            self._hash(jobs, pool, deltas)
        return deltas

    @staticmethod
    def drop(infos) -> None:
        """Advise the kernel that the bytes of each tensor in ``infos`` (``TensorInfo``) are
        not needed again (``POSIX_FADV_DONTNEED``): buffered reads left them in the page
        cache. Advice only: nothing is raised where it cannot be given."""
        if not hasattr(os, "posix_fadvise"):
            return
        for info in infos:
            if info.nbytes <= 0:  # a length of 0 would mean "to the end of the file"
                continue
            try:
                fd = os.open(info.file, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, info.start, info.nbytes, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def hash_ranges(self, jobs, pool) -> None:
        """Hand ranges read elsewhere (inputs by URL: ``remote.read_jobs``) to the hasher,
        as ``read_rows`` does for its own: (info, byte_offset, nbytes, row) with the bytes
        at ``row[:nbytes]``. Nothing without a hasher."""
        if self.hasher is not None and jobs:
            self._hash(jobs, pool, [0] * len(jobs))

    def _hash(self, jobs, pool, deltas) -> None:
        """Hand every range read to the hasher: rows in parallel (xxh3 releases the GIL),
        ranges of one tensor in order."""
        ranges = [(info, off, memoryview(row)[d : d + n])
                  for (info, off, n, row), d in zip(jobs, deltas)]  # fmt: skip
        if len({(r[0].file, r[0].name) for r in ranges}) < len(ranges) or len(ranges) == 1:
            for r in ranges:
                self.hasher.update(*r)
            return
        for fut in [pool.submit(self.hasher.update, *r) for r in ranges]:
            fut.result()

    def close(self) -> None:
        """Close every descriptor."""
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._used.clear()
