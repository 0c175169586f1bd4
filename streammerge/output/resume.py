"""``--resume`` of an output directory: an interrupted merge's journal checked against this
run's recipe and inputs (what changed, said in one line), the shards it finished kept when
their inputs are unchanged; a finished output's record checked the same way. A part of
``OutputDir`` (``streammerge.output.outdir``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.io.lora import ADAPTER_KEY
from streammerge.io.paths import identity
from streammerge.notices import notice
from streammerge.output.files import (
    CTIME_SLACK_NS,
    changed_since,
    rehash_range,
    input_files,
    sha256_file,
)
from streammerge.output.journal import Journal, fsync_dir


class Resuming:
    """The resume half of ``OutputDir``: what an interrupted or finished output holds."""

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
            if before.get(ADAPTER_KEY) != m.file_fingerprints.get(ADAPTER_KEY):
                return f" (the LoRA adapter of input {role} changed)"
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
                if rehash_range(info, covered, buf) != digest:
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
                stale = {f for f in input_files(m).values() if changed_since(f, since)}
            if not stale:
                continue  # no file changed since before the merge wrote its first shard
            for info in m.tensors.values():
                if info.file in stale:
                    want = recorded.get(info.name) if isinstance(recorded, dict) else None
                    if not (isinstance(want, list) and len(want) == 2):
                        continue
                    covered, digest = want
                    if rehash_range(info, covered, buf) != digest:
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
