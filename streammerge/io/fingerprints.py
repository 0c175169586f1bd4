"""Content fingerprints of the inputs: per-tensor xxh3-64 computed as the bytes stream by,
and what ``--resume`` checks before relying on a finished shard.

The reader hands every range it reads to ``InputHasher.update`` (xxh3-64 runs at ~7.5 GB/s
on one core of the reference VM and releases the GIL; the ranges of one chunk are hashed
in parallel). A tensor's ranges arrive in order, so one streaming state per input tensor
gives the hash of its bytes without a second read. ``commit_shard`` records, for every
output tensor of the shard, the hash of each input tensor that fed it; ``streammerge.json``
records them all.

On ``--resume`` each input file is first compared by identity (device, inode, size,
mtime and ctime, recorded when the merge started). An edit in place changes the ctime even
when ``touch -r`` restores the mtime (no system call sets the ctime), so an unchanged
identity means unchanged bytes at the cost of one ``stat``. Any difference (an edit, a
``touch``, a copy, a ``chmod``) re-reads the tensors of that file that finished shards used
and compares their hashes: exact, at the cost of re-reading those bytes (about the read
time of the finished part of the merge for the files concerned).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import xxhash

#: Block size of verification reads (bytes).
VERIFY_BLOCK_BYTES = 8 * 2**20
EMPTY_XXH3 = xxhash.xxh3_64(b"").hexdigest()


def file_identity(path) -> dict:
    """What changes when a file's bytes can have changed: device, inode, size, mtime, ctime
    (the file behind symlinks). For an input by URL (``remote.RemoteFile``): its URL, size
    and ETag; without an ETag nothing proves the bytes the same, so the identity is new
    each time (its used tensors are re-read and hashed)."""
    if hasattr(path, "url"):
        if path.etag is None:
            return {"url": path.url, "unpinned": os.urandom(8).hex()}
        return {"url": path.url, "size": path.size, "etag": path.etag}
    st = os.stat(path)
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


class InputHasher:
    """Streaming xxh3-64 of every input tensor's bytes, fed by the reader.

    A tensor read whole is reduced to its (length, hash) at once, so streaming states (about
    0.8 KB each) live only for tensors being read. A tensor whose ranges do not arrive in
    order from its first byte (not the case in a merge) has no hash (``digest`` returns
    None) rather than a wrong one.
    """

    def __init__(self) -> None:
        self._states: dict[tuple[Path, str], list] = {}  # -> [xxh3 state, next offset, ok]
        self._done: dict[tuple[Path, str], tuple[int, str]] = {}
        self._lock = threading.Lock()

    def update(self, info, byte_offset: int, data: memoryview) -> None:
        """Add ``data``, the bytes of tensor ``info`` from ``byte_offset``."""
        key = (info.file, info.name)
        with self._lock:  # read again by a later pass (the same bytes): hashed already
            if key in self._done and key not in self._states:
                return
        if byte_offset == 0 and len(data) == info.nbytes:  # the whole tensor in one range
            digest = (len(data), xxhash.xxh3_64_hexdigest(data))
            with self._lock:
                self._done[key] = digest
                self._states.pop(key, None)
            return
        with self._lock:
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = [xxhash.xxh3_64(), 0, True]
                self._done.pop(key, None)
        if byte_offset != state[1]:
            state[2] = False
            return
        state[0].update(data)
        state[1] += len(data)
        if state[1] == info.nbytes and state[2]:
            with self._lock:
                self._done[key] = (state[1], state[0].hexdigest())
                del self._states[key]

    def digest(self, info) -> tuple[int, str] | None:
        """(bytes hashed from the tensor's first byte, xxh3-64 hex) of tensor ``info``; a
        tensor never read has hashed 0 bytes. None when its reads came out of order."""
        key = (info.file, info.name)
        with self._lock:
            done = self._done.get(key)
            state = self._states.get(key)
        if done is not None:
            return done
        if state is None:
            return 0, EMPTY_XXH3
        if not state[2]:
            return None
        return state[1], state[0].hexdigest()


def hash_range(path, start: int, nbytes: int, buf: bytearray | None = None) -> str:
    """xxh3-64 hex of ``nbytes`` of ``path`` from byte ``start`` (buffered reads; ranged
    reads for a ``remote.RemoteFile``, which raises MergeError when its server fails or
    its copy changed).

    Raises:
        OSError: the file cannot be read; EOFError: it is shorter than the range.
    """
    h = xxhash.xxh3_64()
    buf = buf if buf is not None else bytearray(VERIFY_BLOCK_BYTES)
    if hasattr(path, "read"):  # an input by URL (remote.RemoteFile): ranged reads
        for pos in range(start, start + nbytes, len(buf)):
            data = path.read(pos, min(len(buf), start + nbytes - pos))
            h.update(data)
        return h.hexdigest()
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_SEQUENTIAL)
        pos, end = start, start + nbytes
        while pos < end:
            n = os.preadv(fd, [view[: min(len(view), end - pos)]], pos)
            if n <= 0:
                raise EOFError(f"{path} ends before byte {end}")
            h.update(view[:n])
            pos += n
    finally:
        os.close(fd)
    return h.hexdigest()
