"""Karcher mean CPU kernels (numba): the Gram statistics pass and the merged value.

Contract: docs/SPEC.md "Karcher mean", tested bit for bit against ``tests/spec_reference.py``
and against the Triton kernels of ``kernels/triton_karcher.py``.

A chunk is ``n`` elements of N models (slot rows ``model_rows``; no base), raw little-endian
byte rows as in ``cpu_merge``, starting at a multiple of ``STOCK_BLOCK`` elements of the
tensor.

- ``karcher_gram``: per block of ``STOCK_BLOCK`` elements, the K = N(N+1)/2 float64 sums
  (G_jj of each model, then G_jk for j < k in order) of the exact products
  ``float64(x_j) * float64(x_k)``, each a pairwise tree over the block padded with +0.0
  (model_stock's layout and order, without a base); the caller adds the blocks left to
  right (``cpu_stock.add_blocks``).
- ``karcher_chunk``: ``acc = +0.0; acc = float32(acc + float32(k_j * x_j))`` for j in
  order, stored rounded to the output dtype.
"""

from __future__ import annotations

import numba
import numpy as np

from .common import FLOAT_CODES
from .cpu_merge import _decode_block, _encode_block
from .cpu_rows import _checked, _tree
from .cpu_stock import STOCK_BLOCK, add_blocks, n_stats

__all__ = ["STOCK_BLOCK", "add_blocks", "karcher_chunk", "karcher_gram", "n_stats", "warmup"]


@numba.njit(parallel=True, nogil=True, cache=True)
def _gram_kernel(inputs, codes, model_rows, n, out):
    n_models = model_rows.shape[0]
    for b in numba.prange((n + STOCK_BLOCK - 1) // STOCK_BLOCK):
        first = b * STOCK_BLOCK
        m = min(STOCK_BLOCK, n - first)
        x = np.zeros((n_models, STOCK_BLOCK), np.float32)
        p = np.empty(STOCK_BLOCK, np.float64)
        for j in range(n_models):
            r = model_rows[j]
            _decode_block(inputs[r], codes[r], first, m, x[j])
        for j in range(n_models):
            for i in range(STOCK_BLOCK):
                p[i] = np.float64(x[j, i]) * np.float64(x[j, i]) if i < m else 0.0
            out[b, j] = _tree(p)
        s = n_models
        for j in range(n_models):
            for k in range(j + 1, n_models):
                for i in range(STOCK_BLOCK):
                    p[i] = np.float64(x[j, i]) * np.float64(x[k, i]) if i < m else 0.0
                out[b, s] = _tree(p)
                s += 1


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy", fastmath=False)
def _karcher_kernel(inputs, codes, model_rows, n, k32, out, out_code):
    n_models = model_rows.shape[0]
    for b in numba.prange((n + STOCK_BLOCK - 1) // STOCK_BLOCK):
        first = b * STOCK_BLOCK
        m = min(STOCK_BLOCK, n - first)
        x = np.empty(STOCK_BLOCK, np.float32)
        acc = np.zeros(STOCK_BLOCK, np.float32)
        for j in range(n_models):
            r = model_rows[j]
            _decode_block(inputs[r], codes[r], first, m, x)
            kj = k32[j]
            for i in range(m):
                prod = np.float32(kj * x[i])
                acc[i] = np.float32(acc[i] + prod)
        _encode_block(acc, out_code, first, m, out)


def _rows(inputs: np.ndarray, dtypes: list[str], model_rows: list[int], n: int):
    """(codes int64 [rows], model rows int64 [N]) of a checked slot."""
    if not isinstance(inputs, np.ndarray) or inputs.dtype != np.uint8 or inputs.ndim != 2 \
            or not inputs.flags.c_contiguous:  # fmt: skip
        raise ValueError("inputs must be a C-contiguous 2-D np.uint8 array (slot rows)")
    if n < 0 or not model_rows:
        raise ValueError(f"need n >= 0 and at least one model row, got {n}, {model_rows}")
    if len(dtypes) != inputs.shape[0] or min(model_rows) < 0 or max(model_rows) >= inputs.shape[0]:
        raise ValueError(f"rows {model_rows} / dtypes {dtypes} do not match {inputs.shape[0]} "
                         "slot rows")  # fmt: skip
    for r in model_rows:
        _checked(inputs[r], dtypes[r], n, f"input row {r}")
    codes = np.array([FLOAT_CODES.get(d, 0) for d in dtypes], np.int64)
    return codes, np.array(model_rows, np.int64)


def karcher_gram(inputs: np.ndarray, dtypes: list[str], model_rows: list[int],
                 n: int) -> np.ndarray:  # fmt: skip
    """The per-block Gram sums of ``n`` elements (SPEC "Karcher mean").

    Returns:
        float64 array [ceil(n / STOCK_BLOCK), K] (``n_stats``): each block's sums.

    Raises:
        ValueError: bad rows or dtypes.
    """
    codes, mr = _rows(inputs, dtypes, model_rows, n)
    out = np.zeros(((n + STOCK_BLOCK - 1) // STOCK_BLOCK, n_stats(len(model_rows))), np.float64)
    if n:
        _gram_kernel(inputs, codes, mr, n, out)
    return out


def karcher_chunk(inputs: np.ndarray, dtypes: list[str], model_rows: list[int], n: int,
                  k: np.ndarray, out: np.ndarray, out_dtype: str) -> None:  # fmt: skip
    """The merged value ``sum_j k_j x_j`` (float32, in model order from +0.0) of ``n``
    elements into the raw byte row ``out`` (SPEC "Karcher mean").

    Args:
        k: float32 [N]: each model's coefficient (``methods.karcher.coefficients``).

    Raises:
        ValueError: bad rows, dtypes, coefficients or output.
    """
    codes, mr = _rows(inputs, dtypes, model_rows, n)
    k32 = np.ascontiguousarray(k, np.float32)
    if k32.shape != (len(model_rows),):
        raise ValueError(f"need {len(model_rows)} coefficients, got {k32.shape}")
    co = _checked(out, out_dtype, n, "out")
    if n:
        _karcher_kernel(inputs, codes, mr, n, k32, out, co)


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for each dtype."""
    for dt in ("F32", "F16", "BF16"):
        s = np.zeros((2, 16), np.uint8)
        karcher_gram(s, [dt] * 2, [0, 1], 2)
        karcher_chunk(s, [dt] * 2, [0, 1], 2, np.ones(2, np.float32), np.zeros(16, np.uint8), dt)
