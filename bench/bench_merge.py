"""Benchmark streammerge against its peers and the I/O floor on one synthetic Llama trio.

    python bench/bench_merge.py --size-gb 2 [--data DIR] [--only floor,naive,mergekit,streammerge]
    python bench/bench_merge.py --smoke            # three ~50 MB models: checks the harness
    python bench/bench_merge.py --size-gb 2 --method ties,dare_ties,task_arithmetic --density 0.5
    python bench/bench_merge.py --size-gb 0.1 --agree --only floor,mergekit,streammerge

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

**Methods** (``--method M[,M...]``, any of ``METHODS``): instead of the single v1 recipe
above, the ``mergekit`` and ``streammerge`` rows run once per method, each tool with the
same method, weights and density: streammerge ``--method M`` (M3 weights drawn from
``--seed``/``--alpha`` unless ``--weights``/``--lambda``), mergekit ``merge_method: M``
with ``dtype: float32``, ``out_dtype: bfloat16`` and the drawn ``(lam, 1 - lam)`` (or
``--weights``) as its per-model ``weight``; ``density`` (``--density``, default 1 - p)
for the sparsifying methods (DARE: streammerge drops at rate 1 - density), ``gamma`` for
breadcrumbs; ``linear`` gets no base. mergekit's ``dare_*`` rescale by the L1 norm with
torch's RNG, so for those only the timings compare. Each streammerge row then gets "x
faster than mergekit" (mergekit_s / streammerge_s, same method, same run) and "x of the
O_DIRECT floor" (floor-direct_s / streammerge_s), and is checked against ``TARGETS`` and
against a peak RSS of at most ``--memory`` + 160 MiB.

``--agree`` adds ``AGREE_METHODS`` (task_arithmetic, ties, linear, breadcrumbs_ties) to
the methods, keeps both outputs of those until compared, and compares them bit by bit
with ``bench/mergekit_agree.py`` ``--explain`` (fraction of bit-equal elements, largest
difference in bf16 ulps, every difference sorted into threshold tie / linear fma / 1 ulp
/ other); the table goes to ``bench/results/mergekit_agree.csv`` and the README.

Each row: wall seconds, input GB/s (bytes of the three inputs / wall), peak resident memory
of that child, and streammerge's ratio to it (peer_s / streammerge_s: the speedup over a
peer, or for a floor row the fraction of the I/O floor's speed streammerge reaches). The
peak RSS is the child's own high-water mark, from GNU ``/usr/bin/time -f %M`` wrapped
around it (``ru_maxrss`` seen from the bench would carry the bench's own peak over the
fork); without ``/usr/bin/time`` it is the child's ``VmHWM`` polled every 50 ms. Rows are
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
METHODS = ("linear", "task_arithmetic", "dare_linear", "ties", "dare_ties", "breadcrumbs",
           "breadcrumbs_ties")  # fmt: skip
AGREE_METHODS = ("task_arithmetic", "ties", "linear", "breadcrumbs_ties")
DENSITY_METHODS = ("dare_linear", "ties", "dare_ties", "breadcrumbs", "breadcrumbs_ties")
GAMMA_METHODS = ("breadcrumbs", "breadcrumbs_ties")
#: method -> {"mergekit": least x faster than mergekit, "floor": least x of the O_DIRECT floor}
TARGETS = {
    "ties": {"mergekit": 10.0, "floor": 0.6},
    "dare_ties": {"floor": 0.8},
    "task_arithmetic": {"floor": 0.8},
}
RSS_SLACK_MIB = 160  # streammerge's peak RSS target: --memory + this
DEFAULT_MEMORY = "256MiB"  # streammerge's default --memory
TIME_BIN = "/usr/bin/time"
BLOCK = 16 * 2**20
DIRECT_ALIGN = 4096
SMOKE_SIZE_GB = 0.05
CSV_FIELDS = [
    "date",
    "contender",
    "method",
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
    "x_faster_than_mergekit",
    "x_of_floor_direct",
    "targets",
    "rss_source",
    "memory",
    "weights",
    "density",
    "gamma",
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
    "note",
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
    from machine import cpu_model as model

    cpu_model = model()
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
    def __init__(self, contender: str, command: list[str] | None = None, method: str = "") -> None:
        self.contender = contender
        self.method = method  # "" for the v1 rows (no --method)
        self.command = command or []
        self.out_dir: Path | None = None  # kept for --agree
        self.rss_source = ""
        self.x_mergekit: float | None = None  # streammerge rows: mergekit_s / streammerge_s
        self.x_floor: float | None = None  # streammerge rows: floor-direct_s / streammerge_s
        self.targets = ""
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


_TIME_OK: bool | None = None


def gnu_time() -> str | None:
    """``/usr/bin/time`` when it is GNU time (``-f %M`` = the child's own peak RSS, KiB)."""
    global _TIME_OK
    if _TIME_OK is None:
        try:
            r = subprocess.run([TIME_BIN, "-f", "%M", "true"], capture_output=True, text=True,
                               timeout=30, check=False)  # fmt: skip
            _TIME_OK = r.returncode == 0 and r.stderr.strip().splitlines()[-1].isdigit()
        except (OSError, subprocess.TimeoutExpired, IndexError):
            _TIME_OK = False
    return TIME_BIN if _TIME_OK else None


def _vmhwm_kib(pid: int) -> int:
    """``VmHWM`` (peak resident set) of a live process, KiB; 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_child(
    cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None
) -> tuple[int, float, float, float, str, str]:
    """Run ``cmd``; returns (exit code, wall s, peak RSS MiB, sampled tree peak MiB, stdout,
    where the peak RSS came from).

    The peak RSS is the child's own: GNU ``time -f %M`` wrapped around the command (its
    ``wait4`` ``ru_maxrss`` of a child forked from the small ``time`` process, so the
    bench's own peak is not carried over the fork as it would be in the bench's
    ``ru_maxrss``). Without GNU time: the child's ``VmHWM`` (read from /proc every 50 ms,
    the last value before it exits). A sampler thread also sums the RSS of the live
    process tree every 50 ms (children that are never waited for).
    """
    import psutil

    timer_bin = gnu_time()
    rss_file = log.with_suffix(".rss")
    rss_file.unlink(missing_ok=True)
    full = [timer_bin, "-o", str(rss_file), "-f", "%M", *cmd] if timer_bin else list(cmd)
    with open(log, "wb") as logf:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            full, stdout=subprocess.PIPE, stderr=logf, start_new_session=True, cwd=REPO,
            env=env,
        )  # fmt: skip
        stop = threading.Event()
        tree_peak = [0]
        hwm: dict[int, int] = {}  # pid -> largest VmHWM seen, KiB
        out_chunks: list[bytes] = []

        def sample() -> None:
            try:
                root = psutil.Process(p.pid)
            except psutil.Error:
                return
            while not stop.is_set():
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
                    hwm[q.pid] = max(hwm.get(q.pid, 0), _vmhwm_kib(q.pid))
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
        _, status, _ = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        timer.cancel()
        stop.set()
        p.returncode = os.waitstatus_to_exitcode(status)
        pumper.join()
        sampler.join()
    rss_kib, source = 0, ""
    if timer_bin:
        try:  # GNU time may write "Command exited with non-zero status N" first
            lines = rss_file.read_text().split()
            rss_kib, source = int(lines[-1]), "time %M"
        except (OSError, ValueError, IndexError):
            pass
        rss_file.unlink(missing_ok=True)
    if not source:  # the command itself (the root when not wrapped, else time's child)
        pids = sorted(hwm)
        own = [hwm[q] for q in pids if q != p.pid] if timer_bin else [hwm.get(p.pid, 0)]
        rss_kib, source = max(own, default=0), "VmHWM poll"
    rc = p.returncode
    if timer_bin and rc > 128 and rc - 128 < 65:  # GNU time: 128 + the child's signal
        rc = -(rc - 128)
    return rc, wall, rss_kib / 1024, tree_peak[0] / 2**20, b"".join(out_chunks).decode(), source


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


def per_model(values: list[float] | None, n: int, default: float) -> list[float]:
    """One value per model from a command-line list of 1 or n values."""
    if not values:
        return [default] * n
    return list(values) * n if len(values) == 1 else list(values)


def method_recipe(method: str, args: argparse.Namespace) -> dict:
    """The recipe both tools get for ``method``: weights, density, gamma (2 models)."""
    weights = list(args.weights) if args.weights else [args.lam, 1.0 - args.lam]
    rec: dict = {"weights": weights}
    if method in DENSITY_METHODS:
        rec["density"] = per_model(args.density, 2, 1.0 - args.drop)
    if method in GAMMA_METHODS:
        rec["gamma"] = per_model(args.gamma, 2, 0.01)
    return rec


def mergekit_method_config(data: Path, method: str, args: argparse.Namespace, path: Path) -> None:
    """mergekit recipe for ``method``: float32 math, bfloat16 output, the same weights,
    density and gamma as streammerge gets (``linear``: no base)."""
    rec = method_recipe(method, args)
    lines = [f"merge_method: {method}"]
    if method != "linear":
        lines.append(f"base_model: {json.dumps(str(data / 'base'))}")
    lines.append("models:")
    for j, role in enumerate(("a", "b")):
        params = [f"weight: {rec['weights'][j]!r}"]
        if "density" in rec:
            params.append(f"density: {rec['density'][j]!r}")
        if "gamma" in rec:
            params.append(f"gamma: {rec['gamma'][j]!r}")
        lines.append(f"  - model: {json.dumps(str(data / role))}")
        lines.append(f"    parameters: {{{', '.join(params)}}}")
    lines += ["dtype: float32", "out_dtype: bfloat16"]
    path.write_text("\n".join(lines) + "\n")


def _csv_list(xs: list[float]) -> str:
    return ",".join(repr(float(x)) for x in xs)


def build_command(
    name: str, args: argparse.Namespace, data: Path, out: Path, work: Path, method: str = ""
) -> tuple[list[str] | None, str]:
    """(command, '') or (None, why the contender cannot run).

    ``method`` "" is the v1 recipe (dare_linear); else a row of ``METHODS``.
    """
    a, b, c = str(data / "a"), str(data / "b"), str(data / "base")
    lam, drop, seed = repr(args.lam), repr(args.drop), str(args.seed)
    if name == "naive":
        return [sys.executable, str(HERE / "naive_merge.py"), a, b, "--base", c, "-o", str(out),
                "--lam", lam, "--drop", drop, "--seed", seed], ""  # fmt: skip
    if name == "mergekit":
        exe = find_mergekit(args.mergekit_bin)
        if exe is None:
            return None, "not installed"
        if method:
            cfg = work / f"mergekit-{method}.yml"
            mergekit_method_config(data, method, args, cfg)
        else:
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
        mem = ["--memory", args.memory] if args.memory else []
        if not method:
            return [exe, a, b, "--base", c, "-o", str(out), "--lambda", lam, "--drop", drop,
                    "--seed", seed, *mem], ""  # fmt: skip
        rec = method_recipe(method, args)
        cmd = [exe, a, b] + ([] if method == "linear" else ["--base", c])
        cmd += ["-o", str(out), "--method", method, "--seed", seed, "--alpha", repr(args.alpha)]
        if args.weights:
            cmd += ["--weights", _csv_list(args.weights)]
        elif args.lam_given:
            cmd += ["--lambda", lam]
        # else: streammerge draws the M3 weights from --seed/--alpha, as the bench did
        if "density" in rec:
            cmd += ["--density", _csv_list(rec["density"])]
        if "gamma" in rec:
            cmd += ["--gamma", _csv_list(rec["gamma"])]
        return cmd + mem, ""
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
        rc, wall, rss, tree, out, r.rss_source = run_child(cmd, log, args.timeout)
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


def run_merge(
    name: str,
    args,
    data: Path,
    work: Path,
    expect,
    need_bytes: int,
    method: str = "",
    keep: bool = False,
) -> Result:
    """One merge row; ``keep`` keeps the output (``r.out_dir``) for the caller to delete."""
    out = work / (f"out-{name}-{method}" if method else f"out-{name}")
    shutil.rmtree(out, ignore_errors=True)
    cmd, why = build_command(name, args, data, out, work, method)
    r = Result(name, cmd, method)
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
    log = work / (f"{name}-{method}.log" if method else f"{name}.log")
    env = None
    if name == "mergekit":  # deterministic model order, never the network (local paths)
        env = {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
    try:
        rc, wall, rss, tree, _, r.rss_source = run_child(cmd, log, args.timeout, env)
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
        if keep and r.ok:
            r.out_dir = out
        elif not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return r


# --------------------------------------------------------------------------- reporting
def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _find(results: list[Result], contender: str, method: str) -> Result | None:
    return next((r for r in results if r.contender == contender and r.method == method and r.ok),
                None)  # fmt: skip


def ratio_base(results: list[Result], r: Result) -> Result | None:
    """The streammerge row a peer row's ``streammerge_ratio`` compares with: the same
    method's; for the floors and naive the v1 row, else the only streammerge row."""
    if r.contender == "streammerge":
        return None
    if r.method:
        return _find(results, "streammerge", r.method)
    sm = _find(results, "streammerge", "")
    if sm is not None:
        return sm
    sms = [q for q in results if q.contender == "streammerge" and q.ok]
    if r.contender == "naive":  # naive merges the v1 recipe: dare_linear
        return _find(results, "streammerge", "dare_linear") or (sms[0] if len(sms) == 1 else None)
    return sms[0] if len(sms) == 1 else None


