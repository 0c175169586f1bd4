"""A sweep's draws: the K weight vectors from one sweep seed (Beta, Dirichlet or a grid), the
mask seed derived from it, each draw's record and the command that repeats it alone, and
the command that repeats the whole sweep."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streammerge.api_types import DEFAULT_SHARD_SIZE, Options
from streammerge.jobs.evaluate import EVAL_TIMEOUT_S, CommandEvaluator, finite_json
from streammerge.methods.registry import all_params
from streammerge.recipe.recipe import RecipeError


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


def mask_seed_for(sweep_seed: int) -> int:
    """The mask seed S of a sweep given its sweep seed alone, so that one seed repeats the
    whole sweep: the first 64-bit word of ``numpy.random.SeedSequence([sweep_seed,
    MASK_SEED_STREAM])`` (a stream apart from the draws' ``default_rng(sweep_seed)``)."""
    state = np.random.SeedSequence([sweep_seed, MASK_SEED_STREAM]).generate_state(1, np.uint64)
    return int(state[0])


def _recipe_flags(recipe_args: dict, shard_size) -> list[str]:
    """The single-merge flags of ``recipe_args`` (and a non-default ``--shard-size``)."""
    argv = []
    params = all_params()
    v = recipe_args.get("method")
    if v is not None:
        argv += ["--method", str(v)]
    for key, v in recipe_args.items():
        if key not in params or v is None:
            continue
        p = params[key]
        if p.kind == "bool":
            argv.append(p.flag if v else "--no-" + p.flag[2:])
        else:
            argv += [p.flag, ",".join(map(repr, v)) if isinstance(v, (list, tuple)) else str(v)]
    for flag, key in (("--trim-scope", "trim_scope"), ("--dtype", "dtype")):
        v = recipe_args.get(key)
        if v is not None and not (key == "trim_scope" and v == "tensor"):
            argv += [flag, str(v)]
    if shard_size != DEFAULT_SHARD_SIZE:
        argv += ["--shard-size", str(shard_size)]
    return argv


def draw_repeat_command(models, base, draw_out: Path, recipe_args: dict, seed: int, w, lam,
                        shard_size=DEFAULT_SHARD_SIZE) -> str:  # fmt: skip
    """The single ``streammerge`` command that repeats one draw of a sweep byte for byte
    (its seed, its weights or lambda, the recipe's flags), for the draw's model card."""
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
