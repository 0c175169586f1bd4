"""CPU seconds per input GB, per pipeline stage, of each method on one trio, cold cache;
with ``--against REV``, the same for another revision side by side, printed as ratios.

    python bench/cpu_cost.py --data bench/data/trio-2gb [--methods dare_linear,ties]
        [--against 682b867] [--repeats 3] [--memory 256MiB]
        [--results bench/results/cpu_cost.md]

Each merge is ``streammerge --config RECIPE --profile`` (the recipes of
``bench_methods.RECIPES``) under GNU time (``bench_methods.timed``: the child's own user +
sys seconds and peak RSS), after dropping the page cache (``bench_merge.drop_caches``).
The per-stage split is ``--profile``'s "CPU seconds per stage" line (read: the reader
thread and its read threads; write: the writer thread; compute: the rest of the process
over the stream, numba's workers included; stats: the statistics passes' share of
compute); "other" = the child's total - those (start-up, imports, planning, finishing).
A revision without that line gets its total only.

``--against REV`` checks REV out into a scratch git worktree (``--scratch``), makes a venv
for it that reuses this interpreter's site-packages (a ``.pth`` file) and installs REV
there editable, without dependencies. Before the timed runs each revision merges a tiny
trio once per method, untimed (numba compiles into its cache). The timed runs alternate
revisions (ABBA order per repeat), so load from other processes falls on both alike; the
table gives medians. The O_DIRECT floor (``bench_merge.py _floor direct``: read every
input, write the output's bytes) is measured once per input set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_merge  # noqa: E402
import bench_methods  # noqa: E402

STAGES = ("read", "compute", "stats", "write", "other")
_CPU_LINE = re.compile(r"CPU seconds per stage: (.*?) \(process")


def parse_profile(log_text: str) -> dict[str, float]:
    """Stage -> CPU seconds from ``--profile``'s "CPU seconds per stage" line ({} if none)."""
    m = _CPU_LINE.search(log_text)
    if not m:
        return {}
    out = {}
    for part in m.group(1).split(", "):
        k, _, v = part.rpartition(" ")
        out[k.removesuffix("_cpu_s")] = float(v)
    return out


def scratch_revision(rev: str, scratch: Path) -> str:
    """A worktree of ``rev`` and a venv with it installed editable; returns its CLI path."""
    repo = HERE.parent
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    wt, venv = scratch / f"wt-{sha}", scratch / f"venv-{sha}"
    if not wt.exists():
        scratch.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "-q", "--detach", str(wt), sha],
                       check=True)  # fmt: skip
    cli = venv / "bin" / "streammerge"
    if not cli.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
        # this interpreter's packages (numpy, numba, ...): every site-packages on its path
        paths = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
        (site / "_devbase.pth").write_text("\n".join(paths) + "\n")
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "-e", str(wt)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import streammerge; print(streammerge.__file__)"],
                           check=True, capture_output=True, text=True, cwd="/").stdout  # fmt: skip
    if not where.startswith(str(wt)):
        raise SystemExit(f"the scratch venv imports streammerge from {where.strip()}, not {wt}")
    return str(cli)


def one_run(cli: str, method: str, data: Path, work: Path, args) -> dict:
    """One cold merge with ``--profile``: total CPU, peak RSS, wall and CPU per stage."""
    cfg = work / f"{method}.yml"
    cfg.write_text(bench_methods.recipe_yaml(method, data, args.dtype))
    out = work / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    bench_merge.drop_caches(args.drop_caches)
    log = work / f"run-{method}.log"
    cmd = [cli, "--config", str(cfg), "-o", str(out), "--memory", args.memory, "--seed", "7",
           "--profile"]  # fmt: skip
    r = bench_methods.timed(cmd, log, args.timeout)
    r["digest"] = output_digest(out)
    shutil.rmtree(out, ignore_errors=True)
    text = log.read_text(errors="replace")
    if r["rc"] != 0:
        raise SystemExit(f"{cli} {method} failed ({r['rc']}):\n{bench_merge.log_tail(log)}")
    st = parse_profile(text)
    if st:
        st["other"] = r["cpu_s"] - sum(v for k, v in st.items() if k != "stats")
        st["compute"] -= st.get("stats", 0.0)  # compute without the statistics passes
    r["stages"] = st
    return r


def output_digest(out: Path) -> str | None:
    """sha256 over the output's tensors in name order (name, dtype, shape, raw bytes), so
    that two revisions that lay out a shard differently (75f2fa0 took safetensors' writer
    order) still compare equal when every tensor is; None when there is no output."""
    tensors = {}
    for p in sorted(out.glob("*.safetensors")):
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            head = json.loads(f.read(n))
        head.pop("__metadata__", None)
        tensors.update({name: (p, 8 + n, info) for name, info in head.items()})
    if not tensors:
        return None
    h = hashlib.sha256()
    for name in sorted(tensors):
        p, data, info = tensors[name]
        lo, hi = info["data_offsets"]
        h.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
        with open(p, "rb") as f:
            f.seek(data + lo)
            left = hi - lo
            while left:
                block = f.read(min(left, 64 << 20))
                h.update(block)
                left -= len(block)
    return h.hexdigest()


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict], gb: float) -> dict:
    """Medians over repeats: CPU s/GB total and per stage, wall s, peak RSS MiB, load."""
    s = {"cpu": med([r["cpu_s"] for r in runs]) / gb, "wall": med([r["wall_s"] for r in runs]),
         "rss": max(r["rss_mib"] for r in runs), "load": med([r["load"] for r in runs]),
         "n": len(runs), "all": [r["cpu_s"] / gb for r in runs]}  # fmt: skip
    for st in STAGES:
        vals = [r["stages"][st] for r in runs if st in r["stages"]]
        s[st] = med(vals) / gb if vals else float("nan")
    return s


