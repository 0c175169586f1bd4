"""Statistics for ``bench/quality.py``, pure numpy (no torch, no I/O): the design points of the
grid arm, the best-of-K picks, seeded bootstrap intervals over test examples, the paired
bootstrap and McNemar's exact test on per-example correctness, and Holm's adjustment.

Conventions: a *correctness* array is bool, one entry per test example (``[n]``); a task
set's accuracy is the mean over its tasks of each task's accuracy (tasks are weighted
equally whatever their sizes, as in the M3 paper's tables); bootstrap replicates resample
each task's examples independently with replacement, with the *same* indices for every
candidate, so that differences between candidates are paired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: First primes: the Halton bases of the simplex grid's coordinates.
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


# --------------------------------------------------------------------------- design points


def radical_inverse(i: int, base: int) -> float:
    """The van der Corput radical inverse of ``i`` in ``base`` (digits mirrored about the
    point): 1 -> 1/2, 2 -> 1/4, 3 -> 3/4 in base 2."""
    f, r = 1.0, 0.0
    while i > 0:
        f /= base
        r += f * (i % base)
        i //= base
    return r


def simplex_grid(n_models: int, k: int) -> list[tuple[float, ...]]:
    """K deterministic, evenly spread weight vectors on the simplex (w_j >= 0, sum 1).

    N = 2: λ evenly spaced over [0, 1], w = (λ, 1 - λ) -- exactly ``streammerge sweep
    --grid`` (``numpy.linspace(0, 1, K)``). N > 2: the Halton points i = 1..K in N - 1
    dimensions (bases 2, 3, 5, ...) mapped onto the simplex by stick breaking with the
    inverse CDF of Beta(1, N - 1 - j), which maps the uniform cube onto the uniform simplex
    (Dirichlet(1), M3's α = 1 law): a quasi-random, stratified version of M3's draws. The
    sequence is nested: the K = 8 grid is the first 8 points of the K = 16 one.

    Example (N = 3, K = 2): Halton (1/2, 1/3) and (1/4, 2/3) give
    (0.293, 0.236, 0.471) and (0.134, 0.577, 0.289).
    """
    if k < 1 or n_models < 2:
        raise ValueError(f"need K >= 1 and N >= 2, got K = {k}, N = {n_models}")
    if n_models == 2:
        return [(float(x), 1.0 - float(x)) for x in np.linspace(0.0, 1.0, k)]
    if n_models - 1 > len(_PRIMES):
        raise ValueError(f"at most {len(_PRIMES) + 1} models, got {n_models}")
    out = []
    for i in range(1, k + 1):
        rest, w = 1.0, []
        for j in range(n_models - 1):
            u = radical_inverse(i, _PRIMES[j])
            b = 1.0 - (1.0 - u) ** (1.0 / (n_models - 1 - j))  # Beta(1, N-1-j) inverse CDF
            w.append(rest * b)
            rest -= rest * b
        w.append(rest)
        out.append(tuple(float(x) for x in w))
    return out


# --------------------------------------------------------------------------- picks


def pick(scores: Sequence[float]) -> int:
    """Index of the highest score, the first one on ties (``streammerge sweep``'s rule)."""
    return max(range(len(scores)), key=lambda i: scores[i])


# --------------------------------------------------------------------------- bootstrap


def boot_indices(n: int, resamples: int, seed: int | Sequence[int]) -> np.ndarray:
    """``[resamples, n]`` indices drawn with replacement from ``default_rng(seed)``."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def boot_acc(correct: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Accuracy of each bootstrap replicate: correct ``[n]`` or ``[c, n]`` bool, idx
    ``[B, n]`` -> ``[B]`` or ``[c, B]``."""
    return correct[..., idx].mean(-1)


def interval(reps: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates ``[B]``."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [a, 1.0 - a])
    return float(lo), float(hi)


def paired_boot_p(diff_reps: np.ndarray) -> float:
    """Two-sided paired-bootstrap p-value of a difference from its replicates ``[B]``:
    2 min(P*(Δ <= 0), P*(Δ >= 0)), at most 1 (the percentile bootstrap's test; with B
    replicates the smallest value it can give is 2 / B, so p = 0 reads "< 2 / B")."""
    d = np.asarray(diff_reps)
    return float(min(1.0, 2.0 * min((d <= 0).mean(), (d >= 0).mean())))


# --------------------------------------------------------------------------- McNemar


def mcnemar_counts(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(examples only ``a`` gets right, examples only ``b`` gets right) of two paired
    correctness arrays."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_exact_p(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value from the discordant counts b and c: under the
    null each discordant example is a fair coin, so p = min(1, 2 P(X <= min(b, c))) with
    X ~ Binomial(b + c, 1/2). Example: b = 1, c = 9 -> 2 * 11 / 1024 = 0.0215."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2.0 * tail / 2.0**n)


# --------------------------------------------------------------------------- multiplicity


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order.
    Example: (0.01, 0.04, 0.03) -> (0.03, 0.06, 0.06)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    run = 0.0
    for r, i in enumerate(order):
        run = max(run, min(1.0, (m - r) * pvalues[i]))
        out[i] = run
    return out
