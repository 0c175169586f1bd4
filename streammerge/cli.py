"""``streammerge MODEL MODEL... --base DIR -o OUT``: the command line around ``merge``."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading

from streammerge import __version__
from streammerge.errors import (
    PREFIX,
    MergeError,
    OneLineArgumentParser,
    guarded_main,
    report,
)
from streammerge.methods import METHODS
from streammerge.sizes import format_bytes


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every flag has help)."""
    p = OneLineArgumentParser(
        prog="streammerge",
        description="Merge fine-tunes of a common base (task arithmetic, DARE, TIES, "
        "breadcrumbs, linear), each with Mixup Model Merge (M3) weights or given ones, "
        "streaming tensors chunk by chunk in flat memory. The exact contract: docs/SPEC.md "
        "in the streammerge repository. Subcommand: streammerge sweep merges K mixup draws "
        "from one read, scores each with your evaluator and keeps the best (see "
        "streammerge sweep --help).",
        epilog="methods: "
        + "; ".join(
            f"{m.name} ({m.sparsifier} + {m.consensus} consensus, normalize "
            f"{'on' if m.normalize else 'off'})"
            for m in METHODS.values()
        ),
    )
    p.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="fine-tune directories (HF layout), model 0, 1, ... (or --config)",
    )
    p.add_argument(
        "--config",
        metavar="RECIPE.yml",
        default=None,
        help="a mergekit YAML recipe (merge_method, base_model, models, parameters, dtype, "
        "out_dtype, tokenizer_source; streammerge's own keys under streammerge:)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="dry run: read headers only, print the per-tensor plan, bytes, memory and "
        "expected time, write nothing",
    )
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="merge the output shards as tasks on a Ray cluster: auto joins a running one, an "
        "address names one, no value starts a local Ray instance (pip install 'streammerge[ray]')",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="DIR",
        help="the common base model directory (every method but linear needs it)",
    )
    p.add_argument(
        "--method",
        choices=tuple(METHODS),
        default=None,
        help="merge method (default dare_linear, with drop rate 0.5 unless --drop/--density)",
    )
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
        help="fixed weights w, comma-separated, one per model (default: drawn by M3)",
    )
    p.add_argument(
        "--drop",
        default=None,
        help="DARE drop rate p: one value or one per model, e.g. 0.3,0.6 (default 0.5; "
        "dare_linear and dare_ties)",
    )
    p.add_argument(
        "--density",
        default=None,
        help="density rho (fraction kept): one or per model; ties/breadcrumbs keep by "
        "magnitude, DARE methods drop at rate 1-rho (default 1.0; DARE: 0.5)",
    )
    p.add_argument(
        "--gamma",
        default=None,
        help="breadcrumbs: fraction of largest magnitudes removed, one or per model (default 0.01)",
    )
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="divide by the sum of the weights that took part (default per method: on for "
        "linear and ties, off otherwise, as mergekit)",
    )
    p.add_argument(
        "--trim-scope",
        choices=("tensor", "model"),
        default="tensor",
        help="population of the magnitude thresholds: each tensor (mergekit, default) or the "
        "whole model (the TIES and M3 papers)",
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
        "--http-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="inputs by http(s):// URL: seconds to wait to connect or for the next bytes "
        "before a request is retried (a few times, then the run stops) (default 30)",
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
        "--profile",
        action="store_true",
        help="also print the seconds each pipeline stage was busy (on a GPU also each stream: "
        "h2d_s, kernel_s, d2h_s, and device_wait_s, the host waiting on the device)",
    )
    p.add_argument("--version", action="version", version=f"streammerge {__version__}")
    return p


#: Flags that set the recipe (the rest set how the merge runs: api.Options).
FLAG_RECIPE_KEYS = (
    "method", "seed", "alpha", "lam", "weights", "density", "drop", "gamma", "scale",
    "normalize", "trim_scope", "dtype",
)  # fmt: skip


#: Options that change how a run goes, not what it writes: left out of the command the
#: model card gives (the card of a resumed or re-run merge must not change with them).
RUN_CONTROL = {
    "--resume", "--overwrite", "--quiet", "--debug", "--profile", "--memory", "--threads",
    "--backend", "--device", "--vram", "--buffered-io", "--ray", "--http-timeout",
}  # fmt: skip


