"""Row-wise CPU kernels (numba): per-row statistics and per-row linear combinations.

Contract: docs/SPEC.md "SLERP (v3)", tested bit for bit against ``tests/spec_reference.py``
and against the Triton kernels of ``kernels/triton_rows.py``.

A chunk holds whole rows: ``n_rows`` rows of ``row_len`` elements, row-major, each input a
raw little-endian byte row of the slot (bf16 as bits), as in ``cpu_merge``.

- ``row_dots``: for each row, S00 = sum x*x, S11 = sum y*y, S01 = sum x*y in float64 (exact
  products of float32 values), each sum in SPEC's fixed order: blocks of ``DOT_BLOCK``
  elements from the row's start, a pairwise tree inside a block (padded with +0.0), the
  block results added left to right.
- ``rows_combine``: ``out = float32(ca[r] * x) + float32(cb[r] * y)`` per element of row r,
  float32, each operation rounded (no FMA), stored rounded to the output dtype.
"""

from __future__ import annotations

import numba
import numpy as np

from .common import FLOAT_CODES, FLOAT_ITEMSIZE
from .cpu_merge import _decode_block, _encode_block

#: Elements per block of a row sum (SPEC: the pairwise tree's width), a power of two.
DOT_BLOCK = 1024


@numba.njit(inline="always")
def _tree(p):
    """Sum of ``p`` (a power-of-two length) as SPEC's pairwise tree: p[i] = p[2i] + p[2i+1]."""
    width = p.shape[0] // 2
    while width >= 1:
        for i in range(width):
            p[i] = p[2 * i] + p[2 * i + 1]
        width //= 2
    return p[0]


@numba.njit(inline="always")
def block_sum(p, src, m):
    """SPEC's block sum (a pairwise tree, ``_tree``) of float64(src[:m]), padded with +0.0
    to the block ``p`` (float64 scratch, a power-of-two length: the block width)."""
    for i in range(p.shape[0]):
        p[i] = np.float64(src[i]) if i < m else 0.0
    return _tree(p)


@numba.njit(inline="always")
def _block_dots(x, y, m, p00, p11, p01):
    """One block's float64 sums (x.x, y.y, x.y) of its first ``m`` float32 elements:
    exact products padded with +0.0 to ``DOT_BLOCK``, each summed by ``_tree``
    (SPEC "SLERP (v3)")."""
    for i in range(m):
        a = np.float64(x[i])
        b = np.float64(y[i])
        p00[i] = a * a
        p11[i] = b * b
        p01[i] = a * b
    for i in range(m, DOT_BLOCK):
        p00[i] = 0.0
        p11[i] = 0.0
        p01[i] = 0.0
    return _tree(p00), _tree(p11), _tree(p01)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _row_dots_kernel(row0, code0, row1, code1, n_rows, row_len, stats):
    for r in numba.prange(n_rows):
        x = np.empty(DOT_BLOCK, np.float32)
        y = np.empty(DOT_BLOCK, np.float32)
        p00 = np.empty(DOT_BLOCK, np.float64)
        p11 = np.empty(DOT_BLOCK, np.float64)
        p01 = np.empty(DOT_BLOCK, np.float64)
        s00 = 0.0
        s11 = 0.0
        s01 = 0.0
        for lo in range(0, row_len, DOT_BLOCK):
            m = min(DOT_BLOCK, row_len - lo)
            _decode_block(row0, code0, r * row_len + lo, m, x)
            _decode_block(row1, code1, r * row_len + lo, m, y)
            d00, d11, d01 = _block_dots(x, y, m, p00, p11, p01)
            s00 = s00 + d00
            s11 = s11 + d11
            s01 = s01 + d01
        stats[r, 0] = s00
        stats[r, 1] = s11
        stats[r, 2] = s01


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _rows_combine_kernel(row0, code0, row1, code1, n_rows, row_len, ca, cb, out, out_code):
    for r in numba.prange(n_rows):
        x = np.empty(DOT_BLOCK, np.float32)
        y = np.empty(DOT_BLOCK, np.float32)
        a = ca[r]
        b = cb[r]
        for lo in range(0, row_len, DOT_BLOCK):
            m = min(DOT_BLOCK, row_len - lo)
            first = r * row_len + lo
            _decode_block(row0, code0, first, m, x)
            _decode_block(row1, code1, first, m, y)
            for i in range(m):
                x[i] = np.float32(a * x[i]) + np.float32(b * y[i])
            _encode_block(x, out_code, first, m, out)


