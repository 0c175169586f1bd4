"""model_stock: the base moved toward the fine-tunes' mean by a ratio set by the angle
between their task vectors (Model Stock, arXiv 2403.19522; mergekit ``model_stock``;
docs/SPEC.md "Model Stock").

One ``t`` per tensor: a statistics pass (``row_stats``: ``stock_dots``, float64 sums in a
fixed block order) gives each task vector's squared norm and each pair's dot product,
``stock_t`` turns them into ``t`` on the host as mergekit's chain of working-dtype ops, and
the elementwise pass computes ``t * mean + (1 - t) * base`` op by op in the working dtype.
No weights: M3 has nothing to draw. mergekit's ``filter_wise: true`` is refused.
"""

from __future__ import annotations

import numpy as np

from streammerge.methods.method import Method
from streammerge.methods.params import Param

FILTER_WISE = Param("filter_wise", kind="bool", default=False, per_model=False, layered=False,
                    only=False, help="model_stock: one t per row (mergekit's true is not "
                    "supported: one t per tensor)")  # fmt: skip


def round_work(v, w_dtype: str) -> np.float32:
    """float32 ``v`` rounded to the working dtype (``F32``, ``F16``, ``BF16``; nearest even)
    and widened back to float32 (SPEC "NearSwap": rW)."""
    v = np.float32(v)
    if w_dtype == "F32" or np.isnan(v):
        return v
    if w_dtype == "F16":
        with np.errstate(over="ignore"):
            return np.float32(np.float16(v))
    u = int(np.array(v).view(np.uint32))
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return np.array(u & 0xFFFFFFFF, np.uint32).view(np.float32)[()]


def stock_t(sums: np.ndarray, n_models: int, w_dtype: str) -> np.float32:
    """The tensor's t from its statistics (SPEC "Model Stock": mergekit's chain in W).

    Args:
        sums: float64 [K]: S_jj of each fine-tune, then S_jk for j < k in order.
        n_models: N >= 2; w_dtype: the working dtype.

    Returns:
        float32 value of W (NaN when a statistic is NaN).
    """
    f, r = np.float32, (lambda v: round_work(v, w_dtype))
    with np.errstate(all="ignore"):
        norms = [r(f(np.sqrt(sums[j]))) for j in range(n_models)]
        floor = r(f(1e-6))
        cos_sum, s = f(0.0), n_models
        pairs = [(j, k) for j in range(n_models) for k in range(j + 1, n_models)]
        for j, k in pairs:
            dot = r(f(sums[s]))
            s += 1
            npr = r(norms[j] * norms[k])
            c = r(dot / (floor if npr < floor else npr))  # noqa: FURB136 - NaN as torch
            c = c if np.isnan(c) else min(max(c, f(-1.0)), f(1.0))
            cos_sum = f(cos_sum + c)
        cos = r(cos_sum / f(len(pairs)))
        num = r(f(n_models) * cos)
        den = r(f(1.0) + r(f(n_models - 1) * cos))
        return f(0.0) if abs(den) < floor else r(num / den)


METHOD = Method(
    name="model_stock",
    order=95,
    uses_base=True,
    sparsifier="none",
    consensus="none",
    params=(FILTER_WISE,),
    summary="the base moved toward the fine-tunes' mean by their task vectors' angle",
    source="Model Stock, arXiv 2403.19522; mergekit model_stock",
    working_dtype="inputs",
    m3="none",
    min_models=2,
    row_op="model_stock",
    row_stats="stock_dots",
)
