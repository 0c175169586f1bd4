"""Model Stock CPU kernels (numba): the statistics pass and the merged value.

Contract: docs/SPEC.md "Model Stock", tested bit for bit against ``tests/spec_reference.py``
and against the Triton kernels of ``kernels/triton_stock.py``.

A chunk is ``n`` elements of the base (slot row ``base_row``) and of N fine-tunes (slot rows
``model_rows``), raw little-endian byte rows as in ``cpu_merge``, starting at a multiple of
``STOCK_BLOCK`` elements of the tensor.

- ``stock_dots``: per block of ``STOCK_BLOCK`` elements, the K = N + N(N-1)/2 float64 sums
  (S_jj of each fine-tune, then S_jk for j < k in order), each a pairwise tree over the
  block padded with +0.0; the caller adds the blocks left to right.
- ``stock_chunk``: ``rW(rW(t * avg) + rW(rW(1 - t) * x_b))`` with ``avg`` the fine-tunes'
  mean in W.
- ``filter_wise``: ``stock_row_dots`` (the K sums of each row of ``row_len`` elements, the
  blocks from the row's start) and ``stock_rows_chunk`` (the merged value with each row's
  t and q = rW(1 - t)); a chunk then holds whole rows.
"""

from __future__ import annotations

import numba
import numpy as np

from .cpu_loops import (BF16, F16, F32, base_and_task_vectors, launch_parts, part_blocks,
                         power_of_two)
from .cpu_merge import _decode_block, _encode_block
from .cpu_nearswap import round_op, round_work
from .cpu_ram import _slot
from .cpu_rows import _checked, _tree

#: Elements per block of a statistic (SPEC), a power of two; chunks start at its multiples.
STOCK_BLOCK = 1024


def n_stats(n_models: int) -> int:
    """K: N squared norms, then N(N-1)/2 dot products."""
    return n_models + n_models * (n_models - 1) // 2


@numba.njit(inline="always")
def task_vectors_w(inputs, codes, base_row, model_rows, first, m, w_code, xb, tv):
    """One block of the task vectors in the working dtype W (SPEC "Model Stock", "SCE"):
    xb[:m] = rW(base), tv[j, :m] = rW(rW(x_j) - xb), the inputs rounded to W at load as
    mergekit does. xb: float32 [>= m]; tv: float32 [n_models, >= m]."""
    base_and_task_vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, tv)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dots_kernel(inputs, codes, base_row, model_rows, n, w_code, out, n_parts):
    # parts of contiguous blocks, each with its scratch made once (not once a block)
    n_models = model_rows.shape[0]
    n_blocks = (n + STOCK_BLOCK - 1) // STOCK_BLOCK
    n_parts = max(1, min(n_blocks, n_parts))
    for part in numba.prange(n_parts):
        xb = np.empty(STOCK_BLOCK, np.float32)
        d = np.zeros((n_models, STOCK_BLOCK), np.float32)
        p = np.empty(STOCK_BLOCK, np.float64)
        lo, hi = part_blocks(part, n_parts, n_blocks)
        for k in range(lo, hi):
            first = k * STOCK_BLOCK
            m = min(STOCK_BLOCK, n - first)
            task_vectors_w(inputs, codes, base_row, model_rows, first, m, w_code, xb, d)
            s = 0
            for j in range(n_models):
                _products(d[j], d[j], m, w_code, True, p)
                out[k, s] = _tree(p)
                s += 1
            for j in range(n_models):
                for q in range(j + 1, n_models):
                    _products(d[j], d[q], m, w_code, False, p)
                    out[k, s] = _tree(p)
                    s += 1


@numba.njit(inline="always")
def _cross_loop(dj, dq, m, c, p):
    for i in range(m):
        p[i] = np.float64(round_op(dj[i] * dq[i], c))


@numba.njit(inline="always")
def _products(dj, dq, m, w_code, square, p):
    """p[:m] = one block's products (SPEC "Model Stock": a square exact in float64, a
    cross product rounded to W), p[m:] = +0.0. Row views, the working dtype a constant in
    each loop and no test of i inside one: the loops vectorize (``cpu_loops``)."""
    if square:
        for i in range(m):
            a = np.float64(dj[i])
            p[i] = a * a
    elif w_code == BF16:
        _cross_loop(dj, dq, m, BF16, p)
    elif w_code == F16:
        _cross_loop(dj, dq, m, F16, p)
    else:
        _cross_loop(dj, dq, m, F32, p)
    for i in range(m, STOCK_BLOCK):
        p[i] = 0.0


@numba.njit(inline="always")
def _base_and_sum(inputs, codes, base_row, model_rows, first, m, w_code, xb, a, x):
    """One block of the merge pass: the base's ``m`` elements from ``first`` into ``xb``
    (float32), and into ``a`` (zeros) the fine-tunes' sum in W, model by model, each term
    and partial sum rounded (SPEC "Model Stock": mergekit's mean of the models). ``x``:
    float32 [STOCK_BLOCK] scratch."""
    _decode_block(inputs[base_row], codes[base_row], first, m, xb)
    for j in range(model_rows.shape[0]):
        r = model_rows[j]
        _decode_block(inputs[r], codes[r], first, m, x)
        if w_code == BF16:
            _add_rounded(a, x, m, BF16)
        elif w_code == F16:
            _add_rounded(a, x, m, F16)
        else:
            _add_rounded(a, x, m, F32)


