"""Bandwidth of the Triton merge kernel against the GPU's own copy bandwidth.

    python bench/bench_kernel.py                      # N = 2 bf16, p = 0.5, four sizes
    python bench/bench_kernel.py --models 3 --dtype f16 --sizes 1M,64M
    python bench/bench_kernel.py --sweep              # also time other (BLOCK, warps)

For each chunk size n the kernel merges N fine-tunes with a base (all of ``--dtype``, output
the same dtype) via ``merge_chunk_triton``, timed with ``triton.testing.do_bench`` (median
of its repetitions, L2 flushed between them). Bytes moved per launch = n x (base + N models
+ output) x itemsize: every byte the kernel must read or write, once. The reference is a
plain ``torch`` device-to-device copy that moves the same number of bytes (a buffer of half
that size, read once and written once), timed the same way: "% of copy" is the fraction of
the device's practical bandwidth the kernel reaches. Plain ``do_bench`` times include the
host's launch overhead when the GPU outruns it (small chunks); ``--cudagraph`` removes it.
Needs a CUDA GPU and Triton compiled for it (``TRITON_INTERPRET`` unset); without one it
says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
SWEEP = [(512, 4), (1024, 4), (2048, 4), (2048, 8), (4096, 8)]


def parse_size(s: str) -> int:
    """'16M' -> 16 * 2**20 elements; 'K', 'M', 'G' are powers of 2**10."""
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    s = s.strip().upper()
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def measure(bench, n: int, dtype, moved_bytes: int, args, configs) -> tuple[float, list]:
    """(copy ms, [(config, kernel ms)]) for one chunk size; buffers are freed on return.

    config None is the launcher's own choice; (BLOCK, warps) replaces
    ``triton_merge._launch_config`` for the timing (``--sweep``)."""
    import torch
    from streammerge.kernels import triton_merge
    from streammerge.kernels.triton_merge import merge_chunk_triton

    n_models = args.models

    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(n, device="cuda", generator=g).to(dtype)  # [n]
    models = torch.empty(n_models, n, device="cuda", dtype=dtype)  # [N, n], one row a model
    for r in range(n_models):
        models[r] = base + 0.01 * torch.randn(n, device="cuda", generator=g).to(dtype)
    out = torch.empty(n, device="cuda", dtype=dtype)  # [n]
    src = torch.empty(moved_bytes // 2, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src), rep=args.rep)
    recipe = {"key": 12345, "start": 2**32 - n // 2, "drop": [args.p] * n_models,
              "weights": [1.0 / n_models] * n_models, "scale": 1.0}  # fmt: skip
    default_config = triton_merge._launch_config
    timings = []
    for cfg in configs:
        triton_merge._launch_config = default_config if cfg is None else (lambda _n, c=cfg: c)
        try:
            merge_chunk_triton(base, models, out, **recipe)  # compile outside the timing
            ms = bench(lambda: merge_chunk_triton(base, models, out, **recipe), rep=args.rep)
        finally:
            triton_merge._launch_config = default_config
        timings.append((cfg, ms))
    return copy_ms, timings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=2, help="N fine-tunes per launch (default 2)")
    ap.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="dtype of the base, the fine-tunes and the output (default bf16)",
    )
    ap.add_argument(
        "--sizes",
        default="1M,16M,64M,256M",
        help="chunk sizes in elements, comma-separated, K/M/G = 2**10/20/30",
    )
    ap.add_argument("--p", type=float, default=0.5, help="drop rate of every model (default 0.5)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    ap.add_argument(
        "--cudagraph",
        action="store_true",
        help="time with triton.testing.do_bench_cudagraph: removes the host launch "
        "overhead (argument checks + Triton's launcher, tens of us) that dominates "
        "small chunks under plain do_bench",
    )
    ap.add_argument(
        "--sweep", action="store_true", help=f"also time each (BLOCK, num_warps) in {SWEEP}"
    )
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "bench_kernel: TRITON_INTERPRET=1 runs the kernel in numpy; unset it and run "
            "on a CUDA GPU to measure bandwidth",
            file=sys.stderr,
        )
        return 2
    import torch

    if not torch.cuda.is_available():
        print(
            "bench_kernel: no CUDA GPU on this machine; the kernel's bandwidth can only be "
            "measured on one (its correctness tests run on the CPU: "
            "TRITON_INTERPRET=1 pytest tests/test_triton_kernel.py)",
            file=sys.stderr,
        )
        return 2
    import triton.testing
    from rich.console import Console
    from rich.table import Table
    from streammerge.kernels import triton_merge

    bench = triton.testing.do_bench_cudagraph if args.cudagraph else triton.testing.do_bench

    dtype = getattr(torch, DTYPES[args.dtype])
    itemsize = torch.empty(0, dtype=dtype).element_size()
    n_models = args.models
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    configs = [None] + (SWEEP if args.sweep else [])
    dev = torch.cuda.get_device_name()

    table = Table(title=f"merge_chunk_triton on {dev}: N={n_models} {args.dtype}, p={args.p}")
    table.caption = "* the launcher's own choice; GB/s = bytes read + written / time"
    for col in ("elements", "block/warps", "MB", "kernel us", "GB/s", "copy us", "copy GB/s",
                "% of copy"):  # fmt: skip
        table.add_column(col, justify="right")
    best = None
    for n in sizes:
        moved_bytes = n * (n_models + 2) * itemsize
        copy_ms, timings = measure(bench, n, dtype, moved_bytes, args, configs)
        copy_gb_per_s = moved_bytes / (copy_ms * 1e-3) / 1e9
        for cfg, ms in timings:
            gb_per_s = moved_bytes / (ms * 1e-3) / 1e9
            block, warps = cfg or triton_merge._launch_config(n)
            table.add_row(
                f"{n:,}", f"{block}/{warps}" + ("" if cfg else " *"),
                f"{moved_bytes / 1e6:,.1f}", f"{ms * 1e3:,.0f}", f"{gb_per_s:,.0f}",
                f"{copy_ms * 1e3:,.0f}", f"{copy_gb_per_s:,.0f}",
                f"{100 * gb_per_s / copy_gb_per_s:.0f}%",
            )  # fmt: skip
            if cfg is None and (best is None or n > best[0]):
                best = (n, moved_bytes, ms, gb_per_s, copy_gb_per_s)  # the largest size
    Console().print(table)
    n, moved_bytes, ms, gb_per_s, copy_gb_per_s = best
    print(
        f"Bandwidth achieved: {gb_per_s:,.0f} GB/s at {n:,} elements "
        f"({moved_bytes / 1e6:,.0f} MB moved in {ms * 1e3:,.0f} us), "
        f"{100 * gb_per_s / copy_gb_per_s:.0f}% of the {copy_gb_per_s:,.0f} GB/s of a plain "
        f"device copy on {dev}; N={n_models} {args.dtype} p={args.p}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
