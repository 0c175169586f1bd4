"""The output directory as a transaction: preflight, lock, journal, resume, atomic finish.

Everything is written inside a staging directory beside the output, in the same parent
filesystem: ``<parent>/.<name>.streammerge-partial/``. Each shard is written as
``<shard>.tmp``, fsync'd, renamed to its final name, and recorded (size, sha256) in
``journal.jsonl``. The index, ``streammerge.json`` and the copied config files come last;
then the staging directory is renamed to the output. A killed merge therefore leaves only a
hidden ``*.streammerge-partial`` directory, never a directory that looks like a model, and
``--resume`` continues from its journal.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from streammerge.errors import MergeError

PARTIAL_SUFFIX = ".streammerge-partial"
JOURNAL = "journal.jsonl"
LOCK = ".lock"
#: Bytes of free space kept beyond the planned output (metadata, config files).
DISK_MARGIN_BYTES = 64 * 2**20


def sha256_file(path: Path, block_bytes: int = 8 * 2**20) -> str:
    """sha256 (hex) of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    buf = bytearray(block_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


class OutputDir:
    """One merge's output location.

    Args:
        out: the output directory the user named.
        inputs: the input model directories (the output may not be, contain, or lie in one).
        overwrite: replace a non-empty output / discard an interrupted merge's staging.
        resume: continue an interrupted merge from its journal.

    Raises:
        MergeError: (from ``preflight``/``open``) output related to an input, output exists
            and is not empty, staging left by an interrupted merge (without --resume or
            --overwrite), another merge holding the lock, too little free disk space.
    """

    def __init__(
        self, out: str | Path, inputs: list[Path], overwrite: bool = False, resume: bool = False
    ):
        self.out = Path(os.path.abspath(out))
        self.inputs = [Path(os.path.realpath(p)) for p in inputs]
        self.overwrite = overwrite
        self.resume = resume
        self.staging = self.out.parent / f".{self.out.name}{PARTIAL_SUFFIX}"
        self._lock_fd = -1
        self._journal = None

    def preflight(self, output_bytes: int) -> None:
        """Check the output location before any byte is written."""
        real_out = Path(os.path.realpath(self.out))
        for inp in self.inputs:
            if _related(real_out, inp):
                where = (
                    "is"
                    if real_out == inp
                    else ("is inside" if inp in real_out.parents else "contains")
                )
                raise MergeError(
                    f"the output directory {where} the input {inp}",
                    self.out,
                    None,
                    "choose an output directory outside every input",
                )
        if not self.out.parent.is_dir():
            raise MergeError(
                "the output's parent directory does not exist",
                self.out.parent,
                None,
                "create it first",
            )
        if not os.access(self.out.parent, os.W_OK):
            raise MergeError(
                "the output's parent directory is not writable",
                self.out.parent,
                None,
                "choose a writable location",
            )
        if self.out.exists() and not self.out.is_dir():
            raise MergeError(
                "the output exists and is not a directory",
                self.out,
                None,
                "choose another output path",
            )
        if self.out.is_dir() and any(self.out.iterdir()) and not self.overwrite:
            raise MergeError(
                "the output directory exists and is not empty",
                self.out,
                None,
                "choose a new directory, or pass --overwrite to replace it",
            )
        if self.staging.is_dir():
            self._lock(check_only=True)  # a running merge is not an interrupted one
        if self.staging.exists() and not (self.resume or self.overwrite):
            raise MergeError(
                "an interrupted merge left its staging directory",
                self.staging,
                None,
                "re-run the same command with --resume to continue it, or --overwrite to start over",
            )
        done = self._journal_bytes() if self.resume else 0
        free = shutil.disk_usage(self.out.parent).free
        need = output_bytes - done + DISK_MARGIN_BYTES
        if free < need:
            raise MergeError(
                f"not enough free disk space: need {need / 1e9:.2f} GB, have {free / 1e9:.2f} GB",
                self.out.parent,
                None,
                "free space or choose another output location",
            )

    def _read_journal(self) -> tuple[dict, dict[str, dict]]:
        path = self.staging / JOURNAL
        head: dict = {}
        shards: dict[str, dict] = {}
        if not path.is_file():
            return head, shards
        for line in path.read_text("utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill: ignore it and what follows
            if "recipe" in rec:
                head = rec
            elif "shard" in rec:
                shards[rec["shard"]] = rec
        return head, shards

    def _journal_bytes(self) -> int:
        return sum(r.get("size", 0) for r in self._read_journal()[1].values())

    def journal_seed(self) -> int | None:
        """The seed an interrupted merge used (for ``--resume`` without ``--seed``)."""
        if not self.resume:
            return None
        return self._read_journal()[0].get("seed")

    def open(self, fingerprint: str, seed: int) -> dict[str, dict]:
        """Create or reopen the staging directory, take the lock, start or check the journal.

        Args:
            fingerprint: hash of everything that decides the output bytes (recipe, inputs'
                header fingerprints, shard size, version).
            seed: recorded in the journal so ``--resume`` can reuse it.

        Returns:
            shard name -> journal record ({"size", "sha256"}) of shards already finished and
            verified (empty when starting fresh).

        Raises:
            MergeError: another merge holds the lock, or (resume) the recipe or inputs changed.
        """
        if self.staging.exists() and self.overwrite and not self.resume:
            self._lock(check_only=True)
            shutil.rmtree(self.staging)
        self.staging.mkdir(exist_ok=True)
        self._lock()
        try:
            return self._open_journal(fingerprint, seed)
        except BaseException:
            self.close()  # a refused resume must not keep the lock (the API may be called again)
            raise

    def _open_journal(self, fingerprint: str, seed: int) -> dict[str, dict]:
        head, shards = self._read_journal()
        done: dict[str, dict] = {}
        if head and head.get("recipe") != fingerprint:
            raise MergeError(
                "the recipe or the inputs changed since the interrupted merge",
                self.staging,
                None,
                "re-run with the same inputs and options (and --seed), or --overwrite to start over",
            )
        if head:
            for name, rec in shards.items():
                path = self.staging / name
                if (
                    path.is_file()
                    and path.stat().st_size == rec["size"]
                    and sha256_file(path) == rec["sha256"]
                ):
                    done[name] = rec
            self._rewrite_journal(head, done)
        else:
            for stale in self.staging.iterdir():
                if stale.name != LOCK:
                    stale.unlink() if stale.is_file() else shutil.rmtree(stale)
            self._rewrite_journal({"recipe": fingerprint, "seed": seed}, {})
        return done

    def _lock(self, check_only: bool = False) -> None:
        path = self.staging / LOCK
        try:
            fd = os.open(path, os.O_RDWR if check_only else os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            if check_only:  # no lock file: nobody holds it (and checking creates nothing)
                return
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MergeError(
                "another merge is writing this output",
                self.out,
                None,
                "wait for it to finish or choose another output",
            ) from None
        if check_only:
            os.close(fd)
        else:
            self._lock_fd = fd

    def _rewrite_journal(self, head: dict, shards: dict[str, dict]) -> None:
        tmp = self.staging / (JOURNAL + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(rec, sort_keys=True) + "\n" for rec in (head, *shards.values()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.staging / JOURNAL)
        _fsync_dir(self.staging)
        self._journal = open(self.staging / JOURNAL, "a", encoding="utf-8")  # noqa: SIM115 - kept open, closed in close()

    def shard_tmp_path(self, name: str) -> Path:
        """Where a shard is written before it is whole."""
        return self.staging / f"{name}.tmp"

    def commit_shard(self, name: str, size: int, sha256: str, meta: dict | None = None) -> None:
        """Rename a finished (fsync'd) shard into place and journal it (fsync'd), with
        ``meta`` (e.g. the thresholds its tensors used) kept in its journal record."""
        os.replace(self.shard_tmp_path(name), self.staging / name)
        _fsync_dir(self.staging)
        self.journal_shard(name, size, sha256, meta)

    def journal_shard(self, name: str, size: int, sha256: str, meta: dict | None = None) -> None:
        """Journal a shard already renamed into the staging directory (fsync'd): by
        ``commit_shard``, or by a distributed worker (the driver alone journals)."""
        assert self._journal is not None
        self._journal.write(
            json.dumps(
                {**(meta or {}), "shard": name, "size": size, "sha256": sha256}, sort_keys=True
            )
            + "\n"
        )
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def write_file(self, name: str, data: bytes) -> None:
        """Write a small output file (index, streammerge.json, config) into the staging dir."""
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def copy_file(self, src: Path, name: str) -> None:
        """Copy an input's small file (config, tokenizer) into the staging dir."""
        self.write_file(name, Path(src).read_bytes())

    def finish(self) -> None:
        """Make the output appear: drop the journal and lock, rename staging -> output."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        (self.staging / JOURNAL).unlink()
        (self.staging / LOCK).unlink()
        _fsync_dir(self.staging)
        old = None
        if self.out.exists():
            if any(self.out.iterdir()):
                old = self.out.parent / f".{self.out.name}.streammerge-old"
                if old.exists():
                    shutil.rmtree(old)
                os.rename(self.out, old)
            else:
                self.out.rmdir()
        os.rename(self.staging, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old)
        self.close()

    def close(self) -> None:
        """Release the lock (the staging directory stays for --resume)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
