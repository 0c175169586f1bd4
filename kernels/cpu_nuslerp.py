"""NuSLERP CPU kernels (numba): task vectors against a base, per-column sums and the
combination with per-row or per-column coefficients.

Contract: docs/SPEC.md "NuSLERP", tested bit for bit against ``tests/spec_reference.py``
and against the Triton kernels of ``kernels/triton_nuslerp.py``. nuslerp without a base
and without ``nuslerp_row_wise`` uses ``cpu_rows`` (slerp's kernels) alone.

A chunk holds ``n_rows`` whole rows of ``row_len`` elements, each input a raw little-endian
byte row of the slot (bf16 as bits), as in ``cpu_merge``. With a base, the inputs are the
task vectors ``x = float32(float32(v0) - b)``, ``y = float32(float32(v1) - b)``.

- ``tv_row_dots``: ``cpu_rows.row_dots`` of the task vectors (same blocks and tree).
- ``col_dots``: adds each column's x*x, y*y, x*y (float64, exact products) into a
  float64 [row_len, 3] accumulator row by row in row order (threads split the columns).
- ``combine``: ``float32(ca[k] * x) + float32(cb[k] * y)`` (plus ``b`` with a base, one more
  float32 addition), k the element's row or column, no FMA, stored rounded.
"""

from __future__ import annotations

import numba
import numpy as np

from .common import FLOAT_CODES, FLOAT_ITEMSIZE
from .cpu_loops import BF16, F16, F32, round_all, task_vector
from .cpu_merge import _decode_block, _encode_block
from .cpu_nearswap import round_op, round_work
from .cpu_rows import DOT_BLOCK, _block_dots, _checked, _tree

