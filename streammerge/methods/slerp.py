"""slerp: spherical interpolation of two models, one angle per tensor (mergekit ``slerp``;
docs/SPEC.md "SLERP (v3)").

A row-wise method: each chunk holds whole rows; a kernel sums each row's S00, S11, S01
(``kernels/cpu_rows.row_dots``), the rows' sums add up to the tensor's (a ``row_dots`` pass
first when the tensor spans several chunks), ``coefficients`` turns them into the tensor's
two coefficients on the host, and a second kernel combines the rows (``rows_combine``).
M3 draws ``t`` (t = 1 - lam: the weight of model 1).
"""

from __future__ import annotations

import numpy as np

from streammerge.methods.method import Method
from streammerge.methods.params import Param

#: mergekit's constants (merge_methods/slerp.py): a row whose |cos theta| exceeds
#: DOT_THRESHOLD is interpolated linearly; a norm at most EPS is taken as 1.
DOT_THRESHOLD = 0.9995
EPS = 1e-8

T = Param("t", default=None, per_model=False, m3=True,
          help="slerp: interpolation factor, 0 gives model 0 (mergekit's base_model), 1 "
          "model 1; M3 draws it as 1 - lam")  # fmt: skip

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
    row_op="slerp",
    base_is_input=True,
    row_coefficients=coefficients,
)
