"""karcher: the weighted Riemannian (Karcher) mean of the models' directions, scaled by
the weighted mean of their norms (mergekit ``karcher``; docs/SPEC.md "Karcher mean").

Every iterate of mergekit's loop is a combination ``u = sum_j c_j u_j`` of the unit vectors
``u_j = x_j / ||x_j||``, so its rounds need only the N x N Gram matrix of the whole
flattened tensor: one statistics pass (``karcher_gram``: float64 block sums in model_stock's
fixed order, no base) gives it, the rounds run on the host on N x N float64 numbers
(``coefficients``), and one elementwise pass writes ``sum_j k_j x_j`` in float32. No
re-reads, nothing held. M3 multiplies the weights (mergekit's alphas are 1/N: weight 1).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from streammerge.methods.method import Method, RowPass
from streammerge.methods.params import WEIGHT, Param

MAX_ITER = Param("max_iter", default=10.0, lo=0.0, hi=10000.0, per_model=False,
                 layered=False, integer=True,
                 help="karcher: most rounds of the fixed-point iteration")  # fmt: skip
TOL = Param("tol", default=1e-5, lo=0.0, lo_open=True, per_model=False, layered=False,
            help="karcher: norms <= tol are left out, angles < tol skipped, a step < tol "
            "stops the rounds")  # fmt: skip
KARCHER_WEIGHT = replace(WEIGHT, lo=0.0)

#: The statistics block (the chunks are whole blocks): model_stock's.
KARCHER_BLOCK = 1024
#: The statistics pass's name (unique across methods).
KARCHER_GRAM = "karcher_gram"


def _gram(sums, n: int) -> list[list[float]]:
    """The symmetric N x N matrix from G_jj, then G_jk (j < k) in order."""
    g = [[0.0] * n for _ in range(n)]
    s = n
    for j in range(n):
        g[j][j] = float(sums[j])
    for j in range(n):
        for k in range(j + 1, n):
            g[j][k] = g[k][j] = float(sums[s])
            s += 1
    return g


def _cos(v: float) -> float:
    return math.cos(v) if math.isfinite(v) else math.nan


def _sin(v: float) -> float:
    return math.sin(v) if math.isfinite(v) else math.nan


class _Sphere:
    """The valid models' unit vectors as their Gram matrix g (SPEC: ``dot``, ``nrm``)."""

    def __init__(self, g: list[list[float]], norms: list[float], valid: list[int]) -> None:
        self.v = valid
        self.g = {(j, k): g[j][k] / (norms[j] * norms[k]) for j in valid for k in valid}

    def dot(self, c: dict, j: int) -> float:
        """<u, u_j> of u = sum_k c_k u_k (left to right over the valid models)."""
        t = 0.0
        for k in self.v:
            t = t + c[k] * self.g[(k, j)]
        return t

    def nrm(self, c: dict) -> float:
        """||u|| (NaN stays NaN; a rounding below 0 is 0)."""
        t = 0.0
        for j in self.v:
            t = t + c[j] * self.dot(c, j)
        return math.nan if math.isnan(t) else math.sqrt(max(t, 0.0))


def _tangent(sp: _Sphere, b: dict, c: dict, tol: float) -> dict:
    """One round's T (coefficients over the valid models)."""
    t = {j: 0.0 for j in sp.v}
    for i in sp.v:
        d = sp.dot(c, i)
        d = d if math.isnan(d) else min(max(d, -1.0), 1.0)
        th = math.acos(d)
        if th < tol:
            continue
        f = b[i] * (th / _sin(th))
        for k in sp.v:
            t[k] = t[k] + f * ((1.0 if k == i else 0.0) - d * c[k])
    return t


def _direction(sp: _Sphere, b: dict, max_iter: int, tol: float) -> dict:
    """The Karcher mean's coefficients c (u = sum_j c_j u_j) after the rounds."""
    c = dict(b)
    m = sp.nrm(c)
    c = {j: (1.0 if j == sp.v[0] else 0.0) for j in sp.v} if m < tol else \
        {j: c[j] / m for j in sp.v}  # fmt: skip
    for _ in range(max_iter):
        t = _tangent(sp, b, c, tol)
        nt = sp.nrm(t)
        if nt < tol:
            break
        c = {k: _cos(nt) * c[k] + _sin(nt) * (t[k] / nt) for k in sp.v}
        m = sp.nrm(c)
        if m > tol:
            c = {k: c[k] / m for k in sp.v}
    return c


