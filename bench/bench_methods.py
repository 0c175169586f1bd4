"""One row per merge method on one synthetic Llama trio: streammerge's time as a fraction
of the O_DIRECT read floor, its CPU seconds per input GB, its peak RSS against
``--memory``, and mergekit 0.1.5's time and RSS on the same recipe, in the same run.

    python bench/bench_methods.py --data bench/data/trio-2gb \\
        [--methods all|slerp,ties,...] [--memory 256MiB] [--mergekit-bin PATH] \\
        [--results bench/results/methods.md]

Each method gets one mergekit YAML recipe (``RECIPES``: the parameters a user would
write), run as is by both tools (``streammerge --config``, ``mergekit-yaml``). Before the
timed runs every method merges a tiny trio once, untimed, so numba's first-run compile
is not counted (a user's second merge finds it cached). Per method, in this order: the
floor (read every input shard the method reads, 16 MiB reads, then write the output's
bytes with O_DIRECT: ``bench_merge.py _floor direct``), streammerge, mergekit; the page
cache is dropped before each (when this process may: root). The peak RSS and CPU
seconds are the child's own (GNU ``time -f "%M %U %S"``); the process baseline is the
largest peak RSS of the untimed merges of a 15 MB trio. Ratios are of runs made minutes apart on the same
machine: the table says what the load average was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_merge  # noqa: E402
import make_synthetic  # noqa: E402

#: method -> (base: "base", "a" or None; models; per-model parameters; shared parameters).
RECIPES: dict[str, tuple[str | None, tuple[str, ...], list[dict], dict]] = {
    "linear": (None, ("a", "b"), [{"weight": 0.5}, {"weight": 0.5}], {}),
    "task_arithmetic": ("base", ("a", "b"), [{"weight": 0.5}, {"weight": 0.5}], {}),
    "dare_linear": ("base", ("a", "b"), [{"weight": 0.5, "density": 0.5}] * 2, {}),
    "ties": ("base", ("a", "b"), [{"weight": 1.0, "density": 0.5}] * 2, {}),
    "dare_ties": ("base", ("a", "b"), [{"weight": 1.0, "density": 0.5}] * 2, {}),
    "breadcrumbs": ("base", ("a", "b"), [{"weight": 0.5, "density": 0.9, "gamma": 0.01}] * 2, {}),
    "breadcrumbs_ties": ("base", ("a", "b"),
                         [{"weight": 1.0, "density": 0.9, "gamma": 0.01}] * 2, {}),
    "della": ("base", ("a", "b"), [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 2,
              {"lambda": 1.0}),
    "della_linear": ("base", ("a", "b"), [{"weight": 0.5, "density": 0.5, "epsilon": 0.1}] * 2,
                     {"lambda": 1.0}),
    "slerp": ("a", ("a", "b"), [{}, {}], {"t": 0.5}),
    "nuslerp": (None, ("a", "b"), [{"weight": 0.5}, {"weight": 0.5}], {}),  # base optional: none
    "multislerp": ("base", ("a", "b"), [{"weight": 0.5}, {"weight": 0.5}], {}),
    "karcher": (None, ("a", "b"), [{}, {}], {}),
    "nearswap": ("a", ("a", "b"), [{}, {}], {"t": 0.001}),
    "ram": ("base", ("a", "b"), [{}, {}], {}),
    "ramplus_tl": ("base", ("a", "b"), [{}, {}], {}),
    "model_stock": ("base", ("a", "b"), [{}, {}], {}),
    "sce": ("base", ("a", "b"), [{}, {}], {"select_topk": 0.5}),
    "arcee_fusion": ("base", ("a",), [{}], {}),
}


def recipe_yaml(method: str, data: Path, dtype: str = "bfloat16") -> str:
    """The mergekit recipe of ``method`` over the trio in ``data`` (bf16 in; ``dtype:``
    the recipe's compute dtype: bfloat16 is mergekit's bytes, float32 the bytes of
    revisions before SPEC "Working dtype (v3)")."""
    base, models, per_model, shared = RECIPES[method]
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {json.dumps(str(data / base))}")
    lines.append("models:")
    for role, params in zip(models, per_model):
        lines.append(f"  - model: {json.dumps(str(data / role))}")
        if params:
            lines.append(f"    parameters: {json.dumps(params)}")
    if shared:
        lines.append(f"parameters: {json.dumps(shared)}")
    lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


def inputs_of(method: str, data: Path) -> list[Path]:
    """Every shard file the method reads (its base and models, once each)."""
    base, models, _, _ = RECIPES[method]
    roles = dict.fromkeys(([base] if base else []) + list(models))
    return [f for r in roles for f in bench_merge.model_files(data / r)]


def timed(cmd: list[str], log: Path, timeout: float, env=None) -> dict:
    """Run ``cmd`` under GNU time: exit code, wall s, the child's own peak RSS (MiB) and CPU
    seconds (user + sys)."""
    from streammerge.vector_width import users_environ

    stats = log.with_suffix(".time")
    full = ["/usr/bin/time", "-o", str(stats), "-f", "%M %U %S", *cmd]
    # numba's target as the user has it: not the one this process's own import of
    # streammerge chose (another revision under test makes its own choice)
    env = users_environ(env)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        try:
            rc = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env=env, check=False).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = -9
    wall = time.perf_counter() - t0
    try:
        kib, user, sys_s = stats.read_text().split()[-3:]
        rss, cpu = int(kib) / 1024, float(user) + float(sys_s)
    except (OSError, ValueError):
        rss = cpu = float("nan")
    return {"rc": rc, "wall_s": wall, "rss_mib": rss, "cpu_s": cpu,
            "load": os.getloadavg()[0]}  # fmt: skip


def floor_s(method: str, data: Path, work: Path, out_bytes: int, cache: dict, args) -> float:
    """The O_DIRECT floor of the method's inputs (read + write seconds), cached per input set."""
    files = inputs_of(method, data)
    key = tuple(map(str, files))
    if key not in cache:
        bench_merge.drop_caches(True)
        r = bench_merge.run_floor("direct", files, out_bytes, work, args)
        cache[key] = r.time_s if r.ok else float("nan")
    return cache[key]


