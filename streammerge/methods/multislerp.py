"""multislerp: barycentric interpolation of N models on the hypersphere (mergekit
``multislerp``, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; docs/SPEC.md
"Multi-SLERP").

mergekit projects the unit vectors onto the tangent space at their weighted mean,
interpolates there and maps back; in exact arithmetic the tangent sum is zero and the
result is the weighted mean of the unit vectors, normalized, times the weighted mean of the
norms. Every quantity follows from the models' Gram matrix: one statistics pass
(``msl_gram``: float64 sums in a fixed block order) gives it, ``coefficients`` turns it into
one float32 coefficient per model on the host, and the elementwise pass computes
``sum_j c_j * v_j`` in float32. A base is optional: with one (``base_optional``) the
vectors are the task vectors and the base is added back. M3 multiplies the weights
(Dirichlet).
"""

from __future__ import annotations

import math

import numpy as np

from streammerge.methods.method import Method, RowPass
from streammerge.methods.model_stock import round_work, work_dtype_of
from streammerge.methods.params import WEIGHT, Param

NORMALIZE_WEIGHTS = Param("normalize_weights", kind="bool", default=True, per_model=False,
                          help="multislerp: divide the weights by their sum")  # fmt: skip
EPS = Param("eps", default=1e-8, lo=0.0, per_model=False,
            help="multislerp: added to every norm; a weighted unit mean shorter than eps "
            "falls back to the weighted sum")  # fmt: skip

#: multislerp's statistics block (docs/SPEC.md "Multi-SLERP"): its chunks are whole blocks.
MSL_BLOCK = 1024
MSL_GRAM = "msl_gram"


def coefficients(gram: np.ndarray, weights, normalize: bool, eps: float,
                 w_dtype: str) -> np.ndarray:  # fmt: skip
    """The tensor's coefficients c_j (SPEC "Multi-SLERP": the host step).

    Args:
        gram: float64 [K]: G_jj of each model, then G_jk for j < k in order.
        weights: the N weights w_j (float64); normalize: ``normalize_weights``;
        eps: mergekit's eps; w_dtype: the working dtype W.

    Returns:
        float32 [N] (NaN when a statistic is NaN or infinite).
    """
    n = len(weights)
    g = np.asarray(gram, np.float64)
    f32 = np.float32
    wq = [round_work(f32(w), w_dtype) for w in weights]  # mergekit: torch.tensor(weight, W)
    if normalize:
        s = f32(0.0)
        for w in wq:
            s = f32(s + w)
        s = round_work(s, w_dtype)
        if s != 0:
            wq = [round_work(f32(w / s), w_dtype) for w in wq]
    w = [float(x) for x in wq]
    with np.errstate(all="ignore"):
        norms = [math.sqrt(g[j]) if g[j] >= 0 else math.nan for j in range(n)]
        a = [w[j] / (norms[j] + eps) for j in range(n)]
        mm = 0.0
        for j in range(n):
            mm = mm + (a[j] * a[j]) * g[j]
        s = n
        for j in range(n):
            for k in range(j + 1, n):
                mm = mm + 2.0 * ((a[j] * a[k]) * g[s])
                s += 1
        mn = math.sqrt(mm) if mm > 0 else (0.0 if mm <= 0 else math.nan)
        if mn < eps:  # mergekit: the linear fallback (two models), an error (more)
            return np.array(w, np.float64).astype(np.float32)
        avg = 0.0
        for j in range(n):
            avg = avg + w[j] * norms[j]
        fac = (avg * math.cos(eps)) / mn
        c = [0.0 if g[j] == 0 else fac * a[j] for j in range(n)]
        return np.array(c, np.float64).astype(np.float32)


def _coef(a) -> np.ndarray:
    sums, cache = a.stats[MSL_GRAM]
    if "c" not in cache:
        p = dict(a.params)
        cache["c"] = coefficients(sums, a.weights, bool(p.get("normalize_weights", True)),
                                  float(p.get("eps", 1e-8)), work_dtype_of(a))  # fmt: skip
    return cache["c"]


def _gram_cpu(inputs, out, a) -> None:
    """``msl_gram``: each block's sums, added into the tensor's totals left to right."""
    from streammerge.kernels import cpu_multislerp, cpu_stock

    blocks = cpu_multislerp.msl_gram(inputs, list(a.dtypes), a.base_row, list(a.model_rows),
                                     a.count, a.compute_dtype)  # fmt: skip
    cpu_stock.add_blocks(a.counts[0], blocks)


def _gram_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import cpu_stock, triton_multislerp

    n = a.count
    base = launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n) if a.base_row >= 0 else None
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    sums = triton_multislerp.msl_gram_triton(base, models, n, a.compute_dtype)
    cpu_stock.add_blocks(a.counts[0], sums.cpu().numpy())


def _msl_cpu(inputs, out, a) -> None:
    from streammerge.kernels import cpu_multislerp

    cpu_multislerp.msl_chunk(inputs, list(a.dtypes), a.base_row, list(a.model_rows), a.count,
                             _coef(a), out, a.out_dtype, a.compute_dtype)  # fmt: skip


def _msl_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_multislerp

    n = a.count
    base = launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n) if a.base_row >= 0 else None
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    triton_multislerp.msl_triton(base, models, n, _coef(a), launch.typed(out, a.out_dtype, n),
                                 a.compute_dtype)  # fmt: skip


def _zero_sums(n_models: int) -> tuple:
    """(float64 [K]: G_jj of each model, then G_jk for j < k; the coefficients' cache)."""
    return (np.zeros(n_models + n_models * (n_models - 1) // 2, np.float64), {})


METHOD = Method(
    name="multislerp",
    order=84,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(WEIGHT, NORMALIZE_WEIGHTS, EPS),
    summary="spherical barycentre of N weighted models (one angle set per tensor)",
    source="mergekit multislerp (goddard.blog, Multi-SLERP)",
    working_dtype="inputs",
    m3="weights",
    min_models=2,
    base_optional=True,
    row_passes=(RowPass(MSL_GRAM, _gram_cpu, _gram_triton, accumulators=_zero_sums),
                RowPass("multislerp", _msl_cpu, _msl_triton)),
    row_block=MSL_BLOCK,
)
