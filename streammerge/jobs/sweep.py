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

import csv
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streammerge.api import (
    DEFAULT_SHARD_SIZE,
    Options,
    Prepared,
    Provenance,
    finalize,
    make_backend,
    open_output,
    preflight_output,
    prepare,
    side_source,
)
from streammerge.errors import MergeError, OptionError
from streammerge.output.files import DISK_MARGIN_BYTES, require_free_space
from streammerge.io.paths import check_apart, real
from streammerge.exec.layout import make_layout
from streammerge.exec.pipeline import analyze, run_many
from streammerge.recipe.recipe import RecipeError, draw_seed
from streammerge.output.side_files import plan_side_files

#: Name of the reference output (λ = 0.5, or equal weights for N > 2).
FIXED = "fixed"
#: Default ``--eval-timeout``: seconds one evaluation may take.
EVAL_TIMEOUT_S = 3600.0
#: Seconds between looks at a running evaluator (has it exited, is its time up).
EVAL_POLL_S = 0.1
#: Exit code of ``streammerge sweep`` when an evaluator ran and no draw was scored (every
#: evaluation failed); every output is then kept, since none could be chosen.
EXIT_NOTHING_SCORED = 3
#: numpy SeedSequence stream deriving the mask seed from the sweep seed ("mask").
MASK_SEED_STREAM = 0x6D61736B


@dataclass
class Draw:
    """One output of a sweep.

    Attributes:
        dir: its directory; name: ``draw-01`` ... or ``fixed``.
        weights: w_j used; lam: λ when N = 2 (w = (λ, 1 - λ)).
        command: the single merge that repeats it, byte for byte.
        scores: named scores from the evaluator ({"score": x} for a plain number).
        score: the one maximized (None when not evaluated or failed); error: why it failed.
    """

    name: str
    dir: Path
    weights: tuple[float, ...]
    lam: float | None
    command: str
    scores: dict = field(default_factory=dict)
    score: float | None = None
    error: str | None = None

    def record(self) -> dict:
        """The ``sweep.json`` row (strict JSON: a named score that is not a finite number
        is null, and ``nonfinite_scores`` gives its value, e.g. ``{"ppl": "inf"}``)."""
        scores, nonfinite = finite_json(self.scores)
        row = {
            "name": self.name,
            "dir": str(self.dir),
            "weights": list(self.weights),
            "lambda": self.lam,
            "scores": scores,
            "score": self.score,
            "error": self.error,
            "command": self.command,
        }
        if nonfinite:
            row["nonfinite_scores"] = nonfinite
        return row


class EvalError(Exception):
    """An evaluation that gave no usable score: its message is the draw's ``error``."""


