"""Benchmark streammerge against its peers and the I/O floor on one synthetic Llama trio.

    python bench/bench_merge.py --size-gb 2 [--data DIR] [--only floor,naive,mergekit,streammerge]
    python bench/bench_merge.py --smoke            # three ~50 MB models: checks the harness

Contenders, each run as a child process, page cache dropped before each (``sync; echo 3 >
/proc/sys/vm/drop_caches``; where that is refused the numbers are labelled warm). On a VM
the host caches the disk as well, beyond drop_caches' reach, so the first read of files
untouched for a while is several times slower than later ones; the inputs are therefore
read once, untimed, right before every row (``--no-prime`` skips it), so that no row pays
for running first or after a long one.

- ``floor-buffered``: read every input shard fully (16 MiB reads), then write one
  output-sized file with buffered writes and one ``fdatasync`` at the end;
- ``floor-direct``: the same reads, the write with ``O_DIRECT`` (aligned 16 MiB blocks);
- ``naive``: ``bench/naive_merge.py`` (full-load torch merge of the same recipe);
- ``mergekit``: ``mergekit-yaml`` ``dare_linear`` with weights (lam, 1 - lam), density
  1 - p, ``normalize: false``, ``dtype: bfloat16`` (when ``mergekit-yaml`` is on PATH, in
  ``$STREAMMERGE_MERGEKIT_BIN`` or given by ``--mergekit-bin``);
- ``streammerge``: ``streammerge A B --base C -o OUT --lambda lam --drop p --seed S``.

Each row: wall seconds, input GB/s (bytes of the three inputs / wall), peak resident memory
of that child (its own ``VmHWM``, sampled: not the bench's, see ``run_child``), and
streammerge's ratio to it (peer_s / streammerge_s: the speedup over a peer,
or for a floor row the fraction of the I/O floor's speed streammerge reaches). Rows are
appended to ``bench/results/bench_merge.csv`` with the machine's facts, and
``bench/results/README.md`` is regenerated from the whole CSV. Merge outputs are deleted
after each contender (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import mmap
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import make_synthetic

CONTENDERS = ("floor-buffered", "floor-direct", "naive", "mergekit", "streammerge")
BLOCK = 16 * 2**20
DIRECT_ALIGN = 4096
SMOKE_SIZE_GB = 0.05
CSV_FIELDS = [
    "date",
    "contender",
    "status",
    "wall_s",
    "io_read_s",
    "io_write_s",
    "input_bytes",
    "output_bytes",
    "input_gbps",
    "peak_rss_mib",
    "tree_peak_rss_mib",
    "streammerge_ratio",
    "output_check",
    "model_gb",
    "layers",
    "dtype",
    "lambda",
    "drop",
    "seed",
    "cache",
    "loadavg_before",
    "cpu_count",
    "cpu_model",
    "ram_gib",
    "kernel",
    "python",
    "host",
    "env",
    "data",
    "bench_cmd",
    "command",
]


# --------------------------------------------------------------------------- floor child
def read_all(paths: list[str] | list[Path], view: memoryview) -> int:
    """Read every file fully, sequentially, in ``len(view)``-byte reads; returns bytes read."""
    read = 0
    for f in paths:
        fd = os.open(f, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := os.readv(fd, [view]):
                read += n
        finally:
            os.close(fd)
    return read


def floor_child(argv: list[str]) -> int:
    """``bench_merge.py _floor MODE OUT_FILE OUT_BYTES INPUT...``: the I/O floor itself.

    Prints one JSON line: read seconds, write seconds, bytes and whether O_DIRECT was used.
    """
    mode, out_file, out_bytes, inputs = argv[0], Path(argv[1]), int(argv[2]), argv[3:]
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, so usable for O_DIRECT too
    view = memoryview(buf)
    t0 = time.perf_counter()
    read = read_all(inputs, view)
    t1 = time.perf_counter()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = False
    if mode == "direct":
        try:
            fd = os.open(out_file, flags | os.O_DIRECT, 0o644)
            direct = True
        except OSError as e:
            print(json.dumps({"error": f"O_DIRECT refused: {e}"}))
            return 3
    else:
        fd = os.open(out_file, flags, 0o644)
    try:
        left = out_bytes
        while left > 0:
            n = min(BLOCK, left)
            if direct and n % DIRECT_ALIGN:
                n += DIRECT_ALIGN - n % DIRECT_ALIGN  # pad the tail block, truncate below
            done = 0
            while done < n:
                done += os.write(fd, view[done:n])
            left -= n
        if direct:
            os.ftruncate(fd, out_bytes)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    t2 = time.perf_counter()
    print(json.dumps({"read_s": t1 - t0, "write_s": t2 - t1, "read_bytes": read, "direct": direct}))
    return 0


# --------------------------------------------------------------------------- helpers
def drop_caches(enabled: bool) -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; True when the cache was dropped."""
    os.sync()
    if not enabled:
        return False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cached_mib() -> float:
    """Page cache size (``Cached`` in /proc/meminfo), MiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def model_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(wm.values()))]
    return [model_dir / "model.safetensors"]


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def tensor_table(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) over every shard of a model directory."""
    out = {}
    for f in model_files(model_dir):
        for k, v in read_header(f).items():
            out[k] = (v["dtype"], tuple(v["shape"]))
    return out