def _checked(row: np.ndarray, dtype: str, n: int, what: str) -> int:
    """The dtype code of a raw byte row holding at least ``n`` elements.

    Raises:
        ValueError: not a contiguous 1-D uint8 array, an unknown dtype, or too short.
    """
    if not isinstance(row, np.ndarray) or row.dtype != np.uint8 or row.ndim != 1 \
            or not row.flags.c_contiguous:  # fmt: skip
        raise ValueError(f"{what} must be a contiguous 1-D np.uint8 array")
    if dtype not in FLOAT_CODES:
        raise ValueError(f"{what}: unsupported dtype {dtype!r}; use {', '.join(FLOAT_CODES)}")
    if n * FLOAT_ITEMSIZE[dtype] > row.shape[0]:
        raise ValueError(f"{what} holds {row.shape[0]} bytes, too few for {n} {dtype} elements")
    return FLOAT_CODES[dtype]


def row_dots(v0: np.ndarray, dtype0: str, v1: np.ndarray, dtype1: str, n_rows: int,
             row_len: int) -> np.ndarray:  # fmt: skip
    """Per-row S00, S11, S01 of two chunks of whole rows (SPEC "SLERP (v3)").

    Args:
        v0, v1: raw byte rows (np.uint8, at least n_rows * row_len elements of dtype0 /
            dtype1: ``F32``, ``F16`` or ``BF16``).
        n_rows, row_len: the chunk's rows and their length (elements).

    Returns:
        float64 array [n_rows, 3]: S00, S11, S01.

    Raises:
        ValueError: a bad row, dtype, or negative count.
    """
    if n_rows < 0 or row_len < 0:
        raise ValueError(f"n_rows and row_len must be >= 0, got {n_rows}, {row_len}")
    n = n_rows * row_len
    c0 = _checked(v0, dtype0, n, "v0")
    c1 = _checked(v1, dtype1, n, "v1")
    stats = np.zeros((n_rows, 3), np.float64)
    _row_dots_kernel(v0, c0, v1, c1, n_rows, row_len, stats)
    return stats


def rows_combine(v0: np.ndarray, dtype0: str, v1: np.ndarray, dtype1: str, n_rows: int,
                 row_len: int, ca: np.ndarray, cb: np.ndarray, out: np.ndarray,
                 out_dtype: str) -> None:  # fmt: skip
    """``out = float32(ca[r] * x) + float32(cb[r] * y)`` for every element of row r, stored
    rounded to ``out_dtype`` into the raw byte row ``out`` (SPEC "SLERP (v3)").

    Args:
        ca, cb: float32 arrays [n_rows], the rows' coefficients.

    Raises:
        ValueError: a bad row, dtype or coefficient array.
    """
    n = n_rows * row_len
    c0 = _checked(v0, dtype0, n, "v0")
    c1 = _checked(v1, dtype1, n, "v1")
    co = _checked(out, out_dtype, n, "out")
    for c, what in ((ca, "ca"), (cb, "cb")):
        if not isinstance(c, np.ndarray) or c.dtype != np.float32 or c.shape != (n_rows,):
            raise ValueError(f"{what} must be a float32 array of {n_rows} coefficients")
    _rows_combine_kernel(v0, c0, v1, c1, n_rows, row_len, np.ascontiguousarray(ca),
                         np.ascontiguousarray(cb), out, co)  # fmt: skip


def warmup() -> None:
    """Compile (or load from numba's cache) both kernels for every dtype pairing used."""
    for dt in FLOAT_CODES:
        b = np.zeros(4 * FLOAT_ITEMSIZE[dt], np.uint8)
        row_dots(b, dt, b, dt, 2, 2)
        rows_combine(b, dt, b, dt, 2, 2, np.zeros(2, np.float32), np.zeros(2, np.float32),
                     b.copy(), dt)  # fmt: skip