def finite_json(value, path: str = "") -> tuple[object, dict[str, str]]:
    """``value`` (JSON-like: dicts, lists, numbers, strings) with every float that is not
    finite replaced by None, and {dotted path: repr of the value} of those replaced (the
    path of a top-level dict entry is its key)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, {path: repr(value)}
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return value, {}
    clean, bad = {}, {}
    for k, v in items:
        clean[k], sub = finite_json(v, f"{path}.{k}" if path else str(k))
        bad.update(sub)
    return (clean if isinstance(value, dict) else list(clean.values())), bad


@dataclass
class SweepResult:
    """What a sweep did: the draws (the fixed reference last), the best draw's index, the
    seeds, and bytes/seconds of the one shared read."""

    out: Path
    draws: list[Draw]
    best: int | None
    seed: int
    sweep_seed: int
    bytes_read: int
    seconds: float
    peak_rss_bytes: int
    command: str = ""
    evaluated: bool = False

    @property
    def unscored(self) -> str | None:
        """Why no draw was scored although an evaluator ran (the first failing draw's name
        and error), else None. The CLI then exits with EXIT_NOTHING_SCORED."""
        if not self.evaluated or self.best is not None:
            return None
        failed = [d for d in self.draws[:-1] if d.error]
        return f"{failed[0].name}: {failed[0].error}" if failed else "no draw returned a score"


def draw_weights(
    n_models: int, draws: int, alpha: float, sweep_seed: int, grid: bool = False
) -> list[tuple[float, ...]]:
    """K mixup weight vectors: ``numpy.random.default_rng(sweep_seed)``, then for each draw
    ``rng.beta(α, α)`` (N = 2: (λ, 1 - λ)) or ``rng.dirichlet([α] * N)``; with ``grid``
    (N = 2), λ evenly spaced over [0, 1] (``numpy.linspace(0, 1, K)``).

    Raises:
        RecipeError: K < 1, grid with N != 2, alpha <= 0.
    """
    if draws < 1:
        raise RecipeError(f"--draws must be >= 1, got {draws}", "draws")
    if grid:
        if n_models != 2:
            raise RecipeError("--grid needs exactly 2 models (λ); use draws for N > 2", "grid")
        return [(float(x), 1.0 - float(x)) for x in np.linspace(0.0, 1.0, draws)]
    if not (alpha > 0 and math.isfinite(alpha)):
        raise RecipeError(f"--alpha must be > 0, got {alpha}", "alpha")
    rng = np.random.default_rng(sweep_seed)
    if n_models == 2:
        out = []
        for _ in range(draws):
            lam = float(rng.beta(alpha, alpha))
            out.append((lam, 1.0 - lam))
        return out
    return [tuple(float(x) for x in rng.dirichlet([alpha] * n_models)) for _ in range(draws)]


def parse_score(stdout: str, select: str | None) -> tuple[dict, float]:
    """The evaluator's last non-empty stdout line: a number, or a JSON object of named
    numbers (``select`` names the one to maximize; default its first key). The score must
    be a finite number (``NaN``, which Python's json.dumps writes, ``Infinity`` are refused);
    the other named scores may be anything.

    Returns:
        (named scores, ``{"score": x}`` for a plain number; the score maximized).

    Raises:
        EvalError: no line, not a number or JSON object, ``select`` missing, or a score that
            is not a finite number (the message quotes the last line).
    """
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise EvalError("the evaluator printed nothing on stdout")
    last = lines[-1].strip()
    try:
        value = json.loads(last)
    except json.JSONDecodeError:
        raise EvalError(f"last line is not a number or a JSON object: {last[:200]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise EvalError(f"last line is not a number or a JSON object: {last[:200]!r}")
    scores = {"score": float(value)} if not isinstance(value, dict) else value
    key = select or next(iter(scores), None)
    if (
        key not in scores
        or isinstance(scores[key], bool)
        or not isinstance(scores[key], (int, float))
    ):
        raise EvalError(f"no numeric score {key!r} in the last line {last[:200]!r}")
    if not math.isfinite(scores[key]):
        raise EvalError(f"score {key!r} is not a finite number in the last line {last[:200]!r}")
    return scores, float(scores[key])


@dataclass(frozen=True)
class CommandEvaluator:
    """The ``--eval`` command, run once per output without a shell.

    ``template`` is split into words as a POSIX shell would (``shlex.split``), then
    ``{out}`` is replaced inside every word by the output directory, which so stays exactly
    one argument whatever it contains (quoting ``{out}`` is unnecessary and harmless; so is
    ``--model={out}``). Shell syntax (pipes, ``&&``, ``$VAR``) is not interpreted: write
    ``sh -c '...'`` for that. The command's last stdout line is the score (``parse_score``).

    It runs with stdin closed, in a new session (its own process group). Once it exits, and
    when it runs longer than ``timeout_s`` seconds, its whole process group is killed
    (SIGKILL): children left behind cannot hold its output pipes open or outlive it.

    Attributes:
        template: the command; select: the named score to maximize; timeout_s: seconds
            one evaluation may take.

    Raises:
        OptionError: (on construction) a template ``shlex`` cannot split or with no words,
            a program not found, a timeout that is not a positive number of seconds.
    """

    template: str
    select: str | None = None
    timeout_s: float = EVAL_TIMEOUT_S

    def __post_init__(self) -> None:
        try:
            words = shlex.split(self.template)
        except ValueError as e:
            raise OptionError(f"--eval cannot be split into words ({e}): {self.template!r}",
                              "check its quotes") from None  # fmt: skip
        if not words:
            raise OptionError("--eval is empty", "give the command that scores {out}")
        if "{out}" not in words[0] and shutil.which(words[0]) is None:
            raise OptionError(f"--eval: program {words[0]!r} not found or not executable",
                              "give its path, or a program on PATH")  # fmt: skip
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == math.inf:
            raise OptionError(f"--eval-timeout must be a positive number of seconds, got {t!r}")

    def argv(self, out: Path) -> list[str]:
        """The command's argv for output directory ``out``."""
        return [w.replace("{out}", str(out)) for w in shlex.split(self.template)]

    def __call__(self, out: Path) -> tuple[dict, float]:
        """Score ``out``: (named scores, score). Raises EvalError (see ``run_evaluator``,
        ``parse_score``; a non-zero exit gives its last stderr line)."""
        r = run_evaluator(self.argv(out), self.timeout_s)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no stderr"])[-1]
            raise EvalError(f"exit {r.returncode}: {tail[:200]}")
        return parse_score(r.stdout, self.select)


def command_evaluator(
    template: str, select: str | None, timeout_s: float | None = None
) -> CommandEvaluator:
    """``CommandEvaluator(template, select, timeout_s)`` (timeout default EVAL_TIMEOUT_S)."""
    return CommandEvaluator(template, select, EVAL_TIMEOUT_S if timeout_s is None else timeout_s)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left of the group (or not ours to kill)


def run_evaluator(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``argv`` (no shell) in a new session, stdin closed, stdout and stderr captured as
    text; kill its process group when it exits (leftover children) or after ``timeout_s``
    seconds.

    Raises:
        EvalError: it ran longer than ``timeout_s`` (``timed out after N s``), or could not
            be started (program missing, not executable).
    """
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    except OSError as e:
        raise EvalError(f"cannot run {argv[0]!r}: {e.strerror or e}") from None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                out, err = p.communicate(timeout=max(0.0, min(EVAL_POLL_S,
                                                              deadline - time.monotonic())))  # fmt: skip
                break
            except subprocess.TimeoutExpired:
                if p.poll() is not None:  # it exited; children it left hold its pipes
                    _kill_group(p.pid)
                    out, err = p.communicate()
                    break
                if time.monotonic() >= deadline:
                    _kill_group(p.pid)
                    p.communicate()
                    raise EvalError(f"timed out after {timeout_s:g} s") from None
    finally:
        _kill_group(p.pid)  # whatever it left behind (Ctrl-C included)
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def mask_seed_for(sweep_seed: int) -> int:
    """The mask seed S of a sweep given its sweep seed alone, so that one seed repeats the
    whole sweep: the first 64-bit word of ``numpy.random.SeedSequence([sweep_seed,
    MASK_SEED_STREAM])`` (a stream apart from the draws' ``default_rng(sweep_seed)``)."""
    state = np.random.SeedSequence([sweep_seed, MASK_SEED_STREAM]).generate_state(1, np.uint64)
    return int(state[0])


def _recipe_flags(recipe_args: dict, shard_size) -> list[str]:
    """The single-merge flags of ``recipe_args`` (and a non-default ``--shard-size``)."""
    argv = []
    for flag, key in (("--method", "method"), ("--density", "density"), ("--drop", "drop"),
                      ("--gamma", "gamma"), ("--scale", "scale"), ("--trim-scope", "trim_scope"),
                      ("--dtype", "dtype")):  # fmt: skip
        v = recipe_args.get(key)
        if v is None or (key == "trim_scope" and v == "tensor") or (key == "scale" and v == 1.0):
            continue
        argv += [flag, ",".join(map(repr, v)) if isinstance(v, (list, tuple)) else str(v)]
    if recipe_args.get("normalize") is not None:
        argv.append("--normalize" if recipe_args["normalize"] else "--no-normalize")
    if shard_size != DEFAULT_SHARD_SIZE:
        argv += ["--shard-size", str(shard_size)]
    return argv


def _repeat_command(models, base, draw_out: Path, recipe_args: dict, seed: int, w, lam,
                    shard_size=DEFAULT_SHARD_SIZE) -> str:  # fmt: skip
    argv = ["streammerge", *map(str, models)]
    if base is not None:
        argv += ["--base", str(base)]
    argv += ["-o", str(draw_out), "--seed", str(seed), *_recipe_flags(recipe_args, shard_size)]
    argv += ["--lambda", repr(lam)] if lam is not None else ["--weights", ",".join(map(repr, w))]
    return shlex.join(argv)


def sweep_command(models, base, out, *, draws: int, grid: bool, alpha: float, seed: int,
                  sweep_seed: int, keep: str, recipe_args: dict, options: Options,
                  evaluate=None) -> str:  # fmt: skip
    """The ``streammerge sweep`` command that repeats a sweep: the same draws and masks,
    so the same output bytes (both seeds given; ``--eval`` when ``evaluate`` is a
    ``CommandEvaluator``, whose scores are the evaluator's business)."""
    argv = ["streammerge", "sweep", *map(str, models)]
    if base is not None:
        argv += ["--base", str(base)]
    argv += ["-o", str(out), "--draws", str(draws)]
    argv += ["--grid"] if grid else ["--alpha", repr(alpha)]
    argv += ["--sweep-seed", str(sweep_seed), "--seed", str(seed)]
    argv += [*_recipe_flags(recipe_args, options.shard_size), "--keep", keep]
    if isinstance(evaluate, CommandEvaluator):
        argv += ["--eval", evaluate.template]
        if evaluate.select is not None:
            argv += ["--eval-select", evaluate.select]
        if evaluate.timeout_s != EVAL_TIMEOUT_S:
            argv += ["--eval-timeout", f"{evaluate.timeout_s:g}"]
    return shlex.join(argv)


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


def _plan(models, base, out, draws, grid, alpha, seed, sweep_seed, keep, evaluate, options,
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
    pl = _plan(models, base, out, draws, grid, alpha, seed, sweep_seed, keep, evaluate, options,
               recipe_args)  # fmt: skip
    out, preps, rows = pl.out, pl.preps, pl.rows
    created = not out.exists()
    try:
        if created:
            out.mkdir()
            for p in preps:
                preflight_output(p)  # now that their parent exists: a single merge's checks
        if ray_address is None:
            engine = make_backend(options.backend, options.device, options.threads, options.vram)
            layout = _layout(preps, engine, options)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if ray_address is None:
        bytes_read = _merge_group(preps, rows, engine, layout, evaluate, eval_select, on_bytes,
                                  on_start, on_draw)  # fmt: skip
    else:
        rows, bytes_read = _run_on_ray(ray_address, groups, models, base, out, pl.names,
                                       pl.vectors, recipe_args, pl.seed, options, evaluate,
                                       eval_select, on_draw)  # fmt: skip
    scored = [i for i, d in enumerate(rows[:-1]) if d.score is not None]
    best = max(scored, key=lambda i: rows[i].score) if scored else None
    if keep == "best" and best is not None:
        for i, d in enumerate(rows[:-1]):
            if i != best:
                shutil.rmtree(d.dir)
    result = SweepResult(out, rows, best, pl.seed, pl.sweep_seed, bytes_read,
                         time.perf_counter() - t0, peak_rss_bytes(), pl.command,
                         evaluate is not None)  # fmt: skip
    write_results(result, len(models), preps[0].recipe.method, keep)
    return result


#: Format tag of ``streammerge sweep --plan --json``.
SWEEP_PLAN_FORMAT = "streammerge-sweep-plan/1"


def describe_sweep(
    models: Sequence[str | Path],
    base: str | Path | None,
    out: str | Path,
    *,
    draws: int = 8,
    grid: bool = False,
    alpha: float = 1.0,
    seed: int | None = None,
    sweep_seed: int | None = None,
    evaluate=None,
    keep: str = "best",
    options: Options | None = None,
    geometry=None,
    device: str = "cpu",
    measure_read: bool = True,
    **recipe_args,
) -> dict:
    """The dry run of a sweep (``streammerge sweep --plan``): every check of a real sweep,
    nothing written (the output directory is not created).

    Args:
        as ``sweep``; geometry: the engine's buffer geometry (``depth``,
        ``max_chunk_elems``; default the CPU's), device: ``cpu`` or ``cuda``;
        measure_read: time a short read of the largest input (``dryrun.describe``).

    Returns:
        A JSON-serializable dict: ``format`` (SWEEP_PLAN_FORMAT), the sweep's ``output``,
        ``draws``, ``grid``, ``alpha``, ``seed``, ``sweep_seed``, ``keep``, ``repeat`` (the
        command that makes this very sweep), ``outputs`` (name, dir, weights, λ, command of
        each of the K + 1), ``bytes_read`` (once, for all), ``bytes_written`` (all outputs),
        ``disk_bytes`` (``peak_disk_bytes``) and ``merge``: ``dryrun.describe`` of the shared
        merge with the sweep's buffer layout (its w is per output, so left out there).

    Raises:
        MergeError / RecipeError / OptionError: as ``sweep``.
    """
    from streammerge import dryrun
    from streammerge.exec.backends import CPU_GEOMETRY
    from streammerge.exec.layout import STAGING_BLOCKS

    options = options or Options()
    pl = _plan(models, base, out, draws, grid, alpha, seed, sweep_seed, keep, evaluate, options,
               recipe_args)  # fmt: skip
    layout = _layout(pl.preps, geometry or CPU_GEOMETRY, options)
    merge = dryrun.describe(pl.preps[0], layout, measure_read, device)
    merge.update(output=str(real(pl.out)), mixup=None, bytes_written=merge["bytes_written"]
                 * len(pl.preps))  # fmt: skip
    merge["lambda"] = None
    merge["resolved"].pop("w", None)
    for g in merge["groups"]:
        for entry in g["params"]:
            entry.pop("w", None)
    merge["memory"].update(outputs=layout.outputs,
                           staging_bytes=layout.outputs * STAGING_BLOCKS * layout.block_bytes)  # fmt: skip
    return {
        "format": SWEEP_PLAN_FORMAT,
        "output": str(real(pl.out)),
        "draws": draws,
        "grid": grid,
        "alpha": None if grid else alpha,
        "seed": pl.seed,
        "sweep_seed": pl.sweep_seed,
        "keep": keep,
        "repeat": pl.command,
        "outputs": [{"name": d.name, "dir": str(d.dir), "weights": list(d.weights),
                     "lambda": d.lam, "command": d.command} for d in pl.rows],  # fmt: skip
        "bytes_read": merge["bytes_read"],
        "bytes_written": merge["bytes_written"],
        "disk_bytes": pl.disk_bytes,
        "merge": merge,
    }


def format_sweep_plan(d: dict) -> str:
    """``describe_sweep``'s dict as plain text: the draws, then the shared merge's plan
    (``dryrun.format_plan``)."""
    from streammerge.dryrun import format_plan
    from streammerge.sizes import format_bytes

    how = "evenly spaced λ" if d["grid"] else f"drawn with α {d['alpha']:g}"
    lines = [
        f"streammerge sweep plan: {d['draws']} draws ({how}) and the fixed reference, sweep "
        f"seed {d['sweep_seed']}, mask seed {d['seed']}, --keep {d['keep']} -> {d['output']} "
        "(nothing written by --plan)"
    ]
    for o in d["outputs"]:
        w = f"λ {o['lambda']!r}" if o["lambda"] is not None else \
            "w (" + ", ".join(f"{x:.6g}" for x in o["weights"]) + ")"  # fmt: skip
        lines.append(f"  {o['name']}: {w}")
    n = len(d["outputs"])
    lines.append(
        f"  one read of {format_bytes(d['bytes_read'])} for all {n} outputs; "
        f"{format_bytes(d['bytes_written'])} written; disk needed at the peak (all {n} "
        f"outputs at once, before --keep best removes any): {format_bytes(d['disk_bytes'])}"
    )
    lines.append(f"  this sweep again: {d['repeat']}")
    lines.append("the shared merge (each output as this, with its own w):")
    return "\n".join(lines) + "\n" + format_plan(d["merge"])


def _layout(preps: list[Prepared], engine, options: Options):
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
    n = _merge_group(preps, rows, engine, _layout(preps, engine, options), evaluate,
                     eval_select, None, None)  # fmt: skip
    return rows, n


def _run_on_ray(address, groups, models, base, out, names, vectors, recipe_args, seed,
                options, evaluate, eval_select, on_draw):  # fmt: skip
    from streammerge.jobs.distributed import _connect, task_cpus, task_options

    ray = _connect(address)
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
        cmd = _repeat_command(models, base, out / name, recipe_args, seed, w, lam,
                              options.shard_size)  # fmt: skip
        preps.append(prepare(models, base, out / name, spec, options, Provenance(command=cmd),
                             preflight=preflight))  # fmt: skip
        rows.append(Draw(name, out / name, tuple(preps[-1].recipe.tensor_params("").w), lam, cmd))


def write_results(result: SweepResult, n_models: int, method: str, keep: str) -> None:
    """``sweep.csv``, ``sweep.json`` and ``sweep.png`` in the sweep's output directory.

    ``sweep.csv``: one row per output; its columns name, lambda, weights, score, then one
    ``score:<key>`` column per named score (none for an evaluator printing a plain number),
    error, kept, command; a value that is not a finite number is an empty cell.
    ``sweep.json`` is strict JSON (``json.dumps(allow_nan=False)``; see ``Draw.record``).
    """
    out = result.out
    rows = result.draws
    named = [d.scores for d in rows if d.scores and d.scores != {"score": d.score}]
    names = sorted({k for s in named for k in s})
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "lambda", "weights", "score", *(f"score:{k}" for k in names),
                    "error", "kept", "command"])  # fmt: skip
        for d in rows:
            scores = finite_json(d.scores)[0]
            w.writerow([d.name, d.lam, " ".join(f"{x:.6g}" for x in d.weights), d.score,
                        *[scores.get(k) for k in names], d.error or "", d.dir.exists(),
                        d.command])  # fmt: skip
    doc = {
        "method": method,
        "seed": result.seed,
        "sweep_seed": result.sweep_seed,
        "keep": keep,
        "best": rows[result.best].name if result.best is not None else None,
        "best_command": rows[result.best].command if result.best is not None else None,
        "repeat": result.command,
        "no_draw_scored": result.unscored,
        "draws": [d.record() for d in rows[:-1]],
        "fixed": rows[-1].record(),
        "bytes_read": result.bytes_read,
        "seconds": result.seconds,
    }
    (out / "sweep.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    plot(result, n_models, out / "sweep.png")


def plot(result: SweepResult, n_models: int, path: Path) -> None:
    """Score against λ (N = 2, the fixed λ = 0.5 merge marked), or ranked scores (N > 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.draws
    draws, fixed = rows[:-1], rows[-1]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if n_models == 2:
        pts = [(d.lam, d.score) for d in draws if d.score is not None]
        if pts:
            ax.scatter(*zip(*pts), label="draws", color="tab:blue")
        if fixed.score is not None:
            ax.scatter([0.5], [fixed.score], marker="*", s=200, color="tab:orange", label="λ = 0.5")
        if result.best is not None:
            b = rows[result.best]
            ax.scatter([b.lam], [b.score], facecolors="none", edgecolors="red", s=200, label="best")
        ax.set_xlabel("mixup ratio λ (weight of model 0)")
        ax.set_xlim(-0.02, 1.02)
    else:
        ranked = sorted((d for d in draws if d.score is not None), key=lambda d: -d.score)
        ax.bar([d.name for d in ranked], [d.score for d in ranked], color="tab:blue")
        if fixed.score is not None:
            ax.axhline(fixed.score, color="tab:orange", linestyle="--", label="equal weights")
        ax.set_xlabel("draw (ranked)")
        ax.tick_params(axis="x", rotation=60)
    if not any(d.score is not None for d in rows):
        ax.text(0.5, 0.5, "no scores (no evaluator)", ha="center", transform=ax.transAxes)
    ax.set_ylabel("score")
    ax.set_title(f"streammerge sweep: {len(draws)} draws")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class _CallableModule(type(sys.modules[__name__])):
    """``streammerge.sweep(...)`` calls ``streammerge.jobs.sweep.sweep(...)`` (the module stays a
    module: ``from streammerge.jobs.sweep import sweep`` works too)."""

    def __call__(self, *args, **kwargs) -> SweepResult:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
