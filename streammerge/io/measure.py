"""How fast the inputs read: a short timed read of the largest input file (O_DIRECT where
allowed), for ``--plan``'s time estimate (``streammerge.dryrun``)."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: The disk speed read: at most this many bytes (bytes) ...
MEASURE_BYTES = 64 * 2**20
#: ... and no new piece started after this many seconds.
MEASURE_SECONDS = 0.4
#: One read request of the measurement (bytes), ``MEASURE_DEPTH`` in flight (the real
#: reader also cuts O_DIRECT ranges into 4 MiB pieces read in parallel).
MEASURE_PIECE = 4 * 2**20
MEASURE_DEPTH = 4


def measure_read_speed(
    files: Iterable[Path], max_bytes: int = MEASURE_BYTES, max_seconds: float = MEASURE_SECONDS
) -> dict | None:
    """Read speed of the largest of ``files`` from a short read at its start.

    O_DIRECT (page cache bypassed) into a page-aligned buffer, ``MEASURE_DEPTH`` requests
    of ``MEASURE_PIECE`` bytes in flight, where the file system allows it; else buffered
    reads after ``posix_fadvise(DONTNEED)`` drops the range's cached pages (tmpfs, and a
    page cache holding dirty pages, still serve it from memory: the speed is then too high).
    At most ``max_bytes``; no new request after ``max_seconds``.

    Returns:
        {"file", "bytes", "seconds", "bytes_per_s", "how"} (``bytes_per_s`` None when
        nothing was read), or None when there is no file.
    """
    files = [Path(f) for f in files]
    if not files:
        return None
    path = max(files, key=lambda p: (p.stat().st_size, str(p)))
    total = min(path.stat().st_size, max_bytes)
    got, seconds, how = 0, 0.0, "empty"
    if total > 0:
        try:
            got, seconds = _read_direct(path, total, max_seconds)
            how = "O_DIRECT"
        except OSError:  # no O_DIRECT here (tmpfs, some network file systems)
            got, seconds = _read_buffered(path, total, max_seconds)
            how = "buffered after fadvise DONTNEED"
    return {
        "file": str(path),
        "bytes": got,
        "seconds": seconds,
        "bytes_per_s": got / seconds if got and seconds > 0 else None,
        "how": how,
    }


def _read_direct(path: Path, total: int, max_seconds: float) -> tuple[int, float]:
    """(bytes read, seconds) of O_DIRECT reads of ``path``'s first ``total`` bytes
    (rounded up to whole pieces). Raises OSError where O_DIRECT is refused."""
    if not hasattr(os, "O_DIRECT"):
        raise OSError("no O_DIRECT")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MEASURE_DEPTH * MEASURE_PIECE)  # page aligned, as O_DIRECT needs
    n_pieces = -(-total // MEASURE_PIECE)

    def piece(k: int) -> int:
        i = k % MEASURE_DEPTH
        with memoryview(buf) as v:
            return os.preadv(
                fd, [v[i * MEASURE_PIECE : (i + 1) * MEASURE_PIECE]], k * MEASURE_PIECE
            )

    got = 0
    try:
        with ThreadPoolExecutor(MEASURE_DEPTH, thread_name_prefix="sm-plan-read") as pool:
            t0 = time.perf_counter()
            futs, k = [], 0
            while futs or k < n_pieces:
                while k < n_pieces and len(futs) < MEASURE_DEPTH:
                    futs.append(pool.submit(piece, k))
                    k += 1
                got += futs.pop(0).result()
                if time.perf_counter() - t0 > max_seconds:
                    k = n_pieces  # drain what is in flight, start nothing new
            seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    return got, seconds


def _read_buffered(path: Path, total: int, max_seconds: float) -> tuple[int, float]:
    """(bytes read, seconds) of buffered reads of ``path``'s first ``total`` bytes after
    dropping their cached pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, total, os.POSIX_FADV_DONTNEED)
        buf = bytearray(MEASURE_PIECE)
        got, t0 = 0, time.perf_counter()
        while got < total and time.perf_counter() - t0 <= max_seconds:
            n = os.preadv(fd, [memoryview(buf)[: min(MEASURE_PIECE, total - got)]], got)
            if n <= 0:
                break
            got += n
        return got, time.perf_counter() - t0
    finally:
        os.close(fd)