def memory_mib(args) -> float:
    """streammerge's --memory in MiB (HF-style units: MB decimal, MiB binary)."""
    text = args.memory or DEFAULT_MEMORY
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    num = text.rstrip("BbIiKkMmGgTt ")
    return float(num) * units[text[len(num) :].strip().upper()] / 2**20


def finish_ratios(results: list[Result], args) -> None:
    """x faster than mergekit, x of the O_DIRECT floor, and the targets, per streammerge row."""
    floor = _find(results, "floor-direct", "")
    budget = memory_mib(args) + RSS_SLACK_MIB
    for r in results:
        if r.contender != "streammerge" or not r.ok:
            continue
        mk = _find(results, "mergekit", r.method)
        r.x_mergekit = mk.time_s / r.time_s if mk else None
        r.x_floor = floor.time_s / r.time_s if floor else None
        checks = []
        want = TARGETS.get(r.method, {})
        for key, got in (("mergekit", r.x_mergekit), ("floor", r.x_floor)):
            if key not in want:
                continue
            if got is None:
                checks.append(f"x {key} >= {want[key]:g}: not measured")
            else:
                ok = got >= want[key]
                checks.append(f"x {key} {got:.2f} {'>=' if ok else '<'} "
                              f"{want[key]:g} {'ok' if ok else 'MISSED'}")  # fmt: skip
        ok = r.peak_rss_mib is not None and r.peak_rss_mib <= budget
        checks.append(f"RSS {fmt(r.peak_rss_mib, '.0f')} {'<=' if ok else '>'} {budget:.0f} MiB "
                      f"{'ok' if ok else 'MISSED'}")  # fmt: skip
        r.targets = "; ".join(checks)