def check_output(out_dir: Path, expect: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """'ok' when ``out_dir`` holds every tensor of ``expect`` with the same dtype and shape."""
    try:
        got = tensor_table(out_dir)
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable: {e}"
    missing = sorted(set(expect) - set(got))
    extra = sorted(set(got) - set(expect))
    wrong = sorted(k for k in set(expect) & set(got) if expect[k] != got[k])
    if not (missing or extra or wrong):
        return "ok"
    parts = []
    for label, names in (("missing", missing), ("extra", extra), ("dtype/shape", wrong)):
        if names:
            parts.append(f"{label} {len(names)} (e.g. {names[0]})")
    return "; ".join(parts)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.exists() else 0


def machine_facts() -> dict[str, str]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total / 2**30
    except ImportError:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    env = " ".join(
        f"{k}={v}"
        for k, v in sorted(os.environ.items())
        if k.startswith(("OMP_", "MKL_", "NUMBA_", "TORCH_", "CUDA_VISIBLE", "TRITON_"))
    )
    return {
        "env": env,
        "cpu_count": str(os.cpu_count()),
        "cpu_model": cpu_model,
        "ram_gib": f"{ram:.1f}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "host": platform.node(),
    }


class Result:
    def __init__(self, contender: str, command: list[str] | None = None) -> None:
        self.contender = contender
        self.command = command or []
        self.status = ""
        self.wall_s: float | None = None
        self.io_read_s: float | None = None
        self.io_write_s: float | None = None
        self.output_bytes = 0
        self.peak_rss_mib: float | None = None
        self.tree_peak_rss_mib: float | None = None
        self.output_check = ""
        self.loadavg = ""
        self.cache = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def time_s(self) -> float | None:
        """The time ratios use: the floor's own I/O time, a merge's wall time."""
        if self.io_read_s is not None and self.io_write_s is not None:
            return self.io_read_s + self.io_write_s
        return self.wall_s


def run_child(cmd: list[str], log: Path, timeout: float) -> tuple[int, float, float, float, str]:
    """Run ``cmd``; returns (exit code, wall s, peak RSS MiB, sampled tree peak MiB, stdout).

    The peak RSS is the child's own: its ``VmHWM`` (the high-water mark of its address
    space), read every 50 ms while it runs. Not ``os.wait4``'s ``ru_maxrss``: Linux carries
    that over from the parent across fork and exec, so it is never below the bench's own
    RSS at the fork (the 54 MiB of the floor rows). ``ru_maxrss`` is the fallback for a
    child too short to be sampled. A sampler thread also sums the RSS of the live process
    tree every 50 ms (catches children that are never waited for).
    """
    import psutil

    with open(log, "wb") as logf:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=logf, start_new_session=True, cwd=REPO
        )
        stop = threading.Event()
        tree_peak = [0]
        hwm_peak = [0]  # the child's own VmHWM, sampled
        out_chunks: list[bytes] = []

        def sample() -> None:
            try:
                root = psutil.Process(p.pid)
            except psutil.Error:
                return
            while not stop.is_set():
                hwm_peak[0] = max(hwm_peak[0], _vmhwm_bytes(p.pid))
                total = 0
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    break
                for q in procs:
                    try:
                        total += q.memory_info().rss
                    except psutil.Error:
                        pass
                tree_peak[0] = max(tree_peak[0], total)
                stop.wait(0.05)

        def pump() -> None:
            assert p.stdout is not None
            for chunk in iter(lambda: p.stdout.read(65536), b""):
                out_chunks.append(chunk)
                logf.write(chunk)

        def kill() -> None:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass

        sampler = threading.Thread(target=sample, daemon=True)
        pumper = threading.Thread(target=pump, daemon=True)
        timer = threading.Timer(timeout, kill)
        sampler.start()
        pumper.start()
        timer.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        timer.cancel()
        stop.set()
        p.returncode = os.waitstatus_to_exitcode(status)
        pumper.join()
        sampler.join()
    rss_mib = hwm_peak[0] / 2**20 if hwm_peak[0] else ru.ru_maxrss / 1024  # KiB on Linux
    return p.returncode, wall, rss_mib, tree_peak[0] / 2**20, b"".join(out_chunks).decode()


