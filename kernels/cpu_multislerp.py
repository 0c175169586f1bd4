"""Multi-SLERP CPU kernels (numba): the four statistics stages and the merged value.

Contract: docs/SPEC.md "Multi-SLERP", tested bit for bit against ``tests/spec_reference.py``
and against the Triton kernels of ``kernels/triton_multislerp.py``.

A chunk is ``n`` elements of N models (slot rows ``model_rows``) and, optionally, of the
base (slot row ``base_row``, -1 for none), raw little-endian byte rows as in ``cpu_merge``,
starting at a multiple of ``MSL_BLOCK`` elements of the tensor. ``v_j`` is model j in the
working dtype W (``rW(x_j)``), or its task vector ``rW(rW(x_j) - rW(x_b))`` with a base.
Every elementwise op is float32 rounded to W (``rW``), no FMA, mergekit's chain in torch's
order (SPEC). ``sc`` (float32 [3N + 5], ``streammerge.methods.multislerp.scalars``) holds
the host scalars known so far: ``w_j`` (0..N-1), ``d_j = rW(n_j + eps)`` (N..2N-1), the
mean's norm ``mn`` (2N), ``dot_j`` (2N+1..3N), ``cos`` (3N+1), ``sin/tn`` (3N+2), the
weighted mean norm ``avg`` (3N+3), the fallback flag (3N+4).

- ``msl_stats(stage)``: per block of ``MSL_BLOCK`` elements, float64 sums (each a pairwise
  tree over the block padded with +0.0; the caller adds the blocks left to right,
  ``cpu_stock.add_blocks``): stage 0 ``v_j^2`` (N sums), stage 1 ``m^2`` (1), stage 2
  ``rW(u_j * mh)`` (N), stage 3 ``T^2`` (1).
- ``msl_chunk``: the merged value (stage 4), or the weighted-sum fallback.
"""

from __future__ import annotations

import numba
import numpy as np

from .common import FLOAT_ITEMSIZE, HELD_UNITS, NO_HELD, STORE_UNITS, checked_held
from .cpu_loops import BF16, F16, F32, launch_parts, part_blocks, round_all, task_vector
from .cpu_merge import _decode_block, _encode_block
from .cpu_nearswap import round_op, round_work
from .cpu_ram import _slot
from .cpu_rows import _checked, _tree, block_sum

#: Elements per block of the statistics (SPEC), a power of two; chunks start at its multiples.
MSL_BLOCK = 1024


def n_scalars(n_models: int) -> int:
    """Length of the host scalar vector ``sc``."""
    return 3 * n_models + 5


def stage_width(stage: int, n_models: int) -> int:
    """Sums per block of a statistics stage (0 and 2: one per model; 1 and 3: one)."""
    return n_models if stage in (0, 2) else 1


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, v):
    """v[j, :m] = model j in W, or its task vector rW(rW(x_j) - xb) with a base (xb[:m] =
    rW(base)); xb untouched without one."""
    if base_row >= 0:
        _decode_block(inputs[base_row], codes[base_row], first, m, xb)
        round_all(xb, m, w_code)
    for j in range(model_rows.shape[0]):
        r = model_rows[j]
        if base_row >= 0:
            task_vector(inputs[r], codes[r], first, m, xb, w_code, v[j])
        else:
            _decode_block(inputs[r], codes[r], first, m, v[j])
            round_all(v[j], m, w_code)


@numba.njit(inline="always")
def _block_squares(p, src, m):
    """SPEC's block sum of float64(src[:m])^2 (exact products, padded with +0.0)."""
    for i in range(MSL_BLOCK):
        p[i] = np.float64(src[i]) * np.float64(src[i]) if i < m else 0.0
    return _tree(p)


