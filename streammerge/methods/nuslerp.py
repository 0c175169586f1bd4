"""nuslerp: spherical interpolation of two models with weights (mergekit ``nuslerp``;
docs/SPEC.md "NuSLERP").

slerp's machinery with mergekit's nuslerp rules: ``t = w_1 / (w_0 + w_1)`` (0.5 when the
weights sum to almost zero), norms clamped at 1e-7, a lerp only where ``|sin theta| <
1e-8``. ``nuslerp_flatten`` (default): one angle per tensor from the ``row_dots`` sums of
its rows, added up exactly (``slerp.tensor_totals``); else one angle per vector of the last
axis (a 1-D tensor is one vector), computed from the chunk itself (a chunk holds whole
rows, so whole vectors). With ``nuslerp_row_wise`` (and not flattened) one angle per
column: the statistics pass adds each chunk's rows into per-column sums in row order
(``cpu_nuslerp.col_dots``). With a base (``Method.base_optional``: the recipe's row is
``Method.with_base()``) the sums and the combination read the task vectors ``v_j - base``
and the base is added back (``cpu_nuslerp`` / ``triton_nuslerp``). Without a base and
without columns the rows are combined by ``cpu_rows.rows_combine`` /
``triton_rows.rows_combine_triton`` with one coefficient pair per vector. M3 multiplies
the weights.
"""

from __future__ import annotations

import math

import numpy as np

from streammerge.methods.method import ROW_DOTS, Method, RowPass
from streammerge.methods.params import WEIGHT, Param
from streammerge.methods.slerp import tensor_totals

#: mergekit's constants (merge_methods/nuslerp.py): norms clamped at NORM_EPS; a vector
#: pair whose |sin theta| is below SIN_EPS is interpolated linearly; weights summing to
#: less than SUM_EPS in magnitude give t = 0.5.
NORM_EPS = 1e-7
SIN_EPS = 1e-8
SUM_EPS = 1e-6

FLATTEN = Param("nuslerp_flatten", kind="bool", default=True, per_model=False, layered=False,
                help="nuslerp: one angle per tensor (true) or per vector of the last axis "
                "(false)")  # fmt: skip
ROW_WISE = Param("nuslerp_row_wise", kind="bool", default=False, per_model=False,
                 layered=False,
                 help="nuslerp: without nuslerp_flatten, one angle per column (mergekit's "
                 "vectors along the first axis) instead of per last-axis vector")  # fmt: skip


def interpolation_t(w0: float, w1: float) -> float:
    """mergekit's t from the two weights (float64): w1 / (w0 + w1), 0.5 when |w0 + w1| <
    1e-6."""
    s = float(w0) + float(w1)
    return 0.5 if abs(s) < SUM_EPS else float(w1) / s


def coefficients(stats: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """The coefficients (ca, cb) of each vector from its sums (SPEC "NuSLERP").

    Args:
        stats: float64 array [k, 3]: each row a vector's (T00, T11, T01).
        t: the interpolation factor (float64).

    Returns:
        (ca, cb): float32 arrays [k], the float64 values rounded to nearest.
    """
    s = np.asarray(stats, np.float64)
    with np.errstate(all="ignore"):  # a NaN / inf gives NaN coefficients (SPEC)
        d0 = np.maximum(np.sqrt(s[:, 0]), NORM_EPS)
        d1 = np.maximum(np.sqrt(s[:, 1]), NORM_EPS)
        theta = np.arccos(np.clip(s[:, 2] / (d0 * d1), -1.0, 1.0))
        sin_theta = np.sin(theta)
        lin = np.abs(sin_theta) < SIN_EPS
        t = float(t)
        div = np.where(lin, 1.0, sin_theta)
        ca = np.where(lin, 1.0 - t, np.sin((1.0 - t) * theta) / div)
        cb = np.where(lin, t, np.sin(t * theta) / div)
    return ca.astype(np.float32), cb.astype(np.float32)


def _per_tensor(a) -> bool:
    """One angle per tensor: ``nuslerp_flatten``, or a tensor of fewer than 2 axes."""
    return bool(dict(a.params).get("nuslerp_flatten", True)) or len(a.shape) < 2


def _per_column(a) -> bool:
    """One angle per column: ``nuslerp_row_wise`` on a tensor not taken as one vector."""
    return not _per_tensor(a) and bool(dict(a.params).get("nuslerp_row_wise", False))


def _t(a) -> float:
    w0, w1 = a.weights
    return interpolation_t(w0, w1)


def _vectors(a) -> tuple[int, int]:
    """(vectors, length) of the chunk: its rows, or the last axis's vectors."""
    if _per_tensor(a) or _per_column(a):
        return a.n_rows, a.row_len
    v = int(a.shape[-1])
    return (a.n_rows * a.row_len) // v if v else 0, v


def _plain(a) -> bool:
    """No base and no columns: slerp's kernels (``cpu_rows``) alone."""
    return a.base_row < 0 and not _per_column(a)


def _base_cpu(inputs, a):
    """(base row, its dtype) of the chunk, or (None, None) without a base."""
    return (inputs[a.base_row], a.dtypes[a.base_row]) if a.base_row >= 0 else (None, None)


def _base_triton(launch, inputs, a, n):
    return launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n) if a.base_row >= 0 else None


