"""The GPU path's first run on a real GPU, one table to paste into an issue.

    bash bench/gpu_smoke.sh              # installs into .venv-gpu, then runs this
    python bench/gpu_smoke.py --size-gb 2 --methods dare_linear,ties

Steps (each row of the table; a failing step is reported, the others still run):

1. environment: GPU, its memory, torch / triton / CUDA versions;
2. the GPU tests: ``tests/test_gpu.py``, ``tests/test_triton_kernel.py``,
   ``tests/test_triton_stats.py``, ``tests/test_compiled_kernels.py``,
   ``tests/test_device_queue.py`` (CUDA runs happen in child processes without
   ``TRITON_INTERPRET``);
3. ``bench/bench_kernel.py``: the merge kernel's GB/s against a device-to-device copy;
4. end to end on a synthetic Llama-shaped trio of ``--size-gb`` per model
   (``bench/make_synthetic.py``, kept in ``--data``): for each method the merge on the
   GPU (``--device cuda --profile``) and on numba (``--device cpu``), wall seconds, input
   GB/s, peak RSS of each child, and whether every output shard is byte-identical.

Needs a CUDA GPU; without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ["tests/test_gpu.py", "tests/test_triton_kernel.py", "tests/test_triton_stats.py",
             "tests/test_compiled_kernels.py", "tests/test_device_queue.py"]  # fmt: skip


def _run(cmd: list[str], env: dict | None = None):
    """(returncode, stdout + stderr, wall seconds, peak RSS MiB of the child: its own
    rusage from ``os.wait4``)."""
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        return p.returncode, log.read(), wall, usage.ru_maxrss / 1024  # KiB on Linux


def environment() -> list[tuple[str, str]]:
    import torch

    rows = [("torch", torch.__version__), ("CUDA (torch)", str(torch.version.cuda))]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    rows.insert(0, ("GPU", (f"{p.name} (sm_{p.major}{p.minor}), {total / 2**30:.1f} GiB, "
                           f"{free / 2**30:.1f} GiB free")))  # fmt: skip
    return rows


def tests(env: dict) -> tuple[str, str]:
    code, out, wall, _ = _run([sys.executable, "-m", "pytest", "-q", *GPU_TESTS], env)
    summary = (out.strip().splitlines() or ["no output"])[-1]
    failed = [ln for ln in out.splitlines() if ln.startswith("FAILED")]
    return ("GPU tests", f"{'ok' if code == 0 else 'FAILED'}: {summary} ({wall:.0f} s)"
            + ("; " + "; ".join(failed[:5]) if failed else ""))  # fmt: skip


def kernel(env: dict) -> tuple[str, str]:
    code, out, _, _ = _run([sys.executable, "bench/bench_kernel.py", "--sizes", "1M,16M,64M"],
                           env)  # fmt: skip
    line = next((ln for ln in out.splitlines() if ln.startswith("Bandwidth achieved")), None)
    return ("kernel", line if code == 0 and line else f"FAILED ({code}): {out[-300:]}")


def end_to_end(args, env: dict) -> list[tuple[str, str]]:
    data = Path(args.data)
    if not (data / "b").exists():
        code, out, _, _ = _run([sys.executable, "bench/make_synthetic.py", str(data),
                                "--size-gb", str(args.size_gb)], env)  # fmt: skip
        if code:
            return [("end to end", f"FAILED making the trio: {out[-300:]}")]
    size = sum(f.stat().st_size for f in data.rglob("*.safetensors"))
    rows = []
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        extra = [] if method == "dare_linear" else ["--method", method, "--density", "0.5"]
        res = {}
        for side, dev in (("gpu", args.gpu_device), ("cpu", "cpu")):
            out = Path(args.work) / f"{method}-{side}"
            cmd = [sys.executable, "-m", "streammerge.cli", str(data / "a"), str(data / "b"),
                   "--base", str(data / "base"), "-o", str(out), "--overwrite", "--seed", "1",
                   "--device", dev, "--profile", *extra]  # fmt: skip
            res[side] = (*_run(cmd, env), out)
        (gc, gout, gwall, grss, gdir), (cc, cout, cwall, crss, cdir) = res["gpu"], res["cpu"]
        if gc or cc:
            rows.append(
                (f"e2e {method}", f"FAILED: gpu {gc} {gout[-300:]} | cpu {cc} {cout[-300:]}")
            )
            continue
        shards = sorted(p.name for p in cdir.glob("*.safetensors"))
        same = all(filecmp.cmp(gdir / s, cdir / s, shallow=False) for s in shards)
        prof = re.search(r"busy seconds per stage: (.*)", gout)
        rows.append((
            f"e2e {method}",
            (f"GPU {gwall:.1f} s ({size / 1e9 / gwall:.2f} GB/s, {grss:.0f} MiB) vs numba "
            f"{cwall:.1f} s ({size / 1e9 / cwall:.2f} GB/s, {crss:.0f} MiB): {cwall / gwall:.2f}x; "
            f"{len(shards)} shards {'byte-identical' if same else 'DIFFER'}; "
            f"{prof.group(1) if prof else ''}"),
        ))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="synthetic model size (GB)")
    ap.add_argument("--data", default=str(ROOT / "bench/data/trio-gpu"), help="trio directory")
    ap.add_argument("--work", default=str(ROOT / "bench/data/gpu-smoke"), help="outputs")
    ap.add_argument("--methods", default="dare_linear,ties,breadcrumbs_ties")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument(
        "--gpu-device",
        default="cuda",
        help="device of the GPU side (cpu: the script's own test, no GPU needed)",
    )
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        import torch

        ok = torch.cuda.is_available()
    except ImportError:
        ok = False
    if args.gpu_device == "cpu":  # exercising the script: end to end only, cpu against cpu
        rows = end_to_end(args, env)
    elif not ok:
        print("gpu_smoke: no CUDA GPU here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    else:
        rows = environment()
        if not args.skip_tests:
            rows.append(tests(env))
        rows.append(kernel(env))
        rows += end_to_end(args, env)
    print("\n| step | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {' '.join(v.replace('|', '/').split())} |")
    return 0 if all("FAILED" not in v and "DIFFER" not in v for _, v in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
