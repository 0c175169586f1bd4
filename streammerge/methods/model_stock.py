"""model_stock: the base moved toward the fine-tunes' mean by a ratio set by the angle
between their task vectors (Model Stock, arXiv 2403.19522; mergekit ``model_stock``;
docs/SPEC.md "Model Stock").

One ``t`` per tensor: a statistics pass (``row_stats``: ``stock_dots``, float64 sums in a
fixed block order) gives each task vector's squared norm and each pair's dot product,
``stock_t`` turns them into ``t`` on the host as mergekit's chain of working-dtype ops, and
the elementwise pass computes ``t * mean + (1 - t) * base`` op by op in the working dtype.
No weights: M3 has nothing to draw. ``filter_wise``: one ``t`` per row of the last
dimension (``Method.row_unit``: the chunks hold whole rows); the writing pass takes each
row's sums from the chunk (``cpu_stock.stock_row_dots``), ``stock_t_rows`` their ``t`` on the
host, ``cpu_stock.stock_rows_chunk`` the merged value.
"""

from __future__ import annotations

import numpy as np

from streammerge.methods.method import Method, RowPass
from streammerge.methods.params import Param

FILTER_WISE = Param("filter_wise", kind="bool", default=False, per_model=False, layered=False,
                    help="model_stock: one t per row of the last dimension (true) or per "
                    "tensor (false)")  # fmt: skip


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


def round_work_rows(v: np.ndarray, w_dtype: str) -> np.ndarray:
    """``round_work`` of each value of a float32 array (the same roundings)."""
    v = np.asarray(v, np.float32)
    if w_dtype == "F32":
        return v
    if w_dtype == "F16":
        with np.errstate(over="ignore"):
            return v.astype(np.float16).astype(np.float32)
    u = v.view(np.uint32).astype(np.uint64)
    u = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16) & 0xFFFFFFFF
    return np.where(np.isnan(v), v, u.astype(np.uint32).view(np.float32))


def stock_t_rows(sums: np.ndarray, n_models: int, w_dtype: str) -> np.ndarray:
    """``stock_t`` of each row of ``sums`` (float64 [R, K]) as float32 [R]: the same chain of
    W ops, elementwise over the rows (``filter_wise``)."""
    f, r = np.float32, (lambda v: round_work_rows(v, w_dtype))
    sums = np.asarray(sums, np.float64).reshape(-1, n_models + n_models * (n_models - 1) // 2)
    with np.errstate(all="ignore"):
        norms = [r(np.sqrt(sums[:, j]).astype(f)) for j in range(n_models)]
        floor = round_work(f(1e-6), w_dtype)
        cos_sum, s = np.zeros(len(sums), f), n_models
        pairs = [(j, k) for j in range(n_models) for k in range(j + 1, n_models)]
        for j, k in pairs:
            dot = r(sums[:, s].astype(f))
            s += 1
            npr = r(norms[j] * norms[k])
            c = r(dot / np.where(npr < floor, floor, npr))
            c = np.where(np.isnan(c), c, np.minimum(np.maximum(c, f(-1.0)), f(1.0)))
            cos_sum = (cos_sum + c).astype(f)
        cos = r(cos_sum / f(len(pairs)))
        num = r(f(n_models) * cos)
        den = r(f(1.0) + r(f(n_models - 1) * cos))
        return np.where(np.abs(den) < floor, f(0.0), r(num / den)).astype(f)


#: model_stock's statistics block (docs/SPEC.md "Model Stock"): its chunks are whole blocks.
STOCK_BLOCK = 1024


def work_dtype_of(a) -> str:
    """SPEC's W of a pass over the base and models: the plan's working dtype, else the
    inputs' common dtype, else F32."""
    dts = [a.dtypes[r] for r in (a.base_row, *a.model_rows) if r >= 0]
    return a.compute_dtype or (dts[0] if len(set(dts)) == 1 else "F32")


def stock_t_of(a) -> np.float32:
    """The tensor's t (a float32 value of W) from its ``stock_dots`` sums."""
    return stock_t(a.stats["stock_dots"][0], len(a.model_rows), work_dtype_of(a))


def _filter_wise(a) -> bool:
    return bool(dict(a.params).get("filter_wise", False))


def row_unit(shape: tuple, params) -> int | None:
    """``Method.row_unit``: with ``filter_wise`` the rows are the last dimension (a 1-D
    tensor one row, a 0-d one row of one); else None (the blocks)."""
    if not params.get("filter_wise", False):
        return None
    return int(shape[-1]) if shape and shape[-1] else 1


def _dots_cpu(inputs, out, a) -> None:
    """``stock_dots``: each block's sums, added into ``a.counts`` left to right (nothing
    with ``filter_wise``: the rows' sums come from the writing pass's chunk)."""
    from streammerge.kernels import cpu_stock

    if _filter_wise(a):
        return
    blocks = cpu_stock.stock_dots(inputs, list(a.dtypes), a.base_row, list(a.model_rows),
                                  a.count, a.compute_dtype)  # fmt: skip
    cpu_stock.add_blocks(a.counts[0], blocks)


def _dots_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import cpu_stock, triton_stock

    if _filter_wise(a):
        return
    n = a.count
    base = launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n)
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    sums = triton_stock.stock_dots_triton(base, models, n, a.compute_dtype)
    cpu_stock.add_blocks(a.counts[0], sums.cpu().numpy())