def _col_acc(a) -> np.ndarray:
    """The tensor's per-column sums (float64 [row_len, 3]), made at the first chunk."""
    cache = a.stats[NUSLERP_DOTS][1]
    if "cols" not in cache:
        cache["cols"] = np.zeros((a.row_len, 3), np.float64)
    return cache["cols"]


def _dots_cpu(inputs, out, a) -> None:
    """``nuslerp_dots``: each row's S00, S11, S01 when the angle is the tensor's, each
    column's sums when it is the column's."""
    from streammerge.kernels import cpu_nuslerp

    v0, d0, v1, d1, b, db = _parts(inputs, a)
    w = _work(a)
    if _per_column(a):
        cpu_nuslerp.col_dots(v0, d0, v1, d1, b, db, a.n_rows, a.row_len, _col_acc(a), w)
    elif _per_tensor(a):  # without a base and in float32: cpu_rows.row_dots's very sums
        a.counts[0].append(cpu_nuslerp.tv_row_dots(v0, d0, v1, d1, b, db, a.n_rows, a.row_len,
                                                   w))  # fmt: skip


def _dots_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_nuslerp, triton_rows

    if _chain(a):
        return _on_host(_dots_cpu, inputs, out, a)
    n = a.n_rows * a.row_len
    v0, v1 = (launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows)
    b = _base_triton(launch, inputs, a, n)
    if _per_column(a):
        acc = _col_acc(a)
        dev = launch.torch.from_numpy(acc).to(v0.device)
        triton_nuslerp.col_dots_triton(v0, v1, b, a.n_rows, a.row_len, dev)
        acc[...] = dev.cpu().numpy()
    elif _per_tensor(a) and b is None:
        a.counts[0].append(triton_rows.row_dots_triton(v0, v1, a.n_rows, a.row_len).cpu().numpy())
    elif _per_tensor(a):
        a.counts[0].append(triton_nuslerp.tv_row_dots_triton(v0, v1, b, a.n_rows,
                                                             a.row_len).cpu().numpy())  # fmt: skip


def _coefficients(a, vector_dots) -> tuple[np.ndarray, np.ndarray]:
    """Per-vector coefficients (float32 [vectors]) of the chunk: the tensor's (cached), the
    columns' (cached), or from ``vector_dots()`` (float64 [vectors, 3], the chunk's own
    vectors)."""
    k, _ = _vectors(a)
    sums, cache = a.stats[NUSLERP_DOTS]
    key = ("ab", _t(a))  # a sweep's outputs share the sums, each with its own weights
    if _per_column(a):
        if key not in cache:
            cache[key] = coefficients(_col_acc(a), _t(a))
        return cache[key]
    if not _per_tensor(a):
        return coefficients(vector_dots(), _t(a))
    if key not in cache:
        cache[key] = coefficients(np.asarray([tensor_totals(sums)], np.float64), _t(a))
    ca, cb = cache[key]
    return np.full(k, ca[0], np.float32), np.full(k, cb[0], np.float32)


