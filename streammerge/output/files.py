"""The output directory's names, limits and file helpers: the hidden staging, journal and
old-model suffixes, ``renameat2``, file hashes, the inputs' digests per shard, free space."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.io.fingerprints import hash_range

PARTIAL_SUFFIX = ".streammerge-partial"
JOURNAL_SUFFIX = ".streammerge-journal"
OLD_SUFFIX = ".streammerge-old"
RECORD_FILE = "streammerge.json"
#: Bytes of free space kept beyond the planned output (metadata, config files).
DISK_MARGIN_BYTES = 64 * 2**20
#: A finished output's inputs are re-hashed on --resume when their ctime is this close to,
#: or after, the output's oldest shard (clock granularity, a merge started right after a
#: copy).
CTIME_SLACK_NS = 10 * 10**9
#: Limits on our own records when read back (they may have been tampered with).
MAX_RECORD_BYTES = 1 << 30
MAX_RECORD_DEPTH = 8

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def sha256_file(path: Path, block_bytes: int = 8 * 2**20) -> str:
    """sha256 (hex) of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    buf = bytearray(block_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


_libc = None


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """Linux ``renameat2(2)``.

    Raises:
        OSError: as the system call (EINVAL / ENOSYS where the filesystem or kernel lacks
            the flag).
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(src))
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(src), None, str(dst))


def rehash_range(info, covered: int, buf: bytearray) -> str:
    """xxh3 of the first ``covered`` bytes of input tensor ``info``, read again.

    Raises:
        MergeError: the file cannot be read or is shorter than it was.
    """
    try:
        return hash_range(info.file, info.start, covered, buf)
    except (OSError, EOFError) as e:
        raise MergeError(
            f"cannot re-read an input to check it ({e})",
            info.file,
            info.name,
            "restore the file, or pass --overwrite to merge again",
        ) from None


def input_files(m) -> dict:
    """File name -> what holds an input model's bytes: its local files, or for a model
    opened by URL the ``remote.RemoteFile`` of each (its ``files`` are a local skeleton of
    headers, made anew each run)."""
    remote = {i.file.name: i.file for i in m.tensors.values() if hasattr(i.file, "url")}
    return remote or {f.name: f for f in m.files}


def changed_since(f, since_ns: int) -> bool:
    """Whether input file ``f`` may have changed since ``since_ns``: its ctime, or for a
    file by URL, whether it has no ETag (one pins its bytes; the output's fingerprint,
    checked first, includes it)."""
    if hasattr(f, "url"):
        return f.etag is None
    return os.stat(f).st_ctime_ns >= since_ns


def nonempty_dir(path: Path) -> bool:
    """True when ``path`` is a directory with at least one entry (False: empty, missing,
    or not a directory)."""
    try:
        with os.scandir(path) as it:
            return next(it, None) is not None
    except (NotADirectoryError, FileNotFoundError):
        return False


def input_digests(plan, hasher, shard_name: str) -> list:
    """[role, tensor, bytes hashed, xxh3] of every input tensor that fed ``shard_name``
    (role ``base`` or the fine-tune's index), from ``hasher`` (``fingerprints.InputHasher``)."""
    if plan is None:
        return []
    # Without a base (linear), a tensor's reference slot holds model 0's tensor: record it
    # under model 0, or a --resume would compare the base's bytes with model 0's hash.
    ref_role = "base" if plan.recipe.row.uses_base else "0"
    out = []
    for s in plan.shards:
        if s.filename != shard_name:
            continue
        for t in s.tensors:
            srcs = [(ref_role, t.base)] + [(str(j), x) for j, x in enumerate(t.sources)]
            for role, info in srcs:
                if info is None:
                    continue
                d = hasher.digest(info)
                if d is not None:
                    out.append([role, info.name, d[0], d[1]])
    return out


#: The model card: written by every run, but on a finished output never compared (its
#: command names the inputs as the user typed them, which a --resume may spell otherwise).
CARD_FILE = "README.md"


def require_free_space(where: Path, need: int) -> None:
    """Refuse a run that will add ``need`` bytes (planned output, side files and
    DISK_MARGIN_BYTES) to the file system holding ``where``, an existing directory, when
    fewer are free (``shutil.disk_usage``).

    Raises:
        MergeError: naming ``where``, the GB needed and the GB free.
    """
    free = shutil.disk_usage(where).free
    if free < need:
        raise MergeError(
            f"not enough free disk space: need {need / 1e9:.2f} GB, have {free / 1e9:.2f} GB",
            where,
            None,
            "free space or choose another output location",
        )