@numba.njit(inline="always")
def _msl_body(v, xb, has_base, m, stage, sc, c, sums_k, acc, tmp, p, units, have_mh):
    """One block of stage ``stage`` with the working dtype ``c`` a constant (so the loops
    vectorize: ``cpu_loops``). Returns True when ``acc`` holds the merged value. ``units``:
    v already holds the unit vectors u_j (held, ``HELD_UNITS``), not v_j; ``have_mh``: acc
    already holds the normalized mean mh (stages 3, 4)."""
    nm = v.shape[0]
    if stage == 0:  # sums of v_j^2 (exact float64 products)
        for j in range(nm):
            sums_k[j] = _block_squares(p, v[j], m)
        return False
    if stage == 4 and sc[3 * nm + 4] != 0:  # the fallback: the weighted sum in W
        row = v[0]
        w0 = sc[0]
        for i in range(m):
            acc[i] = round_op(w0 * row[i], c)
        for j in range(1, nm):
            row = v[j]
            wj = sc[j]
            for i in range(m):
                acc[i] = round_op(acc[i] + round_op(wj * row[i], c), c)
        if has_base:
            for i in range(m):
                acc[i] = round_op(acc[i] + xb[i], c)
        return True
    for j in range(nm if not units else 0):  # unit vectors u_j = rW(v_j / d_j), in place
        row = v[j]
        d = sc[nm + j]
        for i in range(m):
            row[i] = round_op(row[i] / d, c)
    if not have_mh:
        # the mean m = rW(sum_j rW(u_j * w_j)), float32 from +0.0 (models outside: vectorized)
        for j in range(nm):
            row = v[j]
            wj = sc[j]
            for i in range(m):
                acc[i] = acc[i] + round_op(row[i] * wj, c)
        for i in range(m):
            acc[i] = round_op(acc[i], c)
        if stage == 1:
            sums_k[0] = _block_squares(p, acc, m)
            return False
        mn = sc[2 * nm]
        for i in range(m):  # mh = rW(m / mn)
            acc[i] = round_op(acc[i] / mn, c)
    if stage == 2:  # sums of rW(u_j * mh) (float32 values of W, exact in float64)
        for j in range(nm):
            row = v[j]
            for i in range(m):
                tmp[i] = round_op(row[i] * acc[i], c)
            sums_k[j] = block_sum(p, tmp, m)
        return False
    # T = rW(sum_j rW(rW(u_j - rW(dot_j * mh)) * w_j)), float32 from +0.0
    for j in range(nm):
        row = v[j]
        dj = sc[2 * nm + 1 + j]
        wj = sc[j]
        for i in range(m):
            t = round_op(row[i] - round_op(dj * acc[i], c), c)
            tmp[i] = tmp[i] + round_op(t * wj, c)
    for i in range(m):
        tmp[i] = round_op(tmp[i], c)
    if stage == 3:
        sums_k[0] = _block_squares(p, tmp, m)
        return False
    cs, sf, avg = sc[3 * nm + 1], sc[3 * nm + 2], sc[3 * nm + 3]
    for i in range(m):
        r = round_op(round_op(acc[i] * cs, c) + round_op(tmp[i] * sf, c), c)
        acc[i] = round_op(r * avg, c)
    if has_base:
        for i in range(m):
            acc[i] = round_op(acc[i] + xb[i], c)
    return True


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _msl_block(inputs, codes, base_row, model_rows, first, m, stage, sc, w_code, sums_k, out,
               out_code, held, mh, xb, v, acc, tmp, p):  # fmt: skip
    """One block (elements first .. first + m - 1) of stage ``stage`` (SPEC "Multi-SLERP"):
    its sums into ``sums_k``, or the merged value into the raw byte row ``out``. ``held``
    (``msl_stats``): 1 store the unit vectors over the model rows, 2 the model rows hold
    them; with a raw byte row ``mh`` (size 0: none) the normalized mean too, as W.
    Scratch (the caller's, reused block after block): xb, acc, tmp float32
    [MSL_BLOCK], v float32 [N, MSL_BLOCK], p float64 [MSL_BLOCK]."""
    acc[:] = np.float32(0.0)  # the sums of the stages start from +0.0
    tmp[:] = np.float32(0.0)
    hb = base_row >= 0
    if held == HELD_UNITS:  # W values stored as W: the decode is exact
        for j in range(model_rows.shape[0]):
            _decode_block(inputs[model_rows[j]], w_code, first, m, v[j])
        if hb and stage == 4:
            _decode_block(inputs[base_row], codes[base_row], first, m, xb)
            round_all(xb, m, w_code)
    else:
        _vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, v)
    units = held == HELD_UNITS
    have_mh = units and mh.size > 0
    if have_mh:
        _decode_block(mh, w_code, first, m, acc)
    if w_code == BF16:
        done = _msl_body(v, xb, hb, m, stage, sc, BF16, sums_k, acc, tmp, p, units, have_mh)
    elif w_code == F16:
        done = _msl_body(v, xb, hb, m, stage, sc, F16, sums_k, acc, tmp, p, units, have_mh)
    else:
        done = _msl_body(v, xb, hb, m, stage, sc, F32, sums_k, acc, tmp, p, units, have_mh)
    if held == STORE_UNITS:  # each block rewrites only its own elements: no race
        for j in range(model_rows.shape[0]):
            _encode_block(v[j], w_code, first, m, inputs[model_rows[j]])
        if mh.size > 0:
            _encode_block(acc, w_code, first, m, mh)
    if done:
        _encode_block(acc, out_code, first, m, out)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _msl_kernel(inputs, codes, base_row, model_rows, n, stage, sc, w_code, sums, out, out_code,
                held, mh, n_parts):  # fmt: skip
    # Parts of contiguous blocks, each with its scratch made once (not five allocations per
    # 1024-element block: ~5 % of a pass on one thread).
    n_blocks = (n + MSL_BLOCK - 1) // MSL_BLOCK
    n_parts = max(1, min(n_blocks, n_parts))
    nm = model_rows.shape[0]
    for q in numba.prange(n_parts):
        xb = np.zeros(MSL_BLOCK, np.float32)
        v = np.zeros((nm, MSL_BLOCK), np.float32)
        acc = np.zeros(MSL_BLOCK, np.float32)
        tmp = np.zeros(MSL_BLOCK, np.float32)
        p = np.empty(MSL_BLOCK, np.float64)
        lo, hi = part_blocks(q, n_parts, n_blocks)
        for k in range(lo, hi):
            first = k * MSL_BLOCK
            _msl_block(inputs, codes, base_row, model_rows, first, min(MSL_BLOCK, n - first),
                       stage, sc, w_code, sums[min(np.int64(k), np.int64(sums.shape[0] - 1))],
                       out, out_code, held, mh, xb, v, acc, tmp, p)  # fmt: skip


