"""``streammerge MODEL MODEL... --base DIR -o OUT``: the command line around ``merge``."""

from __future__ import annotations

import functools
import os
import sys
import threading

from streammerge.errors import (
    PREFIX,
    MergeError,
    guarded_main,
    report,
)
from streammerge.recipe.parser import (
    FLAG_RECIPE_KEYS,
    build_parser,
    build_sweep_parser,
    repeatable_argv,
)
from streammerge.sizes import format_bytes


def _base_as_model_0(args) -> None:
    """``--base A`` with a method whose base is one of its two models (``nearswap``,
    ``slerp``: mergekit's ``base_model`` is model 0) makes A model 0 and no base."""
    from streammerge.methods.registry import METHODS

    row = METHODS.get(args.method) if isinstance(args.method, str) else None
    if row is not None and row.base_is_input and args.base is not None:
        args.models, args.base = [args.base, *args.models], None


def recipe_inputs(args, parser, notice, argv: list[str]):
    """(models, base, recipe kwargs, Provenance) from the flags or a ``--config`` recipe.

    Raises:
        MergeError: a recipe error (one line, key and line), or flags that conflict.
    """
    import shlex

    from streammerge.api_types import Provenance

    command = shlex.join(["streammerge", *repeatable_argv(parser, argv)])
    if args.config is None:
        _base_as_model_0(args)
        if len(args.models) < 2:
            raise MergeError(f"need at least 2 fine-tunes, got {len(args.models)}", None, None,
                             "pass two or more model directories (or --config RECIPE.yml)")  # fmt: skip
        kwargs = {k: getattr(args, k) for k in FLAG_RECIPE_KEYS}
        kwargs["source"] = "cli"
        labels = ([args.base] if args.base is not None else []) + list(args.models)
        return args.models, args.base, kwargs, Provenance(None, tuple(labels), command)
    from streammerge.recipe.mergekit_yaml import load_recipe

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
    from streammerge.api_types import OPTION_KEYS, Options
    from streammerge.jobs.evaluate import CommandEvaluator
    from streammerge.jobs.sweep import EXIT_NOTHING_SCORED, sweep
    from streammerge.jobs.sweep_plan import describe_sweep

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
        from streammerge.recipe.recipe import draw_seed

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
    """Print a sweep's plan (``sweep_plan.describe_sweep``) on stdout."""
    import json

    from streammerge.jobs.sweep_plan import format_sweep_plan

    print(json.dumps(d, indent=2, sort_keys=True) if as_json else format_sweep_plan(d), end="\n"
          if as_json else "")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted, 1 a bug)."""
    return guarded_main(_main, argv)


class _MergeConsole:
    """What a merge prints on stderr while it runs (nothing but errors with ``--quiet``): the
    seed, the output, the vocabulary rules, base-only tensors, notices, and a progress bar
    (in bytes) on a terminal. Its ``on_start``, ``on_bytes`` and ``notice`` are the merge's
    callbacks.
    """

    def __init__(self, args) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.args = args
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)  # one line per message
        self.progress = (
            None
            if args.quiet or not self.err.is_terminal  # a bar on a pipe only leaves a blank line
            else Progress(
                TextColumn("merging"),
                BarColumn(),
                DownloadColumn(binary_units=False),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.err,
                transient=True,
            )
        )
        self.task = None
        self.lock = threading.Lock()

    def on_start(self, plan, total_bytes: int) -> None:
        """The merge starts: print what it will do, then start the bar (``total_bytes``)."""
        args, err = self.args, self.err
        r = plan.recipe
        if args.quiet:
            return
        if args.seed is None and getattr(r, "slices", None) is None:  # slices: seed 0, no draw
            err.print(f"streammerge: seed {r.seed} (pass --seed {r.seed} to repeat this merge)")
        err.print(f"streammerge: writing {os.path.abspath(args.output)}")
        for line in plan.vocab_rules:
            err.print(f"streammerge: vocabulary rule: {line}")
        if plan.base_only:
            err.print(
                f"streammerge: copied from the base (no fine-tune has them): {', '.join(plan.base_only)}"
            )
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("merge", total=total_bytes)

    def on_bytes(self, n: int) -> None:
        """``n`` more bytes merged: advance the bar (called from the pipeline's threads)."""
        if self.progress is not None and self.task is not None:
            with self.lock:
                self.progress.advance(self.task, n)

    def notice(self, line: str) -> None:
        """Print one notice line, unless ``--quiet``."""
        if not self.args.quiet:
            self.err.print(f"streammerge: {line}")

    def stop(self) -> None:
        """Remove the bar, if one was started."""
        if self.progress is not None and self.task is not None:
            self.progress.stop()


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    if argv[:1] == ["apply-lora"]:
        return apply_lora_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    view = _MergeConsole(args)

    from streammerge.api import merge
    from streammerge.api_types import OPTION_KEYS, Options

    try:
        models, base, kwargs, prov = recipe_inputs(args, parser, view.notice, argv)
        options = Options(**{k: getattr(args, k) for k in OPTION_KEYS})
        if args.plan:
            return show_plan(models, base, args.output, kwargs, options, prov, args.json)
        if args.ray is not None:
            from streammerge.jobs.distributed import merge_ray

            run_merge = functools.partial(merge_ray, address=args.ray)
        else:
            run_merge = merge
        s = run_merge(
            models,
            base,
            args.output,
            options=options,
            on_start=view.on_start,
            on_bytes=view.on_bytes,
            provenance=prov,
            **kwargs,
        )
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - each failure: one line
        view.stop()
        return report(e, args.output, args.debug)
    view.stop()
    if s.already_complete:
        return 0  # finalize said so in one line; there is no run to report
    print(closing_line(s), flush=True)
    if args.profile:
        print_profile(s)
    return 0


def print_profile(s) -> None:
    """``--profile``: the seconds each pipeline stage was busy, then the CPU seconds (user +
    sys) of each stage and of the whole process (per input GB too)."""
    import resource

    wall = {k: v for k, v in s.stage_seconds.items() if not k.endswith("_cpu_s")}
    cpu = {k: v for k, v in s.stage_seconds.items() if k.endswith("_cpu_s")}
    busy = ", ".join(f"{k} {v:.2f}" for k, v in wall.items())
    print(f"streammerge: busy seconds per stage: {busy} (of {s.seconds:.2f} s wall)", flush=True)
    r = resource.getrusage(resource.RUSAGE_SELF)
    total = r.ru_utime + r.ru_stime
    gb = s.bytes_read / 1e9
    per = f", {total / gb:.3f} s per input GB" if gb > 0 else ""
    stages = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
    print(f"streammerge: CPU seconds per stage: {stages} (process {total:.2f}{per})", flush=True)


def apply_lora_main(argv: list[str]) -> int:
    """``streammerge apply-lora MODEL+ADAPTER -o OUT``: the adapted model alone (exit codes
    as a merge's)."""
    import shlex

    from streammerge.api_types import OPTION_KEYS, Options, Provenance
    from streammerge.jobs.apply_lora import apply_lora
    from streammerge.recipe.parser import build_apply_lora_parser

    parser = build_apply_lora_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["streammerge", "apply-lora", *argv])
    try:
        options = Options(**{k: getattr(args, k) for k in OPTION_KEYS})
        s = apply_lora(args.model, args.output, options, Provenance(None, (args.model,) * 3, command))
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - each failure: one line
        return report(e, args.output, args.debug)
    if not s.already_complete:
        print(f"streammerge: read {format_bytes(s.bytes_read)}, wrote "
              f"{format_bytes(s.bytes_written)} in {s.seconds:.2f} s, peak RSS "
              f"{s.peak_rss_bytes / 2**20:.0f} MiB, {args.model} -> {s.out}", flush=True)  # fmt: skip
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
    from streammerge.exec.backends import CPU_GEOMETRY
    from streammerge.exec.choose import wants_gpu

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # a CUDA run would not start
    if wants_gpu(options.backend, options.device) and not interpreted:
        from streammerge.exec import gpu

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
    how = f"seed {s.seed}, {mix}w ({', '.join(f'{w:.6g}' for w in s.weights)}), {drop}"
    if s.method == "passthrough":  # layer slices: copies, no seed, no weights
        how = ""
    return (
        f"streammerge: read {format_bytes(s.bytes_read)}, wrote {format_bytes(s.bytes_written)} "
        f"in {s.seconds:.2f} s ({s.gb_per_s:.2f} GB/s), peak RSS {s.peak_rss_bytes / 2**20:.0f} MiB, "
        f"{how}{s.method} -> {s.out}"
        + (f" ({s.resumed_shards} shard(s) resumed)" if s.resumed_shards else "")
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