def print_table(results: list[Result], input_bytes: int, title: str, caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, caption=caption, caption_justify="left")
    t.add_column("contender")
    t.add_column("method")
    t.add_column("wall s", justify="right")
    t.add_column("input GB/s", justify="right")
    t.add_column("peak RSS MiB", justify="right")
    t.add_column("streammerge ratio", justify="right")
    t.add_column("x faster than mergekit", justify="right")
    t.add_column("x of O_DIRECT floor", justify="right")
    t.add_column("notes")
    for r in results:
        if r.ok:
            gbps = input_bytes / 1e9 / r.time_s
            ratio = ""
            sm = ratio_base(results, r)
            if sm is not None:
                x = r.time_s / sm.time_s
                ratio = f"{x:.2f} of floor" if r.contender.startswith("floor") else f"{x:.2f}x"
            notes = r.targets or r.cache
            if r.io_read_s is not None:
                notes += (
                    f"; read {input_bytes / 1e9 / r.io_read_s:.2f} GB/s in {r.io_read_s:.1f} s, "
                    f"write {r.output_bytes / 1e9 / r.io_write_s:.2f} GB/s in {r.io_write_s:.1f} s"
                )
            t.add_row(r.contender, r.method or "(v1)" if r.contender in ("mergekit", "streammerge")
                      else r.method, f"{r.time_s:.1f}", f"{gbps:.2f}", f"{r.peak_rss_mib:.0f}",
                      ratio, fmt(r.x_mergekit, ".2f"), fmt(r.x_floor, ".2f"), notes)  # fmt: skip
        else:
            t.add_row(r.contender, r.method, fmt(r.wall_s, ".1f"), "", fmt(r.peak_rss_mib, ".0f"),
                      "", "", "", r.status)  # fmt: skip
    Console(width=200).print(t)


