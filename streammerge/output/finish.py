"""Finishing an output directory: files written into staging, non-finite values checked,
then the staging directory put in place (``rename``, or ``renameat2(RENAME_EXCHANGE)`` over
a finished model with ``--overwrite``), journaled first; ``close`` on every exit. A part of
``OutputDir`` (``streammerge.output.outdir``)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.io.paths import identity, is_mount_point
from streammerge.io.writer import create_new
from streammerge.notices import notice
from streammerge.output.files import CARD_FILE, RENAME_EXCHANGE, nonempty_dir, renameat2
from streammerge.output.journal import fsync_dir


class Finishing:
    """The finishing half of ``OutputDir``: files into staging, then staging into place."""

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
        occupied = nonempty_dir(t)
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