def _vmhwm_bytes(pid: int) -> int:
    """``VmHWM`` of process ``pid`` in bytes (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def log_tail(log: Path, n: int = 6) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip()[:160] for line in lines[-n:])


# --------------------------------------------------------------------------- contenders
def find_mergekit(arg: str | None) -> str | None:
    for cand in (arg, os.environ.get("STREAMMERGE_MERGEKIT_BIN"), shutil.which("mergekit-yaml")):
        if cand and Path(cand).exists():
            return cand
    return None


def find_streammerge(arg: str | None) -> str | None:
    if arg:
        return arg
    exe = shutil.which("streammerge")
    if exe:
        return exe
    cand = Path(sys.executable).parent / "streammerge"
    return str(cand) if cand.exists() else None


def mergekit_config(data: Path, lam: float, drop: float, path: Path) -> None:
    density = 1.0 - drop
    text = (
        "merge_method: dare_linear\n"
        f"base_model: {json.dumps(str(data / 'base'))}\n"
        "models:\n"
        f"  - model: {json.dumps(str(data / 'a'))}\n"
        f"    parameters: {{weight: {lam!r}, density: {density!r}}}\n"
        f"  - model: {json.dumps(str(data / 'b'))}\n"
        f"    parameters: {{weight: {1.0 - lam!r}, density: {density!r}}}\n"
        "parameters:\n"
        "  normalize: false\n"
        "dtype: bfloat16\n"
    )
    path.write_text(text)


def build_command(
    name: str, args: argparse.Namespace, data: Path, out: Path, work: Path
) -> tuple[list[str] | None, str]:
    """(command, '') or (None, why the contender cannot run)."""
    a, b, c = str(data / "a"), str(data / "b"), str(data / "base")
    lam, drop, seed = repr(args.lam), repr(args.drop), str(args.seed)
    if name == "naive":
        return [sys.executable, str(HERE / "naive_merge.py"), a, b, "--base", c, "-o", str(out),
                "--lam", lam, "--drop", drop, "--seed", seed], ""  # fmt: skip
    if name == "mergekit":
        exe = find_mergekit(args.mergekit_bin)
        if exe is None:
            return None, "not installed"
        cfg = work / "mergekit.yml"
        mergekit_config(data, args.lam, args.drop, cfg)
        return [exe, str(cfg), str(out), "--random-seed", seed, "--no-copy-tokenizer"], ""
    if name == "streammerge":
        exe = find_streammerge(args.streammerge_bin)
        if exe is None:
            return None, "CLI not found"
        try:
            h = subprocess.run(
                [exe, "--help"], check=False, capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"CLI not available ({e})"
        if h.returncode != 0:
            last = (h.stderr or h.stdout).strip().splitlines()
            why = last[-1] if last else f"exit {h.returncode}"
            return None, f"CLI not available: `streammerge --help` failed ({why})"
        # numba compiles the kernels once per installation (~15 s, then cached on disk): do
        # that untimed, as a user's second merge would find it done.
        py = Path(exe).with_name("python")
        warm = "from streammerge.kernels import cpu_merge; cpu_merge.warmup()"
        subprocess.run(
            [str(py) if py.exists() else sys.executable, "-c", warm], check=False, timeout=600
        )
        return [exe, a, b, "--base", c, "-o", str(out), "--lambda", lam, "--drop", drop,
                "--seed", seed], ""  # fmt: skip
    raise ValueError(name)


def _cache_label(dropped: bool, args) -> str:
    """'cold' (page cache dropped, inputs primed), 'cold, not primed' or 'warm'."""
    if not dropped:
        return "warm"
    return "cold" if args.prime else "cold, not primed"


def run_floor(mode: str, inputs: list[Path], out_bytes: int, work: Path, args) -> Result:
    out_file = work / f"floor-{mode}.bin"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_floor", mode, str(out_file),
           str(out_bytes), *map(str, inputs)]  # fmt: skip
    r = Result(f"floor-{mode}", cmd)
    r.cache = _cache_label(drop_caches(args.drop_caches), args)
    r.loadavg = f"{os.getloadavg()[0]:.2f}"
    log = work / f"floor-{mode}.log"
    try:
        rc, wall, rss, tree, out = run_child(cmd, log, args.timeout)
    finally:
        out_file.unlink(missing_ok=True)
    r.wall_s, r.peak_rss_mib, r.tree_peak_rss_mib = wall, rss, tree
    try:
        info = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = {}
    if rc == 0 and "read_s" in info:
        r.io_read_s, r.io_write_s = info["read_s"], info["write_s"]
        r.output_bytes = out_bytes
        r.status = "ok"
        r.output_check = "n/a"
    else:
        r.status = info.get("error") or f"failed (exit {rc}): {log_tail(log)}"
    return r


def run_merge(name: str, args, data: Path, work: Path, expect, need_bytes: int) -> Result:
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    cmd, why = build_command(name, args, data, out, work)
    r = Result(name, cmd)
    if cmd is None:
        r.status = why
        return r
    if name == "naive":
        import psutil

        avail = psutil.virtual_memory().available
        if need_bytes > 0.9 * avail:
            r.status = (
                f"skipped: needs ~{need_bytes / 2**30:.1f} GiB RAM, "
                f"{avail / 2**30:.1f} GiB available"
            )
            return r
    r.cache = _cache_label(drop_caches(args.drop_caches), args)
    r.loadavg = f"{os.getloadavg()[0]:.2f}"
    log = work / f"{name}.log"
    try:
        rc, wall, rss, tree, _ = run_child(cmd, log, args.timeout)
        r.wall_s, r.peak_rss_mib, r.tree_peak_rss_mib = wall, rss, tree
        r.output_bytes = dir_bytes(out)
        if rc == 0:
            r.output_check = check_output(out, expect)
            r.status = "ok" if r.output_check == "ok" else "bad output"
        elif rc == -9 and wall >= args.timeout:
            r.status = f"timeout after {args.timeout:.0f} s"
        else:
            r.status = f"failed (exit {rc}): {log_tail(log)}"
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return r


# --------------------------------------------------------------------------- reporting
def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def print_table(results: list[Result], input_bytes: int, title: str, caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    sm = next((r for r in results if r.contender == "streammerge" and r.ok), None)
    t = Table(title=title, caption=caption, caption_justify="left")
    t.add_column("contender")
    t.add_column("wall s", justify="right")
    t.add_column("input GB/s", justify="right")
    t.add_column("peak RSS MiB", justify="right")
    t.add_column("streammerge ratio", justify="right")
    t.add_column("notes")
    for r in results:
        if r.ok:
            gbps = input_bytes / 1e9 / r.time_s
            ratio = ""
            if sm is not None and r is not sm:
                x = r.time_s / sm.time_s
                ratio = f"{x:.2f} of floor" if r.contender.startswith("floor") else f"{x:.2f}x"
            notes = r.cache
            if r.io_read_s is not None:
                notes += (
                    f"; read {input_bytes / 1e9 / r.io_read_s:.2f} GB/s in {r.io_read_s:.1f} s, "
                    f"write {r.output_bytes / 1e9 / r.io_write_s:.2f} GB/s in {r.io_write_s:.1f} s"
                )
            t.add_row(r.contender, f"{r.time_s:.1f}", f"{gbps:.2f}", f"{r.peak_rss_mib:.0f}",
                      ratio, notes)  # fmt: skip
        else:
            t.add_row(r.contender, fmt(r.wall_s, ".1f"), "", fmt(r.peak_rss_mib, ".0f"), "",
                      r.status)  # fmt: skip
    Console(width=160).print(t)


def csv_rows(results: list[Result], common: dict[str, str], input_bytes: int) -> list[dict]:
    sm = next((r for r in results if r.contender == "streammerge" and r.ok), None)
    rows = []
    for r in results:
        ratio = ""
        if r.ok and sm is not None and r is not sm:
            ratio = f"{r.time_s / sm.time_s:.3f}"
        rows.append(
            {
                **common,
                "contender": r.contender,
                "status": r.status,
                "wall_s": fmt(r.time_s if r.ok else r.wall_s, ".2f"),
                "io_read_s": fmt(r.io_read_s, ".2f"),
                "io_write_s": fmt(r.io_write_s, ".2f"),
                "input_bytes": str(input_bytes),
                "output_bytes": str(r.output_bytes),
                "input_gbps": fmt(input_bytes / 1e9 / r.time_s, ".3f") if r.ok else "",
                "peak_rss_mib": fmt(r.peak_rss_mib, ".0f"),
                "tree_peak_rss_mib": fmt(r.tree_peak_rss_mib, ".0f"),
                "streammerge_ratio": ratio,
                "output_check": r.output_check,
                "cache": r.cache or common.get("cache", ""),
                "loadavg_before": r.loadavg,
                "command": shlex.join(r.command) if r.command else "",
            }
        )
    return rows


def append_csv(path: Path, rows: list[dict]) -> list[dict]:
    """Append ``rows`` to the CSV (rewriting it if its columns changed); returns all rows."""
    old: list[dict] = []
    fields = list(CSV_FIELDS)
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            rd = csv.DictReader(f)
            old = list(rd)
            for k in rd.fieldnames or []:
                if k not in fields:
                    fields.append(k)
    every = old + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in every:
            w.writerow({k: row.get(k, "") for k in fields})
    return every


README_COLUMNS = [
    ("date", "date (UTC)"),
    ("model_gb", "model GB"),
    ("dtype", "dtype"),
    ("contender", "contender"),
    ("status", "status"),
    ("wall_s", "wall s"),
    ("input_gbps", "input GB/s"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("streammerge_ratio", "streammerge ratio"),
    ("cache", "cache"),
    ("loadavg_before", "load"),
    ("env", "env"),
    ("cpu_count", "CPUs"),
    ("ram_gib", "RAM GiB"),
    ("kernel", "kernel"),
]


def write_readme(path: Path, rows: list[dict]) -> None:
    def cell(v: str) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = [
        "# bench_merge results",
        "",
        "Generated by `bench/bench_merge.py` from `bench_merge.csv` (do not edit by hand; the",
        "CSV has every column: commands, CPU model, lambda/drop/seed, read/write split).",
        "",
        "- *wall s*: the child's wall time; for the floor rows the read + write I/O time.",
        "- *input GB/s*: bytes of the three input models / wall s.",
        "- *peak RSS MiB*: that child's own `VmHWM`, sampled every 50 ms (`ru_maxrss` would",
        "  include the bench's own RSS, which Linux carries over across fork and exec).",
        "- *streammerge ratio*: peer_s / streammerge_s from the same run: the speedup over",
        "  naive/mergekit; for floor rows the fraction of the I/O floor's speed reached (1 =",
        "  at the floor).",
        "- *cache*: `cold` when the page cache was dropped before the row, else `warm`. On a",
        "  VM the host caches the disk too, out of reach of drop_caches (the first read of",
        "  files untouched for a while ran at 0.55 GB/s, the next at 1.77 GB/s on the",
        "  reference VM), so the inputs are read once, untimed, before each row (`not primed`",
        "  when `--no-prime` skipped that): rows are guest-cold, host state unknown.",
        "- *load*: 1-minute load average just before the row (the machine may be shared).",
        "- *env*: OMP_/MKL_/NUMBA_/TORCH_ variables set for the run (e.g. OMP_WAIT_POLICY).",
        "",
        "| " + " | ".join(h for _, h in README_COLUMNS) + " |",
        "| " + " | ".join("---" for _ in README_COLUMNS) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k, "")) for k, _ in README_COLUMNS) + " |")
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- main
def parse_only(text: str) -> list[str]:
    out: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item == "floor":
            out += ["floor-buffered", "floor-direct"]
        elif item in CONTENDERS:
            out.append(item)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown contender {item!r} (use floor, {', '.join(CONTENDERS)})"
            )
    return [c for c in CONTENDERS if c in out]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_floor":
        return floor_child(argv[1:])
    ap = argparse.ArgumentParser(
        description="Benchmark streammerge vs the I/O floor, a naive torch merge and mergekit."
    )
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of each model (GB)")
    ap.add_argument(
        "--data", type=Path, default=None,
        help="trio directory (base/, a/, b/); generated there if missing "
        "(default bench/data/trio-<size>gb, or a temporary one with --smoke)",
    )  # fmt: skip
    ap.add_argument("--dtype", choices=sorted(make_synthetic.DTYPES), default="bf16")
    ap.add_argument("--only", type=parse_only, default=list(CONTENDERS),
                    help="comma list of floor, floor-buffered, floor-direct, naive, mergekit, "
                    "streammerge (default: all)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="three ~50 MB models: harness check")
    ap.add_argument("--keep", action="store_true", help="keep merge outputs (and smoke data)")
    ap.add_argument("--seed", type=int, default=0, help="merge seed (and trio seed)")
    ap.add_argument("--alpha", type=float, default=1.0, help="M3 Beta(alpha, alpha)")
    ap.add_argument("--lambda", dest="lam", type=float, default=None,
                    help="mixup weight (default: drawn from Beta(alpha, alpha) with --seed, "
                    "as streammerge does)")  # fmt: skip
    ap.add_argument("--drop", type=float, default=0.5, help="DARE drop rate p")
    ap.add_argument("--mergekit-bin", default=None, help="path to mergekit-yaml")
    ap.add_argument("--streammerge-bin", default=None, help="path to the streammerge CLI")
    ap.add_argument("--results", type=Path, default=HERE / "results",
                    help="directory of bench_merge.csv and README.md")  # fmt: skip
    ap.add_argument("--work", type=Path, default=None,
                    help="where merge outputs go (default: the data directory)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=7200.0, help="per contender, seconds")
    ap.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                    help="do not drop the page cache (numbers are then warm)")  # fmt: skip
    ap.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds to wait (after sync) between rows so one row's writes do not slow the next",
    )
    ap.add_argument("--no-prime", dest="prime", action="store_false",
                    help="skip the untimed first read of the inputs")  # fmt: skip
    args = ap.parse_args(argv)
    if args.alpha <= 0:
        ap.error("--alpha must be > 0")
    if not 0 <= args.drop < 1:
        ap.error("--drop must be in [0, 1)")
    if args.lam is None:
        import numpy as np

        args.lam = float(np.random.default_rng(args.seed).beta(args.alpha, args.alpha))
    size_gb = SMOKE_SIZE_GB if args.smoke else args.size_gb

    tmp_data = None
    if args.data is None:
        if args.smoke:
            tmp_data = Path(tempfile.mkdtemp(prefix="bench-smoke-"))
            args.data = tmp_data
        else:
            args.data = HERE / "data" / f"trio-{size_gb:g}gb"
    data = args.data.resolve()
    try:
        return _run(args, data, size_gb, argv)
    finally:
        if tmp_data is not None and not args.keep:
            shutil.rmtree(tmp_data, ignore_errors=True)


def _run(args, data: Path, size_gb: float, argv: list[str]) -> int:
    have = all((data / r / "model.safetensors.index.json").exists() for r in make_synthetic.ROLES)
    if not have:
        print(f"generating a {size_gb:g} GB/model {args.dtype} trio in {data} ...")
        make_synthetic.make_trio(data, size_gb=size_gb, dtype=args.dtype, seed=args.seed)
    else:
        print(f"reusing the trio in {data}")
    work = (args.work or data).resolve()
    work.mkdir(parents=True, exist_ok=True)

    inputs = [f for r in ("a", "b", "base") for f in model_files(data / r)]
    input_bytes = sum(f.stat().st_size for f in inputs)
    base_bytes = sum(f.stat().st_size for f in model_files(data / "base"))
    expect = tensor_table(data / "base")
    dtypes = sorted({d for d, _ in expect.values()})
    cfg = json.loads((data / "base" / "config.json").read_text())
    # naive: three inputs + the output in RAM, plus float32 temporaries of the largest tensor
    largest = max((math.prod(s) for _, s in expect.values()), default=0)  # elements
    need = 4 * base_bytes + 6 * 4 * largest

    def prime() -> None:
        # On a VM the host (or the disk) caches too, out of reach of drop_caches, and forgets
        # within a minute or two: the first read of files not touched for a while is several
        # times slower than the next. An untimed pass right before every row puts each row
        # in the same state, whichever runs first and however long the row before it took.
        t0 = time.perf_counter()
        drop_caches(args.drop_caches)
        with mmap.mmap(-1, BLOCK) as buf:
            view = memoryview(buf)
            read_all(inputs, view)
            view.release()
        secs = time.perf_counter() - t0
        print(f"   primed: read the inputs once, untimed ({input_bytes / 1e9 / secs:.2f} GB/s)")

    dropped = drop_caches(args.drop_caches)
    cache_state = "cold" if dropped else "warm"
    if args.drop_caches and not dropped:
        print("note: cannot drop the page cache (not root?): numbers below are WARM")
    elif dropped:
        print(f"page cache dropped (Cached now {cached_mib():.0f} MiB): numbers are cold")
    print(
        f"trio: {len(expect)} tensors, {base_bytes / 1e9:.3f} GB/model, inputs "
        f"{input_bytes / 1e9:.3f} GB in {len(inputs)} files; lambda {args.lam:.6f}, drop "
        f"{args.drop:g}, seed {args.seed}; load average {os.getloadavg()[0]:.2f}"
    )

    results: list[Result] = []
    for name in args.only:
        print(f"-- {name} ...", flush=True)
        if results and args.settle > 0:
            # let the previous row's writes drain (the host may still be flushing them)
            subprocess.run(["sync"], check=False)
            time.sleep(args.settle)
        if args.prime:
            prime()
        if name.startswith("floor-"):
            r = run_floor(name.split("-", 1)[1], inputs, base_bytes, work, args)
        else:
            r = run_merge(name, args, data, work, expect, need)
        results.append(r)
        extra = f", {r.time_s:.1f} s, peak RSS {r.peak_rss_mib:.0f} MiB" if r.ok else ""
        print(f"   {r.status}{extra}", flush=True)

    common = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model_gb": f"{base_bytes / 1e9:.3f}",
        "layers": str(cfg.get("num_hidden_layers", "")),
        "dtype": ",".join(dtypes),
        "lambda": f"{args.lam:.6f}",
        "drop": f"{args.drop:g}",
        "seed": str(args.seed),
        "cache": cache_state + ("" if args.prime else ", not primed"),
        "data": str(data),
        "bench_cmd": shlex.join(["python", "bench/bench_merge.py", *argv]),
        **machine_facts(),
    }
    title = (
        f"merge of two {base_bytes / 1e9:.2f} GB {','.join(dtypes)} Llama fine-tunes "
        f"({cfg.get('num_hidden_layers')} layers), inputs {input_bytes / 1e9:.2f} GB"
    )
    facts = machine_facts()
    caption = (
        f"{facts['cpu_count']} CPUs ({facts['cpu_model']}), {facts['ram_gib']} GiB RAM, "
        f"kernel {facts['kernel']}; page cache {cache_state}"
        f"{' (dropped before each row)' if dropped else ' (NOT dropped: warm numbers)'}; "
        f"lambda {args.lam:.4f}, drop {args.drop:g}, seed {args.seed}.\n"
        "streammerge ratio = peer_s / streammerge_s: speedup over a merge peer; for a floor "
        "row, the fraction of the I/O floor's speed streammerge reaches."
    )
    print_table(results, input_bytes, title, caption)
    rows = append_csv(args.results / "bench_merge.csv", csv_rows(results, common, input_bytes))
    write_readme(args.results / "README.md", rows)
    print(f"appended {len(results)} rows to {args.results / 'bench_merge.csv'}")
    bad = [r for r in results if r.status.startswith(("failed", "bad output", "timeout"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