def print_methods(results: list[Result], input_bytes: int) -> None:
    """One line per method: both tools' wall s, streammerge's GB/s and RSS, the ratios."""
    from rich.console import Console
    from rich.table import Table

    methods = list(dict.fromkeys(r.method for r in results if r.method))
    if not methods:
        return
    t = Table(title="per method (same run)")
    for col in ("method", "mergekit s", "mergekit RSS MiB", "streammerge s", "input GB/s",
                "streammerge RSS MiB", "x faster than mergekit", "x of O_DIRECT floor",
                "targets"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("method", "targets") else "right")
    for m in methods:
        mk = next((r for r in results if r.contender == "mergekit" and r.method == m), None)
        sm = next((r for r in results if r.contender == "streammerge" and r.method == m), None)
        t.add_row(
            m,
            (f"{mk.time_s:.1f}" if mk.ok else mk.status) if mk else "",
            fmt(mk.peak_rss_mib, ".0f") if mk else "",
            (f"{sm.time_s:.1f}" if sm.ok else sm.status) if sm else "",
            f"{input_bytes / 1e9 / sm.time_s:.2f}" if sm and sm.ok else "",
            fmt(sm.peak_rss_mib, ".0f") if sm else "",
            fmt(sm.x_mergekit, ".2f") if sm else "",
            fmt(sm.x_floor, ".2f") if sm else "",
            sm.targets if sm else "",
        )
    Console(width=200).print(t)


