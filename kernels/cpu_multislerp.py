"""Multi-SLERP CPU kernels (numba): the Gram statistics pass and the merged value.

Contract: docs/SPEC.md "Multi-SLERP", tested bit for bit against ``tests/spec_reference.py``
and against the Triton kernels of ``kernels/triton_multislerp.py``.

A chunk is ``n`` elements of N models (slot rows ``model_rows``) and, optionally, of the
base (slot row ``base_row``, -1 for none), raw little-endian byte rows as in ``cpu_merge``,
starting at a multiple of ``MSL_BLOCK`` elements of the tensor. ``v_j`` is model j in the
working dtype W (``rW(x_j)``), or its task vector ``rW(rW(x_j) - rW(x_b))`` with a base.

- ``msl_gram``: per block of ``MSL_BLOCK`` elements, the K = N + N(N-1)/2 float64 sums
  (G_jj of each model, then G_jk for j < k in order) of the exact float64 products
  ``v_j * v_k``, each a pairwise tree over the block padded with +0.0; the caller adds the
  blocks left to right (``cpu_stock.add_blocks``).
- ``msl_chunk``: ``acc = sum_j c_j * v_j`` (float32, model order from +0.0, no FMA),
  ``out = rW(acc)``, plus the base: ``rW(out + x_b)``.
"""

from __future__ import annotations

import numba
import numpy as np

from .cpu_merge import _decode_block, _encode_block
from .cpu_nearswap import round_work
from .cpu_ram import _slot
from .cpu_rows import _checked, _tree
from .cpu_stock import n_stats

#: Elements per block of the statistics (SPEC), a power of two; chunks start at its multiples.
MSL_BLOCK = 1024


@numba.njit(inline="always")
def _vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, v):
    """v[j, :m] = model j in W, or its task vector rW(rW(x_j) - xb) with a base (xb[:m] =
    rW(base)); xb untouched without one."""
    if base_row >= 0:
        _decode_block(inputs[base_row], codes[base_row], first, m, xb)
        for i in range(m):
            xb[i] = round_work(xb[i], w_code)
    for j in range(model_rows.shape[0]):
        r = model_rows[j]
        _decode_block(inputs[r], codes[r], first, m, v[j])
        for i in range(m):
            x = round_work(v[j, i], w_code)
            v[j, i] = round_work(x - xb[i], w_code) if base_row >= 0 else x


@numba.njit(parallel=True, nogil=True, cache=True)
def _gram_kernel(inputs, codes, base_row, model_rows, n, w_code, out):
    n_models = model_rows.shape[0]
    for k in numba.prange((n + MSL_BLOCK - 1) // MSL_BLOCK):
        first = k * MSL_BLOCK
        m = min(MSL_BLOCK, n - first)
        xb = np.zeros(MSL_BLOCK, np.float32)
        v = np.zeros((n_models, MSL_BLOCK), np.float32)
        p = np.empty(MSL_BLOCK, np.float64)
        _vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, v)
        s = 0
        for j in range(n_models):
            for i in range(MSL_BLOCK):
                p[i] = np.float64(v[j, i]) * np.float64(v[j, i]) if i < m else 0.0
            out[k, s] = _tree(p)
            s += 1
        for j in range(n_models):
            for q in range(j + 1, n_models):
                for i in range(MSL_BLOCK):
                    p[i] = np.float64(v[j, i]) * np.float64(v[q, i]) if i < m else 0.0
                out[k, s] = _tree(p)
                s += 1


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _msl_kernel(inputs, codes, base_row, model_rows, n, coef, w_code, out, out_code):
    n_models = model_rows.shape[0]
    for k in numba.prange((n + MSL_BLOCK - 1) // MSL_BLOCK):
        first = k * MSL_BLOCK
        m = min(MSL_BLOCK, n - first)
        xb = np.zeros(MSL_BLOCK, np.float32)
        v = np.zeros((n_models, MSL_BLOCK), np.float32)
        acc = np.zeros(MSL_BLOCK, np.float32)
        _vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, v)
        for j in range(n_models):
            c = coef[j]
            for i in range(m):
                acc[i] = acc[i] + c * v[j, i]
        for i in range(m):
            o = round_work(acc[i], w_code)
            acc[i] = round_work(o + xb[i], w_code) if base_row >= 0 else o
        _encode_block(acc, out_code, first, m, out)


def _slot_any(inputs, dtypes, base_row, model_rows, n, work):
    """``cpu_ram._slot`` with an optional base (``base_row`` -1: W from the models alone)."""
    return _slot(inputs, dtypes, base_row if base_row >= 0 else model_rows[0] if model_rows
                 else -1, model_rows, n, work)  # fmt: skip


def msl_gram(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
             n: int, work: str | None = None) -> np.ndarray:  # fmt: skip
    """The per-block Gram sums of ``n`` elements (SPEC "Multi-SLERP").

    Returns:
        float64 array [ceil(n / MSL_BLOCK), K] (``cpu_stock.n_stats``): each block's sums.

    Raises:
        ValueError: bad rows or dtypes.
    """
    codes, mr, w_code, _ = _slot_any(inputs, dtypes, base_row, model_rows, n, work)
    out = np.zeros(((n + MSL_BLOCK - 1) // MSL_BLOCK, n_stats(len(model_rows))), np.float64)
    if n:
        _gram_kernel(inputs, codes, base_row, mr, n, w_code, out)
    return out


def msl_chunk(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
              n: int, coef: np.ndarray, out: np.ndarray, out_dtype: str,
              work: str | None = None) -> None:  # fmt: skip
    """The merged value of ``n`` elements into the raw byte row ``out`` (SPEC "Multi-SLERP").

    Args:
        coef: float32 [N]: the tensor's coefficients c_j (``streammerge.methods.multislerp``).

    Raises:
        ValueError: bad rows, dtypes, coefficients or output.
    """
    codes, mr, w_code, _ = _slot_any(inputs, dtypes, base_row, model_rows, n, work)
    coef = np.ascontiguousarray(coef, np.float32)
    if coef.shape != (len(model_rows),):
        raise ValueError(f"need {len(model_rows)} coefficients, got shape {coef.shape}")
    co = _checked(out, out_dtype, n, "out")
    if n:
        _msl_kernel(inputs, codes, base_row, mr, n, coef, w_code, out, co)


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for each dtype, with and without a
    base."""
    for dt in ("F32", "F16", "BF16"):
        s = np.zeros((3, 16), np.uint8)
        for base in (0, -1):
            msl_gram(s, [dt] * 3, base, [1, 2], 2)
            msl_chunk(s, [dt] * 3, base, [1, 2], 2, np.ones(2, np.float32),
                      np.zeros(16, np.uint8), dt)  # fmt: skip