def _nuslerp_cpu(inputs, out, a) -> None:
    from streammerge.kernels import cpu_nuslerp, cpu_rows

    if _chain(a):
        return _chain_cpu(inputs, out, a)
    (r0, r1) = a.model_rows
    k, n = _vectors(a)
    v0, d0, v1, d1 = inputs[r0], a.dtypes[r0], inputs[r1], a.dtypes[r1]
    if _plain(a):
        ca, cb = _coefficients(a, lambda: cpu_rows.row_dots(v0, d0, v1, d1, k, n))
        cpu_rows.rows_combine(v0, d0, v1, d1, k, n, ca, cb, out, a.out_dtype)
        return
    b, db = _base_cpu(inputs, a)
    ca, cb = _coefficients(a, lambda: cpu_nuslerp.tv_row_dots(v0, d0, v1, d1, b, db, k, n))
    cpu_nuslerp.combine(v0, d0, v1, d1, b, db, k * n, n, _per_column(a), ca, cb, out,
                        a.out_dtype)  # fmt: skip


def _nuslerp_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_nuslerp, triton_rows

    if _chain(a):
        return _on_host(_nuslerp_cpu, inputs, out, a)
    torch = launch.torch
    k, n = _vectors(a)
    v0, v1 = (launch.typed(inputs[r], a.dtypes[r], k * n) for r in a.model_rows)
    dev = v0.device
    o = launch.typed(out, a.out_dtype, k * n)
    if _plain(a):
        ca, cb = _coefficients(a, lambda: triton_rows.row_dots_triton(v0, v1, k, n).cpu().numpy())
        triton_rows.rows_combine_triton(v0, v1, k, n, torch.from_numpy(ca).to(dev),
                                        torch.from_numpy(cb).to(dev), o)  # fmt: skip
        return
    b = _base_triton(launch, inputs, a, k * n)
    ca, cb = _coefficients(
        a, lambda: triton_nuslerp.tv_row_dots_triton(v0, v1, b, k, n).cpu().numpy())
    triton_nuslerp.combine_triton(v0, v1, b, k * n, n, _per_column(a),
                                  torch.from_numpy(ca).to(dev), torch.from_numpy(cb).to(dev), o)


def _work(a) -> str:
    """The working dtype W (the plan's: a recipe's ``dtype:``, else the inputs')."""
    return a.compute_dtype or "F32"


def _chain(a) -> bool:
    """W not float32: mergekit's op chain in W (SPEC "NuSLERP", "The chain in W")."""
    return _work(a) != "F32"


def _on_host(fn, inputs, out, a) -> None:
    """A pass of the chain under the Triton backends: its numba kernels on host copies (no
    Triton kernel for the chain yet), the output copied back."""
    import torch

    if out is None:  # a statistics pass writes nothing
        return fn(inputs.cpu().numpy(), None, a)
    host_out = out.cpu().numpy().copy()
    fn(inputs.cpu().numpy(), host_out, a)
    out.copy_(torch.from_numpy(host_out))


def _parts(inputs, a):
    """(v0, d0, v1, d1, base, dtype_b) of the chunk, numpy rows (base None without one)."""
    (r0, r1) = a.model_rows
    b, db = _base_cpu(inputs, a)
    return inputs[r0], a.dtypes[r0], inputs[r1], a.dtypes[r1], b, db


def _units_cpu(inputs, out, a) -> None:
    """``nuslerp_units`` (the chain only): each row's sum of the unit vectors' products
    with the tensor's norms, or each column's with the columns' norms."""
    from streammerge.kernels import cpu_nuslerp

    if not _chain(a) or not (_per_tensor(a) or _per_column(a)):
        return
    parts, w = _parts(inputs, a), _work(a)
    sums, cache = a.stats[NUSLERP_DOTS]
    if _per_column(a):
        if "norms" not in cache:
            cols = _col_acc(a)
            cache["norms"] = (cpu_nuslerp.chain_norms(cols[:, 0], w),
                              cpu_nuslerp.chain_norms(cols[:, 1], w))  # fmt: skip
        n0, n1 = cache["norms"]
        ucache = a.counts[1]
        if "ucols" not in ucache:
            ucache["ucols"] = np.zeros(a.row_len, np.float64)
        cpu_nuslerp.unit_col_dots(*parts, a.n_rows, a.row_len, n0, n1, w, ucache["ucols"])
        return
    if "norms" not in cache:
        t00, t11, _ = tensor_totals(sums)
        cache["norms"] = tuple(cpu_nuslerp.chain_norms(np.array([t00, t11]), w))
    n0, n1 = (np.full(a.n_rows, v, np.float32) for v in cache["norms"])
    a.counts[0].append(cpu_nuslerp.unit_row_dots(*parts, a.n_rows, a.row_len, n0, n1, w))