def _recipe_cols(r: Result, args) -> dict[str, str]:
    if r.contender not in ("mergekit", "streammerge", "naive"):
        return {}
    if not r.method:  # the v1 recipe: (lam, 1 - lam), drop p
        return {"weights": _csv_list([args.lam, 1 - args.lam]), "density": repr(1 - args.drop)}
    rec = method_recipe(r.method, args)
    return {k: _csv_list(rec[k]) for k in ("weights", "density", "gamma") if k in rec}


def csv_rows(results: list[Result], common: dict[str, str], input_bytes: int, args) -> list[dict]:
    rows = []
    for r in results:
        ratio = ""
        sm = ratio_base(results, r) if r.ok else None
        if sm is not None:
            ratio = f"{r.time_s / sm.time_s:.4g}"
        rows.append(
            {
                **common,
                "contender": r.contender,
                "method": r.method,
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
                "x_faster_than_mergekit": fmt(r.x_mergekit, ".4g"),
                # significant digits: a tiny smoke trio's ratio is ~1e-4
                "x_of_floor_direct": fmt(r.x_floor, ".4g"),
                "targets": r.targets,
                "rss_source": r.rss_source,
                "memory": (args.memory or DEFAULT_MEMORY) if r.contender == "streammerge" else "",
                **_recipe_cols(r, args),
                "output_check": r.output_check,
                "cache": r.cache or common.get("cache", ""),
                "loadavg_before": r.loadavg,
                "command": shlex.join(r.command) if r.command else "",
            }
        )
    return rows


def append_csv(path: Path, rows: list[dict], fields0: list[str] = CSV_FIELDS) -> list[dict]:
    """Append ``rows`` to the CSV (rewriting it if its columns changed); returns all rows."""
    old: list[dict] = []
    fields = list(fields0)
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


def read_csv(path: Path) -> list[dict]:
    if not path.exists() or not path.stat().st_size:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


