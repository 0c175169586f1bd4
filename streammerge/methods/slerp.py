"""slerp: spherical interpolation of two models, one angle per tensor (mergekit ``slerp``;
docs/SPEC.md "SLERP (v3)").

A row-wise method: each chunk holds whole rows; a kernel sums each row's S00, S11, S01
(``kernels/cpu_rows.row_dots``), the rows' sums add up to the tensor's (a ``row_dots`` pass
first when the tensor spans several chunks), ``coefficients`` turns them into the tensor's
two coefficients on the host, and a second kernel combines the rows (``rows_combine``).
M3 draws ``t`` (t = 1 - lam: the weight of model 1).
"""

from __future__ import annotations

import math

import numpy as np

from streammerge.methods.method import ROW_DOTS, Method, RowPass
from streammerge.methods.params import Param

#: mergekit's constants (merge_methods/slerp.py): a row whose |cos theta| exceeds
#: DOT_THRESHOLD is interpolated linearly; a norm at most EPS is taken as 1.
DOT_THRESHOLD = 0.9995
EPS = 1e-8

T = Param("t", default=None, per_model=False, m3=True,
          help="slerp: interpolation factor, 0 gives model 0 (mergekit's base_model), 1 "
          "model 1; nearswap: the distance t of w = t / |a - b|; M3 draws it as 1 - lam")  # fmt: skip

def coefficients(stats: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """The coefficients (ca, cb) from sums T00, T11, T01 (SPEC "SLERP (v3)": one row per
    tensor, its totals).

    Args:
        stats: float64 array [k, 3]: each row a tensor's (T00, T11, T01).
        t: the tensor's interpolation factor (float64).

    Returns:
        (ca, cb): float32 arrays [k], the float64 values rounded to nearest.
    """
    s = np.asarray(stats, np.float64)
    with np.errstate(all="ignore"):  # a NaN / inf row gives NaN coefficients (SPEC)
        n0, n1 = np.sqrt(s[:, 0]), np.sqrt(s[:, 1])
        d0 = np.where(n0 > EPS, n0, 1.0)
        d1 = np.where(n1 > EPS, n1, 1.0)
        dot = np.clip(s[:, 2] / (d0 * d1), -1.0, 1.0)
        linear = np.abs(dot) > DOT_THRESHOLD
        theta = np.arccos(np.where(linear, 0.0, dot))
        sin_theta = np.sin(theta)
        t = float(t)
        ca = np.where(linear, 1.0 - t, np.sin((1.0 - t) * theta) / np.where(linear, 1.0, sin_theta))
        cb = np.where(linear, t, np.sin(t * theta) / np.where(linear, 1.0, sin_theta))
    return ca.astype(np.float32), cb.astype(np.float32)


def tensor_totals(parts: list[np.ndarray]) -> tuple[float, float, float]:
    """(T00, T11, T01): each column of the rows' sums (float64 arrays [rows, 3], any order
    of chunks) correctly rounded by ``math.fsum`` (docs/SPEC.md "SLERP (v3)" "Tensor
    statistics"), so the result does not depend on where the chunks were cut."""
    rows = np.concatenate([np.asarray(p, np.float64).reshape(-1, 3) for p in parts])
    return tuple(math.fsum(rows[:, k].tolist()) for k in range(3))  # type: ignore[return-value]


def row_coefficients(a) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's per-row coefficients (float32 [n_rows] each, one value: the tensor's)
    from the tensor's ``row_dots`` sums (``a.stats``), added up once and cached."""
    sums, cache = a.stats[ROW_DOTS]
    key = ("ab", float(a.t))  # per t: a sweep's draws share the sums, not the t
    if key not in cache:
        cache[key] = coefficients(np.asarray([tensor_totals(sums)], np.float64), a.t)
    ca, cb = cache[key]
    return np.full(a.n_rows, ca[0], np.float32), np.full(a.n_rows, cb[0], np.float32)


def _dots_cpu(inputs, out, a) -> None:
    """``row_dots``: each row's S00, S11, S01 (float64 [n_rows, 3]), kept for the tensor."""
    from streammerge.kernels import cpu_rows

    (r0, r1) = a.model_rows
    a.counts[0].append(cpu_rows.row_dots(inputs[r0], a.dtypes[r0], inputs[r1], a.dtypes[r1],
                                         a.n_rows, a.row_len))  # fmt: skip


def _dots_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_rows

    n = a.n_rows * a.row_len
    v0, v1 = (launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows)
    a.counts[0].append(triton_rows.row_dots_triton(v0, v1, a.n_rows, a.row_len).cpu().numpy())


def _slerp_cpu(inputs, out, a) -> None:
    """``slerp``: the rows combined with the tensor's coefficients."""
    from streammerge.kernels import cpu_rows

    ca, cb = row_coefficients(a)
    (r0, r1) = a.model_rows
    cpu_rows.rows_combine(inputs[r0], a.dtypes[r0], inputs[r1], a.dtypes[r1], a.n_rows,
                          a.row_len, ca, cb, out, a.out_dtype)  # fmt: skip


def _slerp_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_rows

    torch, n = launch.torch, a.n_rows * a.row_len
    ca, cb = row_coefficients(a)
    v0, v1 = (launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows)
    dev = v0.device
    triton_rows.rows_combine_triton(v0, v1, a.n_rows, a.row_len, torch.from_numpy(ca).to(dev),
                                    torch.from_numpy(cb).to(dev),
                                    launch.typed(out, a.out_dtype, n))  # fmt: skip


#: slerp's statistics pass: the rows' sums (a list of float64 [rows, 3]) and a cache.
DOTS_PASS = RowPass(ROW_DOTS, _dots_cpu, _dots_triton, accumulators=lambda n_models: ([], {}))

METHOD = Method(
    name="slerp",
    order=80,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(T,),
    summary="spherical interpolation of two models, one angle per tensor",
    source="Shoemake 1985; mergekit slerp",
    m3="t",
    min_models=2,
    max_models=2,
    row_passes=(DOTS_PASS, RowPass("slerp", _slerp_cpu, _slerp_triton)),
    base_is_input=True,
)