def _units_triton(launch, inputs, out, a) -> None:
    if _chain(a) and (_per_tensor(a) or _per_column(a)):
        _on_host(_units_cpu, inputs, out, a)


def _chain_coefficients(a, parts, k, n) -> tuple:
    """The chunk's per-vector scalars of the chain (``cpu_nuslerp.chain_coefficients``):
    the tensor's or the columns' (cached per t), or from the chunk's own vectors."""
    from streammerge.kernels import cpu_nuslerp

    w, t = _work(a), _t(a)
    usums, ucache = a.stats[NUSLERP_UNITS] if NUSLERP_UNITS in a.stats else ([], {})
    key = ("chain", t)
    if _per_column(a):
        if key not in ucache:
            ucache[key] = cpu_nuslerp.chain_coefficients(ucache["ucols"], t, w)
        return ucache[key]
    if _per_tensor(a):
        if key not in ucache:
            cos = math.fsum(np.concatenate([np.asarray(u, np.float64) for u in usums]).tolist())
            ucache[key] = cpu_nuslerp.chain_coefficients(np.array([cos]), t, w)
        lin, ca, cb, st, p, q = ucache[key]
        return (np.full(k, lin[0]), np.full(k, ca[0], np.float32), np.full(k, cb[0], np.float32),
                np.full(k, st[0], np.float32), p, q)  # fmt: skip
    s = cpu_nuslerp.tv_row_dots(*parts, k, n, w)
    n0, n1 = cpu_nuslerp.chain_norms(s[:, 0], w), cpu_nuslerp.chain_norms(s[:, 1], w)
    return cpu_nuslerp.chain_coefficients(cpu_nuslerp.unit_row_dots(*parts, k, n, n0, n1, w), t, w)


def _chain_cpu(inputs, out, a) -> None:
    """The writing pass of the chain (SPEC "NuSLERP", "The chain in W")."""
    from streammerge.kernels import cpu_nuslerp

    k, n = _vectors(a)
    parts = _parts(inputs, a)
    coef = _chain_coefficients(a, parts, k, n)
    cpu_nuslerp.chain_combine(*parts, k * n, n, _per_column(a), coef, out, a.out_dtype,
                              _work(a))  # fmt: skip


#: nuslerp's statistics pass: slerp's row sums (a list of float64 [rows, 3]) and a cache
#: (the coefficients; with columns, the per-column sums ``cols``); nothing when the angles
#: are per last-axis vector.
NUSLERP_DOTS = "nuslerp_dots"
DOTS_PASS = RowPass(NUSLERP_DOTS, _dots_cpu, _dots_triton, accumulators=lambda n_models: ([], {}))
#: The chain's second statistics pass (W not float32): the unit vectors' product sums per
#: row (a list of float64 [rows]) or per column (``ucols`` in the cache); nothing otherwise.
NUSLERP_UNITS = "nuslerp_units"
UNITS_PASS = RowPass(NUSLERP_UNITS, _units_cpu, _units_triton,
                     accumulators=lambda n_models: ([], {}),
                     needed=lambda tp: (tp.compute or "F32") != "F32")  # fmt: skip

assert ROW_DOTS != NUSLERP_DOTS  # a pass name is unique across methods

METHOD = Method(
    name="nuslerp",
    order=82,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(WEIGHT, FLATTEN, ROW_WISE),
    summary="spherical interpolation of two weighted models, per tensor or per row",
    source="mergekit nuslerp",
    m3="weights",
    min_models=2,
    max_models=2,
    base_optional=True,
    working_dtype="inputs",
    row_passes=(DOTS_PASS, UNITS_PASS, RowPass("nuslerp", _nuslerp_cpu, _nuslerp_triton)),
)
