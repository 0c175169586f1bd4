"""Issue 5: a killed merge never leaves a directory that looks like a finished model, and
``--resume`` finishes it byte-identical to an uninterrupted run.

The kill trials run the real CLI (``streammerge.cli.main``) in processes forked from a
"zygote" that has already imported the package (interpreter and numba start-up would
otherwise take most of each trial): the SIGKILL delay is measured from the fork, and the
delays spread over the merge itself (two uninterrupted runs measure it first). Each killed
merge is resumed (most in this process, every fifth in a fresh ``python -m streammerge.cli``)
and every output file, index and streammerge.json included, must equal the reference.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import dir_digest, merge_argv, run_cli, write_model
from safetensors.torch import load_file, save_file

import streammerge.cli
from streammerge.output.outdir import OutputDir

TRIALS = 20
SEED = 1234
PARTIAL = ".out.streammerge-partial"
JOURNAL = ".out.streammerge-journal"
#: Small and slow enough to stream in ~100 chunks into ~9 shards (one 120 KB tensor each).
OPTS = [
    "--seed",
    str(SEED),
    "--shard-size",
    "200KB",
    "--memory",
    "1150KiB",
    "--device",
    "cpu",
    "--quiet",
]

#: A zygote: imports streammerge (numba and the kernels included, nothing run, so no thread
#: started) once, then forks one child per command line; the child is the CLI
#: (``streammerge.cli.main``), its output going to a log file. The zygote reaps a child only
#: when told to, so the pid the test signals cannot have been reused.
ZYGOTE = """
import json, os, sys
import streammerge.cli
import numba  # noqa: F401 - imported, nothing run: no OpenMP threads exist before fork
import streammerge.kernels.cpu_merge  # noqa: F401
print("ready", flush=True)
while line := sys.stdin.readline():
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            rc = streammerge.cli.main(job["argv"])
        except BaseException as e:
            print("zygote child:", repr(e), file=sys.stderr, flush=True)
            rc = 99
        os._exit(rc)
    print(pid, flush=True)
    sys.stdin.readline()
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    """Starts CLI processes without paying for interpreter and numba start-up each time."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.p = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.p.stdout.readline()
        assert line == "ready\n", line
        self.pid = 0

    def start(self, argv: list[str]) -> float:
        """Fork a child running the CLI on ``argv``; returns the time it started."""
        self.p.stdin.write(json.dumps({"argv": argv, "log": str(self.log)}) + "\n")
        self.p.stdin.flush()
        self.pid = int(self.p.stdout.readline())
        return time.perf_counter()

    def running(self) -> bool:
        """True until the child exits (it stays a zombie, unreaped, until ``reap``)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def reap(self) -> tuple[int, str]:
        """Let the zygote reap the child: (exit code, or -signal; its log)."""
        self.p.stdin.write("reap\n")
        self.p.stdin.flush()
        rc = int(self.p.stdout.readline())
        return rc, self.log.read_text()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


def build_trio(root: Path, seed: int = 5, scale: float = 0.002) -> tuple[Path, Path, Path]:
    """Base (1 file), a (3 shards), b (2 shards): eight 250x240 bf16 layers, an embedding,
    an integer buffer, and a tensor only the base has."""
    g = torch.Generator().manual_seed(seed)
    base = {f"layers.{i}.mlp.weight": torch.randn(250, 240, generator=g) * 0.02 for i in range(8)}
    base["embed.weight"] = torch.randn(37, 24, generator=g) * 0.02
    dirs = []
    for k, (name, shards) in enumerate((("base", 1), ("a", 3), ("b", 2))):
        ts = {
            n: (v if k == 0 else v + torch.randn(v.shape, generator=g) * scale).to(torch.bfloat16)
            for n, v in base.items()
        }
        ts["position_ids"] = torch.arange(13, dtype=torch.int64).reshape(1, 13)
        if k == 0:
            ts["pooler.weight"] = torch.randn(5, 3, generator=g).to(torch.bfloat16)
        dirs.append(write_model(root / name, ts, shards=shards))
    return dirs[0], dirs[1], dirs[2]