#: Columns per parallel task of ``col_dots``; elements per task of ``combine``.
COL_BLOCK = 256
COMBINE_BLOCK = 1024


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _load(row0, code0, row1, code1, rowb, codeb, has_base, first, m, x, y, b, w):
    """x[:m], y[:m]: the two inputs from element ``first`` rounded to the working dtype
    ``w`` (task vectors rW(rW(x) - b) with a base; b[:m] then holds the base in W). With W
    float32 every rounding is the identity: ``x - b`` in float32. (``cpu_loops``' loops.)"""
    if has_base:
        _decode_block(rowb, codeb, first, m, b)
        round_all(b, m, w)
        task_vector(row0, code0, first, m, b, w, x)
        task_vector(row1, code1, first, m, b, w, y)
    else:
        _decode_block(row0, code0, first, m, x)
        round_all(x, m, w)
        _decode_block(row1, code1, first, m, y)
        round_all(y, m, w)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _tv_row_dots_kernel(row0, code0, row1, code1, rowb, codeb, has_base, n_rows, row_len, w,
                        stats):  # fmt: skip
    for r in numba.prange(n_rows):
        x = np.empty(DOT_BLOCK, np.float32)
        y = np.empty(DOT_BLOCK, np.float32)
        b = np.empty(DOT_BLOCK, np.float32)
        p00 = np.empty(DOT_BLOCK, np.float64)
        p11 = np.empty(DOT_BLOCK, np.float64)
        p01 = np.empty(DOT_BLOCK, np.float64)
        s00 = 0.0
        s11 = 0.0
        s01 = 0.0
        for lo in range(0, row_len, DOT_BLOCK):
            m = min(DOT_BLOCK, row_len - lo)
            first = r * row_len + lo
            _load(row0, code0, row1, code1, rowb, codeb, has_base, first, m, x, y, b, w)
            d00, d11, d01 = _block_dots(x, y, m, p00, p11, p01)
            s00 = s00 + d00
            s11 = s11 + d11
            s01 = s01 + d01
        stats[r, 0] = s00
        stats[r, 1] = s11
        stats[r, 2] = s01


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _col_dots_kernel(row0, code0, row1, code1, rowb, codeb, has_base, n_rows, row_len, w, acc):
    for k in numba.prange((row_len + COL_BLOCK - 1) // COL_BLOCK):
        c0 = k * COL_BLOCK
        m = min(COL_BLOCK, row_len - c0)
        x = np.empty(COL_BLOCK, np.float32)
        y = np.empty(COL_BLOCK, np.float32)
        b = np.empty(COL_BLOCK, np.float32)
        for r in range(n_rows):  # row order: each column's sums left to right
            _load(row0, code0, row1, code1, rowb, codeb, has_base, r * row_len + c0, m, x, y, b, w)
            for i in range(m):
                u = np.float64(x[i])
                v = np.float64(y[i])
                acc[c0 + i, 0] = acc[c0 + i, 0] + u * u
                acc[c0 + i, 1] = acc[c0 + i, 1] + v * v
                acc[c0 + i, 2] = acc[c0 + i, 2] + u * v


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _combine_kernel(row0, code0, row1, code1, rowb, codeb, has_base, n, row_len, per_col, ca, cb,
                    w, out, out_code):  # fmt: skip
    for k in numba.prange((n + COMBINE_BLOCK - 1) // COMBINE_BLOCK):
        first = k * COMBINE_BLOCK
        m = min(COMBINE_BLOCK, n - first)
        x = np.empty(COMBINE_BLOCK, np.float32)
        y = np.empty(COMBINE_BLOCK, np.float32)
        b = np.empty(COMBINE_BLOCK, np.float32)
        _load(row0, code0, row1, code1, rowb, codeb, has_base, first, m, x, y, b, w)
        row = first // row_len  # the element's row and column, advanced without a division
        col = first - row * row_len
        for i in range(m):
            j = col if per_col else row
            col += 1
            if col == row_len:
                col = 0
                row += 1
            o = np.float32(ca[j] * x[i]) + np.float32(cb[j] * y[i])
            if has_base:
                o = o + b[i]
            x[i] = o
        _encode_block(x, out_code, first, m, out)


@numba.njit(inline="always")
def _unit_loop(x, y, m, n0, n1, c, p):
    for i in range(m):
        p[i] = np.float64(round_op(round_op(x[i] / n0, c) * round_op(y[i] / n1, c), c))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _unit_products(x, y, m, n0, n1, w, p):
    """p[:m] = float64(rW(rW(x / n0) * rW(y / n1))), the rest of the block +0.0."""
    p[m:] = 0.0
    if w == BF16:
        _unit_loop(x, y, m, n0, n1, BF16, p)
    elif w == F16:
        _unit_loop(x, y, m, n0, n1, F16, p)
    else:
        _unit_loop(x, y, m, n0, n1, F32, p)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _unit_row_dots_kernel(row0, code0, row1, code1, rowb, codeb, has_base, n_rows, row_len, w,
                          n0, n1, sums):  # fmt: skip
    for r in numba.prange(n_rows):
        x = np.empty(DOT_BLOCK, np.float32)
        y = np.empty(DOT_BLOCK, np.float32)
        b = np.empty(DOT_BLOCK, np.float32)
        p = np.empty(DOT_BLOCK, np.float64)
        s = 0.0
        for lo in range(0, row_len, DOT_BLOCK):
            m = min(DOT_BLOCK, row_len - lo)
            first = r * row_len + lo
            _load(row0, code0, row1, code1, rowb, codeb, has_base, first, m, x, y, b, w)
            _unit_products(x, y, m, n0[r], n1[r], w, p)
            s = s + _tree(p)
        sums[r] = s


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _unit_col_dots_kernel(row0, code0, row1, code1, rowb, codeb, has_base, n_rows, row_len, w,
                          n0, n1, acc):  # fmt: skip
    for k in numba.prange((row_len + COL_BLOCK - 1) // COL_BLOCK):
        c0 = k * COL_BLOCK
        m = min(COL_BLOCK, row_len - c0)
        x = np.empty(COL_BLOCK, np.float32)
        y = np.empty(COL_BLOCK, np.float32)
        b = np.empty(COL_BLOCK, np.float32)
        for r in range(n_rows):  # row order: each column's sum left to right
            _load(row0, code0, row1, code1, rowb, codeb, has_base, r * row_len + c0, m, x, y, b, w)
            for i in range(m):
                c = c0 + i
                u = round_op(round_op(x[i] / n0[c], w) * round_op(y[i] / n1[c], w), w)
                acc[c] = acc[c] + np.float64(u)


@numba.njit(inline="always")
def _chain_one(x, y, lin, ca, cb, st, p, q, w):
    """One element of the chain's combination (no base)."""
    if lin:
        return round_op(round_op(p * x, w) + round_op(q * y, w), w)
    o = round_op(round_op(ca * x, w) + round_op(cb * y, w), w)
    return round_op(o / st, w)


@numba.njit(inline="always")
def _chain_loops(x, y, b, i, seg, col, row, per_col, has_base, lin, ca, cb, st, p, q, c):
    if per_col:  # each element its column's scalars
        for t in range(seg):
            k = col + t
            x[i + t] = _chain_one(x[i + t], y[i + t], lin[k], ca[k], cb[k], st[k], p, q, c)
    else:  # the row's scalars for the whole run (LLVM vectorizes each case)
        lr, ar, br, sr = lin[row], ca[row], cb[row], st[row]
        for t in range(seg):
            x[i + t] = _chain_one(x[i + t], y[i + t], lr, ar, br, sr, p, q, c)
    if has_base:
        for t in range(seg):
            x[i + t] = round_op(b[i + t] + x[i + t], c)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _chain_run(x, y, b, i, seg, col, row, per_col, has_base, lin, ca, cb, st, p, q, w):
    """The chain's combination of x[i:i + seg] (one row's run) in place (the working dtype
    a constant per branch: ``cpu_loops``)."""
    if w == BF16:
        _chain_loops(x, y, b, i, seg, col, row, per_col, has_base, lin, ca, cb, st, p, q, BF16)
    elif w == F16:
        _chain_loops(x, y, b, i, seg, col, row, per_col, has_base, lin, ca, cb, st, p, q, F16)
    else:
        _chain_loops(x, y, b, i, seg, col, row, per_col, has_base, lin, ca, cb, st, p, q, F32)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _chain_combine_kernel(row0, code0, row1, code1, rowb, codeb, has_base, n, row_len, per_col,
                          lin, ca, cb, st, p, q, w, out, out_code):  # fmt: skip
    for k in numba.prange((n + COMBINE_BLOCK - 1) // COMBINE_BLOCK):
        first = k * COMBINE_BLOCK
        m = min(COMBINE_BLOCK, n - first)
        x = np.empty(COMBINE_BLOCK, np.float32)
        y = np.empty(COMBINE_BLOCK, np.float32)
        b = np.empty(COMBINE_BLOCK, np.float32)
        _load(row0, code0, row1, code1, rowb, codeb, has_base, first, m, x, y, b, w)
        row = first // row_len  # the block in runs of one row: no division per element
        col = first - row * row_len
        i = 0
        while i < m:
            seg = min(m - i, row_len - col)
            _chain_run(x, y, b, i, seg, col, row, per_col, has_base, lin, ca, cb, st, p, q, w)
            i += seg
            col += seg
            if col == row_len:
                col = 0
                row += 1
        _encode_block(x, out_code, first, m, out)

def _rows(v0, dtype0, v1, dtype1, base, dtype_b, n):
    """Codes of the inputs (the base: a 1-byte stand-in when None) and the has-base flag."""
    c0 = _checked(v0, dtype0, n, "v0")
    c1 = _checked(v1, dtype1, n, "v1")
    if base is None:
        return c0, c1, np.zeros(1, np.uint8), c0, False
    return c0, c1, base, _checked(base, dtype_b, n, "base"), True


def tv_row_dots(v0: np.ndarray, dtype0: str, v1: np.ndarray, dtype1: str, base: np.ndarray | None,
                dtype_b: str | None, n_rows: int, row_len: int,
                work: str = "F32") -> np.ndarray:  # fmt: skip
    """Per-row S00, S11, S01 (float64 [n_rows, 3]) of the task vectors (``base`` None: the
    inputs themselves), in ``cpu_rows.row_dots``'s order (SPEC "NuSLERP").

    Raises:
        ValueError: a bad row, dtype, or negative count.
    """
    if n_rows < 0 or row_len < 0:
        raise ValueError(f"n_rows and row_len must be >= 0, got {n_rows}, {row_len}")
    c0, c1, rb, cbase, has = _rows(v0, dtype0, v1, dtype1, base, dtype_b, n_rows * row_len)
    stats = np.zeros((n_rows, 3), np.float64)
    _tv_row_dots_kernel(v0, c0, v1, c1, rb, cbase, has, n_rows, row_len, FLOAT_CODES[work], stats)
    return stats


def col_dots(v0: np.ndarray, dtype0: str, v1: np.ndarray, dtype1: str, base: np.ndarray | None,
             dtype_b: str | None, n_rows: int, row_len: int, acc: np.ndarray,
             work: str = "F32") -> None:  # fmt: skip
    """Adds the chunk's rows into ``acc`` (float64 [row_len, 3]: each column's T00, T11,
    T01 so far), row by row in order (SPEC "NuSLERP").

    Raises:
        ValueError: a bad row, dtype, count or accumulator.
    """
    if n_rows < 0 or row_len < 0:
        raise ValueError(f"n_rows and row_len must be >= 0, got {n_rows}, {row_len}")
    if not isinstance(acc, np.ndarray) or acc.dtype != np.float64 or acc.shape != (row_len, 3) \
            or not acc.flags.c_contiguous:  # fmt: skip
        raise ValueError(f"acc must be a contiguous float64 array [{row_len}, 3]")
    c0, c1, rb, cbase, has = _rows(v0, dtype0, v1, dtype1, base, dtype_b, n_rows * row_len)
    if n_rows and row_len:
        _col_dots_kernel(v0, c0, v1, c1, rb, cbase, has, n_rows, row_len, FLOAT_CODES[work], acc)


def combine(v0: np.ndarray, dtype0: str, v1: np.ndarray, dtype1: str, base: np.ndarray | None,
            dtype_b: str | None, n: int, row_len: int, per_col: bool, ca: np.ndarray,
            cb: np.ndarray, out: np.ndarray, out_dtype: str,
            work: str = "F32") -> None:  # fmt: skip
    """``out = float32(ca[k] * x) + float32(cb[k] * y)`` (``+ b`` with a base) for the ``n``
    elements (whole rows of ``row_len``), k the element's column (``per_col``) or row;
    stored rounded to ``out_dtype`` (SPEC "NuSLERP").

    Args:
        ca, cb: float32 arrays, one coefficient per row / column.

    Raises:
        ValueError: a bad row, dtype or coefficient array.
    """
    if row_len <= 0 or n % row_len:
        raise ValueError(f"n = {n} is not whole rows of {row_len}")
    c0, c1, rb, cbase, has = _rows(v0, dtype0, v1, dtype1, base, dtype_b, n)
    co = _checked(out, out_dtype, n, "out")
    k = row_len if per_col else n // row_len
    for c, what in ((ca, "ca"), (cb, "cb")):
        if not isinstance(c, np.ndarray) or c.dtype != np.float32 or c.shape != (k,):
            raise ValueError(f"{what} must be a float32 array of {k} coefficients")
    if n:
        _combine_kernel(v0, c0, v1, c1, rb, cbase, has, n, row_len, bool(per_col),
                        np.ascontiguousarray(ca), np.ascontiguousarray(cb), FLOAT_CODES[work], out,
                        co)  # fmt: skip


def _vector_array(a: np.ndarray, k: int, dtype, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != (k,):
        raise ValueError(f"{what} must be a {np.dtype(dtype).name} array of {k} values")
    return np.ascontiguousarray(a)


def unit_row_dots(v0: np.ndarray, dtype0: str, v1: np.ndarray, dtype1: str,
                  base: np.ndarray | None, dtype_b: str | None, n_rows: int, row_len: int,
                  n0: np.ndarray, n1: np.ndarray, work: str) -> np.ndarray:  # fmt: skip
    """Per row (float64 [n_rows]): the sum of ``rW(rW(x / n0[r]) * rW(y / n1[r]))`` in
    ``cpu_rows.row_dots``'s block and tree order, x, y the inputs (task vectors) in W
    (SPEC "NuSLERP", the chain's cosine pass). n0, n1: float32 [n_rows], the clamped norms.

    Raises:
        ValueError: a bad row, dtype or norm array.
    """
    if n_rows < 0 or row_len < 0:
        raise ValueError(f"n_rows and row_len must be >= 0, got {n_rows}, {row_len}")
    c0, c1, rb, cbase, has = _rows(v0, dtype0, v1, dtype1, base, dtype_b, n_rows * row_len)
    n0, n1 = (_vector_array(v, n_rows, np.float32, f"n{j}") for j, v in enumerate((n0, n1)))
    sums = np.zeros(n_rows, np.float64)
    _unit_row_dots_kernel(v0, c0, v1, c1, rb, cbase, has, n_rows, row_len, FLOAT_CODES[work],
                          n0, n1, sums)  # fmt: skip
    return sums


def unit_col_dots(v0: np.ndarray, dtype0: str, v1: np.ndarray, dtype1: str,
                  base: np.ndarray | None, dtype_b: str | None, n_rows: int, row_len: int,
                  n0: np.ndarray, n1: np.ndarray, work: str, acc: np.ndarray) -> None:  # fmt: skip
    """Adds the chunk's rows of ``rW(rW(x / n0[c]) * rW(y / n1[c]))`` into each column's
    float64 sum ``acc`` [row_len], row by row in order (SPEC "NuSLERP").

    Raises:
        ValueError: a bad row, dtype, norm array or accumulator.
    """
    if n_rows < 0 or row_len < 0:
        raise ValueError(f"n_rows and row_len must be >= 0, got {n_rows}, {row_len}")
    c0, c1, rb, cbase, has = _rows(v0, dtype0, v1, dtype1, base, dtype_b, n_rows * row_len)
    n0, n1 = (_vector_array(v, row_len, np.float32, f"n{j}") for j, v in enumerate((n0, n1)))
    _vector_array(acc, row_len, np.float64, "acc")
    if n_rows and row_len:
        _unit_col_dots_kernel(v0, c0, v1, c1, rb, cbase, has, n_rows, row_len, FLOAT_CODES[work],
                              n0, n1, acc)  # fmt: skip


def chain_combine(v0: np.ndarray, dtype0: str, v1: np.ndarray, dtype1: str,
                  base: np.ndarray | None, dtype_b: str | None, n: int, row_len: int,
                  per_col: bool, coef: tuple, out: np.ndarray, out_dtype: str,
                  work: str) -> None:  # fmt: skip
    """The merged value in the working dtype W (SPEC "NuSLERP", the chain): per element of
    vector k, ``rW(rW(rW(ca*x) + rW(cb*y)) / st)``, or ``rW(rW(p*x) + rW(q*y))`` where
    ``lin[k]``, plus ``rW(b + .)`` with a base; stored rounded to ``out_dtype``.

    Args:
        coef: (lin bool [k], ca, cb, st float32 [k], p, q float32): ``chain_coefficients``.

    Raises:
        ValueError: a bad row, dtype or coefficient array.
    """
    if row_len <= 0 or n % row_len:
        raise ValueError(f"n = {n} is not whole rows of {row_len}")
    c0, c1, rb, cbase, has = _rows(v0, dtype0, v1, dtype1, base, dtype_b, n)
    co = _checked(out, out_dtype, n, "out")
    k = row_len if per_col else n // row_len
    lin, ca, cb, st, p, q = coef
    lin = _vector_array(lin, k, np.bool_, "lin")
    ca, cb, st = (_vector_array(v, k, np.float32, name)
                  for v, name in ((ca, "ca"), (cb, "cb"), (st, "st")))  # fmt: skip
    if n:
        _chain_combine_kernel(v0, c0, v1, c1, rb, cbase, has, n, row_len, bool(per_col), lin, ca,
                              cb, st, np.float32(p), np.float32(q), FLOAT_CODES[work], out,
                              co)  # fmt: skip


def chain_norms(sums: np.ndarray, work: str) -> np.ndarray:
    """mergekit's ``norm(x).clamp(min=1e-7)`` in W from each vector's float64 sum of
    squares: ``max(rW(float32(sqrt(S))), rW(1e-7))`` (NaN stays NaN), float32 [k]."""
    from .common import round_host

    with np.errstate(all="ignore"):
        n = np.sqrt(np.asarray(sums, np.float64)).astype(np.float32)
    n = _round_array(n, work)
    floor = np.float32(round_host(1e-7, work))
    return np.where(np.isnan(n), n, np.maximum(n, floor)).astype(np.float32)


def chain_coefficients(cos_sums: np.ndarray, t: float, work: str) -> tuple:
    """Each vector's scalars of the chain from its cosine sum C (float64 [k]) (SPEC
    "NuSLERP"): ``cos = clamp(rW(float32(C)), -1, 1)``, ``lin = rW(1 - rW(cos^2)) <= 1e-16``,
    ``theta = rW(acos(0 if lin else cos))``, ``st = rW(sin theta)``, ``ca = rW(sin(rW(p *
    theta)))``, ``cb = rW(sin(rW(q * theta)))``, ``p = float32(1 - t)``, ``q = float32(t)``
    (numpy's float32 arccos and sin). Returns (lin, ca, cb, st, p, q)."""
    f = np.float32
    r = lambda v: _round_array(np.asarray(v, np.float32), work)  # noqa: E731
    p, q = f(1.0 - float(t)), f(float(t))
    with np.errstate(all="ignore"):
        cos = r(np.asarray(cos_sums, np.float64).astype(np.float32))
        cos = np.where(np.isnan(cos), cos, np.clip(cos, f(-1), f(1))).astype(np.float32)
        lin = r(f(1) - r(cos * cos)) <= 1e-16
        theta = r(np.arccos(np.where(lin, f(0), cos).astype(np.float32)))
        st = r(np.sin(theta))
        ca = r(np.sin(r(p * theta)))
        cb = r(np.sin(r(q * theta)))
    return lin, ca, cb, st, p, q


def _round_array(v: np.ndarray, work: str) -> np.ndarray:
    """float32 array rounded to W (nearest even; NaN stays NaN) and widened back."""
    out = np.empty_like(v, dtype=np.float32)
    _round_array_kernel(np.ascontiguousarray(v, np.float32), FLOAT_CODES[work], out)
    return out


@numba.njit(cache=True, error_model="numpy")
def _round_array_kernel(v, w, out):
    for i in range(v.shape[0]):
        out[i] = round_work(v[i], w)


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for each dtype, with and without a
    base."""
    for dt in FLOAT_CODES:
        r = np.zeros(4 * FLOAT_ITEMSIZE[dt], np.uint8)
        for base in (None, r):
            tv_row_dots(r, dt, r, dt, base, dt, 2, 2)
            col_dots(r, dt, r, dt, base, dt, 2, 2, np.zeros((2, 3), np.float64))
            for per_col in (False, True):
                combine(r, dt, r, dt, base, dt, 4, 2, per_col, np.zeros(2, np.float32),
                        np.zeros(2, np.float32), r.copy(), dt)  # fmt: skip
