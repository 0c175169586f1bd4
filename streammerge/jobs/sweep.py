"""``streammerge sweep``: M3 without the lottery. K mixup draws merged from one read of the
inputs, scored by the user's evaluator, the best kept.

M3 (arXiv 2502.15434) draws one mixup ratio λ ~ Beta(α, α) per merge, and single draws
spread widely. A sweep draws K weight vectors from one *sweep seed* (Beta for N = 2,
Dirichlet for N > 2; ``grid`` for evenly spaced λ), all sharing one *mask seed* S (by
default derived from the sweep seed: ``mask_seed_for``, so the sweep seed alone repeats the
whole sweep byte for byte), so draw k is exactly the single merge ``--seed S --lambda λ_k``
(``--weights w_k`` for N > 2) and can be repeated alone. The inputs are read once for all K outputs (plus the fixed λ = 0.5
/ equal-weights merge, for reference): each chunk is read, its masks and thresholds are the
same for every draw (they do not depend on the weights), and K weighted combinations are
written to K outputs within the same ``--memory`` budget (``pipeline.run_many``).

Output: ``OUT/draw-01`` ... ``OUT/draw-K`` and ``OUT/fixed`` (complete models),
``sweep.csv``, ``sweep.json`` (strict JSON; ``repeat``: the command that repeats the sweep)
and ``sweep.png`` (score against λ for N = 2, ranked scores for N > 2). All K + 1 outputs
exist at once before ``keep="best"`` removes the other draws, so the free-space check
counts them all (``peak_disk_bytes``). The evaluator (``CommandEvaluator`` for ``--eval``)
runs without a shell, within a timeout; a score must be a finite number. When no draw is
scored every output is kept (none could be chosen) and the CLI exits EXIT_NOTHING_SCORED.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from streammerge.api import finalize, open_output, preflight_output, prepare, side_source
from streammerge.api_types import Options, Prepared, Provenance
from streammerge.errors import MergeError, OptionError
from streammerge.exec.choose import make_backend
from streammerge.exec.layout import make_layout
from streammerge.exec.pipeline import analyze, run_many
from streammerge.io.paths import check_apart, real
from streammerge.jobs.draws import Draw, draw_repeat_command, draw_weights, mask_seed_for, sweep_command
from streammerge.jobs.evaluate import EvalError
from streammerge.jobs.sweep_results import SweepResult, write_results
from streammerge.methods.registry import DEFAULT_METHOD, METHODS
from streammerge.output.files import DISK_MARGIN_BYTES, require_free_space
from streammerge.output.side_files import plan_side_files
from streammerge.recipe.recipe import RecipeError, draw_seed

#: Name of the reference output (λ = 0.5, or equal weights for N > 2).
FIXED = "fixed"
#: Exit code of ``streammerge sweep`` when an evaluator ran and no draw was scored (every
#: evaluation failed); every output is then kept, since none could be chosen.
EXIT_NOTHING_SCORED = 3


@dataclass
class _Planned:
    """A sweep planned and checked, nothing written: the K + 1 prepared merges, their rows,
    the seeds, the repeat command and the peak disk bytes (``peak_disk_bytes``)."""

    out: Path
    names: list[str]
    vectors: list[tuple[float, ...]]
    seed: int
    sweep_seed: int
    preps: list[Prepared]
    rows: list[Draw]
    command: str
    disk_bytes: int


def peak_disk_bytes(preps: list[Prepared]) -> int:
    """Bytes a sweep adds to its disk at its peak: every output at once (each one's shards
    and copied files; a draw is written in a staging directory beside it, renamed in place,
    and ``--keep best`` removes the others only once every output is scored), plus
    ``DISK_MARGIN_BYTES``.

    Raises:
        MergeError: a ``config.json`` the vocabulary rule must rewrite is unreadable.
    """
    p0 = preps[0]
    side = 0
    if p0.options.copy_files:
        side = sum(f.size_bytes for f in plan_side_files(p0.plan, side_source(p0), p0.models))
    return sum(p.plan.output_bytes + side for p in preps) + DISK_MARGIN_BYTES


def _check_location(out: Path, preps: list[Prepared], disk_bytes: int) -> None:
    """The sweep's directory (its outputs' parent) before it exists: its parent a writable
    directory, apart from every input, and room on the disk for ``disk_bytes``."""
    target = real(out)
    if not target.exists():
        if not target.parent.is_dir():
            raise MergeError("the output's parent directory does not exist", target.parent, None,
                             "create it first")  # fmt: skip
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise MergeError("the output's parent directory is not writable", target.parent,
                             None, "choose a writable location")  # fmt: skip
    check_apart([("the sweep's output directory", target, out)], preps[0].output.inputs)
    require_free_space(target if target.is_dir() else target.parent, disk_bytes)


def plan_sweep(models, base, out, draws, grid, alpha, seed, sweep_seed, keep, evaluate, options,
          recipe_args) -> _Planned:  # fmt: skip
    """Every check of a sweep (each draw's as a single merge's, the sweep's directory, the
    disk for all outputs at once) and its draws; nothing written. Raises MergeError."""
    if keep not in ("best", "all"):
        raise RecipeError(f"--keep must be best or all, got {keep!r}", "keep")
    for k in ("weights", "lam", "alpha"):
        if k in recipe_args:
            raise RecipeError(f"a sweep draws the weights: drop {k}", k)
    if isinstance(models, (str, bytes)) or not isinstance(models, Sequence) or len(models) < 2:
        n = len(models) if isinstance(models, Sequence) else type(models).__name__
        raise OptionError(f"a sweep needs at least 2 fine-tunes, got {n}",
                          "pass two or more model directories")  # fmt: skip
    if options.resume:
        raise OptionError("a sweep cannot --resume", "re-run it, with --overwrite")
    row = METHODS.get(recipe_args.get("method") or DEFAULT_METHOD)
    if row is not None and row.weighted_stats:
        raise RecipeError(f"a sweep cannot run {row.name}: its statistics passes depend on "
                          "the weights, which differ per draw", "method")  # fmt: skip
    if sweep_seed is not None and (isinstance(sweep_seed, bool) or not isinstance(sweep_seed, int)
                                   or not 0 <= sweep_seed < 2**64):  # fmt: skip
        raise OptionError(f"--sweep-seed must be an integer in [0, 2**64), got {sweep_seed!r}")
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise MergeError("the output exists and is not a directory", out, None,
                         "choose another -o")  # fmt: skip
    if out.is_dir() and any(out.iterdir()) and not options.overwrite:
        raise MergeError("exists and is not empty", out, None, "choose another -o or --overwrite")
    sweep_seed = draw_seed() if sweep_seed is None else sweep_seed
    seed = mask_seed_for(sweep_seed) if seed is None else seed
    n = len(models)
    vectors = draw_weights(n, draws, alpha, sweep_seed, grid)
    vectors.append((0.5, 0.5) if n == 2 else tuple([1.0 / n] * n))
    names = [f"draw-{k + 1:02d}" for k in range(draws)] + [FIXED]
    preps: list[Prepared] = []
    rows: list[Draw] = []
    _prepare_all(models, base, out, names, vectors, recipe_args, seed, options, preps, rows,
                 preflight=out.is_dir())  # fmt: skip
    disk_bytes = peak_disk_bytes(preps)
    _check_location(out, preps, disk_bytes)
    command = sweep_command(models, base, out, draws=draws, grid=grid, alpha=alpha, seed=seed,
                            sweep_seed=sweep_seed, keep=keep, recipe_args=recipe_args,
                            options=options, evaluate=evaluate)  # fmt: skip
    return _Planned(out, names, vectors, seed, sweep_seed, preps, rows, command, disk_bytes)


def sweep(
    models: Sequence[str | Path],
    base: str | Path | None,
    out: str | Path,
    *,
    draws: int = 8,
    grid: bool = False,
    alpha: float = 1.0,
    seed: int | None = None,
    sweep_seed: int | None = None,
    evaluate: Callable[[Path], float | dict | tuple] | None = None,
    eval_select: str | None = None,
    keep: str = "best",
    options: Options | None = None,
    on_draw: Callable[[Draw], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    ray_address: str | None = None,
    groups: int | None = None,
    **recipe_args,
) -> SweepResult:
    """Merge K mixup draws (and the fixed λ = 0.5 reference) from one read, score, keep the
    best (see the module docstring).

    Args:
        models, base, out: as ``streammerge.merge``; ``out`` gets one directory per draw
            (its parent must exist).
        draws: K; grid: evenly spaced λ instead of draws (N = 2); alpha: Beta/Dirichlet α.
        seed: the mask seed S shared by every draw (default: ``mask_seed_for(sweep_seed)``,
            so the sweep seed alone repeats the sweep byte for byte).
        sweep_seed: seeds the K draws, in [0, 2**64) (drawn from the OS when None).
        evaluate: callable(output dir) -> a number, a dict of named numbers, or
            (scores dict, score), or a ``CommandEvaluator``; the score must be a finite
            number; its exceptions are recorded in the draw's row.
        eval_select: the named score to maximize; keep: ``best`` (remove the other draws
            once every output is scored; all are kept when no draw was scored) or ``all``.
        options: ``Options`` (memory, threads, backend...); recipe_args: method, density,
            drop, gamma, scale, normalize, trim_scope, dtype (weights come from the draws).
        on_draw: called with each Draw once it is scored (or merged, without evaluator).
        on_start: called with the bytes the shared read will read, before it starts.
        ray_address: run groups of draws as Ray tasks (``"local"``, ``"auto"`` or an
            address; see ``streammerge.jobs.distributed``): each group shares one read of the
            inputs on its worker, and its evaluations run there, where its outputs are.
        groups: number of such groups (default: the cluster's CPUs, at most K + 1).

    Returns:
        SweepResult (its ``command`` repeats the sweep).

    Raises:
        MergeError / RecipeError / OptionError: as ``merge``, before anything is written;
        among them too little free disk for every output at once (``peak_disk_bytes``).
    """
    from streammerge.sysinfo import peak_rss_bytes

    t0 = time.perf_counter()
    options = options or Options()
    pl = plan_sweep(models, base, out, draws, grid, alpha, seed, sweep_seed, keep, evaluate, options,
               recipe_args)  # fmt: skip
    out, preps, rows = pl.out, pl.preps, pl.rows
    engine, layout = _start_outputs(out, preps, options, ray_address)
    if ray_address is None:
        bytes_read = _merge_group(preps, rows, engine, layout, evaluate, eval_select, on_bytes,
                                  on_start, on_draw)  # fmt: skip
    else:
        rows, bytes_read = _run_on_ray(ray_address, groups, models, base, out, pl.names,
                                       pl.vectors, recipe_args, pl.seed, options, evaluate,
                                       eval_select, on_draw)  # fmt: skip
    best = _keep_best(rows, keep)
    result = SweepResult(out, rows, best, pl.seed, pl.sweep_seed, bytes_read,
                         time.perf_counter() - t0, peak_rss_bytes(), pl.command,
                         evaluate is not None)  # fmt: skip
    write_results(result, len(models), preps[0].recipe.method, keep)
    return result


def _start_outputs(out: Path, preps: list[Prepared], options: Options, ray_address):
    """Create the sweep's directory when it is absent and check each output in it (a single
    merge's checks, now that their parent exists); without Ray, make the engine and the
    buffer layout of the shared read. Returns (engine, layout), (None, None) on Ray.

    A directory created here is removed again when any of this fails.
    """
    created = not out.exists()
    engine = layout = None
    try:
        if created:
            out.mkdir()
            for p in preps:
                preflight_output(p)  # now that their parent exists: a single merge's checks
        if ray_address is None:
            engine = make_backend(options.backend, options.device, options.threads, options.vram)
            layout = sweep_layout(preps, engine, options)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return engine, layout


def _keep_best(rows: list[Draw], keep: str) -> int | None:
    """The index of the best-scored draw (the fixed reference, last, is not a candidate),
    None when no draw was scored; with ``keep="best"`` the other draws' directories are
    removed (the fixed reference's stays)."""
    scored = [i for i, d in enumerate(rows[:-1]) if d.score is not None]
    best = max(scored, key=lambda i: rows[i].score) if scored else None
    if keep == "best" and best is not None:
        for i, d in enumerate(rows[:-1]):
            if i != best:
                shutil.rmtree(d.dir)
    return best


def sweep_layout(preps: list[Prepared], engine, options: Options):
    """The buffers of a sweep: one read of the inputs, ``len(preps)`` outputs per slot
    (``streammerge.exec.layout.make_layout`` with ``outputs``)."""
    p0 = preps[0]
    return make_layout(p0.plan, len(p0.models), p0.memory_bytes, engine.depth,
                       getattr(engine, "max_chunk_elems", None), options.threads,
                       outputs=len(preps))  # fmt: skip


def _evaluate(d: Draw, evaluate, eval_select) -> None:
    """Score draw ``d`` (sets scores and score, or error: the score must be finite)."""
    if evaluate is None:
        return
    try:
        res = evaluate(d.dir)
        if isinstance(res, tuple):
            scores, score = res
        elif isinstance(res, dict):
            scores, score = res, res[eval_select or next(iter(res))]
        else:
            scores, score = {"score": res}, res
        score = float(score)
        if not math.isfinite(score):
            raise EvalError(f"the score is not a finite number: {score!r}")
        d.scores, d.score = scores, score
    except EvalError as e:
        d.error = str(e)[:300]
    except Exception as e:  # noqa: BLE001 - one failing draw is reported, not fatal
        d.error = f"{type(e).__name__}: {e}"[:300]


def _merge_group(preps, rows, engine, layout, evaluate, eval_select, on_bytes, on_start,
                 on_draw=None) -> int:  # fmt: skip
    """Merge prepared draws from one read, finalize each, evaluate each (``on_draw`` after
    each); bytes read."""
    options = preps[0].options
    try:
        for p in preps:
            open_output(p)
            if p.done:
                raise MergeError("a sweep cannot resume an output", p.output.out, None,
                                 "remove it or pass --overwrite")  # fmt: skip
        p0 = preps[0]
        model_th = None
        if on_start is not None:
            from streammerge.exec.layout import read_bytes, work_items

            on_start(read_bytes(work_items(p0.plan, list(p0.plan.shards), layout)))
        if p0.plan.model_scope:
            model_th, _ = analyze(p0.plan, layout, engine, on_bytes, options.direct_io)
        stats = run_many([p.plan for p in preps], [p.output for p in preps], layout, engine,
                         on_bytes, options.direct_io, model_th)  # fmt: skip
    except BaseException:
        for p in preps:
            p.output.close()
        raise
    for p, st in zip(preps, stats):
        if model_th is not None:
            st.thresholds = p.plan.per_tensor(model_th)
        finalize(p, st)
    for d in rows:
        _evaluate(d, evaluate, eval_select)
        if on_draw is not None:
            on_draw(d)
    return stats[0].bytes_read


def _group_task(models, base, out, names, vectors, recipe_args, seed, options, evaluate,
                eval_select):  # fmt: skip
    """A Ray task: one group of draws, prepared, merged from one read and evaluated here."""
    preps: list[Prepared] = []
    rows: list[Draw] = []
    _prepare_all(models, base, Path(out), names, vectors, recipe_args, seed, options, preps, rows)
    engine = make_backend(options.backend, options.device, options.threads, options.vram)
    n = _merge_group(preps, rows, engine, sweep_layout(preps, engine, options), evaluate,
                     eval_select, None, None)  # fmt: skip
    return rows, n


def _run_on_ray(address, groups, models, base, out, names, vectors, recipe_args, seed,
                options, evaluate, eval_select, on_draw):  # fmt: skip
    from streammerge.jobs.distributed import connect_ray, task_cpus, task_options

    ray = connect_ray(address)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    g = max(1, min(groups or cpus // task_cpus(options), len(names)))
    task = ray.remote(_group_task).options(**task_options(options))
    parts = [list(range(len(names)))[k::g] for k in range(g)]
    refs = [
        task.remote(
            [str(m) for m in models],
            None if base is None else str(base),
            str(out),
            [names[i] for i in part],
            [vectors[i] for i in part],
            recipe_args,
            seed,
            options,
            evaluate,
            eval_select,
        )
        for part in parts
    ]
    rows: dict[str, Draw] = {}
    total = 0
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            got, n = ray.get(ref)
            total += n
            for d in got:
                rows[d.name] = d
                if on_draw is not None:
                    on_draw(d)
    return [rows[n] for n in names], total


def _prepare_all(models, base, out, names, vectors, recipe_args, seed, options, preps, rows,
                 preflight: bool = True):  # fmt: skip
    """One prepared merge per draw (every check of a single merge, before any byte; the
    output location's only with ``preflight``)."""
    for name, w in zip(names, vectors):
        lam = w[0] if len(models) == 2 else None
        spec = {**recipe_args, "seed": seed, "source": "cli"}  # as the command that repeats it
        spec["lam" if lam is not None else "weights"] = lam if lam is not None else list(w)
        cmd = draw_repeat_command(models, base, out / name, recipe_args, seed, w, lam,
                              options.shard_size)  # fmt: skip
        preps.append(prepare(models, base, out / name, spec, options, Provenance(command=cmd),
                             preflight=preflight))  # fmt: skip
        rows.append(Draw(name, out / name, tuple(preps[-1].recipe.tensor_params("").w), lam, cmd))


class _CallableModule(type(sys.modules[__name__])):
    """``streammerge.sweep(...)`` calls ``streammerge.jobs.sweep.sweep(...)`` (the module stays a
    module: ``from streammerge.jobs.sweep import sweep`` works too)."""

    def __call__(self, *args, **kwargs) -> SweepResult:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