def _rows_t(a, sums) -> tuple[np.ndarray, np.ndarray]:
    """Each row's t and q = rW(1 - t) (float32 [rows]) from its sums."""
    w = work_dtype_of(a)
    t = stock_t_rows(sums, len(a.model_rows), w)
    return t, round_work_rows((np.float32(1.0) - t).astype(np.float32), w)


def _stock_cpu(inputs, out, a) -> None:
    """``model_stock``: ``t * mean + (1 - t) * base`` op by op in W."""
    from streammerge.kernels import cpu_stock

    args = (inputs, list(a.dtypes), a.base_row, list(a.model_rows))
    if _filter_wise(a):
        sums = cpu_stock.stock_row_dots(*args, a.n_rows, a.row_len, a.compute_dtype)
        t, q = _rows_t(a, sums)
        cpu_stock.stock_rows_chunk(*args, a.count, a.row_len, t, q, out, a.out_dtype,
                                   a.compute_dtype)  # fmt: skip
        return
    cpu_stock.stock_chunk(*args, a.count, stock_t_of(a), out, a.out_dtype,
                          a.compute_dtype)  # fmt: skip


def _stock_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_stock

    n = a.count
    base = launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n)
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    o = launch.typed(out, a.out_dtype, n)
    if _filter_wise(a):
        sums = triton_stock.stock_row_dots_triton(base, models, a.n_rows, a.row_len,
                                                  a.compute_dtype).cpu().numpy()  # fmt: skip
        t, q = _rows_t(a, sums)
        dev = base.device
        torch = launch.torch
        triton_stock.stock_rows_triton(base, models, n, a.row_len, torch.from_numpy(t).to(dev),
                                       torch.from_numpy(q).to(dev), o, a.compute_dtype)
        return
    t = stock_t_of(a)
    q = round_work(np.float32(1.0) - t, work_dtype_of(a))
    triton_stock.stock_triton(base, models, n, t, q, o, a.compute_dtype)


def _zero_sums(n_models: int) -> tuple:
    """float64 [K]: S_jj of each fine-tune, then S_jk for j < k."""
    return (np.zeros(n_models + n_models * (n_models - 1) // 2, np.float64),)


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
    row_passes=(RowPass("stock_dots", _dots_cpu, _dots_triton, accumulators=_zero_sums),
                RowPass("model_stock", _stock_cpu, _stock_triton)),
    row_block=STOCK_BLOCK,
    row_unit=row_unit,
)
