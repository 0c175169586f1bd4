"""Scale on paper: expected merge times for 70B / 405B / 671B on 1, 4 and 16 nodes.

    python bench/scale_on_paper.py                          # measure here, print, write
    python bench/scale_on_paper.py --net-gbps 25            # a real network figure
    python bench/scale_on_paper.py --net-gbps 100 --store-gbps 200 --dare-gels 8 --no-write
    python bench/scale_on_paper.py --check-trio bench/data/trio-2gb   # + a real merge vs formula

Measures per-node rates on this machine (each a second or two), then computes the times
with the formula below and prints a markdown table (also written to
``bench/results/scale.md`` unless ``--no-write``). Every measured rate can be replaced by
an option (then it is not measured), so the table can be redone for other nodes.

Measured (per node):

- disk read: ``streammerge.io.measure.measure_read_speed`` (O_DIRECT, 4 x 4 MiB requests in
  flight) of a file this script writes into a temp dir on the data's file system
  (``--dir``, default ``bench/data``); median of 3.
- disk write: O_DIRECT sequential 4 MiB writes of the same file plus fsync; median of 3.
- network: HTTP range reads (fsspec, as ``streammerge.io.remote``; 8 MiB pieces, 12 in
  flight) from a server this script starts on 127.0.0.1 serving from memory. LOOPBACK:
  no NIC, no wire: it measures the HTTP client's (and server's) CPU cost here, an upper
  bound of the network rate, not a network measurement. Pass ``--net-gbps`` (10 / 25 /
  100 ...) for a real one.
- kernels, elements/s, all numba threads, 16M-element bf16 chunk, N = 2 fine-tunes + base:
  dare_linear's merge pass (p = 0.5), and ties' three passes (hist_high + hist_low +
  merge with a density-0.2 keep window, sign consensus, normalize); best of 7.
- sha256 (the writer hashes every output byte): one thread, x cores.

The formula (P parameters, bf16 = 2 bytes, 3 inputs: base + 2 fine-tunes, 1 output, n
nodes; rates per node):

    R = 3 * 2P * f      bytes read (f = 1; ties: tensors too large for a --memory slot
                        are read twice (the statistics read counts the high histograms
                        and a guessed window's low ones, then the merge read; a third
                        read only when the window misses), held ones once)
    W = 2P              bytes written;  E = P elements
    s(n) = ceil(K / n) / K   share of the busiest node, K = ceil(W / shard_size) output
                        shards (shards are the unit of work; about 1/n)
    read  = s R / min(disk_read, net)
    write = s W / min(disk_write, net)
    cpu   = s E / kernel + s W / (sha256 * cores)
    store = R / S       (one shared input store of bandwidth S, --store-gbps; default none)
    T(n)  = startup + max(read, write, cpu, store)

The pipeline overlaps reading, computing and writing, so the slowest stage bounds the time.
The "1 node, local disk" column drops the network (inputs and output on the node's disk,
no Ray). Optimistic where stages share the CPU (kernel, sha256, O_DIRECT memmoves, the
HTTP client): they are assumed not to slow each other except kernel + sha256 (summed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import math
import mmap
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from machine import machine  # bench/machine.py (bench/ is on sys.path when run)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GB = 1e9
#: Test file size (bytes) for the disk rates, and the in-memory size the HTTP server serves.
FILE_BYTES = 256 * 2**20
NET_BYTES = 128 * 2**20
PIECE = 4 * 2**20
NET_PIECE = 8 * 2**20
NET_INFLIGHT = 12
KERNEL_ELEMS = 16 * 2**20
NODES = (1, 4, 16)


# ----------------------------------------------------------------------------------------
# Model inventories: (count, numel) of every tensor, from the models' config.json
# ----------------------------------------------------------------------------------------


def llama(layers: int, hidden: int, inter: int, kv_dim: int, vocab: int) -> list[tuple[int, int]]:
    """Llama-3 tensors (untied embeddings): q, k, v, o, gate, up, down, 2 norms per layer."""
    per_layer = [(2, hidden * hidden), (2, kv_dim * hidden), (3, inter * hidden), (2, hidden)]
    return [(c * layers, m) for c, m in per_layer] + [(2, vocab * hidden), (1, hidden)]


def deepseek_v3() -> list[tuple[int, int]]:
    """DeepSeek-V3 (config.json of deepseek-ai/DeepSeek-V3) without the MTP layer (the
    671B count): MLA attention, 3 dense layers, 58 MoE layers of 256 routed + 1 shared
    experts; taken as bf16 (the release is fp8 with bf16 scales)."""
    h, layers, dense, experts, moe_i, inter, vocab = 7168, 61, 3, 256, 2048, 18432, 129280
    attn = [(1, 1536 * h), (1, 1536), (1, 128 * 192 * 1536), (1, 576 * h), (1, 512),
            (1, 128 * 256 * 512), (1, h * 128 * 128), (2, h)]  # fmt: skip
    moe = [(3 * (experts + 1), moe_i * h), (1, experts * h), (1, experts)]
    inv = [(c * layers, m) for c, m in attn]
    inv += [(3 * dense, inter * h)]
    inv += [(c * (layers - dense), m) for c, m in moe]
    return inv + [(2, vocab * h), (1, h)]


MODELS = {
    "70B (Llama-3-70B)": llama(80, 8192, 28672, 1024, 128256),
    "405B (Llama-3.1-405B)": llama(126, 16384, 53248, 1024, 128256),
    "671B (DeepSeek-V3)": deepseek_v3(),
}


def params(inv) -> int:
    return sum(c * m for c, m in inv)


# ----------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------


def _median(xs):
    return statistics.median(xs)


def measure_write(path: Path, total: int) -> tuple[float, str]:
    """Bytes/s of writing ``total`` bytes sequentially (4 MiB pieces) plus fsync."""
    buf = mmap.mmap(-1, PIECE)  # page aligned, as O_DIRECT needs
    buf.write(np.random.default_rng(0).integers(0, 256, PIECE, np.uint8).tobytes())
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    how = "O_DIRECT"
    try:
        fd = os.open(path, flags | os.O_DIRECT)
    except (OSError, AttributeError):
        fd, how = os.open(path, flags), "buffered + fsync"
    try:
        t0 = time.perf_counter()
        with memoryview(buf) as v:
            for k in range(total // PIECE):
                v[:8] = k.to_bytes(8, "little")  # no two pieces alike
                os.pwrite(fd, v, k * PIECE)
        os.fsync(fd)
        return total / (time.perf_counter() - t0), how
    finally:
        os.close(fd)
        buf.close()


def measure_disk(directory: Path) -> dict:
    """Disk write and read rates (bytes/s) on a temp file in ``directory``; median of 3."""
    from streammerge.io.measure import measure_read_speed

    tmp = Path(tempfile.mkdtemp(prefix="scale-on-paper-", dir=directory))
    try:
        path = tmp / "probe.bin"
        writes, reads = [], []
        for _ in range(3):
            w, how_w = measure_write(path, FILE_BYTES)
            writes.append(w)
            r = measure_read_speed([path], max_bytes=FILE_BYTES, max_seconds=5.0)
            reads.append(r["bytes_per_s"])
        return {"read": _median(reads), "write": _median(writes), "reads": reads,
                "writes": writes, "how_read": r["how"], "how_write": how_w, "dir": str(directory)}  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SERVER = r"""