def files_of(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (hidden ones too), relative path -> bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def assert_same_files(out: Path, ref: dict[str, bytes]) -> None:
    got = files_of(out)
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    for name, want in ref.items():
        assert got[name] == want, f"{name} differs from the uninterrupted run"


def argv_for(trio, out: Path, *extra: str) -> list[str]:
    base, a, b = trio
    return merge_argv([a, b], base, out, *OPTS, *extra)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """The inputs and the reference: every file of one uninterrupted merge."""
    root = tmp_path_factory.mktemp("resume")
    trio = build_trio(root / "m")
    assert streammerge.cli.main(argv_for(trio, root / "ref")) == 0
    ref = files_of(root / "ref")
    shards = [n for n in ref if n.endswith(".safetensors")]
    assert len(shards) >= 8 and "model.safetensors.index.json" in ref and "streammerge.json" in ref
    return trio, ref, root


def inspect_parent(work: Path, ref: dict[str, bytes]) -> str:
    """After a kill: the output is absent or whole; nothing else in its parent looks like a
    model (only the hidden staging directory and journal). Returns the phase the kill hit."""
    names = sorted(p.name for p in work.iterdir())
    assert set(names) <= {"out", PARTIAL, JOURNAL}, names
    if (work / "out").exists():
        assert_same_files(work / "out", ref)  # renamed into place only when whole
        return "finished" if names == ["out"] else "renamed, not cleaned up"
    staging = work / PARTIAL
    journal = work / JOURNAL
    if not journal.exists():
        return "before the journal"
    if not staging.exists():
        return "journal, no staging"
    return f"{shards_journaled(journal)} shard(s) journaled"


def shards_journaled(journal: Path) -> int:
    """Shards a journal records as finished (0 when there is none, or it is being replaced)."""
    try:
        return sum('"shard"' in line for line in journal.read_text().splitlines())
    except OSError:
        return 0


def test_kill_9_at_random_points_then_resume_is_byte_identical(trio):
    trio_dirs, ref, root = trio
    work = root / "work"
    work.mkdir()
    out = work / "out"
    argv = argv_for(trio_dirs, out)
    zygote = Zygote(root / "child.log")
    try:
        phases = []
        # Up to 3 rounds (a loaded machine can make the timed runs slow and the killed ones
        # fast, so that every kill lands after the end): until one kill hits mid-merge.
        for _round in range(3):
            # Two uninterrupted runs: the same bytes, and when the first shard is journaled and
            # the merge ends (the kills spread over both: the first shard pays for loading the
            # compiled kernels, the others stream by quickly).
            journal = work / JOURNAL
            first, total = [], []
            for _ in range(2):
                t0 = zygote.start(argv)
                seen = None
                while zygote.running():
                    if seen is None and shards_journaled(journal):
                        seen = time.perf_counter() - t0
                    time.sleep(0.002)
                total.append(time.perf_counter() - t0)
                first.append(seen or 0.0)
                rc, log = zygote.reap()
                assert rc == 0, log
                assert_same_files(out, ref)
                shutil.rmtree(out)
            duration, t_first = sum(total) / 2, sum(first) / 2

            rng = random.Random(20240605)
            early, late = TRIALS * 2 // 5, TRIALS - TRIALS * 2 // 5
            delays = [duration * 1.15 * (i + rng.random()) / early for i in range(early)]
            delays += [t_first + (duration - t_first) * (i + rng.random()) / late
                       for i in range(late)]  # fmt: skip
            rng.shuffle(delays)
            for trial, delay in enumerate(delays):
                t0 = zygote.start(argv)
                time.sleep(max(0.0, delay - (time.perf_counter() - t0)))
                os.kill(zygote.pid, signal.SIGKILL)  # our child, running or an unreaped zombie
                rc, log = zygote.reap()
                assert rc in (0, -signal.SIGKILL), (rc, log)
                phase = inspect_parent(work, ref)
                phases.append(f"{delay:.2f}s: {phase}")
                if rc == 0:  # exited before the kill: then the output is whole
                    assert phase == "finished", (phase, log)
                if phase != "finished":
                    if trial % 5 == 4:  # every fifth resume in a fresh process, others in this one
                        r = run_cli(argv + ["--resume"])
                        assert r.returncode == 0, (phases, r.stderr)
                    else:
                        assert streammerge.cli.main(argv + ["--resume"]) == 0, phases
                    assert sorted(p.name for p in work.iterdir()) == ["out"], phases
                    assert_same_files(out, ref)
                shutil.rmtree(out)
            if mid_merge(phases):
                break
    finally:
        zygote.close()
    print(
        f"\nuninterrupted: {duration:.2f}s, first shard {t_first:.2f}s; kills:", *phases, sep="\n  "
    )
    # The kills hit mid-merge, not only before or after it.
    assert mid_merge(phases), phases


def mid_merge(phases: list[str]) -> bool:
    """Whether a kill landed mid-merge: some shards journaled, not all."""
    return any("journaled" in p and not p.endswith(": 0 shard(s) journaled") for p in phases)


def interrupt_after(monkeypatch, argv: list[str], shards: int) -> None:
    """Run the CLI in this process and Ctrl-C it right after ``shards`` shards are committed."""
    real = OutputDir.commit_shard
    count = [0]

    def commit(self, *args, **kwargs):
        real(self, *args, **kwargs)
        count[0] += 1
        if count[0] == shards:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(OutputDir, "commit_shard", commit)
        assert streammerge.cli.main(argv) == 130
    assert count[0] == shards


def journaled(staging: Path) -> list[dict]:
    """The shard records of the journal beside ``staging``."""
    lines = (staging.parent / JOURNAL).read_text().splitlines()
    return [json.loads(x) for x in lines if '"shard"' in x]


def test_resume_refuses_a_changed_recipe(trio, monkeypatch, capsys, tmp_path):
    trio_dirs, ref, _ = trio
    out = tmp_path / "out"
    argv = argv_for(trio_dirs, out)
    interrupt_after(monkeypatch, argv, 2)
    staging = tmp_path / PARTIAL
    kept = files_of(staging)
    assert len(journaled(staging)) == 2
    capsys.readouterr()
    for change in (
        ["--drop", "0.3"],
        ["--seed", str(SEED + 1)],
        ["--shard-size", "300KB"],
        ["--lambda", "0.4"],
    ):
        assert streammerge.cli.main(argv + change + ["--resume"]) == 2, change
        err = capsys.readouterr().err.strip().split("\n")
        assert len(err) == 1 and err[0].startswith("streammerge: error: "), err
        assert "the recipe or the inputs changed" in err[0] and str(staging) in err[0], err
        assert "--overwrite" in err[0]
        assert files_of(staging) == kept and not out.exists(), change
        if change[0] == "--drop":  # names what changed, nothing that did not
            assert "drop" in err[0] and "mixup" not in err[0], err
    assert streammerge.cli.main(argv + ["--resume"]) == 0
    assert_same_files(out, ref)


def test_resume_refuses_a_changed_input(trio, monkeypatch, capsys, tmp_path):
    src, _, _ = trio
    base, a, b = (tmp_path / "m" / p.name for p in src)
    for p, q in zip(src, (base, a, b)):
        shutil.copytree(p, q)
    out = tmp_path / "out"
    argv = argv_for((base, a, b), out)
    interrupt_after(monkeypatch, argv, 1)
    staging = tmp_path / PARTIAL
    kept = files_of(staging)

    # b rewritten with other values: same names, shapes, dtypes, sharding, header bytes.
    def headers():
        raw = {p.name: p.read_bytes() for p in b.glob("*.safetensors")}
        return {k: v[: 8 + int.from_bytes(v[:8], "little")] for k, v in raw.items()}

    before = headers()
    time.sleep(0.01)
    for f in b.glob("*.safetensors"):
        tensors = load_file(str(f))
        tensors = {
            n: (t.float() + 0.001).to(t.dtype) if t.is_floating_point() else t
            for n, t in tensors.items()
        }
        save_file(tensors, str(f), metadata={"format": "pt"})
    assert headers() == before
    capsys.readouterr()
    assert streammerge.cli.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and "an input changed since the interrupted merge" in err[0], err
    assert str(b) in err[0], err  # names the file that changed
    assert files_of(staging) == kept and not out.exists()
    # Starting over is what the message offers.
    assert streammerge.cli.main(argv + ["--overwrite"]) == 0
    assert not staging.exists() and (out / "streammerge.json").is_file()


def test_resume_rewrites_a_corrupted_finished_shard(trio, monkeypatch, capsys, tmp_path):
    trio_dirs, ref, _ = trio
    out = tmp_path / "out"
    argv = argv_for(trio_dirs, out)
    interrupt_after(monkeypatch, argv, 3)
    staging = tmp_path / PARTIAL
    recs = journaled(staging)
    assert len(recs) == 3
    flipped = staging / recs[0]["shard"]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only sha256 can tell
    flipped.write_bytes(bytes(data))
    truncated = staging / recs[1]["shard"]
    os.truncate(truncated, truncated.stat().st_size - 1)
    capsys.readouterr()
    assert streammerge.cli.main(argv + ["--resume"]) == 0
    assert "(1 shard(s) resumed)" in capsys.readouterr().out
    assert_same_files(out, ref)


#: The CLI in a child process that sends itself a real SIGINT (Ctrl-C) once the journal has
#: recorded a finished shard: a Ctrl-C mid-merge whatever the machine's load (a timed signal
#: from outside raced the merge to its end on a loaded machine).
CTRL_C_AFTER_FIRST_SHARD = """
import os, signal, sys
# Ctrl-C raises KeyboardInterrupt even where the test process ignores SIGINT (a child
# inherits SIG_IGN, and Python then installs no handler: the merge ran to its end)
signal.signal(signal.SIGINT, signal.default_int_handler)
import streammerge.cli
from streammerge.output.journal import JournalFile
append = JournalFile.append
def append_then_ctrl_c(self, rec):
    append(self, rec)
    if "shard" in rec:
        os.kill(os.getpid(), signal.SIGINT)
JournalFile.append = append_then_ctrl_c
sys.exit(streammerge.cli.main(sys.argv[1:]))
"""


def test_ctrl_c_exits_130_and_resume_finishes(trio, tmp_path):
    trio_dirs, ref, _ = trio
    out = tmp_path / "out"
    argv = argv_for(trio_dirs, out)
    staging = tmp_path / PARTIAL
    p = subprocess.run([sys.executable, "-c", CTRL_C_AFTER_FIRST_SHARD, *argv],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)  # fmt: skip
    log = p.stdout
    assert p.returncode == 130, log
    assert "--resume" in log and "Traceback" not in log, log
    assert not out.exists() and staging.is_dir() and journaled(staging)
    # --resume without --seed takes the seed from the journal.
    argv_no_seed = [x for x in argv if x not in ("--seed", str(SEED))]
    r = run_cli(argv_no_seed + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert_same_files(out, ref)


def test_kill_9_during_overwrite_keeps_a_whole_model_then_resume_is_byte_identical(trio):
    """Issue 12: ``--overwrite`` of a finished model, killed at random points (the final
    exchange included): the output is always a whole model, the old one until the new one
    replaces it in one step; ``--resume --overwrite`` then gives the reference bytes and
    leaves nothing else behind."""
    trio_dirs, ref, root = trio
    work = root / "work-overwrite"
    work.mkdir()
    out = work / "out"
    old_copy = root / "old-model"
    assert streammerge.cli.main(argv_for(trio_dirs, old_copy, "--seed", str(SEED + 1))) == 0
    old = files_of(old_copy)
    argv = argv_for(trio_dirs, out, "--overwrite")
    zygote = Zygote(root / "child-overwrite.log")
    try:
        total = []
        for _ in range(2):
            shutil.copytree(old_copy, out)
            t0 = zygote.start(argv)
            while zygote.running():
                time.sleep(0.002)
            total.append(time.perf_counter() - t0)
            rc, log = zygote.reap()
            assert rc == 0, log
            assert_same_files(out, ref)
            shutil.rmtree(out)
        duration = sum(total) / 2
        rng = random.Random(20261123)
        delays = [duration * 1.1 * (i + rng.random()) / TRIALS for i in range(TRIALS)]
        rng.shuffle(delays)
        phases = []
        for delay in delays:
            shutil.copytree(old_copy, out)
            t0 = zygote.start(argv)
            time.sleep(max(0.0, delay - (time.perf_counter() - t0)))
            os.kill(zygote.pid, signal.SIGKILL)
            rc, log = zygote.reap()
            assert rc in (0, -signal.SIGKILL), (rc, log)
            names = sorted(p.name for p in work.iterdir())
            assert "out" in names, (delay, names)  # never without a model
            now = files_of(out)
            phase = "new" if now == ref else "old"
            assert now == (ref if phase == "new" else old), (delay, "a mixed model", names)
            phases.append(f"{delay:.2f}s: {phase}, {len(names) - 1} hidden")
            assert streammerge.cli.main(argv + ["--resume"]) == 0, phases
            assert sorted(p.name for p in work.iterdir()) == ["out"], phases
            assert_same_files(out, ref)
            shutil.rmtree(out)
    finally:
        zygote.close()
    print(f"\n--overwrite, uninterrupted {duration:.2f}s; kills:", *phases, sep="\n  ")
    assert any(": old" in p and " 0 hidden" not in p for p in phases), phases  # mid-merge


def _interrupted_copy(trio, tmp_path, monkeypatch, shards: int):
    """Copies of the trio and a merge of them interrupted after ``shards`` shards."""
    src, _, _ = trio
    dirs = tuple(tmp_path / "m" / p.name for p in src)
    for p, q in zip(src, dirs):
        shutil.copytree(p, q)
    out = tmp_path / "out"
    argv = argv_for(dirs, out)
    interrupt_after(monkeypatch, argv, shards)
    return dirs, out, argv


def _flip_byte_keeping_size_and_mtime(f: Path, offset: int) -> None:
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _tensor_byte(model: Path, tensor: str) -> tuple[Path, int]:
    """The file of ``model`` holding ``tensor`` and the offset of its middle byte."""
    from streammerge.io.reader import open_model

    info = open_model(model).tensors[tensor]
    return info.file, info.start + info.nbytes // 2


def test_resume_refuses_an_input_edited_in_place_with_size_and_mtime_restored(
    trio, monkeypatch, capsys, tmp_path
):
    """Issue 12 finding 3: one byte of a tensor a finished shard used, edited in place,
    size and mtime restored: --resume refuses, naming the file and the tensor, and changes
    nothing; with the byte put back it resumes to the reference bytes."""
    (base, a, b), out, argv = _interrupted_copy(trio, tmp_path, monkeypatch, 2)
    staging = tmp_path / PARTIAL
    used = [t for rec in journaled(staging) for role, t, *_ in rec["inputs"] if role == "1"]
    f, offset = _tensor_byte(b, used[0])
    _flip_byte_keeping_size_and_mtime(f, offset)
    kept = files_of(tmp_path)
    capsys.readouterr()
    assert streammerge.cli.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and str(f) in err[0] and used[0] in err[0], err
    assert "an input changed" in err[0] and "--overwrite" in err[0], err
    assert files_of(tmp_path) == kept
    _flip_byte_keeping_size_and_mtime(f, offset)  # put back: the bytes are what they were
    assert streammerge.cli.main(argv + ["--resume"]) == 0
    fresh = tmp_path / "fresh"
    assert streammerge.cli.main(argv_for((base, a, b), fresh)) == 0
    assert_same_files(out, files_of(fresh))


def test_resume_merges_an_input_edited_where_no_finished_shard_read(trio, monkeypatch, tmp_path):
    """An edit in a tensor no finished shard used is not relied on: --resume continues
    and the output is that of a fresh merge of the inputs as they are now."""
    (base, a, b), out, argv = _interrupted_copy(trio, tmp_path, monkeypatch, 2)
    staging = tmp_path / PARTIAL
    used = {t for rec in journaled(staging) for _, t, *_ in rec["inputs"]}
    from streammerge.io.reader import open_model

    unused = min(set(open_model(a).tensors) - used)
    f, offset = _tensor_byte(a, unused)
    _flip_byte_keeping_size_and_mtime(f, offset)
    assert streammerge.cli.main(argv + ["--resume"]) == 0
    fresh = tmp_path / "fresh"
    assert streammerge.cli.main(argv_for((base, a, b), fresh)) == 0
    assert_same_files(out, files_of(fresh))


def test_links_planted_in_the_staging_directory_lead_nowhere(trio, monkeypatch, tmp_path):
    """Symlinks and hard links to inputs planted at names the resumed merge will write (the
    next shard's .tmp, a finished shard, config.json): written files are created anew, never
    through the link, so no input changes; the output is the reference."""
    (base, a, b), out, argv = _interrupted_copy(trio, tmp_path, monkeypatch, 2)
    staging = tmp_path / PARTIAL
    before = {p: dir_digest(p) for p in (base, a, b)}
    done = [r["shard"] for r in journaled(staging)]
    names = json.loads((tmp_path / JOURNAL).read_text().splitlines()[0])["shards"]
    todo = [n for n in names if n not in done]
    (staging / f"{todo[0]}.tmp").symlink_to(next(a.glob("*.safetensors")))
    os.link(next(b.glob("*.safetensors")), staging / f"{todo[1]}.tmp")
    (staging / done[0]).unlink()
    (staging / done[0]).symlink_to(next(b.glob("*.safetensors")))
    (staging / "config.json").symlink_to(base / "config.json")
    assert streammerge.cli.main(argv + ["--resume"]) == 0
    assert {p: dir_digest(p) for p in (base, a, b)} == before
    fresh = tmp_path / "fresh"
    assert streammerge.cli.main(argv_for((base, a, b), fresh)) == 0
    assert_same_files(out, files_of(fresh))


# --- issue 21.1-2: records of TIES-like methods across --resume ------------------------------

METHODS_ALL = ("linear", "task_arithmetic", "dare_linear", "ties", "dare_ties", "breadcrumbs",
               "breadcrumbs_ties")  # fmt: skip


def _kw(method: str) -> dict:
    kw: dict = {"seed": 5, "method": method, "shard_size": "200KB"}
    if method in ("ties", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear"):
        kw["density"] = 0.5
    return kw


@pytest.mark.parametrize("method", METHODS_ALL)
def test_resume_on_a_finished_output_is_one_line_and_exit_0(tmp_path, method):
    """Every method, TIES and breadcrumbs included (their records carry thresholds): the
    rebuilt record equals the finished one, nothing is read or written, and the CLI says so
    in one line."""
    from conftest import make_trio

    base, a, b = make_trio(tmp_path / "m", big=200_000)
    out = tmp_path / "out"
    kw = _kw(method)
    argv = merge_argv([a, b], base, out, "--seed", "5", "--method", method, "--shard-size",
                      "200KB", *(["--density", "0.5"] if "density" in kw else []))  # fmt: skip
    r = run_cli(argv)
    assert r.returncode == 0, r.stderr
    before = dir_digest(out)
    r = run_cli(argv + ["--resume"])
    assert r.returncode == 0, r.stderr
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and "already this merge" in lines[0], lines
    assert dir_digest(out) == before


@pytest.mark.parametrize("method", ("ties", "breadcrumbs_ties"))
def test_resumed_record_equals_an_uninterrupted_runs(tmp_path, method):
    """A TIES merge interrupted after some shards, then resumed: every file, the record's
    per-tensor thresholds included, equals an uninterrupted run's; a further --resume is a
    no-op."""
    from conftest import fail_after, make_trio

    import streammerge

    base, a, b = make_trio(tmp_path / "m", big=200_000)
    kw = _kw(method)
    ref = streammerge.merge([a, b], base, tmp_path / "ref", **kw)
    out = tmp_path / "out"
    on_bytes = fail_after(ref.bytes_read // 2, KeyboardInterrupt(), out)

    with pytest.raises(KeyboardInterrupt):
        streammerge.merge([a, b], base, out, on_bytes=on_bytes, **kw)
    s = streammerge.merge([a, b], base, out, resume=True, **kw)
    assert s.resumed_shards > 0
    rec, want = (json.loads((d / "streammerge.json").read_text()) for d in (out, tmp_path / "ref"))
    assert any(t.get("thresholds") for t in want["tensors"].values())
    assert rec["tensors"] == want["tensors"]
    assert dir_digest(out) == dir_digest(tmp_path / "ref")
    again = streammerge.merge([a, b], base, out, resume=True, **kw)
    assert again.already_complete and again.bytes_read == 0