def _slot_any(inputs, dtypes, base_row, model_rows, n, work):
    """``cpu_ram._slot`` with an optional base (``base_row`` -1: W from the models alone)."""
    return _slot(inputs, dtypes, base_row if base_row >= 0 else model_rows[0] if model_rows
                 else -1, model_rows, n, work)  # fmt: skip


def _scalars(sc, n_models):
    sc = np.ascontiguousarray(sc, np.float32)
    if sc.shape != (n_scalars(n_models),):
        raise ValueError(f"need {n_scalars(n_models)} scalars, got shape {sc.shape}")
    return sc


def _mh_row(mh, held: int, work: str, n: int) -> np.ndarray:
    """The raw byte row holding the normalized mean (``mh``), or an empty one."""
    if mh is None:
        return np.zeros(0, np.uint8)
    if held == NO_HELD:
        raise ValueError("a held mean goes with held unit vectors")
    _checked(mh, work, n, "held mean")
    return mh


def msl_stats(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
              n: int, stage: int, sc: np.ndarray, work: str | None = None,
              held: int = NO_HELD, mh: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The per-block sums of statistics stage ``stage`` (0..3) of ``n`` elements (SPEC
    "Multi-SLERP"; ``sc``: the scalars of the earlier stages).

    Args:
        held: NO_HELD; STORE_UNITS (stage 2): the unit vectors u_j (W values) are stored
            over the model rows, as W (a tensor in one chunk: its later passes skip the
            task vectors and the divisions); HELD_UNITS (stage 3): the model rows hold
            them. The sums are the same bit for bit.
        mh: with ``held``, a raw byte row of n elements of W where the dots pass stores the
            normalized mean mh and the tangent pass reads it (None: recomputed).

    Returns:
        float64 array [ceil(n / MSL_BLOCK), stage_width(stage, N)]: each block's sums.

    Raises:
        ValueError: bad rows, dtypes, stage, scalars or ``held``.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"statistics stage must be 0..3, got {stage}")
    codes, mr, w_code, w = _slot_any(inputs, dtypes, base_row, model_rows, n, work)
    sc = _scalars(sc, len(model_rows))
    held = checked_held(held, stage, 2, w, dtypes, model_rows)
    mh = _mh_row(mh, held, w, n)
    sums = np.zeros(((n + MSL_BLOCK - 1) // MSL_BLOCK, stage_width(stage, len(model_rows))),
                    np.float64)  # fmt: skip
    if n:
        _msl_kernel(inputs, codes, base_row, mr, n, stage, sc, w_code, sums,
                    np.zeros(1, np.uint8), 0, held, mh, launch_parts())  # fmt: skip
    return sums


def msl_chunk(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
              n: int, sc: np.ndarray, out: np.ndarray, out_dtype: str,
              work: str | None = None, held: int = NO_HELD,
              mh: np.ndarray | None = None) -> None:  # fmt: skip
    """The merged value of ``n`` elements into the raw byte row ``out`` (SPEC "Multi-SLERP").

    Args:
        sc: float32 [3N + 5]: the tensor's scalars (``streammerge.methods.multislerp``).
        held: HELD_UNITS: the model rows hold the unit vectors (``msl_stats``).
        mh: ``out`` itself when it holds the normalized mean (``msl_stats``; element i of
            both at the same bytes: the output dtype has W's itemsize).

    Raises:
        ValueError: bad rows, dtypes, scalars, output or ``held``.
    """
    codes, mr, w_code, w = _slot_any(inputs, dtypes, base_row, model_rows, n, work)
    sc = _scalars(sc, len(model_rows))
    held = checked_held(held, 4, 2, w, dtypes, model_rows)
    if held != NO_HELD and sc[3 * len(model_rows) + 4] != 0:
        raise ValueError("the fallback's weighted sum needs the inputs, not held unit vectors")
    co = _checked(out, out_dtype, n, "out")
    mh = _mh_row(mh, held, w, n)
    if mh.size and (mh is not out or FLOAT_ITEMSIZE[out_dtype] != FLOAT_ITEMSIZE[w]):
        raise ValueError("the writing pass's held mean must be out, with W's itemsize")
    if n:
        _msl_kernel(inputs, codes, base_row, mr, n, 4, sc, w_code, np.zeros((1, 1), np.float64),
                    out, co, held, mh, launch_parts())  # fmt: skip


def warmup() -> None:
    """Compile (or load from numba's cache) the kernel for each dtype, with and without a
    base."""
    for dt in ("F32", "F16", "BF16"):
        s = np.zeros((3, 16), np.uint8)
        sc = np.ones(n_scalars(2), np.float32)
        for base in (0, -1):
            msl_stats(s, [dt] * 3, base, [1, 2], 2, 0, sc)
            msl_chunk(s, [dt] * 3, base, [1, 2], 2, sc, np.zeros(16, np.uint8), dt)