def coefficients(sums, weights, max_iter: int, tol: float) -> np.ndarray:
    """The coefficients k_j of ``out = sum_j k_j x_j`` (SPEC "Karcher mean": the rounds,
    IEEE float64 on the host).

    Args:
        sums: float64 [N(N+1)/2]: the tensor's Gram sums (G_jj, then G_jk for j < k).
        weights: the N weights w_j (M3 applied); max_iter: rounds; tol: > 0.

    Returns:
        float32 [N] (zeros when every model is left out).
    """
    n = len(weights)
    g = _gram(sums, n)
    norms = [math.sqrt(g[j][j]) for j in range(n)]
    total = 0.0
    for w in weights:
        total = total + float(w)
    out = np.zeros(n, np.float32)
    if total == 0.0:
        return out
    a = [float(w) / total for w in weights]
    valid = [j for j in range(n) if norms[j] > tol]
    mass = 0.0
    for j in valid:
        mass = mass + a[j]
    if not valid or mass == 0.0:
        return out
    c = _direction(_Sphere(g, norms, valid), {j: a[j] / mass for j in valid}, max_iter, tol)
    s = 0.0
    for j in range(n):
        s = s + a[j] * norms[j]
    with np.errstate(all="ignore"):
        for j in valid:
            out[j] = np.float32((s * c[j]) / norms[j])
    return out


def _params(a) -> tuple[int, float]:
    p = dict(a.params)
    return int(p.get("max_iter", 10)), float(p.get("tol", 1e-5))


def coefficients_of(a) -> np.ndarray:
    """The tensor's k (float32 [N]), computed once from its Gram sums and cached."""
    sums, cache = a.stats[KARCHER_GRAM]
    if "k" not in cache:
        cache["k"] = coefficients(sums, a.weights, *_params(a))
    return cache["k"]


def _gram_cpu(inputs, out, a) -> None:
    """``karcher_gram``: each block's sums, added into ``a.counts[0]`` left to right."""
    from streammerge.kernels import cpu_karcher

    blocks = cpu_karcher.karcher_gram(inputs, list(a.dtypes), list(a.model_rows), a.count)
    cpu_karcher.add_blocks(a.counts[0], blocks)


def _gram_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import cpu_karcher, triton_karcher

    n = a.count
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    cpu_karcher.add_blocks(a.counts[0], triton_karcher.karcher_gram_triton(models, n).cpu().numpy())


def _karcher_cpu(inputs, out, a) -> None:
    """``karcher``: ``sum_j k_j x_j`` in float32, in model order from +0.0."""
    from streammerge.kernels import cpu_karcher

    cpu_karcher.karcher_chunk(inputs, list(a.dtypes), list(a.model_rows), a.count,
                              coefficients_of(a), out, a.out_dtype)  # fmt: skip


def _karcher_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_karcher

    n = a.count
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    k = launch.torch.from_numpy(coefficients_of(a)).to(models[0].device)
    triton_karcher.karcher_triton(models, n, k, launch.typed(out, a.out_dtype, n))


def _zero_sums(n_models: int) -> tuple:
    """float64 [K] (G_jj of each model, then G_jk for j < k) and the tensor's cache."""
    return (np.zeros(n_models + n_models * (n_models - 1) // 2, np.float64), {})


def _check_weights(per_model: dict) -> str | None:
    w = per_model.get("weight")
    if w is not None and not sum(w) > 0:
        return f"karcher: the weights {list(w)} must have a positive sum"
    return None


METHOD = Method(
    name="karcher",
    order=84,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(KARCHER_WEIGHT, MAX_ITER, TOL),
    summary="Riemannian (Karcher) mean of the models' directions, times their mean norm",
    source="mergekit karcher (Karcher mean)",
    m3="weights",
    min_models=2,
    base_unsupported=True,
    row_passes=(RowPass(KARCHER_GRAM, _gram_cpu, _gram_triton, accumulators=_zero_sums),
                RowPass("karcher", _karcher_cpu, _karcher_triton)),
    row_block=KARCHER_BLOCK,
    check_params=_check_weights,
    plan_note="1 statistics pass (the N x N Gram matrix), max_iter rounds on the host on "
    "N x N numbers (no re-reads, nothing held), 1 elementwise pass",
)