def repeatable_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` as typed, without the ``RUN_CONTROL`` options (and their values)."""
    takes_value = {o: a.nargs != 0 for a in parser._actions for o in a.option_strings}
    out, skip = [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        flag = word.split("=", 1)[0]
        if flag in RUN_CONTROL:
            action = next((a for a in parser._actions if flag in a.option_strings), None)
            # a value follows unless given with "=", or the option takes none (or optional)
            skip = "=" not in word and takes_value.get(flag, False) and action is not None \
                and action.nargs != "?" and i + 1 < len(argv)  # fmt: skip
            if action is not None and action.nargs == "?" and i + 1 < len(argv) \
                    and not argv[i + 1].startswith("-"):  # fmt: skip
                skip = True
            continue
        out.append(word)
    return out


def recipe_inputs(args, parser, notice, argv: list[str]):
    """(models, base, recipe kwargs, Provenance) from the flags or a ``--config`` recipe.

    Raises:
        MergeError: a recipe error (one line, key and line), or flags that conflict.
    """
    import shlex

    from streammerge.api import Provenance

    command = shlex.join(["streammerge", *repeatable_argv(parser, argv)])
    if args.config is None:
        if len(args.models) < 2:
            raise MergeError(f"need at least 2 fine-tunes, got {len(args.models)}", None, None,
                             "pass two or more model directories (or --config RECIPE.yml)")  # fmt: skip
        kwargs = {k: getattr(args, k) for k in FLAG_RECIPE_KEYS}
        kwargs["source"] = "cli"
        labels = ([args.base] if args.base is not None else []) + list(args.models)
        return args.models, args.base, kwargs, Provenance(None, tuple(labels), command)
    from streammerge.mergekit_yaml import load_recipe

    if args.models or args.base:
        raise MergeError("--config names the models and the base", args.config, None,
                         "drop the MODEL arguments and --base")  # fmt: skip
    clash = [
        k for k in FLAG_RECIPE_KEYS if k != "seed" and getattr(args, k) != parser.get_default(k)
    ]
    if clash:
        flag = "--" + clash[0].replace("_", "-").replace("lam", "lambda")
        raise MergeError(f"{flag} conflicts with --config", args.config, None,
                         "put it in the recipe (streammerge: block for seed, mixup, trim_scope)")  # fmt: skip
    yr = load_recipe(args.config, notice)
    kwargs = dict(yr.recipe)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    prov = Provenance(yr.text, tuple(yr.labels), command, yr.tokenizer_model)
    return [str(m) for m in yr.models], yr.base, kwargs, prov


def build_sweep_parser() -> argparse.ArgumentParser:
    """``streammerge sweep``: the merge flags, plus the draws, the evaluator and what to keep."""
    p = build_parser()
    p.prog = "streammerge sweep"
    p.description = (
        "M3 without the lottery: merge K mixup draws (Beta for 2 models, Dirichlet for more) "
        "from one read of the inputs, score each with your evaluator, keep the best. Every "
        "draw shares one mask seed, so each is exactly the single merge its row names."
    )
    p.epilog = (
        "Disk: all K + 1 outputs exist at once (--keep best removes the others only once every "
        "output is scored); the free-space check counts them all. Streams: notices and the "
        "table of draws on stderr, the closing lines (the command repeating the sweep, the "
        "best draw's) on stdout. Exit codes: 0 done; 2 bad input (one line, nothing written); "
        "3 an evaluator ran and no draw was scored: every output is kept, since none could be "
        "chosen, and one line gives the first failure; 130 interrupted; 1 a bug."
    )
    for action in p._actions:  # the single merge's help, as a sweep uses the flag
        if action.dest == "seed":
            action.help = ("mask seed shared by every draw, in [0, 2**64) (default: derived "
                           "from --sweep-seed, so that one seed repeats the sweep)")  # fmt: skip
    p.set_defaults(output="sweep")
    p.add_argument("--draws", type=int, default=8, help="number of draws K (default 8)")
    p.add_argument("--grid", action="store_true", help="evenly spaced λ in [0, 1] (2 models)")
    p.add_argument(
        "--sweep-seed",
        type=int,
        default=None,
        help="seed of the K draws, and of the masks without --seed: the same --sweep-seed "
        "repeats the sweep byte for byte (default: from the OS, printed)",
    )
    p.add_argument(
        "--eval",
        dest="eval_cmd",
        default=None,
        metavar="CMD",
        help="command scoring one output, run without a shell: split into words like a shell "
        "would, then {out} replaced by the output directory inside each word (it stays one "
        "argument whatever it contains, so quoting it is unnecessary and harmless; shell syntax "
        "such as pipes needs sh -c '...'); its last stdout line is a finite number or a JSON "
        'object of named numbers (e.g. "python score.py {out}")',
    )
    p.add_argument(
        "--eval-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="seconds one evaluation may take (default 3600); then the evaluator's whole "
        "process group is killed and the draw recorded as failed",
    )
    p.add_argument("--eval-select", default=None, help="the named score to maximize")
    p.add_argument(
        "--keep",
        choices=("best", "all"),
        default="best",
        help="keep only the best draw's output (and the fixed reference) once every output "
        "is scored, or all (default best; all are kept when no draw was scored)",
    )
    return p


def sweep_main(argv: list[str]) -> int:
    """``streammerge sweep A B ... --base C --draws K [--eval CMD]``.

    Streams as the single merge: notices and the table of draws on stderr (the table live on
    a terminal, else printed once at the end; none with --quiet), the closing lines on
    stdout, each error one line on stderr. Exit codes: 0 done, 2 bad input (nothing
    written), 3 (``sweep.EXIT_NOTHING_SCORED``) an evaluator ran and no draw was scored
    (every output kept), 130 interrupted, 1 a bug.
    """
    parser = build_sweep_parser()
    args = parser.parse_args(argv)
    if args.config is None and len(args.models) < 2:
        parser.error(f"the following arguments are required: MODEL MODEL (at least 2 fine-tune "
                     f"directories, got {len(args.models)})")  # fmt: skip
    from streammerge.api import OPTION_KEYS, Options
    from streammerge.sweep import EXIT_NOTHING_SCORED, CommandEvaluator, describe_sweep, sweep

    if args.config is not None:
        return report(MergeError("sweep takes models and flags, not --config", None, None,
                                 "give the models and flags"), args.output)  # fmt: skip
    if args.weights is not None or args.lam is not None:
        return report(MergeError("a sweep draws the weights: drop --weights/--lambda", None,
                                 None, "use --alpha, --draws or --grid"), args.output)  # fmt: skip
    recipe = {k: getattr(args, k) for k in FLAG_RECIPE_KEYS
              if k not in ("weights", "lam", "alpha", "seed") and getattr(args, k) is not None}  # fmt: skip
    view = _SweepView(args)
    try:
        evaluate = (
            CommandEvaluator(args.eval_cmd, args.eval_select, args.eval_timeout)
            if args.eval_cmd is not None
            else None
        )
        options = Options(**{k: getattr(args, k) for k in OPTION_KEYS})
        common = dict(draws=args.draws, grid=args.grid, alpha=args.alpha, seed=args.seed,
                      evaluate=evaluate, keep=args.keep, options=options, **recipe)  # fmt: skip
        if args.plan:
            geometry, device = plan_geometry(options)
            d = describe_sweep(args.models, args.base, args.output, sweep_seed=args.sweep_seed,
                               geometry=geometry, device=device, **common)  # fmt: skip
            return _print_plan(d, args.json)
        from streammerge.recipe import draw_seed

        sweep_seed = draw_seed() if args.sweep_seed is None else args.sweep_seed
        r = sweep(args.models, args.base, args.output, sweep_seed=sweep_seed,
                  eval_select=args.eval_select, on_draw=view.row,
                  on_start=lambda _: view.start(sweep_seed), ray_address=args.ray, **common)  # fmt: skip
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - each failure: one line
        view.stop()
        return report(e, args.output, args.debug)
    view.stop()
    return _sweep_closing(r, EXIT_NOTHING_SCORED)


class _SweepView:
    """The sweep's stderr: the seed notice and the table of draws (live on a terminal,
    else printed once at the end; nothing with --quiet)."""

    def __init__(self, args) -> None:
        from rich.console import Console
        from rich.table import Table

        self.args = args
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.table = Table("draw", "λ / w", "score", "note", title="streammerge sweep")
        self.live = None
        self.started = False

    def start(self, sweep_seed: int) -> None:
        """After every check, before the merge: the seed notice, the live table."""
        if self.args.quiet or self.started:
            return
        self.started = True
        if self.args.sweep_seed is None:
            self.err.print(f"streammerge: sweep seed {sweep_seed} (pass --sweep-seed "
                           f"{sweep_seed} to repeat this sweep)")  # fmt: skip
        self.err.print(f"streammerge: writing {os.path.abspath(self.args.output)}")
        if self.err.is_terminal:
            from rich.live import Live

            self.live = Live(self.table, console=self.err, transient=False)
            self.live.start()

    def row(self, d) -> None:
        """One scored (or merged) draw."""
        w = f"{d.lam:.4f}" if d.lam is not None else " ".join(f"{x:.3f}" for x in d.weights)
        score = "" if d.score is None else f"{d.score:.6g}"
        self.table.add_row(d.name, w, score, d.error or "")

    def stop(self) -> None:
        """The table's final state, ending with a newline (nothing when no row came)."""
        if self.live is not None:
            self.live.stop()  # on a terminal: leaves the table and a newline
            self.live = None
        elif not self.args.quiet and self.table.row_count:
            self.err.print(self.table)


def _sweep_closing(r, exit_nothing_scored: int) -> int:
    """The closing lines on stdout (and, when no draw was scored, the one error line)."""
    best = r.draws[r.best] if r.best is not None else None
    print(
        f"streammerge: sweep of {len(r.draws) - 1} draws read {format_bytes(r.bytes_read)} once "
        f"in {r.seconds:.2f} s, peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB, seed {r.seed}, "
        f"sweep seed {r.sweep_seed} -> {os.path.abspath(r.out)}",
        flush=True,
    )
    print(f"streammerge: repeat this sweep with: {r.command}", flush=True)
    if best is not None:
        print(f"streammerge: best {best.name} (score {best.score:.6g}); repeat it with: "
              f"{best.command}", flush=True)  # fmt: skip
    if r.unscored is None:
        return 0
    print(f"{PREFIX}no draw was scored ({r.unscored}): all {len(r.draws)} outputs are kept "
          f"in {os.path.abspath(r.out)}, none could be chosen: fix the evaluator, then score "
          "them or re-run", file=sys.stderr, flush=True)  # fmt: skip
    return exit_nothing_scored


def _print_plan(d: dict, as_json: bool) -> int:
    """Print a sweep's plan (``sweep.describe_sweep``) on stdout."""
    import json

    from streammerge.sweep import format_sweep_plan

    print(json.dumps(d, indent=2, sort_keys=True) if as_json else format_sweep_plan(d), end="\n"
          if as_json else "")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted, 1 a bug)."""
    return guarded_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from streammerge.api import OPTION_KEYS, Options, merge

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

    def notice(line: str) -> None:
        if not args.quiet:
            err.print(f"streammerge: {line}")

    try:
        models, base, kwargs, prov = recipe_inputs(args, parser, notice, argv)
        options = Options(**{k: getattr(args, k) for k in OPTION_KEYS})
        if args.plan:
            return show_plan(models, base, args.output, kwargs, options, prov, args.json)
        if args.ray is not None:
            from streammerge.distributed import merge_ray

            run_merge = functools.partial(merge_ray, address=args.ray)
        else:
            run_merge = merge
        s = run_merge(
            models,
            base,
            args.output,
            options=options,
            on_start=on_start,
            on_bytes=on_bytes,
            provenance=prov,
            **kwargs,
        )
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - each failure: one line
        if progress is not None and task is not None:
            progress.stop()
        return report(e, args.output, args.debug)
    if progress is not None and task is not None:
        progress.stop()
    if s.already_complete:
        return 0  # finalize said so in one line; there is no run to report
    print(closing_line(s), flush=True)
    if args.profile:
        busy = ", ".join(f"{k} {v:.2f}" for k, v in s.stage_seconds.items())
        print(
            f"streammerge: busy seconds per stage: {busy} (of {s.seconds:.2f} s wall)", flush=True
        )
    return 0


def show_plan(models, base, out, kwargs, options, prov, as_json: bool) -> int:
    """``--plan``: prepare from headers (every check of a real run), print, write nothing."""
    import json

    from streammerge import dryrun
    from streammerge.api import layout_for, prepare

    prep = prepare(models, base, out, kwargs, options, prov)
    geometry, device = plan_geometry(options)
    d = dryrun.describe(prep, layout_for(prep, geometry), device=device)
    print(json.dumps(d, indent=2, sort_keys=True) if as_json else dryrun.format_plan(d))
    return 0


def plan_geometry(options) -> tuple[object, str]:
    """(buffer geometry, ``cpu`` or ``cuda``) a run with ``options`` would have, for
    ``--plan``: a CUDA run's when it would use a GPU (no kernel started), else the CPU's."""
    from streammerge.api import wants_gpu
    from streammerge.backends import CPU_GEOMETRY

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # a CUDA run would not start
    if wants_gpu(options.backend, options.device) and not interpreted:
        from streammerge import gpu

        if gpu.cuda_available():  # the buffers a CUDA run would have (no kernel started)
            from streammerge.sizes import parse_size

            vram = None if options.vram is None else parse_size(options.vram, "--vram")
            return gpu.plan_geometry(vram), "cuda"
    return CPU_GEOMETRY, "cpu"


def closing_line(s) -> str:
    """The run's one honest line: bytes, seconds, GB/s, peak RSS and the recipe that
    repeats it (seed, λ or the mixup ratios, w, p, method)."""
    mix = ""
    if s.mixup is not None:
        mix = (
            f"λ {s.mixup[0]:.6g}, "
            if len(s.mixup) == 2
            else f"m ({', '.join(f'{m:.6g}' for m in s.mixup)}), "
        )
    drop = f"p ({', '.join(f'{p:g}' for p in s.drop)}), " if s.drop else ""
    return (
        f"streammerge: read {format_bytes(s.bytes_read)}, wrote {format_bytes(s.bytes_written)} "
        f"in {s.seconds:.2f} s ({s.gb_per_s:.2f} GB/s), peak RSS {s.peak_rss_bytes / 2**20:.0f} MiB, "
        f"seed {s.seed}, {mix}w ({', '.join(f'{w:.6g}' for w in s.weights)}), {drop}"
        f"{s.method} -> {s.out}"
        + (f" ({s.resumed_shards} shard(s) resumed)" if s.resumed_shards else "")
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
