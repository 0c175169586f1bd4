"""The output directory as a transaction: preflight, lock, journal, resume, atomic finish.

Where: the output's real location ``T`` (``-o`` resolved through symlinks) and, beside it
in the same filesystem, two hidden entries that exist only while a merge is unfinished:

- ``.<name>.streammerge-partial/``: the staging directory. Each shard is written as
  ``<shard>.tmp``, fsync'd, renamed to its final name; the index, ``streammerge.json`` and
  the copied files come last; then the directory becomes ``T``.
- ``.<name>.streammerge-journal``: the lock (``flock``) and the journal, one fsync'd JSON
  line per step: the head (recipe fingerprint, seed, the inputs' identities and header
  fingerprints, the planned shard names), the staging directory's identity once created,
  each finished shard (size, sha256, the xxh3 of every input tensor it used, its non-finite
  counts), each other file before it is written, and the final rename.

The run only ever deletes what it created or what this journal records: a directory
at the staging path that the journal does not record is refused, never removed.

Finishing: ``T`` absent or empty: ``rename(staging, T)`` (which cannot replace a non-empty
directory that appeared meanwhile). ``T`` a finished model and ``--overwrite``: one
``renameat2(RENAME_EXCHANGE)`` swaps the two directories atomically (the old model then
sits at the staging path and is removed); where the filesystem cannot exchange, two
renames through ``.<name>.streammerge-old``. The rename is journaled first, so a kill at
any point leaves ``T`` whole (old or new) and the next run on ``T`` completes and cleans
up what the journal recorded. ``--resume`` on a finished output of the same recipe and
inputs changes nothing and says so.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
from dataclasses import asdict
from pathlib import Path

from streammerge.io import safejson
from streammerge.errors import MergeError
from streammerge.io.fingerprints import InputHasher, file_identity, hash_range
from streammerge.output.journal import JOURNAL_FORMAT, Journal, JournalFile, fsync_dir
from streammerge.notices import notice
from streammerge.io.paths import check_apart, identity, is_mount_point, real
from streammerge.io.writer import create_new

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


def _rehash(info, covered: int, buf: bytearray) -> str:
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


def _changed_since(f, since_ns: int) -> bool:
    """Whether input file ``f`` may have changed since ``since_ns``: its ctime, or for a
    file by URL, whether it has no ETag (one pins its bytes; the output's fingerprint,
    checked first, includes it)."""
    if hasattr(f, "url"):
        return f.etag is None
    return os.stat(f).st_ctime_ns >= since_ns


def _nonempty_dir(path: Path) -> bool:
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


class OutputDir:
    """One merge's output location.

    Args:
        out: the output directory the user named (a symlink is followed: the output is
            written where it points).
        inputs: the input model directories (nothing the run touches may be, contain, or
            lie in one).
        overwrite: replace a non-empty output / discard an interrupted merge's staging.
        resume: continue an interrupted merge from its journal (on a finished output of the
            same recipe and inputs: nothing to do).
        allow_nonfinite: keep non-finite values the merge produced (else they stop it).

    Raises:
        MergeError: (from ``preflight``/``open``/``finish``) a path the run touches related
            to an input, the output a mount point, the output exists and is not empty,
            staging left by an interrupted merge (without --resume or --overwrite), a
            directory at the staging path no journal records, another merge holding the
            lock, too little free disk space, a resume whose recipe or inputs changed, an
            output that appeared during the merge, non-finite values.
    """

    def __init__(
        self,
        out: str | Path,
        inputs: list[Path],
        overwrite: bool = False,
        resume: bool = False,
        allow_nonfinite: bool = False,
    ):
        self.out = Path(os.path.abspath(out))
        self.target = real(self.out)
        parent, name = self.target.parent, self.target.name
        self.staging = parent / f".{name}{PARTIAL_SUFFIX}"
        self.journal_path = parent / f".{name}{JOURNAL_SUFFIX}"
        self.old_path = parent / f".{name}{OLD_SUFFIX}"
        self.inputs = [real(p) for p in inputs]
        self.overwrite = overwrite
        self.resume = resume
        self.allow_nonfinite = allow_nonfinite
        self.finished = False  # --resume on a finished output: nothing to write
        #: how the merge was asked for (command, labels, recipe YAML) for the model card:
        #: journaled by the first run, so a resumed merge's card keeps the first run's words
        self.card_provenance: dict | None = None
        self.side_files = None  # planned in preflight
        self.input_hasher = InputHasher()
        self._plan = None
        self._base = None
        self._models: list = []
        self._fingerprint = ""
        self._jfile: JournalFile | None = None
        self._journal: Journal | None = None
        self._new_shards: dict[str, dict] = {}
        self._files_recorded: set[str] = set()
        self._finished_record: dict | None = None
        self._journal_now: Journal | None = None

    # --- looking (no lock, nothing written) -----------------------------------------------

    def _where(self) -> Path:
        return self.out if self.out == self.target else self.target

    def _finished_rec(self) -> dict | None:
        """The finished output's streammerge.json (None when it has none or it is not ours)."""
        path = self.target / RECORD_FILE
        if not path.is_file():
            return None
        try:
            rec = safejson.load_file(
                path,
                max_depth=MAX_RECORD_DEPTH,
                max_bytes=MAX_RECORD_BYTES,
                todo="it is not a streammerge output: pass --overwrite to replace it",
                what="streammerge.json",
            )
        except MergeError:
            return None
        return (
            rec
            if isinstance(rec, dict) and str(rec.get("format", "")).startswith("streammerge/")
            else None
        )

    def _swap_state(self, j: Journal | None) -> str | None:
        """``"done"``: the journal's final rename happened (the output is the new model);
        ``"half"``: a two-step rename was cut between its renames; else None."""
        if j is None or j.swap is None:
            return None
        new, old = j.swap.get("new"), j.swap.get("out")
        if identity(self.target) == new:
            return "done"
        if (
            j.swap.get("swap") == "two-step"
            and identity(self.target) is None
            and identity(self.staging) == new
            and identity(self.old_path) == old
        ):
            return "half"
        return None

    def _staging_ours(self, j: Journal | None) -> bool:
        """True when the directory at the staging path is the one the journal recorded."""
        sid = identity(self.staging)
        if sid is None:
            return True
        if j is None:
            return False
        if j.staging_id is not None and j.staging_id == sid:
            return True
        if j.mkdir and j.staging_id is None and not _nonempty_dir(self.staging):
            return True  # killed between mkdir and recording it: an empty directory
        # the old output, left at the staging path by an exchange
        return j.swap is not None and j.swap.get("out") == sid

    def journal_seed(self) -> int | None:
        """The seed to resume with: an interrupted merge's, or (``--resume`` on a finished
        output) the finished merge's."""
        if not self.resume:
            return None
        j = Journal.read(self.journal_path)
        if j is not None and j.head and self._swap_state(j) is None:
            seed = j.head.get("seed")
            return seed if isinstance(seed, int) else None
        rec = self._finished_rec()
        seed = rec.get("seed") if rec else None
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def _input_paths(self) -> list[Path]:
        paths = list(self.inputs)
        for m in (self._base, *self._models):
            if m is not None:
                paths += [real(f) for f in m.files]
        for f in self.side_files or ():
            if f.src is not None:
                paths.append(f.src)
        return paths

    def preflight(self, plan, base=None, models=None, copy_files: bool = True) -> None:
        """Check everything about the output before the staging directory exists.

        Args:
            plan: the merge plan (an int is taken as the planned output bytes, with no
                side-file planning, for callers without a plan).
            base, models: the opened inputs (their files are inputs too).
            copy_files: plan the side files (``streammerge.output.side_files``) now.

        Raises:
            MergeError: see the class.
        """
        output_bytes = plan if isinstance(plan, int) else plan.output_bytes
        if not isinstance(plan, int):
            self._plan, self._base, self._models = plan, base, list(models or ())
        self._recover()
        t = self.target
        if is_mount_point(t):
            raise MergeError(
                "the output is a mount point, which a finished merge cannot be renamed onto",
                self.out,
                None,
                f"choose a directory inside it, e.g. {self.out / 'merged'}",
            )
        if not t.parent.is_dir():
            raise MergeError(
                "the output's parent directory does not exist", t.parent, None, "create it first"
            )
        if not os.access(t.parent, os.W_OK | os.X_OK):
            raise MergeError(
                "the output's parent directory is not writable",
                t.parent,
                None,
                "choose a writable location",
            )
        if (t.exists() or t.is_symlink()) and not t.is_dir():
            raise MergeError(
                "the output exists and is not a directory",
                self.out,
                None,
                "choose another output path",
            )
        touched = [
            ("the output directory", t, self.out),
            ("the staging directory", self.staging),
            ("the journal", self.journal_path),
            ("the old-output path", self.old_path),
        ]
        check_apart(touched, self._input_paths())
        for path, kind in ((self.staging, "directory"), (self.journal_path, "file")):
            if path.is_symlink() or (path.exists() and (path.is_dir() != (kind == "directory"))):
                raise MergeError(
                    f"something other than a streammerge {kind} is in the way (a symlink, or "
                    f"not a {kind})",
                    path,
                    None,
                    "it was not left by streammerge: move it away (it is never deleted)",
                )
        if self._plan is not None and copy_files and self.side_files is None:
            from streammerge.output.side_files import plan_side_files

            self.side_files = plan_side_files(self._plan, self._base, self._models)
            check_apart(touched, self._input_paths())
        self._check_state(Journal.read(self.journal_path), locked=False)
        if self.finished:
            return
        j = self._journal_now
        done = 0
        if self.resume and j is not None and j.head and identity(self.staging) is not None:
            done = sum(r.get("size", 0) for r in j.shards.values())
        side = sum(f.size_bytes for f in self.side_files or ())
        require_free_space(t.parent, output_bytes + side - done + DISK_MARGIN_BYTES)

    def _check_state(self, j: Journal | None, locked: bool) -> None:
        """The output, staging and journal as found: refuse what this run may not do.

        Sets ``self.finished`` for --resume on a finished output with no merge pending.
        """
        self._journal_now = j
        if not locked and j is not None:
            self._lock(check_only=True)  # a running merge is not an interrupted one
        if not self._staging_ours(j):
            raise MergeError(
                "a directory is in the way at the staging path, and no streammerge journal "
                "records it",
                self.staging,
                None,
                "it was not left by streammerge: move it away (it is never deleted)",
            )
        pending = j is not None and bool(j.head) and self._swap_state(j) is None
        occupied = _nonempty_dir(self.target)
        if occupied and not self.overwrite:
            if self.resume and not pending and self._finished_rec() is not None:
                self.finished = True
                return
            raise MergeError(
                "the output directory exists and is not empty",
                self.out,
                None,
                "choose a new directory, or pass --overwrite to replace it"
                + (" when the merge finishes" if pending and self.resume else ""),
            )
        self.finished = False
        if (pending or identity(self.staging) is not None) and not (self.resume or self.overwrite):
            raise MergeError(
                "an interrupted merge left its staging directory",
                self.staging if identity(self.staging) is not None else self.journal_path,
                None,
                "re-run the same command with --resume to continue it, or --overwrite to start over",
            )

    # --- the lock and the journal (streammerge.output.journal) --------------------------------

    def _lock(self, check_only: bool = False) -> None:
        """Take (or, ``check_only``, test) the journal's lock."""
        jf = JournalFile.lock(self.journal_path, self.out, create=not check_only)
        if jf is None or check_only:
            if jf is not None:
                jf.release(remove=False)
            return
        self._jfile = jf

    def _unlock(self, remove: bool) -> None:
        if self._jfile is not None:
            self._jfile.release(remove)
            self._jfile = None

    def _append(self, rec: dict) -> None:
        """Append one record to the journal and make it durable."""
        self._jfile.append(rec)

    def _truncate(self) -> None:
        self._jfile.truncate()

    # --- recovery of a finished merge's leftovers ----------------------------------------

    def _recover(self) -> None:
        """Complete and clean up after a merge killed during its final rename (or after it):
        what its journal records, nothing else. Runs under the lock, before any check."""
        j = Journal.read(self.journal_path)
        if self._swap_state(j) is None:
            return
        self._lock()
        try:
            j = Journal.read(self.journal_path)
            state = self._swap_state(j)
            if state is None:
                return
            if state == "half":
                os.rename(self.staging, self.target)  # the new output, whole: put it in place
                fsync_dir(self.target.parent)
            self._remove_old(j.swap)
            self._unlock(remove=True)
        finally:
            self._unlock(remove=False)

    def _remove_old(self, swap: dict) -> None:
        """Delete the replaced output, wherever the recorded rename left it (checked by
        identity: only the directory the journal recorded)."""
        old = swap.get("out")
        if old is None:
            return
        for path in (self.staging, self.old_path):
            if identity(path) == old:
                check_apart([("the replaced output", path)], self._input_paths())
                shutil.rmtree(path)
                fsync_dir(path.parent)

    # --- opening: the journal and the staging directory -----------------------------------

    def open(self, fingerprint: str, seed: int) -> dict[str, dict]:
        """Take the lock, re-check the output, then start, resume or confirm the merge.

        Args:
            fingerprint: hash of everything that decides the output bytes (recipe, inputs'
                header fingerprints, shard size, version).
            seed: recorded in the journal so ``--resume`` can reuse it.

        Returns:
            shard name -> {"size", "sha256"} of shards already finished and verified (every
            shard when ``--resume`` found the output finished; empty when starting fresh).

        Raises:
            MergeError: another merge holds the lock, the output changed since the
                preflight, or (resume) the recipe or inputs changed.
        """
        self._fingerprint = fingerprint
        try:
            if self.finished and not self.journal_path.exists():
                return self._open_finished()  # read-only: no lock file is created
            self._lock()
            j = Journal.read(self.journal_path)
            self._check_state(j, locked=True)
            if self.finished:
                return self._open_finished()
            if self.resume and j is not None and j.head:
                return self._open_resume(j, fingerprint)
            if j is not None and (j.head or j.mkdir or j.shards):
                self._discard(j)
            self._start(fingerprint, seed)
            return {}
        except BaseException:
            self._unlock(
                remove=self._jfile is not None and self._jfile.created and self._journal is None
            )
            raise

    def _head(self, fingerprint: str, seed: int) -> dict:
        plan = self._plan
        models = [("base", self._base)] + [(str(j), m) for j, m in enumerate(self._models)]
        return {
            "journal": JOURNAL_FORMAT,
            "recipe": fingerprint,
            "seed": seed,
            "recipe_fields": asdict(plan.recipe) if plan is not None else None,
            "shards": [s.filename for s in plan.shards] if plan is not None else [],
            "headers": {role: m.file_fingerprints for role, m in models if m is not None},
            "identity": self._identities(),
            "card": self.card_provenance,
        }

    def _identities(self) -> dict:
        out: dict = {}
        for role, m in [("base", self._base)] + [(str(j), m) for j, m in enumerate(self._models)]:
            if m is not None:
                out[role] = {name: file_identity(f) for name, f in input_files(m).items()}
        return out

    def _start(self, fingerprint: str, seed: int) -> None:
        self._truncate()
        self._append(self._head(fingerprint, seed))
        self._append({"mkdir": True})
        os.mkdir(self.staging, 0o755)
        self._journal = Journal([])  # from here on the journal is kept whatever happens
        fsync_dir(self.staging.parent)
        self._append({"staging": identity(self.staging)})
        self._journal = Journal.read(self.journal_path)

    def _recorded_names(self, j: Journal) -> set[str]:
        names = set(j.head.get("shards", [])) | set(j.shards) | set(j.files)
        names |= {n + ".tmp" for n in list(names)}
        return names

    def _discard(self, j: Journal) -> None:
        """--overwrite over an interrupted merge: delete what its journal records (refusing,
        before deleting anything, when the staging directory holds anything else)."""
        if identity(self.staging) is not None:
            names = self._recorded_names(j)
            dirs = {str(Path(n).parent) for n in names} - {"."}
            dirs |= {str(p) for d in list(dirs) for p in Path(d).parents} - {"."}
            foreign = []
            for dirpath, dirnames, filenames in os.walk(self.staging):
                rel = Path(dirpath).relative_to(self.staging)
                for d in dirnames:
                    if (rel / d).as_posix() not in dirs:
                        foreign.append(rel / d)
                for f in filenames:
                    if (rel / f).as_posix() not in names:
                        foreign.append(rel / f)
                dirnames[:] = [d for d in dirnames if (rel / d).as_posix() in dirs]
            if foreign:
                raise MergeError(
                    f"the staging directory holds {foreign[0]}, which streammerge did not write",
                    self.staging,
                    None,
                    "move it out (nothing unrecorded is ever deleted), then re-run",
                )
            for dirpath, _dirnames, filenames in os.walk(self.staging, topdown=False):
                for f in filenames:
                    os.unlink(os.path.join(dirpath, f))
                os.rmdir(dirpath)
            fsync_dir(self.staging.parent)
        self._truncate()

    def _open_resume(self, j: Journal, fingerprint: str) -> dict[str, dict]:
        """--resume of an interrupted merge: same recipe and headers, then the finished
        shards (size + sha256) and the input bytes they used."""
        if j.head.get("recipe") != fingerprint:
            raise MergeError(
                f"the recipe or the inputs changed since the interrupted merge{self._what_changed(j.head)}",
                self.staging,
                None,
                "re-run with the same inputs and options (and --seed), or --overwrite to start over",
            )
        if identity(self.staging) is None:
            self._append({"mkdir": True})
            os.mkdir(self.staging, 0o755)
            fsync_dir(self.staging.parent)
            self._append({"staging": identity(self.staging)})
        done: dict[str, dict] = {}
        for name, rec in j.shards.items():
            path = self.staging / name
            if (
                path.is_file()
                and not path.is_symlink()
                and path.stat().st_size == rec.get("size")
                and sha256_file(path) == rec.get("sha256")
            ):
                done[name] = rec
        self._verify_inputs(j, done)
        self._journal = Journal.read(self.journal_path)
        self._journal.shards = done  # only verified shards count
        if isinstance(j.head.get("card"), dict):
            self.card_provenance = j.head["card"]  # the first run's words
        return {n: {"size": r["size"], "sha256": r["sha256"], "thresholds": r.get("thresholds")
                    or {}} for n, r in done.items()}  # fmt: skip

    def _what_changed(self, head: dict) -> str:
        """`` (seed 1 -> 2)`` or `` (the header of X changed)``: what a refused resume differs
        in, where the journal tells."""
        if self._plan is None:
            return ""
        old = head.get("recipe_fields") or {}
        # as the journal stores it (JSON: tuples are lists), so only real changes show
        new = json.loads(json.dumps(asdict(self._plan.recipe), default=str))
        diffs = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
        if diffs:
            return f" ({', '.join(diffs)})"
        models = [("base", self._base)] + [(str(j), m) for j, m in enumerate(self._models)]
        for role, m in models:
            before = (head.get("headers") or {}).get(role, {})
            for f in m.files:
                if before.get(f.name) != m.file_fingerprints.get(f.name):
                    url = getattr(m, "url", None)  # by URL: ``f`` is in a local skeleton
                    return f" (the header of {f'{url}/{f.name}' if url else f} changed)"
        return ""

    def _tensor_info(self, role: str, name: str):
        m = self._base if role == "base" else self._models[int(role)]
        return m.tensors.get(name)

    def _verify_inputs(self, j: Journal, done: dict[str, dict]) -> None:
        """Refuse when an input tensor a finished shard used has other bytes now.

        A file with the identity the journal recorded (device, inode, size, mtime, ctime)
        is unchanged (one stat); any other file has its used tensors re-read and hashed.
        """
        seen = j.seen or j.head.get("identity") or {}
        now = self._identities()
        changed: list[Path] = []
        buf = bytearray(8 * 2**20)
        by_file: dict[tuple[str, str], list] = {}
        for rec in done.values():
            for role, name, covered, digest in rec.get("inputs", []):
                info = self._tensor_info(str(role), name)
                if info is None:
                    continue
                by_file.setdefault((str(role), info.file.name), []).append((info, covered, digest))
        for (role, fname), items in by_file.items():
            if (seen.get(role) or {}).get(fname) == now[role][fname]:
                continue
            changed.append(items[0][0].file)
            for info, covered, digest in items:
                if _rehash(info, covered, buf) != digest:
                    raise MergeError(
                        "an input changed since the interrupted merge: this tensor's bytes "
                        "differ from those the finished shards were merged from",
                        info.file,
                        info.name,
                        "restore the input, or re-run with --overwrite to merge it as it is now",
                    )
        for f in changed:
            if getattr(f, "url", None) is not None and f.etag is None:
                notice(f"{f} has no ETag to show it unchanged: the bytes its finished shards "
                       "used were fetched again and are the same")  # fmt: skip
                continue
            notice(
                f"{f} changed since the interrupted merge; the bytes its finished shards used "
                "are the same (re-read), the rest is merged as it is now"
            )
        if now != seen:
            self._append({"seen": now})

    def _open_finished(self) -> dict[str, dict]:
        """--resume on a finished output: same recipe and headers (fingerprint), every
        shard present at its size, and the inputs' bytes as recorded (re-hashed for the
        files whose ctime is not older than the output). Nothing is written."""
        rec = self._finished_rec() or {}
        where = self._where()
        if rec.get("fingerprint") != self._fingerprint:
            raise MergeError(
                "the output is a finished merge of another recipe or other inputs",
                where,
                None,
                "pass --overwrite to replace it, or choose another output",
            )
        shards = rec.get("shards") or []
        mtimes = []
        for s in shards:
            path = self.target / str(s.get("file"))
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is None or st.st_size != s.get("size_bytes"):
                raise MergeError(
                    "the finished output lacks this shard or it has another size",
                    path,
                    None,
                    "pass --overwrite to merge again",
                )
            mtimes.append(st.st_mtime_ns)
        since = min(mtimes, default=0) - CTIME_SLACK_NS
        hashes = rec.get("inputs_xxh3") or {}
        per_model = list(hashes.get("models") or [])
        per_model += [{}] * (len(self._models) - len(per_model))
        buf = bytearray(8 * 2**20)
        records = [rec.get("base") or {}, *(rec.get("models") or [])]
        records += [{}] * (1 + len(self._models) - len(records))
        inputs = zip([self._base, *self._models], [hashes.get("base") or {}, *per_model], records)
        for m, recorded, inrec in inputs:
            if m is None:
                continue
            if getattr(m, "url", None) is not None and inrec.get("stamp") != m.stamp:
                stale = set(input_files(m).values())  # a size or ETag changed: re-read all
            else:
                stale = {f for f in input_files(m).values() if _changed_since(f, since)}
            if not stale:
                continue  # no file changed since before the merge wrote its first shard
            for info in m.tensors.values():
                if info.file in stale:
                    want = recorded.get(info.name) if isinstance(recorded, dict) else None
                    if not (isinstance(want, list) and len(want) == 2):
                        continue
                    covered, digest = want
                    if _rehash(info, covered, buf) != digest:
                        raise MergeError(
                            "an input changed since the output was merged: this tensor's "
                            "bytes differ",
                            info.file,
                            info.name,
                            "pass --overwrite to merge the inputs as they are now",
                        )
        self.finished = True
        self._finished_record = rec
        return {str(s["file"]): {"size": s["size_bytes"], "sha256": s["sha256"],
                                 "thresholds": self._recorded_thresholds(rec, str(s["file"]))}
                for s in shards}  # fmt: skip

    def _recorded_thresholds(self, rec: dict, shard: str) -> dict:
        """The thresholds a finished output's record gives the tensors of ``shard`` (the
        record is rebuilt from them, so a finished TIES output compares equal)."""
        tensors = rec.get("tensors") if isinstance(rec.get("tensors"), dict) else {}
        plan_shard = next((s for s in self._plan.shards if s.filename == shard), None)
        names = [t.name for t in plan_shard.tensors] if plan_shard is not None else []
        return {
            n: tensors[n]["thresholds"]
            for n in names
            if isinstance(tensors.get(n), dict) and tensors[n].get("thresholds") is not None
        }

    # --- writing -------------------------------------------------------------------------

    def shard_tmp_path(self, name: str) -> Path:
        """Where a shard is written before it is whole."""
        return self.staging / f"{name}.tmp"

    def _input_digests(self, shard_name: str) -> list:
        """[role, tensor, bytes hashed, xxh3] of every input tensor that fed a shard."""
        return input_digests(self._plan, self.input_hasher, shard_name)

    def commit_shard(self, name: str, size: int, sha256: str, meta: dict | None = None) -> None:
        """Rename a finished (fsync'd) shard into place and journal it (fsync'd), with the
        input hashes and non-finite counts of its tensors, and ``meta`` (e.g. the
        thresholds its tensors used).

        Raises:
            MergeError: the shard holds non-finite values the merge produced and
                ``--allow-nonfinite`` is off (``nonfinite.check_shard``); it is not
                committed.
        """
        from streammerge.io.writer import take_nonfinite

        from streammerge.io.nonfinite import check_shard

        nonfinite = take_nonfinite(self.shard_tmp_path(name))
        check_shard(self._plan, name, self.shard_tmp_path(name), nonfinite, self.allow_nonfinite)
        os.replace(self.shard_tmp_path(name), self.staging / name)
        fsync_dir(self.staging)
        extra = {"inputs": self._input_digests(name), "nonfinite": nonfinite}
        self.journal_shard(name, size, sha256, {**extra, **(meta or {})})

    def journal_shard(self, name: str, size: int, sha256: str, extra: dict | None = None) -> None:
        """Journal a shard already renamed into the staging directory (fsync'd): by
        ``commit_shard``, or by the driver of a distributed merge for a worker's shard
        (``extra``: its input hashes, non-finite counts and thresholds)."""
        rec = {**(extra or {}), "shard": name, "size": size, "sha256": sha256}
        rec.setdefault("inputs", [])
        rec.setdefault("nonfinite", {})
        self._append(rec)
        self._new_shards[name] = rec

    def write_file(self, name: str, data: bytes) -> None:
        """Write a small output file (index, streammerge.json, config) into the staging dir
        (journaled first). On a finished output: check it has these bytes already."""
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise MergeError(f"refusing to write {name!r} outside the output", self.staging)
        if self.finished:
            if name == CARD_FILE:
                return  # the card keeps the words of the run that wrote it (paths as typed)
            path = self.target / name
            try:
                same = path.read_bytes() == data
            except OSError:
                same = False
            if not same:
                raise MergeError(
                    "the finished output differs from what this merge would write",
                    path,
                    None,
                    "pass --overwrite to merge again",
                )
            return
        if name not in self._files_recorded:
            self._append({"file": name})
            self._files_recorded.add(name)
        path = self.staging / name
        self._staging_dirs(Path(name).parent)
        fd = create_new(path, os.O_WRONLY | os.O_CLOEXEC)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _staging_dirs(self, rel: Path) -> None:
        """Make the directories ``rel`` below the staging directory, refusing any component
        that is not a real directory (a symlink planted there could lead writes into an
        input)."""
        d = self.staging
        for part in rel.parts:
            d = d / part
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                os.mkdir(d, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise MergeError(
                    "something other than a directory streammerge made is in the staging directory",
                    d,
                    None,
                    "move it away, then re-run with --resume",
                )

    def copy_file(self, src: Path, name: str) -> None:
        """Copy an input's small file (config, tokenizer) into the staging dir."""
        self.write_file(name, Path(src).read_bytes())

    def record_extra(self) -> dict:
        """What ``streammerge.json`` records besides the recipe: the fingerprint ``--resume``
        compares, and the xxh3 of every input tensor (``[bytes hashed, hex]``); on a
        finished output, also its recorded ``base`` and ``models``."""
        if self.finished and self._finished_record is not None:
            # A finished output is not rewritten: its inputs as recorded (a URL input's
            # stamp may have changed while its bytes, re-hashed, did not).
            rec = self._finished_record
            keep = {"fingerprint": rec.get("fingerprint"), "inputs_xxh3": rec.get("inputs_xxh3")}
            keep.update({k: rec[k] for k in ("base", "models") if k in rec})
            return keep
        roles: dict[str, dict] = {}
        shards = dict(self._journal.shards) if self._journal is not None else {}
        shards.update(self._new_shards)
        for rec in shards.values():
            for role, name, covered, digest in rec.get("inputs", []):
                roles.setdefault(str(role), {})[name] = [covered, digest]
        return {
            "fingerprint": self._fingerprint,
            "inputs_xxh3": {
                "base": dict(sorted(roles.get("base", {}).items())),
                "models": [
                    dict(sorted(roles.get(str(j), {}).items())) for j in range(len(self._models))
                ],
            },
        }

    # --- finishing -----------------------------------------------------------------------

    def _check_nonfinite(self) -> None:
        """Stop on non-finite values the merge produced (not copied from an input that has
        them), unless --allow-nonfinite; a notice either way."""
        from streammerge.io.nonfinite import produced_nonfinite

        shards = dict(self._journal.shards) if self._journal is not None else {}
        shards.update(self._new_shards)
        flagged = {
            (name, t): n
            for name, r in shards.items()
            for t, n in (r.get("nonfinite") or {}).items()
        }
        if not flagged or self._plan is None:
            return
        total = sum(flagged.values())
        produced, first = 0, None
        for s in self._plan.shards:
            for t in s.tensors:
                if (s.filename, t.name) in flagged:
                    n = produced_nonfinite(t, self.staging / s.filename, len(s.header))
                    if n and first is None:
                        first = t.name
                    produced += n
        if produced and not self.allow_nonfinite:
            raise MergeError(
                f"the merge produced {produced} non-finite values (NaN or Inf) where every "
                f"input is finite (weights or scale too large?)",
                self.staging,
                first,
                "check --weights / --lambda / --scale, or re-run with --resume "
                "--allow-nonfinite to keep them",
            )
        if produced:
            notice(f"kept {produced} non-finite values the merge produced (first in {first})")
        if total > produced:
            notice(f"{total - produced} non-finite values come from inputs that have them")

    def finish(self) -> None:
        """Make the output appear (atomically), then remove the journal and what it replaced."""
        if self.finished:
            notice(f"{self._where()} is already this merge (same recipe and inputs): nothing to do")
            self.close()
            return
        self._check_nonfinite()
        fsync_dir(self.staging)
        new = identity(self.staging)
        t = self.target
        occupied = _nonempty_dir(t)
        if occupied and not self.overwrite:
            raise MergeError(
                "the output appeared during this merge and is not empty",
                self.out,
                None,
                "re-run with --resume --overwrite to replace it, or move it away and --resume",
            )
        if is_mount_point(t):
            raise MergeError(
                "the output became a mount point during this merge",
                self.out,
                None,
                "unmount it, or move the staging directory yourself",
            )
        if occupied:
            swap = {"swap": "exchange", "out": identity(t), "new": new}
            self._append(swap)
            try:
                renameat2(self.staging, t, RENAME_EXCHANGE)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                swap = {"swap": "two-step", "out": identity(t), "new": new}
                self._append(swap)
                if identity(self.old_path) is not None:
                    raise MergeError(
                        "a directory is in the way at the old-output path",
                        self.old_path,
                        None,
                        "move it away, then re-run with --resume --overwrite",
                    ) from None
                os.rename(t, self.old_path)
                os.rename(self.staging, t)
        else:
            swap = {"swap": "rename", "out": identity(t), "new": new}
            self._append(swap)
            try:
                os.rename(self.staging, t)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise MergeError(
                    "the output appeared during this merge",
                    self.out,
                    None,
                    "re-run with --resume --overwrite to replace it, or move it away and --resume",
                ) from None
        fsync_dir(t.parent)
        if occupied:
            self._remove_old(swap)
        self._unlock(remove=True)

    def close(self) -> None:
        """Release the lock (the staging directory and journal stay for --resume; a journal
        this run created and never used is removed)."""
        self._unlock(
            remove=self._jfile is not None and self._jfile.created and self._journal is None
        )