def run_tool(tool: str, method: str, data: Path, work: Path, args) -> dict:
    """One merge of ``method`` by ``tool`` (``streammerge`` or ``mergekit``), cold cache."""
    cfg = work / f"{method}.yml"
    cfg.write_text(recipe_yaml(method, data))
    out = work / f"out-{tool}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    if tool == "streammerge":
        cmd = [args.streammerge, "--config", str(cfg), "-o", str(out), "--memory", args.memory]
        env = None
    else:
        cmd = [args.mergekit_bin, str(cfg), str(out), "--random-seed", "0",
               "--no-copy-tokenizer"]  # fmt: skip
        env = {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
    bench_merge.drop_caches(True)
    r = timed(cmd, work / f"{tool}-{method}.log", args.timeout, env)
    shutil.rmtree(out, ignore_errors=True)
    return r


def warm_up(methods: list[str], work: Path, args) -> float:
    """Merge a tiny trio (15 MB) once per method, untimed: numba compiles each kernel once.
    Returns the process baseline: the largest peak RSS (MiB) of a second tiny merge of each
    (the interpreter, numpy, numba and the cached kernels; next to nothing of data)."""
    tiny = work / "tiny"
    if not (tiny / "base").exists():
        make_synthetic.make_trio(tiny, 0.005, None, "bf16", 0)
    baseline = 0.0
    for m in methods:
        cfg = work / f"warm-{m}.yml"
        cfg.write_text(recipe_yaml(m, tiny))
        out = work / f"warm-{m}"
        for _compile_then_measure in range(2):  # the first run may compile (LLVM's memory)
            r = timed([args.streammerge, "--config", str(cfg), "-o", str(out), "--overwrite"],
                      work / f"warm-{m}.log", 1800)  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
        baseline = max(baseline, r["rss_mib"])
    return baseline


def _fmt(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)  # NaN: not measured


def table(rows: list[dict], baseline_mib: float, args) -> str:
    """The markdown table of the rows: one per method."""
    out = ["| method | GB read | streammerge s | x O_DIRECT floor | CPU s/GB | peak RSS MiB "
           "(budget) | mergekit s | mergekit peak RSS MiB | x faster than mergekit | load |",
           "|" + "---|" * 10]  # fmt: skip
    budget = bench_merge.memory_mib(args) + baseline_mib
    for r in rows:
        sm, mk, gb = r["sm"], r.get("mk"), r["gb"]
        sm_s = _fmt(sm["wall_s"], ".1f") + ("" if sm["rc"] == 0 else f" (failed {sm['rc']})")
        floor = r["floor_s"] / sm["wall_s"] if sm["rc"] == 0 else float("nan")
        if mk is None:
            mk_s, mk_rss, speed = "-", "-", "-"
        elif mk["rc"] != 0:
            mk_s, mk_rss, speed = f"failed ({mk['rc']})", "-", "-"
        else:
            mk_s, mk_rss = _fmt(mk["wall_s"], ".1f"), _fmt(mk["rss_mib"], ".0f")
            speed = _fmt(mk["wall_s"] / sm["wall_s"], ".1f") if sm["rc"] == 0 else "-"
        out.append(f"| {r['method']} | {gb:.2f} | {sm_s} | {_fmt(floor, '.2f')} | "
                   f"{_fmt(sm['cpu_s'] / gb, '.2f')} | {_fmt(sm['rss_mib'], '.0f')} "
                   f"({budget:.0f}) | {mk_s} | {mk_rss} | {speed} | {sm['load']:.1f} |")
    out += ["", f"Budget = `--memory` ({args.memory}) + the process baseline ({baseline_mib:.0f} "
            "MiB: the largest peak RSS of the same merges on a 15 MB trio, run first). x O_DIRECT floor = floor seconds / "
            "streammerge seconds (1.0 = as fast as reading every input and writing the output "
            "with O_DIRECT). CPU s/GB = the child's user + sys seconds per GB read."]
    return "\n".join(out)


def measure(methods: list[str], data: Path, work: Path, args, done=None) -> list[dict]:
    """Per method: the floor, streammerge, then mergekit (when given), each cold; ``done(rows)``
    after each method (the table so far is written as it grows)."""
    rows, floors = [], {}
    for m in methods:
        gb = sum(f.stat().st_size for f in inputs_of(m, data)) / 1e9
        out_bytes = sum(f.stat().st_size for f in bench_merge.model_files(data / "a"))
        row = {"method": m, "gb": gb,
               "floor_s": floor_s(m, data, work, out_bytes, floors, args),
               "sm": run_tool("streammerge", m, data, work, args)}  # fmt: skip
        if args.mergekit_bin:
            row["mk"] = run_tool("mergekit", m, data, work, args)
        print(f"{m}: {json.dumps({k: v for k, v in row.items() if k != 'method'})}", flush=True)
        rows.append(row)
        if done is not None:
            done(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure each method and write the table (markdown) to ``--results``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=HERE / "data" / "trio-2gb",
                    help="the trio (a, b, base): bench/make_synthetic.py")
    ap.add_argument("--methods", default="all", help="all, or a comma-separated list")
    ap.add_argument("--memory", default="256MiB", help="streammerge's --memory")
    ap.add_argument("--mergekit-bin", default=None, help="mergekit-yaml (none: skip mergekit)")
    ap.add_argument("--streammerge", default=shutil.which("streammerge") or "streammerge",
                    help="the streammerge CLI")
    ap.add_argument("--work", type=Path, default=HERE / "data" / "work-methods")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per merge, seconds")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "methods.md")
    args = ap.parse_args(argv)
    args.drop_caches, args.prime = True, True
    from streammerge.methods.registry import METHODS

    methods = [m for m in RECIPES if m in METHODS] if args.methods == "all" \
        else args.methods.split(",")  # fmt: skip
    unknown = [m for m in methods if m not in RECIPES or m not in METHODS]
    if unknown:
        ap.error(f"no recipe or no such method: {', '.join(unknown)}")
    args.work.mkdir(parents=True, exist_ok=True)
    baseline = warm_up(methods, args.work, args)
    facts = bench_merge.machine_facts()
    head = (f"# Every method on the 2 GB trio\n\nGenerated by `python bench/bench_methods.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}` on "
            f"{time.strftime('%Y-%m-%d')}; {', '.join(f'{k}: {v}' for k, v in facts.items())}."
            "\n\n")  # fmt: skip

    def write(rows: list[dict]) -> None:
        todo = len(methods) - len(rows)
        tail = f"\n\n({todo} of {len(methods)} methods not measured yet.)" if todo else ""
        args.results.write_text(head + table(rows, baseline, args) + tail + "\n")

    rows = measure(methods, args.data, args.work, args, write)
    print(table(rows, baseline, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
