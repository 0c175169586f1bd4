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

import os
import shutil
from dataclasses import asdict
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.io import safejson
from streammerge.io.fingerprints import InputHasher, file_identity
from streammerge.io.paths import check_apart, identity, is_mount_point, real
from streammerge.io.writer import WrittenShard
from streammerge.output.files import (
    DISK_MARGIN_BYTES,
    JOURNAL_SUFFIX,
    MAX_RECORD_BYTES,
    MAX_RECORD_DEPTH,
    OLD_SUFFIX,
    PARTIAL_SUFFIX,
    RECORD_FILE,
    nonempty_dir,
    input_digests,
    input_files,
    require_free_space,
)
from streammerge.output.finish import Finishing
from streammerge.output.journal import JOURNAL_FORMAT, Journal, JournalFile, fsync_dir
from streammerge.output.resume import Resuming


class OutputDir(Resuming, Finishing):
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
        if j.mkdir and j.staging_id is None and not nonempty_dir(self.staging):
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
        occupied = nonempty_dir(self.target)
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
            self._jfile.release(remove)  # once only, even if a Ctrl-C makes this run again
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
        # From here on the journal is kept whatever happens: set before the mkdir, so a
        # Ctrl-C just after it cannot delete the journal and leave the staging directory
        # unexplained (every later run, --resume and --overwrite too, would refuse it).
        self._journal = Journal([])
        os.mkdir(self.staging, 0o755)
        fsync_dir(self.staging.parent)
        self._append({"staging": identity(self.staging)})
        self._journal = Journal.read(self.journal_path)

    # --- writing -------------------------------------------------------------------------

    def shard_tmp_path(self, name: str) -> Path:
        """Where a shard is written before it is whole."""
        return self.staging / f"{name}.tmp"

    @property
    def scratch_dir(self) -> str:
        """Where passes make nameless temporary files (``ops.RowArgs.scratch``): the staging
        directory, on the output's disk (a distributed worker's output has none: TMPDIR)."""
        return str(self.staging)

    def _input_digests(self, shard_name: str) -> list:
        """[role, tensor, bytes hashed, xxh3] of every input tensor that fed a shard."""
        return input_digests(self._plan, self.input_hasher, shard_name)

    def commit_shard(self, name: str, shard: WrittenShard, meta: dict | None = None) -> None:
        """Rename a finished (fsync'd) shard into place and journal it (fsync'd), with the
        input hashes and non-finite counts of its tensors, and ``meta`` (e.g. the
        thresholds its tensors used). ``shard``: what ``ShardWriter.finish`` returned.

        Raises:
            MergeError: the shard holds non-finite values the merge produced and
                ``--allow-nonfinite`` is off (``nonfinite.check_shard``); it is not
                committed.
        """
        from streammerge.io.nonfinite import check_shard

        nonfinite = shard.nonfinite
        check_shard(self._plan, name, self.shard_tmp_path(name), nonfinite, self.allow_nonfinite)
        os.replace(self.shard_tmp_path(name), self.staging / name)
        fsync_dir(self.staging)
        extra = {"inputs": self._input_digests(name), "nonfinite": nonfinite}
        self.journal_shard(name, shard.size, shard.sha256, {**extra, **(meta or {})})

    def journal_shard(self, name: str, size: int, sha256: str, extra: dict | None = None) -> None:
        """Journal a shard already renamed into the staging directory (fsync'd): by
        ``commit_shard``, or by the driver of a distributed merge for a worker's shard
        (``extra``: its input hashes, non-finite counts and thresholds)."""
        rec = {**(extra or {}), "shard": name, "size": size, "sha256": sha256}
        rec.setdefault("inputs", [])
        rec.setdefault("nonfinite", {})
        self._append(rec)
        self._new_shards[name] = rec

    # --- finishing -----------------------------------------------------------------------