@numba.njit(inline="always")
def _add_rounded(a, x, m, c):
    for i in range(m):
        a[i] = round_op(a[i] + round_work(x[i], c), c)  # x[i]: a stored value


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _stock_kernel(inputs, codes, base_row, model_rows, n, t32, w_code, out, out_code, n_parts):
    count = np.float32(model_rows.shape[0])
    q = round_work(np.float32(1.0) - t32, w_code)
    n_blocks = (n + STOCK_BLOCK - 1) // STOCK_BLOCK
    n_parts = max(1, min(n_blocks, n_parts))
    for part in numba.prange(n_parts):  # scratch made once per part of blocks
        xb = np.empty(STOCK_BLOCK, np.float32)
        a = np.empty(STOCK_BLOCK, np.float32)
        x = np.empty(STOCK_BLOCK, np.float32)
        lo, hi = part_blocks(part, n_parts, n_blocks)
        for k in range(lo, hi):
            first = k * STOCK_BLOCK
            m = min(STOCK_BLOCK, n - first)
            a[:] = np.float32(0.0)  # the models' sum starts from +0.0
            _base_and_sum(inputs, codes, base_row, model_rows, first, m, w_code, xb, a, x)
            if w_code == BF16:
                _interpolate(a, xb, m, count, t32, q, BF16)
            elif w_code == F16:
                _interpolate(a, xb, m, count, t32, q, F16)
            else:
                _interpolate(a, xb, m, count, t32, q, F32)
            _encode_block(xb, out_code, first, m, out)


