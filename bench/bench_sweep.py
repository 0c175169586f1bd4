"""A sweep of K draws against K separate merges of the same draws (issue: M3 without the
lottery). Both write the same K outputs (the sweep adds the fixed λ = 0.5 reference); the
sweep reads the inputs once.

    python bench/bench_sweep.py --data bench/data/trio-2gb --draws 8 --method ties --density 0.5

Prints wall seconds, input GB/s and each run's own peak RSS (``/usr/bin/time -f %M`` of a
fresh process), and the ratio "sweep is N x faster than K merges" measured in the same run.
Each row starts with the page cache dropped when possible (root), like bench_merge.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def drop_caches() -> None:
    """Flush dirty pages and drop the page cache (root only; otherwise warm numbers)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


UNITS = {"B": 1e-9, "KB": 1e-6, "MB": 1e-3, "GB": 1.0, "TB": 1e3}


def read_gb(stdout: str) -> float:
    """Input GB a merge read, from its closing line (``streammerge: read 5.93 GB, ...``)."""
    m = re.search(r"read ([0-9.]+) ([KMGT]?B)\b", stdout)
    return float(m.group(1)) * UNITS[m.group(2)] if m else 0.0


def timed(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the command itself, stdout)."""
    drop_caches()
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], capture_output=True, text=True,
                       check=False)  # fmt: skip
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{r.stderr[-2000:]}")
    rss_kib = int(r.stderr.strip().splitlines()[-1])
    return wall, rss_kib * 1024, r.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="trio directory (base/, a/, b/)")
    p.add_argument("--work", type=Path, default=None, help="outputs (default: DATA/sweep-bench)")
    p.add_argument("--draws", type=int, default=8, help="K")
    p.add_argument("--method", default="dare_linear", help="merge method")
    p.add_argument("--density", default=None, help="density (ties, DARE methods)")
    p.add_argument("--memory", default="256MiB", help="--memory of every run")
    p.add_argument("--seed", type=int, default=1, help="mask seed")
    p.add_argument("--sweep-seed", type=int, default=2, help="seed of the draws")
    args = p.parse_args(argv)
    work = args.work or args.data / "sweep-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    exe = [sys.executable, "-m", "streammerge.cli"]
    common = ["--method", args.method, "--memory", args.memory, "--quiet"]
    if args.density:
        common += ["--density", args.density]
    inputs = [str(args.data / "a"), str(args.data / "b"), "--base", str(args.data / "base")]
    sweep_out = work / "sweep"
    s_wall, s_rss, _ = timed([*exe, "sweep", *inputs, "-o", str(sweep_out), "--draws",
                              str(args.draws), "--seed", str(args.seed), "--sweep-seed",
                              str(args.sweep_seed), "--keep", "all", *common])  # fmt: skip
    doc = json.loads((sweep_out / "sweep.json").read_text())
    input_gb = doc["bytes_read"] / 1e9
    shutil.copy(sweep_out / "sweep.json", work / "sweep.json")
    shutil.rmtree(sweep_out)  # room for the separate merges
    m_wall, m_rss, m_gb = 0.0, 0, 0.0
    for k, d in enumerate(doc["draws"]):
        out = work / f"single-{k:02d}"
        w, rss, stdout = timed([*exe, *inputs, "-o", str(out), "--seed", str(args.seed),
                                "--lambda", repr(d["lambda"]), *common])  # fmt: skip
        m_wall += w
        m_rss = max(m_rss, rss)
        m_gb += read_gb(stdout)
        shutil.rmtree(out)
    rows = [
        (f"sweep, K = {args.draws} (+ fixed λ = 0.5)", s_wall, input_gb / s_wall, s_rss),
        (f"{args.draws} separate merges", m_wall, m_gb / m_wall, m_rss),
    ]
    print(f"inputs {input_gb:.2f} GB, method {args.method}, --memory {args.memory}")
    print("| contender | wall s | input GB/s | peak RSS |")
    print("|---|---|---|---|")
    for name, wall, gbps, rss in rows:
        print(f"| {name} | {wall:.1f} | {gbps:.2f} | {rss / 2**20:.0f} MiB |")
    print(f"sweep is {m_wall / s_wall:.2f}x faster than {args.draws} separate merges")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