import http.server, os, sys
data = os.urandom(int(sys.argv[1]))
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def _range(self):
        r = self.headers.get("Range")
        if not r: return 0, len(data)
        a, b = r.split("=")[1].split("-")
        return int(a), min(len(data), int(b) + 1 if b else len(data))
    def do_HEAD(self):
        self.send_response(200); self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes"); self.send_header("ETag", '"x"'); self.end_headers()
    def do_GET(self):
        a, b = self._range()
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("Content-Length", str(b - a)); self.send_header("ETag", '"x"')
        self.send_header("Content-Range", f"bytes {a}-{b - 1}/{len(data)}"); self.end_headers()
        self.wfile.write(memoryview(data)[a:b])
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def measure_loopback(seconds: float = 2.0) -> dict:
    """Bytes/s of HTTP range reads through fsspec from a local server (another process,
    serving from memory) over 127.0.0.1: LOOPBACK, an upper bound, not a network."""
    import fsspec

    srv = subprocess.Popen([sys.executable, "-c", SERVER, str(NET_BYTES)], stdout=subprocess.PIPE,
                           text=True)  # fmt: skip
    try:
        port = int(srv.stdout.readline())
        url = f"http://127.0.0.1:{port}/blob"
        fs = fsspec.filesystem("http")
        n_pieces = NET_BYTES // NET_PIECE

        def piece(k: int) -> int:
            off = (k % n_pieces) * NET_PIECE
            return len(fs.cat_file(url, start=off, end=off + NET_PIECE))

        piece(0)  # connect, warm the session
        got, k = 0, 0
        with ThreadPoolExecutor(NET_INFLIGHT) as pool:
            t0 = time.perf_counter()
            futs = [pool.submit(piece, k + i) for i in range(NET_INFLIGHT)]
            k += NET_INFLIGHT
            while futs:
                got += futs.pop(0).result()
                if time.perf_counter() - t0 < seconds:
                    futs.append(pool.submit(piece, k))
                    k += 1
            el = time.perf_counter() - t0
        return {"bytes_per_s": got / el, "bytes": got, "seconds": el}
    finally:
        srv.terminate()
        srv.wait()


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (truncation; fine for timing)."""
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def measure_kernels(n: int = KERNEL_ELEMS, reps: int = 7) -> dict:
    """Elements/s of dare_linear's merge pass and of ties' three passes (module docstring)."""
    import numba
    from streammerge.kernels import cpu_merge, cpu_stats

    t0 = time.perf_counter()
    cpu_merge.warmup()
    cpu_stats.warmup()
    warm_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    base = rng.standard_normal(n, dtype=np.float32)
    rows = [_bf16(base)] + [_bf16(base + 0.01 * rng.standard_normal(n, dtype=np.float32))
                            for _ in range(2)]  # fmt: skip
    inputs = np.stack([r.view(np.uint8) for r in rows])  # [3, 2n] raw bf16 bytes
    del base, rows
    out = np.empty(2 * n, np.uint8)
    dt_ = ["BF16"] * 3

    def dare():
        cpu_merge.merge_chunk(inputs, dt_, 0, [1, 2], [0, 1], [0.5, 0.5], [0.5, 0.5], 1.0,
                              out, "BF16", n, 12345, 0)  # fmt: skip

    density = 0.2
    hh = np.zeros((2, cpu_stats.HIGH_BINS), np.int64)
    cpu_stats.hist_high(inputs, dt_, 0, [1, 2], n, hh)
    target = int(density * n)  # keep the `target` largest magnitudes
    buckets, keep_lo = np.zeros((2, 1), np.int64), []
    above = np.cumsum(hh[:, ::-1], axis=1)  # elements in buckets >= b, from the top
    for k in range(2):
        b = cpu_stats.HIGH_BINS - 1 - int(np.searchsorted(above[k], target))
        buckets[k, 0] = b
        keep_lo.append(b << 16)  # the bucket's floor: close enough for timing

    def ties():
        h1 = np.zeros((2, cpu_stats.HIGH_BINS), np.int64)
        cpu_stats.hist_high(inputs, dt_, 0, [1, 2], n, h1)
        h2 = np.zeros((2, 1, cpu_stats.LOW_BINS), np.int64)
        cpu_stats.hist_low(inputs, dt_, 0, [1, 2], n, buckets, h2)
        cpu_merge.merge_chunk(inputs, dt_, 0, [1, 2], [0, 1], [0.0, 0.0], [1.0, 1.0], 1.0,
                              out, "BF16", n, 12345, 0, keep_lo=keep_lo, consensus="sign",
                              normalize=True)  # fmt: skip

    res = {"threads": numba.get_num_threads(), "elems": n, "warmup_s": warm_s}
    for name, fn in (("dare_linear", dare), ("ties", ties)):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        res[name] = n / min(ts)  # best of reps: other load only adds time
    return res


def measure_sha256(nbytes: int = 64 * 2**20) -> float:
    data = np.random.default_rng(1).integers(0, 256, nbytes, np.uint8).tobytes()
    hashlib.sha256(data[: 2**20]).digest()
    t = time.perf_counter()
    hashlib.sha256(data).digest()
    return nbytes / (time.perf_counter() - t)


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


def chunk_elems(memory_bytes: int, threads: int) -> int:
    """Elements of one slot of a ties run (``layout.make_layout`` on a stub bf16 plan)."""
    from streammerge.exec.layout import make_layout

    t = SimpleNamespace(action="merge", base=SimpleNamespace(itemsize=2),
                        sources=[SimpleNamespace(itemsize=2)] * 2, dtype="BF16",
                        ops=("hist_high", "hist_low", "merge"))  # fmt: skip
    row = SimpleNamespace(sparse=SimpleNamespace(stats=True), sparsifier="magnitude")
    recipe = SimpleNamespace(row=row, trim_scope="tensor")
    plan = SimpleNamespace(tensors=[t], recipe=recipe, model_scope=False)
    return make_layout(plan, 2, memory_bytes, 0, None, threads).chunk_elems


def ties_read_factor(inv, chunk: int) -> float:
    """Bytes read by ties / bytes read once: held tensors (numel <= chunk) once, others
    twice (the statistics read with a guessed threshold window, then the merge read;
    ``pipeline`` adds a third only when the window misses, not counted here)."""
    total = params(inv)
    return sum(c * m * (1 if m <= chunk else 2) for c, m in inv) / total


def predict(p: int, read_factor: float, kernel: float, rates: dict, nodes: int,
            local: bool) -> tuple[float, str]:  # fmt: skip
    """(seconds, dominating bound) for one cell (module docstring's formula)."""
    return predict_bytes(3 * 2 * p * read_factor, 2 * p, p, kernel, rates, nodes, local)


def predict_bytes(R: float, W: float, E: float, kernel: float, rates: dict, nodes: int,
                  local: bool) -> tuple[float, str]:  # fmt: skip
    """(seconds, dominating bound) for R bytes read, W written, E elements merged."""
    k = math.ceil(W / rates["shard_bytes"])
    s = math.ceil(k / nodes) / k
    net = math.inf if local else rates["net"]
    bounds = {
        "read": s * R / min(rates["disk_read"], net),
        "write": s * W / min(rates["disk_write"], net),
        "cpu": s * E / kernel + s * W / (rates["sha256"] * rates["cores"]),
    }
    if rates["store"] and not local:
        bounds["store"] = R / rates["store"]
    name = max(bounds, key=bounds.get)
    t = rates["startup"] + bounds[name]
    if name in ("read", "write") and net < rates["disk_" + name]:
        name = "net " + name
    return t, name


def fmt_t(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def _safetensors_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def check_trio(rates: dict, trio: Path, runs: int = 2) -> str:
    """Run streammerge dare_linear (lambda 0.5, p 0.5, ``--profile``) ``runs`` times on a
    trio of ``bench/make_synthetic.py`` (``trio/{base,a,b}``; 1 node, local disk) and
    compare the wall times with the formula (no startup term: the measured wall has the
    process start and numba load in it)."""
    R = sum(_safetensors_bytes(trio / m) for m in ("base", "a", "b"))
    W = _safetensors_bytes(trio / "base")
    t_pred, bound = predict_bytes(R, W, W / 2, rates["dare"], dict(rates, startup=0.0), 1, True)
    exe = Path(sys.executable).with_name("streammerge")
    walls, busy = [], []
    for _ in range(runs):
        tmp = Path(tempfile.mkdtemp(prefix="scale-check-", dir=trio))
        try:
            cmd = [str(exe), str(trio / "a"), str(trio / "b"), "--base", str(trio / "base"),
                   "-o", str(tmp / "out"), "--lambda", "0.5", "--drop", "0.5", "--seed", "0",
                   "--profile"]  # fmt: skip
            t0 = time.perf_counter()
            res = subprocess.run(cmd, check=False, capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            raise SystemExit(f"--check-trio: streammerge failed ({res.returncode})")
        busy += [ln.split("per stage:", 1)[1].strip() for ln in (res.stdout + res.stderr).splitlines()
                 if "per stage:" in ln]  # fmt: skip
    runs_md = "; ".join(
        f"{w:.1f} s" + (f" (busy {b})" if b else "")
        for w, b in zip(walls, busy + [""] * (len(walls) - len(busy)))
    )
    return (
        f"Check (`--check-trio {trio}`): streammerge dare_linear on that trio ({R / GB:.2f} GB "
        f"read, {W / GB:.2f} GB written, 1 node, local disk), {runs} runs: {runs_md}. The "
        f"formula with the rates above gives {t_pred:.1f} s ({bound}), so measured / formula "
        f"= {min(walls) / t_pred:.1f}-{max(walls) / t_pred:.1f}: read the table as lower bounds."
    )


NOTES = """\
Reading, merging and writing overlap (bounded buffers), so the slowest stage bounds T; each
cell names it. *1 node, local disk*: inputs and output on the node's own disk, no network
(startup still added). Other columns: inputs read from shared storage or an object store
and the output written to the shared staging dir, both through each node's network, the
store serving each node at the measured disk rate. Optimistic: stages that share the CPU
(O_DIRECT memmoves, the HTTP client) are assumed not to slow each other, except kernel +
sha256 (summed); on few cores the stages do slow each other (see the check below), so
read the times as lower bounds. Ray is assumed to spread the tasks evenly over the nodes.
If the output goes to the same store as the inputs, add W to R in the store bound."""


def report(rates: dict, how: dict, args) -> str:
    """The markdown document: header, rates, formula, table, optional check."""
    chunk = chunk_elems(args.memory_bytes, rates["cores"])
    store = f"{rates['store'] * 8 / GB:.0f} Gbit/s" if rates["store"] else "none (unlimited)"
    shown, skip = [], False  # the command line, without --note (printed after it)
    for a in args.argv:
        if not skip and not a.startswith("--note"):
            shown.append(a)
        skip = a == "--note"
    cmd = shlex.join(["python", "bench/scale_on_paper.py", *shown])
    now = dt.datetime.now(dt.timezone.utc)
    load = (
        f"1-minute load average {args.load[0]:.1f} before measuring, "
        f"{os.getloadavg()[0]:.1f} after (rates are this machine's at that load)"
    )
    net = f"{rates['net'] * 8 / GB:.1f} Gbit/s ({rates['net'] / GB:.2f} GB/s)"
    sha = f"{rates['sha256'] / GB:.2f} GB/s per core x {rates['cores']} cores"
    rate_rows = [
        ("disk read", f"{rates['disk_read'] / GB:.2f} GB/s", how["disk_read"]),
        ("disk write", f"{rates['disk_write'] / GB:.2f} GB/s", how["disk_write"]),
        ("network", net, how["net"]),
        ("kernel, dare_linear", f"{rates['dare'] / GB:.2f} G elements/s", how["dare"]),
        ("kernel, ties", f"{rates['ties'] / GB:.2f} G elements/s", how["ties"]),
        ("sha256", sha, how["sha256"]),
        ("startup", f"{rates['startup']:.0f} s", how["startup"]),
        ("shared input store S", store, "--store-gbps"),
    ]
    formula = f"""\
R = 3 * 2P * f    bytes read; f = 1, ties: tensors larger than one --memory slot are
                  read twice (3x when a guessed window misses); --memory {args.memory}
                  -> slot {chunk / 1e6:.1f}M elements
W = 2P            bytes written;  E = P elements merged
s = ceil(K/n)/K   share of the busiest node, K = ceil(W / shard size) output shards
                  (--shard-size-gb {args.shard_size_gb:g}; tasks are whole shards)
read  = s*R / min(disk read, network)
write = s*W / min(disk write, network)
cpu   = s*E / kernel rate + s*W / (sha256 * cores)
store = R / S     (one shared input store; only with --store-gbps)
T     = startup + max(read, write, cpu, store)"""
    lines = [
        "# Scale on paper",
        "",
        f"Generated by `{cmd}` on {now:%Y-%m-%d %H:%M} UTC, {platform.node()}: {machine()}; {load}."
        + (f" {args.note}" if args.note else ""),
        "",
        "## Rates per node",
        "",
        "| rate | value | how |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rate_rows),
        "",
        "## Formula",
        "",
        "P parameters, bf16 (2 bytes), 3 inputs (base + 2 fine-tunes), 1 output, n nodes:",
        "",
        "```",
        formula,
        "```",
        "",
        NOTES,
        "",
        "## Expected times",
        "",
    ]
    cols = ["1 node, local disk"] + [f"{n} node{'s' if n > 1 else ''}" for n in args.nodes]
    lines += ["| model | method | read | " + " | ".join(cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]  # fmt: skip
    for label, inv in MODELS.items():
        p = params(inv)
        for method in ("dare_linear", "ties"):
            f = 1.0 if method == "dare_linear" else ties_read_factor(inv, chunk)
            kern = rates["dare"] if method == "dare_linear" else rates["ties"]
            cells = [predict(p, f, kern, rates, 1, local=True)]
            cells += [predict(p, f, kern, rates, n, local=False) for n in args.nodes]
            cells_md = " | ".join(f"{fmt_t(t)} ({b})" for t, b in cells)
            read = f"{3 * 2 * p * f / 1e12:.2f} TB"
            lines.append(f"| {label}, {p / 1e9:.1f}e9 | {method} | {read} | {cells_md} |")
    if args.check_trio:
        lines += ["", check_trio(rates, args.check_trio)]
    return "\n".join(lines) + "\n"


def parse_bytes(s: str) -> int:
    from streammerge.sizes import parse_size

    return int(parse_size(s))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the disk probe file goes (default bench/data, else the repo)",
    )
    ap.add_argument("--disk-read-gbs", type=float, help="disk read, GB/s (skip measuring)")
    ap.add_argument("--disk-write-gbs", type=float, help="disk write, GB/s (skip measuring)")
    ap.add_argument(
        "--net-gbps",
        type=float,
        help="network per node, Gbit/s, e.g. 10/25/100 (default: loopback, an upper bound)",
    )
    ap.add_argument("--dare-gels", type=float, help="dare_linear kernel, G elements/s")
    ap.add_argument("--ties-gels", type=float, help="ties kernels (3 passes), G elements/s")
    ap.add_argument("--sha-gbs", type=float, help="sha256 per core, GB/s")
    ap.add_argument(
        "--cores", type=int, help="cores per node (sha256 scaling; default this machine's)"
    )
    ap.add_argument(
        "--startup-s",
        type=float,
        default=5.0,
        help="plan + Ray task launch, seconds (stated, not measured; default 5)",
    )
    ap.add_argument(
        "--store-gbps",
        type=float,
        default=None,
        help="bandwidth of one shared input store, Gbit/s (default none: unlimited)",
    )
    ap.add_argument(
        "--memory", default="256MiB", help="streammerge --memory (ties: held or multi-pass)"
    )
    ap.add_argument("--shard-size-gb", type=float, default=5.0, help="output shard size, GB")
    ap.add_argument("--nodes", default="1,4,16", help="node counts, comma-separated")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.md")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--note", default="", help="a sentence added under the header")
    ap.add_argument(
        "--check-trio",
        type=Path,
        default=None,
        help="also time streammerge dare_linear on this bench/make_synthetic.py trio "
        "(DIR/base, DIR/a, DIR/b) against the formula (~10 s for the 2 GB trio)",
    )
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.nodes = [int(x) for x in args.nodes.split(",")]
    args.memory_bytes = parse_bytes(args.memory)
    args.load = os.getloadavg()
    cores = args.cores or len(os.sched_getaffinity(0))
    rates = {"cores": cores, "startup": args.startup_s, "shard_bytes": args.shard_size_gb * GB,
             "store": args.store_gbps * GB / 8 if args.store_gbps else None}  # fmt: skip
    how = {"startup": "stated (--startup-s), not measured"}
    given = "given on the command line"

    if args.disk_read_gbs is None or args.disk_write_gbs is None:
        d = args.dir or (ROOT / "bench" / "data" if (ROOT / "bench" / "data").is_dir() else ROOT)
        m = measure_disk(d)
        rates["disk_read"], rates["disk_write"] = m["read"], m["write"]
        how["disk_read"] = (f"{m['how_read']}, 4 x 4 MiB in flight, {FILE_BYTES >> 20} MiB file in {d}; "
                            f"median of {', '.join(f'{x / GB:.2f}' for x in m['reads'])}")  # fmt: skip
        how["disk_write"] = (f"{m['how_write']}, sequential 4 MiB writes + fsync, {FILE_BYTES >> 20} MiB; "
                             f"median of {', '.join(f'{x / GB:.2f}' for x in m['writes'])}")  # fmt: skip
    if args.disk_read_gbs is not None:
        rates["disk_read"], how["disk_read"] = args.disk_read_gbs * GB, given
    if args.disk_write_gbs is not None:
        rates["disk_write"], how["disk_write"] = args.disk_write_gbs * GB, given
    if args.net_gbps is not None:
        rates["net"], how["net"] = args.net_gbps * GB / 8, given
    else:
        m = measure_loopback()
        rates["net"] = m["bytes_per_s"]
        how["net"] = (f"**LOOPBACK** (127.0.0.1, no NIC): fsspec HTTP range reads, {NET_PIECE >> 20} MiB "
                      f"pieces, {NET_INFLIGHT} in flight, {m['bytes'] >> 20} MiB in {m['seconds']:.1f} s; "
                      "no wire, so it measures the HTTP client's (and the local server's) CPU cost on this "
            "machine: a real network is slower only where its link is; pass --net-gbps")  # fmt: skip
    if args.dare_gels is None or args.ties_gels is None:
        k = measure_kernels()
        desc = (f"numba, {k['threads']} threads, {k['elems'] >> 20}M-element chunk, bf16, "
                "base + 2 fine-tunes, best of 7")  # fmt: skip
        rates["dare"], how["dare"] = k["dare_linear"], f"merge pass, p = 0.5; {desc}"
        rates["ties"], how["ties"] = (
            k["ties"],
            (f"hist_high + hist_low + merge (keep window at density 0.2, sign, normalize); {desc}"),
        )
    if args.dare_gels is not None:
        rates["dare"], how["dare"] = args.dare_gels * GB, given
    if args.ties_gels is not None:
        rates["ties"], how["ties"] = args.ties_gels * GB, given
    if args.sha_gbs is not None:
        rates["sha256"], how["sha256"] = args.sha_gbs * GB, given
    else:
        rates["sha256"], how["sha256"] = measure_sha256(), "hashlib, 64 MiB, one thread"
    text = report(rates, how, args)
    print(text)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