@numba.njit(inline="always")
def _interpolate(a, xb, m, count, t32, q, c):
    """xb = rW(rW(t * rW(a / N)) + rW(q * rW(xb))), the working dtype ``c`` a constant; a
    division by N = 2**k is the multiply by 2**-k (the same IEEE result)."""
    if power_of_two(np.int64(count)):
        inv = np.float32(1.0) / count
        for i in range(m):
            avg = round_op(a[i] * inv, c)
            p = round_op(t32 * avg, c)
            xb[i] = round_op(p + round_op(q * round_work(xb[i], c), c), c)
    else:
        for i in range(m):
            avg = round_op(a[i] / count, c)
            p = round_op(t32 * avg, c)
            xb[i] = round_op(p + round_op(q * round_work(xb[i], c), c), c)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _row_dots_kernel(inputs, codes, base_row, model_rows, n_rows, row_len, w_code, out):
    n_models = model_rows.shape[0]
    for r in numba.prange(n_rows):
        xb = np.empty(STOCK_BLOCK, np.float32)
        d = np.zeros((n_models, STOCK_BLOCK), np.float32)
        p = np.empty(STOCK_BLOCK, np.float64)
        for lo in range(0, row_len, STOCK_BLOCK):
            m = min(STOCK_BLOCK, row_len - lo)
            task_vectors_w(inputs, codes, base_row, model_rows, r * row_len + lo, m, w_code, xb, d)
            s = 0
            for j in range(n_models):
                _products(d[j], d[j], m, w_code, True, p)
                out[r, s] = out[r, s] + _tree(p)
                s += 1
            for j in range(n_models):
                for q in range(j + 1, n_models):
                    _products(d[j], d[q], m, w_code, False, p)
                    out[r, s] = out[r, s] + _tree(p)
                    s += 1


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _stock_rows_kernel(inputs, codes, base_row, model_rows, n, row_len, ts, qs, w_code, out,
                       out_code):  # fmt: skip
    count = np.float32(model_rows.shape[0])
    for k in numba.prange((n + STOCK_BLOCK - 1) // STOCK_BLOCK):
        first = k * STOCK_BLOCK
        m = min(STOCK_BLOCK, n - first)
        xb = np.empty(STOCK_BLOCK, np.float32)
        a = np.zeros(STOCK_BLOCK, np.float32)
        _base_and_sum(inputs, codes, base_row, model_rows, first, m, w_code, xb, a,
                      np.empty(STOCK_BLOCK, np.float32))  # fmt: skip
        for i in range(m):
            row = (first + i) // row_len
            avg = round_op(a[i] / count, w_code)
            p = round_op(ts[row] * avg, w_code)
            xb[i] = round_op(p + round_op(qs[row] * round_work(xb[i], w_code), w_code),
                             w_code)  # fmt: skip
        _encode_block(xb, out_code, first, m, out)


def stock_row_dots(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
                   n_rows: int, row_len: int, work: str | None = None) -> np.ndarray:  # fmt: skip
    """The K sums of each row (``filter_wise``; SPEC "Model Stock"): float64 [n_rows, K],
    each row's blocks from its first element, added left to right.

    Raises:
        ValueError: bad rows, dtypes or counts.
    """
    if n_rows < 0 or row_len <= 0:
        raise ValueError(f"need n_rows >= 0 and row_len > 0, got {n_rows}, {row_len}")
    codes, mr, w_code, _ = _slot(inputs, dtypes, base_row, model_rows, n_rows * row_len, work)
    out = np.zeros((n_rows, n_stats(len(model_rows))), np.float64)
    if n_rows:
        _row_dots_kernel(inputs, codes, base_row, mr, n_rows, row_len, w_code, out)
    return out


def stock_rows_chunk(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
                     n: int, row_len: int, ts: np.ndarray, qs: np.ndarray, out: np.ndarray,
                     out_dtype: str, work: str | None = None) -> None:  # fmt: skip
    """The merged value of ``n`` elements (whole rows of ``row_len``) with each row's t and
    q = rW(1 - t) (float32 [n // row_len], values of W; ``filter_wise``).

    Raises:
        ValueError: bad rows, dtypes, counts or t arrays.
    """
    if row_len <= 0 or n % row_len:
        raise ValueError(f"n = {n} is not whole rows of {row_len}")
    codes, mr, w_code, _ = _slot(inputs, dtypes, base_row, model_rows, n, work)
    co = _checked(out, out_dtype, n, "out")
    for v, what in ((ts, "ts"), (qs, "qs")):
        if not isinstance(v, np.ndarray) or v.dtype != np.float32 or v.shape != (n // row_len,):
            raise ValueError(f"{what} must be a float32 array of {n // row_len} values")
    if n:
        _stock_rows_kernel(inputs, codes, base_row, mr, n, row_len, np.ascontiguousarray(ts),
                           np.ascontiguousarray(qs), w_code, out, co)  # fmt: skip


def stock_dots(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
               n: int, work: str | None = None) -> np.ndarray:  # fmt: skip
    """The per-block statistics of ``n`` elements (SPEC "Model Stock").

    Returns:
        float64 array [ceil(n / STOCK_BLOCK), K] (``n_stats``): each block's sums.

    Raises:
        ValueError: bad rows or dtypes.
    """
    codes, mr, w_code, _ = _slot(inputs, dtypes, base_row, model_rows, n, work)
    out = np.zeros(((n + STOCK_BLOCK - 1) // STOCK_BLOCK, n_stats(len(model_rows))), np.float64)
    if n:
        _dots_kernel(inputs, codes, base_row, mr, n, w_code, out, launch_parts())
    return out


def stock_chunk(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
                n: int, t: np.float32, out: np.ndarray, out_dtype: str,
                work: str | None = None) -> None:  # fmt: skip
    """The merged value of ``n`` elements into the raw byte row ``out`` (SPEC "Model Stock").

    Args:
        t: the tensor's t, a float32 value of the working dtype (``stock_t``).

    Raises:
        ValueError: bad rows, dtypes or output.
    """
    codes, mr, w_code, _ = _slot(inputs, dtypes, base_row, model_rows, n, work)
    co = _checked(out, out_dtype, n, "out")
    if n:
        _stock_kernel(inputs, codes, base_row, mr, n, np.float32(t), w_code, out, co,
                      launch_parts())  # fmt: skip


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _add_blocks(total, blocks):
    for b in range(blocks.shape[0]):
        for k in range(blocks.shape[1]):
            total[k] = total[k] + blocks[b, k]


def add_blocks(total: np.ndarray, blocks: np.ndarray) -> None:
    """``total`` (float64 [K]) += each block's sums (float64 [blocks, K]), left to right
    (SPEC's block order: the float64 adds of ``for row in blocks: total += row``, compiled:
    a Python loop cost ~1 us a block, 4 s of a 2 GB multislerp merge's one compute thread).

    Raises:
        ValueError: ``total`` is not a writable float64 [K] or ``blocks`` not [*, K].
    """
    blocks = np.asarray(blocks, np.float64)
    if total.dtype != np.float64 or total.ndim != 1 or blocks.ndim != 2 \
            or blocks.shape[1] != total.shape[0]:  # fmt: skip
        raise ValueError(f"need float64 totals [K] and block sums [*, K], got {total.dtype} "
                         f"{total.shape} and {blocks.shape}")  # fmt: skip
    _add_blocks(total, np.ascontiguousarray(blocks))


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for each dtype."""
    add_blocks(np.zeros(2), np.zeros((1, 2)))
    for dt in ("F32", "F16", "BF16"):
        s = np.zeros((3, 16), np.uint8)
        stock_dots(s, [dt] * 3, 0, [1, 2], 2)
        stock_chunk(s, [dt] * 3, 0, [1, 2], 2, np.float32(0.5), np.zeros(16, np.uint8), dt)
        stock_row_dots(s, [dt] * 3, 0, [1, 2], 2, 1)
        stock_rows_chunk(s, [dt] * 3, 0, [1, 2], 2, 1, np.zeros(2, np.float32),
                         np.zeros(2, np.float32), np.zeros(16, np.uint8), dt)  # fmt: skip
