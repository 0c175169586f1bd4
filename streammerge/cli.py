"""``streammerge MODEL MODEL... --base DIR -o OUT``: the command line around ``merge``."""

from __future__ import annotations

import argparse
import os
import sys
import threading

from streammerge import __version__
from streammerge.errors import OneLineArgumentParser, guarded_main, report
from streammerge.sizes import format_bytes


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every flag has help)."""
    p = OneLineArgumentParser(
        prog="streammerge",
        description="Merge fine-tunes of a common base with Mixup Model Merge (M3) + DARE, "
        "streaming tensors chunk by chunk in flat memory (shared/SPEC.md).",
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="fine-tune directories (HF layout), model 0, 1, ...",
    )
    p.add_argument("--base", required=True, metavar="DIR", help="the common base model directory")
    p.add_argument(
        "-o",
        "--output",
        default="merged",
        metavar="OUT",
        help="output directory, created (default: ./merged; never replaced without --overwrite)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="Beta(α,α) concentration of the mixup ratio λ (default 1.0)",
    )
    p.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=None,
        help="fixed mixup ratio λ: w = (λ, 1-λ) (2 models)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="fixed weights w, comma-separated, one per model (task arithmetic)",
    )
    p.add_argument(
        "--drop",
        default="0.5",
        help="DARE drop rate p: one value or one per model, e.g. 0.3,0.6 (default 0.5)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="scaling coefficient s of the mixed task vector (default 1.0)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed in [0, 2**64) (default: drawn from the OS, printed)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="output dtype of float tensors: bf16, fp16, fp32 (default: the base's)",
    )
    p.add_argument(
        "--shard-size", default="5GB", help="largest output shard, e.g. 500MB, 5GB (default 5GB)"
    )
    p.add_argument(
        "--memory",
        default="256MiB",
        help="budget for all I/O buffers, e.g. 256MiB, 1GB (default 256MiB)",
    )
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to merge: cuda when available (auto, the default), cpu, or cuda",
    )
    p.add_argument(
        "--vram",
        default=None,
        help="GPU buffer budget, e.g. 2GB (default: a quarter of free GPU memory, at most 4GiB)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "numba", "triton"),
        default="auto",
        help="kernel: numba (CPU) or triton (GPU; with TRITON_INTERPRET=1 it runs on the CPU: "
        "the test path); auto picks triton on a GPU, else numba",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted merge into the same output"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output / discard an interrupted merge",
    )
    p.add_argument(
        "--no-copy-files",
        dest="copy_files",
        action="store_false",
        help="do not copy config/tokenizer files from the base",
    )
    p.add_argument(
        "--buffered-io",
        dest="direct_io",
        action="store_false",
        help="write with the page cache, not O_DIRECT",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="keep NaN/Inf values the merge produces (by default they stop it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the closing line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument(
        "--profile", action="store_true", help="also print the seconds each pipeline stage was busy"
    )
    p.add_argument("--version", action="version", version=f"streammerge {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted, 1 a bug)."""
    return guarded_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from streammerge.api import merge

    err = Console(stderr=True, highlight=False, soft_wrap=True)  # one line per message
    progress = (
        None
        if args.quiet or not err.is_terminal  # a bar on a pipe only leaves a blank line
        else Progress(
            TextColumn("merging"),
            BarColumn(),
            DownloadColumn(binary_units=False),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
    )
    task = None
    lock = threading.Lock()

    def on_start(plan, total_bytes: int) -> None:
        nonlocal task
        r = plan.recipe
        if args.quiet:
            return
        if args.seed is None:
            err.print(f"streammerge: seed {r.seed} (pass --seed {r.seed} to repeat this merge)")
        err.print(f"streammerge: writing {os.path.abspath(args.output)}")
        for line in plan.vocab_rules:
            err.print(f"streammerge: vocabulary rule: {line}")
        if plan.base_only:
            err.print(
                f"streammerge: copied from the base (no fine-tune has them): {', '.join(plan.base_only)}"
            )
        if progress is not None:
            progress.start()
            task = progress.add_task("merge", total=total_bytes)

    def on_bytes(n: int) -> None:
        if progress is not None and task is not None:
            with lock:
                progress.advance(task, n)

    try:
        s = merge(
            args.models,
            args.base,
            args.output,
            alpha=args.alpha,
            lam=args.lam,
            weights=args.weights,
            drop=args.drop,
            scale=args.scale,
            seed=args.seed,
            dtype=args.dtype,
            shard_size=args.shard_size,
            memory=args.memory,
            threads=args.threads,
            backend=args.backend,
            device=args.device,
            vram=args.vram,
            overwrite=args.overwrite,
            resume=args.resume,
            copy_files=args.copy_files,
            direct_io=args.direct_io,
            allow_nonfinite=args.allow_nonfinite,
            on_start=on_start,
            on_bytes=on_bytes,
        )
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - each failure: one line
        if progress is not None and task is not None:
            progress.stop()
        return report(e, args.output, args.debug)
    if progress is not None and task is not None:
        progress.stop()
    lam = f"λ {s.weights[0]:.6g}, " if len(s.weights) == 2 and s.method != "task_arithmetic" else ""
    print(
        f"streammerge: read {format_bytes(s.bytes_read)}, wrote {format_bytes(s.bytes_written)} "
        f"in {s.seconds:.2f} s ({s.gb_per_s:.2f} GB/s), peak RSS {s.peak_rss_bytes / 2**20:.0f} MiB, "
        f"seed {s.seed}, {lam}w ({', '.join(f'{w:.6g}' for w in s.weights)}), "
        f"p ({', '.join(f'{p:g}' for p in s.drop)}), {s.method} -> {s.out}"
        + (f" ({s.resumed_shards} shard(s) resumed)" if s.resumed_shards else ""),
        flush=True,
    )
    if args.profile:
        busy = ", ".join(f"{k} {v:.2f}" for k, v in s.stage_seconds.items())
        print(
            f"streammerge: busy seconds per stage: {busy} (of {s.seconds:.2f} s wall)", flush=True
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