README_COLUMNS = [
    ("date", "date (UTC)"),
    ("model_gb", "model GB"),
    ("dtype", "dtype"),
    ("contender", "contender"),
    ("method", "method"),
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
AGREE_FIELDS = [
    "date", "model_gb", "method", "status", "tensors_identical", "tensors", "elements",
    "bit_equal", "bit_equal_frac", "max_ulp", "threshold_tie", "linear_fma", "ulp1_other",
    "other", "only_mergekit", "only_streammerge", "weights_match", "weights", "density",
    "gamma", "compare_s", "note", "data", "bench_cmd",
]  # fmt: skip


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def methods_section(rows: list[dict], agree: list[dict]) -> list[str]:
    lines = [
        "",
        "## Methods",
        "",
        "Runs with `--method`: per method, mergekit 0.1.5 (`merge_method: M`, `dtype: float32`,",
        "`out_dtype: bfloat16`, the same weights: the M3 draw `(lam, 1 - lam)` of the run's seed",
        "unless `--weights`, the same density and gamma) and streammerge `--method M`, each",
        "timed from a dropped page cache with the inputs read once untimed before it.",
        "mergekit's `dare_*` rescale by the L1 norm and draw their masks from torch's RNG, so",
        "there only the time compares. *x faster than mergekit* = mergekit s / streammerge s;",
        "*x of O_DIRECT floor* = floor-direct s / streammerge s (1 = at the floor), both from",
        "the same run. *peak RSS* is each child's own (`/usr/bin/time -f %M`). Targets: ties",
        ">= 10x mergekit and >= 0.6 of the floor; dare_ties and task_arithmetic >= 0.8 of the",
        "floor; streammerge's peak RSS <= `--memory` + 160 MiB.",
        "",
    ]
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r.get("date", ""), []).append(r)
    table = []
    for date, run in by_run.items():
        floor = next((r for r in run if r["contender"] == "floor-direct" and r["status"] == "ok"),
                     None)  # fmt: skip
        for sm in run:
            if sm["contender"] != "streammerge" or not sm.get("method"):
                continue
            mk = next((r for r in run if r["contender"] == "mergekit"
                       and r.get("method") == sm["method"]), None)  # fmt: skip
            table.append([
                date, sm.get("model_gb", ""), sm["method"], sm.get("density", ""),
                (mk["wall_s"] if mk["status"] == "ok" else mk["status"]) if mk else "",
                mk.get("peak_rss_mib", "") if mk else "",
                sm["wall_s"] if sm["status"] == "ok" else sm["status"],
                sm.get("input_gbps", ""), sm.get("peak_rss_mib", ""),
                sm.get("x_faster_than_mergekit", ""), floor["wall_s"] if floor else "",
                sm.get("x_of_floor_direct", ""), sm.get("targets", ""),
                sm.get("loadavg_before", ""), sm.get("note", ""),
            ])  # fmt: skip
    if table:
        lines += _table(
            ["date (UTC)", "model GB", "method", "density", "mergekit s", "mergekit RSS MiB",
             "streammerge s", "input GB/s", "streammerge RSS MiB", "x faster than mergekit",
             "O_DIRECT floor s", "x of O_DIRECT floor", "targets", "load", "note"], table,
        )  # fmt: skip
    else:
        lines.append("(no runs with --method yet)")
    lines += [
        "",
        "## Agreement with mergekit",
        "",
        "`--agree`: both tools merge the same trio with the same recipe; the outputs are",
        "compared bit by bit (`bench/mergekit_agree.py --explain`). *bit-equal*: fraction of",
        "elements whose stored bf16 bits are equal; *max ulp*: largest difference in bf16 ulps.",
        "Every differing element is classified: *threshold tie* (its magnitude equals the",
        "recorded threshold of a fine-tune: mergekit's argsort keeps an arbitrary subset of the",
        "elements tied with the k-th largest, streammerge keeps them all), *linear fma* (the",
        "element recomputed from the inputs gives mergekit's bits with its fused `addcmul_` and",
        "streammerge's with SPEC's unfused sum), *1 ulp* (any other difference of one ulp),",
        "*other*. *weights*: the weights streammerge.json recorded equal mergekit's `weight`s.",
        "",
    ]
    if agree:
        lines += _table(
            ["date (UTC)", "model GB", "method", "status", "tensors bit-identical", "elements",
             "bit-equal", "max ulp", "threshold tie", "linear fma", "1 ulp", "other",
             "weights", "note"],
            [[a.get("date", ""), a.get("model_gb", ""), a.get("method", ""), a.get("status", ""),
              f"{a.get('tensors_identical', '')}/{a.get('tensors', '')}", a.get("elements", ""),
              a.get("bit_equal_frac", ""), a.get("max_ulp", ""), a.get("threshold_tie", ""),
              a.get("linear_fma", ""), a.get("ulp1_other", ""), a.get("other", ""),
              a.get("weights_match", ""), a.get("note", "")] for a in agree],
        )  # fmt: skip
    else:
        lines.append("(no --agree runs yet)")
    return lines


