"""Merge methods as rows of one table, and the recipe that fixes a merge's randomness.

A method is a configuration of shared parts (as in mergekit's table): a sparsifier (how a
task vector is thinned), a weighting (how the thinned task vectors are mixed), and
whether it needs a per-tensor statistic before the elementwise pass (TIES trims by a
magnitude quantile: such a method gets a second pass over the same chunk plan).

| method          | sparsifier              | weighting                      | stats pass | source                          |
|-----------------|-------------------------|--------------------------------|------------|---------------------------------|
| m3_dare         | DARE drop p, 1/(1-p)    | mixup: λ ~ Beta(α, α) (N=2),   | no         | M3 arXiv 2502.15434; DARE       |
|                 |                         | Dirichlet(α) (N>2)             |            | arXiv 2311.03099                |
| dare_linear     | DARE drop p, 1/(1-p)    | fixed λ: w = (λ, 1-λ)          | no         | DARE arXiv 2311.03099           |
| task_arithmetic | DARE drop p (p=0: none) | given weights w                | no         | Task Arithmetic arXiv 2212.04089|
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Method:
    """One row of the method table."""

    name: str
    sparsifier: str
    weighting: str
    needs_stats_pass: bool
    source: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "m3_dare", "dare", "mixup_beta", False, "M3 arXiv 2502.15434 + DARE arXiv 2311.03099"
        ),
        Method("dare_linear", "dare", "fixed_lambda", False, "DARE arXiv 2311.03099"),
        Method("task_arithmetic", "dare", "given", False, "Task Arithmetic arXiv 2212.04089"),
    )
}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the merged values (SPEC "Contribution weights", "masks").

    Attributes:
        method: a key of METHODS, derived from which of lam / weights is given.
        seed: 0 <= seed < 2**64; keys every Philox mask and the mixup draw.
        alpha: Beta / Dirichlet concentration (> 0), used by m3_dare.
        weights: the contribution weight w_j of each fine-tune (drawn or given), float64.
        drop: DARE drop rate p_j of each fine-tune, 0 <= p_j < 1.
        scale: scaling coefficient s applied to the mixed task vector.
        lam: the fixed mixup ratio when given (dare_linear), else None.
        dtype: output dtype override (safetensors string) for float tensors, or None.
    """

    method: str
    seed: int
    alpha: float
    weights: tuple[float, ...]
    drop: tuple[float, ...]
    scale: float
    lam: float | None = None
    dtype: str | None = None


def draw_seed() -> int:
    """A fresh seed from the OS, in [0, 2**64)."""
    return secrets.randbits(64)


def make_recipe(
    n_models: int,
    *,
    seed: int | None = None,
    alpha: float = 1.0,
    lam: float | None = None,
    weights: list[float] | tuple[float, ...] | None = None,
    drop: float | list[float] | tuple[float, ...] = 0.5,
    scale: float = 1.0,
    dtype: str | None = None,
) -> Recipe:
    """Resolve a recipe: validate it and draw the mixup weights (SPEC "Contribution weights").

    w is ``(lam, 1 - lam)`` when ``lam`` is given (N = 2 only); ``weights`` when given;
    otherwise ``rng = numpy.random.default_rng(seed)`` and ``rng.beta(alpha, alpha)``
    (N = 2, w = (λ, 1 - λ)) or ``rng.dirichlet([alpha] * N)`` (N > 2).

    Args:
        n_models: number of fine-tunes N >= 2.
        drop: one p for all, or one per model.

    Raises:
        ValueError: N < 2, alpha <= 0, both lam and weights, lam with N != 2, a length
            mismatch, p outside [0, 1), a non-finite value, or a seed outside [0, 2**64).
    """
    if n_models < 2:
        raise ValueError(f"need at least 2 fine-tunes, got {n_models}")
    seed = draw_seed() if seed is None else int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    drops = (float(drop),) * n_models if isinstance(drop, (int, float)) else tuple(map(float, drop))
    if len(drops) != n_models:
        raise ValueError(f"--drop has {len(drops)} values for {n_models} models")
    for p in drops:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop rate p must satisfy 0 <= p < 1, got {p}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if lam is not None and weights is not None:
        raise ValueError("give --lambda or --weights, not both")
    if lam is not None:
        if n_models != 2:
            raise ValueError(f"--lambda needs exactly 2 models, got {n_models}; use --weights")
        if not math.isfinite(lam):
            raise ValueError(f"lambda must be finite, got {lam}")
        return Recipe(
            "dare_linear",
            seed,
            float(alpha),
            (float(lam), 1.0 - float(lam)),
            drops,
            scale,
            float(lam),
            dtype,
        )
    if weights is not None:
        w = tuple(map(float, weights))
        if len(w) != n_models or not all(math.isfinite(x) for x in w):
            raise ValueError(f"--weights needs {n_models} finite values, got {list(weights)}")
        return Recipe("task_arithmetic", seed, float(alpha), w, drops, scale, None, dtype)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    if n_models == 2:
        lam_drawn = float(rng.beta(alpha, alpha))
        w = (lam_drawn, 1.0 - lam_drawn)
    else:
        w = tuple(float(x) for x in rng.dirichlet([alpha] * n_models))
    return Recipe("m3_dare", seed, float(alpha), w, drops, float(scale), None, dtype)
