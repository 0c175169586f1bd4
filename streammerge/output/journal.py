"""The journal of one merge: a file beside the output, ``.<name>.streammerge-journal``,
that is both the lock (``flock``: one merge per output) and the record of every step, one
fsync'd JSON line each, appended and never rewritten (so the lock stays on one inode).

Records: the head (``{"journal": JOURNAL_FORMAT, "recipe": ..., "seed": ...}``), the
staging directory's creation (``{"mkdir": true}`` before, ``{"staging": [dev, ino]}``
after), each finished shard (``{"shard": name, ...}``), each other file before it is
written (``{"file": name}``), the inputs' identities seen by a resume (``{"seen": ...}``)
and the final rename (``{"swap": kind, "out": [dev, ino], "new": [dev, ino]}``). A kill
leaves at worst a torn last line, which reading ignores.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.io.paths import identity

JOURNAL_FORMAT = "streammerge-journal/2"
#: Largest journal read back (bytes).
MAX_JOURNAL_BYTES = 1 << 30


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """What a journal file says, read back (a torn last line from a kill is ignored)."""

    def __init__(self, lines: list[str]) -> None:
        self.head: dict = {}
        self.mkdir = False
        self.staging_id: list[int] | None = None
        self.shards: dict[str, dict] = {}
        self.files: list[str] = []
        self.swap: dict | None = None
        self.seen: dict = {}
        for line in lines:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                break
            if not isinstance(rec, dict):
                break
            if rec.get("journal") == JOURNAL_FORMAT:
                self.head = rec
            elif "mkdir" in rec:
                self.mkdir = True
            elif "staging" in rec:
                self.staging_id = rec["staging"]
            elif "shard" in rec:
                self.shards[rec["shard"]] = rec
            elif "file" in rec:
                self.files.append(rec["file"])
            elif "swap" in rec:
                self.swap = rec
            elif "seen" in rec:
                self.seen = rec["seen"]

    @classmethod
    def read(cls, path: Path) -> Journal | None:
        """The journal at ``path``; None when there is no regular file there (a symlink or
        a directory is not ours: the preflight refuses it)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        with open(fd, "rb") as f:
            data = f.read(MAX_JOURNAL_BYTES)
        return cls(data.decode("utf-8", "replace").splitlines())


class JournalFile:
    """The journal, opened and locked by this process.

    Use ``JournalFile.lock``; ``created`` tells whether this process created the file.
    """

    def __init__(self, path: Path, fd: int, created: bool) -> None:
        self.path = path
        self.fd = fd
        self.created = created

    @classmethod
    def lock(cls, path: Path, out: Path, create: bool = True) -> JournalFile | None:
        """Open and lock the journal at ``path`` (creating it when ``create``); None when
        it does not exist and ``create`` is False.

        The journal is deleted by the merge that finishes; a process that opened it just
        before then locks a deleted file, so the lock counts only while the path still
        names the locked file.

        Raises:
            MergeError: another merge holds the lock (naming the output ``out``), or
                something other than a regular file is at ``path``.
        """
        for _ in range(20):
            existed = path.exists()
            try:
                flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError:
                if not create:
                    return None
                raise
            except OSError as e:  # a directory, a symlink: not a journal streammerge wrote
                raise MergeError(
                    f"something other than a journal is in the way ({e.strerror})",
                    path,
                    None,
                    "it was not left by streammerge: move it away",
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MergeError(
                    "another merge is writing this output",
                    out,
                    None,
                    "wait for it to finish or choose another output",
                ) from None
            st = os.fstat(fd)
            if identity(path) != [st.st_dev, st.st_ino]:
                os.close(fd)  # deleted (or replaced) meanwhile: not the lock any more
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                os.close(fd)  # a journal is never hard-linked: truncating it would write there
                raise MergeError(
                    "the journal is not a file of its own (it has other names: hard links)",
                    path,
                    None,
                    "it was not left by streammerge: move it away",
                )
            return cls(path, fd, not existed)
        raise MergeError(
            "the journal keeps changing under this merge",
            path,
            None,
            "another process is using this output: wait for it",
        )

    def append(self, rec: dict) -> None:
        """Append one record and make it durable."""
        data = (json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n").encode()
        os.lseek(self.fd, 0, os.SEEK_END)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        os.fsync(self.fd)

    def truncate(self) -> None:
        """Empty the journal (a fresh start; the lock stays)."""
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)

    def release(self, remove: bool) -> None:
        """Unlock and close; ``remove`` deletes the journal first (while still locked).

        Once only: the descriptor is forgotten before it is closed, so a Ctrl-C between the
        close and the bookkeeping, and the caller's cleanup calling this again, cannot close
        it twice (an EBADF that replaced the interrupt, or another file's descriptor closed
        if the number was reused meanwhile). A second call does nothing."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            if remove:
                try:
                    os.unlink(self.path)
                    fsync_dir(self.path.parent)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