def write_readme(path: Path, rows: list[dict], agree: list[dict] | None = None) -> None:
    lines = [
        "# bench_merge results",
        "",
        "Generated by `bench/bench_merge.py` from `bench_merge.csv` and `mergekit_agree.csv`",
        "(do not edit by hand; the CSV has every column: commands, CPU model, lambda/drop/seed,",
        "weights/density/gamma, read/write split, targets).",
        "",
        "- *method*: blank = the v1 recipe (mergekit `dare_linear` in bf16 math, streammerge",
        "  `--lambda --drop`); else `--method`, see [Methods](#methods).",
        "- *wall s*: the child's wall time; for the floor rows the read + write I/O time.",
        "- *input GB/s*: bytes of the three input models / wall s.",
        "- *peak RSS MiB*: the child's own peak (`/usr/bin/time -f %M`; rows whose CSV",
        "  `rss_source` is blank: `ru_maxrss` via `os.wait4`, which can carry the bench's own",
        "  peak over the fork).",
        "- *streammerge ratio*: peer_s / streammerge_s from the same run (the same method's",
        "  streammerge row): the speedup over naive/mergekit; for floor rows the fraction of the",
        "  I/O floor's speed reached (1 = at the floor; blank when a run has several methods).",
        "- *cache*: `cold` when the page cache was dropped before the row, else `warm`. On a",
        "  VM the host caches the disk too, out of reach of drop_caches (the first read of",
        "  files untouched for a while ran at 0.55 GB/s, the next at 1.77 GB/s on the",
        "  reference VM), so the inputs are read once, untimed, before each row (`not primed`",
        "  when `--no-prime` skipped that): rows are guest-cold, host state unknown.",
        "- *load*: 1-minute load average just before the row (the machine may be shared).",
        "- *env*: OMP_/MKL_/NUMBA_/TORCH_ variables set for the run (e.g. OMP_WAIT_POLICY).",
        "",
    ]
    lines += _table([h for _, h in README_COLUMNS],
                    [[row.get(k, "") for k, _ in README_COLUMNS] for row in rows])  # fmt: skip
    lines += methods_section(rows, agree or [])
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- agreement
def agree_method(method: str, mk: Result, sm: Result, data: Path, args,
                 common: dict[str, str]) -> dict:  # fmt: skip
    """Bit-level agreement of one method's two outputs (``--agree``), as a CSV row."""
    import mergekit_agree

    rec = method_recipe(method, args)
    row = {k: common.get(k, "") for k in ("date", "model_gb", "note", "data", "bench_cmd")}
    row |= {"method": method, **{k: _csv_list(rec[k]) for k in ("weights", "density", "gamma")
                                 if k in rec}}  # fmt: skip
    if mk.out_dir is None or sm.out_dir is None:
        row["status"] = f"not compared: mergekit {mk.status or '-'}, streammerge {sm.status or '-'}"
        return row
    t0 = time.perf_counter()
    res = mergekit_agree.compare_dirs(
        mk.out_dir, sm.out_dir, explain_inputs=[data / "base", data / "a", data / "b"]
    )
    s = res["summary"]
    reasons = s.get("reasons", {})
    # the weights streammerge used (M3 draw or given) are the ones mergekit was given
    try:
        got = json.loads((sm.out_dir / "streammerge.json").read_text())
        ws = [t["w"] for t in got["tensors"].values()]
        import numpy as np

        want = np.float32(rec["weights"])
        match = all(np.array_equal(np.float32(w), want) for w in ws)
        row["weights_match"] = "yes" if match else "NO"
    except (OSError, ValueError, KeyError, TypeError):
        row["weights_match"] = "unknown"
    row |= {
        "status": "ok" if not s["problems"] else "; ".join(s["problems"][:3]),
        "tensors_identical": s["tensors_equal"], "tensors": s["tensors"],
        "elements": s["numel"], "bit_equal": s["equal"],
        "bit_equal_frac": "1" if s["equal"] == s["numel"] else f"{s['equal_frac']:.6f}",
        "max_ulp": s["max_ulp"], "threshold_tie": reasons.get("threshold tie", ""),
        "linear_fma": reasons.get("linear fma", ""),
        "ulp1_other": reasons.get("fma/rounding (1 ulp)", ""), "other": reasons.get("other", ""),
        "only_mergekit": s["only_a"], "only_streammerge": s["only_b"],
        "compare_s": f"{time.perf_counter() - t0:.1f}",
    }  # fmt: skip
    return row


def print_agree(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="agreement with mergekit (bf16 output bits)")
    cols = [("method", "method"), ("tensors bit-identical", None), ("elements", "elements"),
            ("bit-equal", "bit_equal_frac"), ("max ulp", "max_ulp"),
            ("threshold tie", "threshold_tie"), ("linear fma", "linear_fma"),
            ("1 ulp", "ulp1_other"), ("other", "other"), ("weights", "weights_match"),
            ("status", "status")]  # fmt: skip
    for h, _ in cols:
        t.add_column(h)
    for r in rows:
        t.add_row(*[f"{r.get('tensors_identical', '')}/{r.get('tensors', '')}" if k is None
                    else str(r.get(k, "")) for _, k in cols])  # fmt: skip
    Console(width=200).print(t)


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


def parse_methods(text: str) -> list[str]:
    out = [m.strip() for m in text.split(",") if m.strip()]
    for m in out:
        if m not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {m!r} (use {', '.join(METHODS)})")
    return list(dict.fromkeys(out))


def parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    ap.add_argument(
        "--method",
        type=parse_methods,
        default=[],
        help="comma list of merge methods (" + ", ".join(METHODS) + "): the mergekit "
        "and streammerge rows run once per method (default: the v1 recipe)",
    )
    ap.add_argument(
        "--density",
        type=parse_floats,
        default=None,
        help="density, one or one per model (default 1 - --drop); DARE methods "
        "drop at rate 1 - density",
    )
    ap.add_argument(
        "--gamma",
        type=parse_floats,
        default=None,
        help="breadcrumbs gamma, one or one per model (default 0.01)",
    )
    ap.add_argument(
        "--weights",
        type=parse_floats,
        default=None,
        help="w0,w1 for both tools (default: the M3 draw (lam, 1 - lam))",
    )
    ap.add_argument(
        "--memory",
        default=None,
        help=f"streammerge --memory (default its own, {DEFAULT_MEMORY}); the RSS "
        f"target is this + {RSS_SLACK_MIB} MiB",
    )
    ap.add_argument(
        "--agree",
        action="store_true",
        help="also run " + ", ".join(AGREE_METHODS) + " and compare both tools' "
        "outputs bit by bit (bench/mergekit_agree.py --explain)",
    )
    ap.add_argument(
        "--note",
        default="",
        help="free text recorded with the rows (e.g. 'CPU shared with other jobs')",
    )
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
    for what, vals in (("--density", args.density), ("--gamma", args.gamma)):
        if vals is not None and len(vals) not in (1, 2):
            ap.error(f"{what}: one value or one per model (2)")
    if args.density is not None and not all(0 < d <= 1 for d in args.density):
        ap.error("--density must be in (0, 1]")
    if args.weights is not None and len(args.weights) != 2:
        ap.error("--weights: one per model (2)")
    if args.weights is not None and args.lam is not None:
        ap.error("give --weights or --lambda, not both")
    if args.agree:
        args.method = list(dict.fromkeys([*args.method, *AGREE_METHODS]))
        if not {"mergekit", "streammerge"} <= set(args.only):
            ap.error("--agree needs both mergekit and streammerge in --only")
    args.lam_given = args.lam is not None
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
    if args.method:
        print("methods: " + "; ".join(
            f"{m} {method_recipe(m, args)}" for m in args.method))  # fmt: skip

    # rows: the floors and naive, then mergekit and streammerge once per method (or v1)
    plan: list[tuple[str, str]] = []
    for name in args.only:
        if not (args.method and name in ("mergekit", "streammerge")):
            plan.append((name, ""))
    for m in args.method:
        plan += [(name, m) for name in ("mergekit", "streammerge") if name in args.only]
    to_agree = set(AGREE_METHODS) if args.agree else set()
    run_date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    results: list[Result] = []
    agree_rows: list[dict] = []
    for name, method in plan:
        print(f"-- {name}{' ' + method if method else ''} ...", flush=True)
        if results and args.settle > 0:
            # let the previous row's writes drain (the host may still be flushing them)
            subprocess.run(["sync"], check=False)
            time.sleep(args.settle)
        if args.prime:
            prime()
        if name.startswith("floor-"):
            r = run_floor(name.split("-", 1)[1], inputs, base_bytes, work, args)
        else:
            r = run_merge(name, args, data, work, expect, need, method, method in to_agree)
        results.append(r)
        extra = f", {r.time_s:.1f} s, peak RSS {r.peak_rss_mib:.0f} MiB" if r.ok else ""
        print(f"   {r.status}{extra}", flush=True)
        if method in to_agree and name == "streammerge":
            mk = next(q for q in results if q.contender == "mergekit" and q.method == method)
            print(f"   comparing {method} outputs bit by bit ...", flush=True)
            meta = {"date": run_date, "model_gb": f"{base_bytes / 1e9:.3f}", "note": args.note,
                    "data": str(data), "bench_cmd": shlex.join(["python", "bench/bench_merge.py",
                                                                *argv])}  # fmt: skip
            try:
                agree_rows.append(agree_method(method, mk, r, data, args, meta))
            finally:
                for q in (mk, r):
                    if q.out_dir is not None and not args.keep:
                        shutil.rmtree(q.out_dir, ignore_errors=True)
            a = agree_rows[-1]
            print(f"   bit-equal {a.get('bit_equal_frac', '-')}, max {a.get('max_ulp', '-')} ulp, "
                  f"tie {a.get('threshold_tie', '-')}, linear fma {a.get('linear_fma', '-')}, "
                  f"1 ulp {a.get('ulp1_other', '-')}, other {a.get('other', '-')} "
                  f"({a.get('compare_s', '-')} s)", flush=True)  # fmt: skip
    finish_ratios(results, args)

    common = {
        "date": run_date,
        "note": args.note,
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
    print_methods(results, input_bytes)
    if agree_rows:
        print_agree(agree_rows)
    rows = append_csv(args.results / "bench_merge.csv", csv_rows(results, common, input_bytes,
                                                                  args))  # fmt: skip
    agree_csv = args.results / "mergekit_agree.csv"
    agree_all = append_csv(agree_csv, agree_rows, AGREE_FIELDS) if agree_rows else read_csv(
        agree_csv)  # fmt: skip
    write_readme(args.results / "README.md", rows, agree_all)
    print(f"appended {len(results)} rows to {args.results / 'bench_merge.csv'}"
          + (f" and {len(agree_rows)} to {agree_csv}" if agree_rows else ""))  # fmt: skip
    bad = [r for r in results if r.status.startswith(("failed", "bad output", "timeout"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