def _ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a stage neither revision spends time in)."""
    return a / b if b else float("nan")


def _f(x: float, spec: str = ".2f") -> str:
    return "-" if x != x else format(x, spec)


def table(rows: list[dict], revs: list[str]) -> str:
    """Markdown: one row per method and revision, then the ratio row (new / old)."""
    head = ["method", "revision", "CPU s/GB", *[f"{s} s/GB" for s in STAGES], "wall s",
            "x O_DIRECT floor", "peak RSS MiB", "runs (CPU s/GB each)", "load"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for rev in revs:
            s = row[rev]
            out.append("| " + " | ".join([
                row["method"], rev, _f(s["cpu"], ".3f"), *[_f(s[st], ".3f") for st in STAGES],
                _f(s["wall"], ".1f"), _f(row["floor_s"] / s["wall"]), _f(s["rss"], ".0f"),
                " ".join(_f(x, ".3f") for x in s["all"]), _f(s["load"], ".1f")]) + " |")  # fmt: skip
        if len(revs) == 2:
            new, old = row[revs[0]], row[revs[1]]
            out.append("| " + " | ".join([
                row["method"], f"**ratio {revs[0]} / {revs[1]}**", f"**{_f(new['cpu'] / old['cpu'])}**",
                *[_f(_ratio(new[st], old[st])) for st in STAGES], _f(new["wall"] / old["wall"]), "",
                _f(new["rss"] / old["rss"]),
                "same bytes" if row.get("same") else "**bytes differ**", ""]) + " |")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=HERE / "data" / "trio-2gb",
                    help="the trio (a, b, base): bench/make_synthetic.py")
    ap.add_argument("--methods", default="dare_linear,ties", help="comma-separated, or all")
    ap.add_argument("--against", default=None, help="another revision, measured side by side")
    ap.add_argument("--repeats", type=int, default=3, help="cold runs per method and revision")
    ap.add_argument("--memory", default="256MiB", help="streammerge's --memory")
    ap.add_argument("--streammerge", default=shutil.which("streammerge") or "streammerge",
                    help="this revision's CLI")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/sm-cpu-cost"),
                    help="where --against's worktree and venv go")
    ap.add_argument("--work", type=Path, default=HERE / "data" / "work-cpu-cost")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per merge, seconds")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the O_DIRECT floor")
    ap.add_argument("--no-warm-up", dest="warm", action="store_false",
                    help="skip the untimed tiny merges (numba's cache already holds the kernels)")
    ap.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                    help="leave the page cache (the runs are warm then)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the recipes' compute dtype (float32: the bytes of revisions before "
                    "SPEC 'Working dtype (v3)', e.g. 682b867)")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "cpu_cost.md")
    args = ap.parse_args(argv)
    args.prime = True
    methods = list(bench_methods.RECIPES) if args.methods == "all" else args.methods.split(",")
    bad = [m for m in methods if m not in bench_methods.RECIPES]
    if bad:
        ap.error(f"no recipe: {', '.join(bad)}")
    this = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "this"  # fmt: skip
    clis = {f"this ({this})": args.streammerge}
    if args.against:
        clis[args.against] = scratch_revision(args.against, args.scratch)
    revs = list(clis)
    args.work.mkdir(parents=True, exist_ok=True)
    for rev, cli in clis.items():
        if args.warm:
            ns = argparse.Namespace(**{**vars(args), "streammerge": cli})
            bench_methods.warm_up(methods, args.work / "warm", ns)
    rows, floors = [], {}
    for m in methods:
        gb = sum(f.stat().st_size for f in bench_methods.inputs_of(m, args.data)) / 1e9
        out_bytes = sum(f.stat().st_size for f in bench_merge.model_files(args.data / "a"))
        floor = bench_methods.floor_s(m, args.data, args.work, out_bytes, floors, args) \
            if args.floor else float("nan")  # fmt: skip
        runs: dict[str, list[dict]] = {r: [] for r in revs}
        for i in range(args.repeats):
            order = revs if i % 2 == 0 else revs[::-1]  # ABBA: neither revision always first
            for rev in order:
                r = one_run(clis[rev], m, args.data, args.work, args)
                runs[rev].append(r)
                print(f"{m} {rev}: {r['cpu_s'] / gb:.3f} CPU s/GB, {r['wall_s']:.1f} s, "
                      f"{r['rss_mib']:.0f} MiB, stages {r['stages']}", flush=True)  # fmt: skip
        digests = {r["digest"] for rs in runs.values() for r in rs}
        same = "the same bytes" if len(digests) == 1 else "NOT the same bytes"
        print(f"{m}: the outputs of every run are {same}", flush=True)
        rows.append({"method": m, "gb": gb, "floor_s": floor, "same": len(digests) == 1,
                     **{rev: summarize(runs[rev], gb) for rev in revs}})  # fmt: skip
    facts = bench_merge.machine_facts()
    text = (f"# CPU seconds per input GB\n\nGenerated by `python bench/cpu_cost.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"{', '.join(f'{k}: {v}' for k, v in facts.items())}.\n\n{table(rows, revs)}\n\n"
            "Medians of the cold runs (page cache dropped before each), revisions alternating. "
            "CPU s/GB = the child's user + sys seconds per GB of input (the method's input "
            "shards once each). Stages from `--profile` (see bench/cpu_cost.py); '-' = that "
            "revision does not report them. x O_DIRECT floor = floor seconds / wall seconds. "
            "load = the 1-minute load average after the run (the machine is shared).\n")  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(table(rows, revs))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
