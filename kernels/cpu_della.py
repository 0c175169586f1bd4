"""DELLA CPU kernel (numba): mergekit's ``della`` / ``della_linear`` in the working dtype.

Contract: docs/SPEC.md "DELLA (della, della_linear)", tested bit for bit against
``tests/spec_reference.py`` (``spec_della``).

A chunk holds whole rows: ``n_rows`` rows of ``row_len`` elements of the base (slot row
``base_row``) and of N fine-tunes (``model_rows``), raw little-endian byte rows as in
``cpu_merge``. Per row and fine-tune j with density < 1: the task vector's magnitudes are
ranked exactly (ties by element index), the rank gives the keep threshold
``K = A_j + (rank * B_j) // (row_len - 1)`` of a 32-bit Philox word (SPEC v1's counter and
key: element index in the tensor, model j), a kept value is rescaled by
``float32(2**32) / float32(K)``; then the thinned task vectors are combined as the v3
task-vector merge (sign election for ``della``, a plain sum for ``della_linear``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .common import FLOAT_CODES
from .cpu_loops import BF16 as _BF16
from .cpu_loops import F16 as _F16
from .cpu_loops import F32 as _F32
from .cpu_loops import round_all, task_vector, weigh
from .cpu_merge import _decode_block, _encode_block, _f32_bits, _philox_range
from .cpu_nearswap import round_op, round_work
from .cpu_rows import _checked


def della_thresholds(density: float, epsilon: float) -> tuple[int, int]:
    """(A, B) of SPEC "DELLA": ``floor((rho - eps) * 2**32)`` and ``floor(2 * eps * 2**32)``
    (float64 products, truncated). Only for ``rho < 1``.

    Raises:
        ValueError: rho - eps <= 0 or rho + eps >= 1 (mergekit's condition).
    """
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: epsilon {epsilon} must keep density {density} +/- epsilon "
                         "inside (0, 1)")  # fmt: skip
    return math.floor((density - epsilon) * 2**32), math.floor(2.0 * epsilon * 2**32)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _sorted_order(mags, n, perm, spare, hist):
    """The element indices 0 .. n-1 in the order of ascending magnitude, ties by element
    index (SPEC "DELLA": the order of the keys ``mag << 32 | i``; the k-th has rank k): a
    stable LSD radix sort on the 31-bit magnitudes, 8 bits a pass, only over the digits that
    vary in the row (a bfloat16 magnitude's low 16 bits are zero: two passes).
    perm, spare: int64 [>= n] scratch (the result is one of them); hist: int64 [256]."""
    lo_all = np.uint32(0xFFFFFFFF)
    hi_any = np.uint32(0)
    for i in range(n):
        lo_all &= mags[i]
        hi_any |= mags[i]
    for i in range(n):
        perm[i] = i
    for p in range(4):
        shift = np.uint32(8 * p)
        if ((lo_all ^ hi_any) >> shift) & np.uint32(255) == 0:
            continue  # the same digit for all: the pass keeps the order
        hist[:] = 0
        for i in range(n):
            hist[(mags[i] >> shift) & np.uint32(255)] += 1
        total = 0
        for b in range(256):
            c = hist[b]
            hist[b] = total
            total += c
        for k in range(n):
            e = perm[k]
            b = (mags[e] >> shift) & np.uint32(255)
            spare[hist[b]] = e
            hist[b] += 1
        perm, spare = spare, perm
    return perm


#: Counting-sort bins per element of a row (plus COUNT_BINS_MIN): a row whose nonzero
#: magnitudes span at most this many distinct steps is ranked by one counting pass.
COUNT_BINS_PER_ELEM = 4
COUNT_BINS_MIN = 4096


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _ranks(mags, n, rank, pos, perm, spare, hist):
    """rank[i] = #{k : (mags[k], k) < (mags[i], i)} for 0 <= i < n (SPEC "DELLA" rank).

    Zeros come first (in index order). The nonzero magnitudes, as steps of their common
    power of two above the smallest (a bfloat16 value's low 16 bits are zero), are ranked
    by one stable counting pass when they span fewer than ``pos.shape[0]`` steps (the usual
    row: a task vector's magnitudes cover a few binades); otherwise the radix sort
    ``_sorted_order`` gives the order and the ranks are its inverse.
    rank: int32 [>= n] (the result); pos: int32 [bins]; perm, spare: int64 [>= n]; hist:
    int64 [256]."""
    zeros = 0
    mn = np.uint32(0xFFFFFFFF)
    mx = np.uint32(0)
    for i in range(n):  # selects, not branches: a row's zeros fall anywhere
        m = mags[i]
        zeros += m == 0
        mn = min(mn, m if m != 0 else np.uint32(0xFFFFFFFF))
        mx = max(mx, m)
    steps = np.uint32(0)
    for i in range(n):
        m = mags[i]
        steps |= (m - mn) if m != 0 else np.uint32(0)
    shift = np.uint32(0)
    if steps != 0:
        while (steps >> shift) & np.uint32(1) == 0:
            shift += np.uint32(1)
    span = np.int64(((mx - mn) >> shift) + 1) if zeros < n else np.int64(0)
    if span + 1 > pos.shape[0]:
        order = _sorted_order(mags, n, perm, spare, hist)
        for k in range(n):
            rank[order[k]] = k
        return
    # bin 0 the zeros, bin 1 + (m - mn) >> shift a nonzero magnitude, chosen by a select:
    # a branch on m == 0 was mispredicted at every zero (a row of bf16 task vectors with a
    # quarter zeros: 6.7 ns per element against 2.85 branch-free; none: 2.85 and 2.78)
    pos[: span + 1] = 0
    for i in range(n):
        m = mags[i]
        pos[((m - mn) >> shift) + np.uint32(1) if m != 0 else np.uint32(0)] += 1
    total = pos.dtype.type(0)
    for b in range(span + 1):
        c = pos[b]
        pos[b] = total
        total += c
    for i in range(n):
        m = mags[i]
        b = ((m - mn) >> shift) + np.uint32(1) if m != 0 else np.uint32(0)
        rank[i] = pos[b]
        pos[b] += 1


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _keep_tables(tha, thb, drop, row_len, thr, inv):
    """Per fine-tune j and rank k: the keep threshold K = A_j + (k * B_j) // (L - 1) (SPEC
    "DELLA"; walked with an integer quotient and carry, no division) and its rescale
    float32(2**32) / float32(K). thr: uint32 [N, L] (K <= A_j + B_j <= (rho_j + eps_j) 2**32
    < 2**32, so a Philox word compares with it as uint32); inv: float32 [N, L]."""
    two32 = np.float32(4294967296.0)
    span = np.uint64(max(row_len - 1, 1))
    for j in range(tha.shape[0]):
        if not drop[j]:
            continue
        step = np.uint64(thb[j]) // span if row_len > 1 else np.uint64(0)
        carry = np.uint64(thb[j]) % span if row_len > 1 else np.uint64(0)
        kk = np.uint64(tha[j])
        rem = np.uint64(0)
        for k in range(row_len):
            thr[j, k] = np.uint32(kk)
            kk += step
            rem += carry
            if rem >= span:
                kk += np.uint64(1)
                rem -= span
        for k in range(row_len):
            inv[j, k] = two32 / np.float32(thr[j, k])


#: Rows per work item at most (a work item allocates its scratch once).
ROWS_PER_ITEM = 64


@numba.njit(inline="always")
def _thin_loop(d, n, rank, words, thr, inv, rescale, w, w_code, out):
    """out = rW(w'_j * e_j): e_j = the kept d (rescaled: rW(d * r(rank))) or +0.0, in
    element order; branch-free (both sides computed, then selected: no side effects).
    thr, inv: fine-tune j's rows of the keep tables. (One-dimensional arrays throughout:
    with ``wd[j, i]`` in the loop LLVM does not vectorize it.)"""
    zero = np.float32(0.0)
    for i in range(n):
        k = rank[i]
        scaled = round_op(d[i] * inv[k], w_code) if rescale else d[i]
        e = scaled if words[i] < thr[k] else zero
        out[i] = round_op(w * e, w_code)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _thin(d, n, rank, words, thr, inv, rescale, w, w_code, out):
    """``_thin_loop`` with the working dtype a constant in each branch (so LLVM vectorizes
    the loop without having to unswitch rW's dtype branch)."""
    if w_code == _BF16:
        _thin_loop(d, n, rank, words, thr, inv, rescale, w, _BF16, out)
    elif w_code == _F16:
        _thin_loop(d, n, rank, words, thr, inv, rescale, w, _F16, out)
    else:
        _thin_loop(d, n, rank, words, thr, inv, rescale, w, _F32, out)


@numba.njit(inline="always")
def _combine_loops(wd, n, wq, sign, normalize, den0, s32, w_code, xb, acc, den, elect):
    """xb = rW(x_b + rW(s * m)), m the (normalized) sign-elected or plain sum of wd
    (SPEC "DELLA", v3's merged value); one loop per step, models outside (vectorized),
    each element's sums over the models in order from +0.0."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    n_models = wd.shape[0]
    acc[:n] = zero
    den[:n] = zero
    if sign:
        elect[:n] = zero
        for j in range(n_models):
            row = wd[j]
            for i in range(n):
                elect[i] = elect[i] + row[i]
        for i in range(n):
            elect[i] = round_op(elect[i], w_code)  # the elected sign's sum S
        for j in range(n_models):
            row = wd[j]
            w = wq[j]
            for i in range(n):
                v = row[i]
                agree = (v > zero) if elect[i] >= zero else (v < zero)  # NaN: none agrees
                acc[i] = acc[i] + (v if agree else zero)
                den[i] = den[i] + (w if agree else zero)
        for i in range(n):
            dn = round_op(den[i], w_code)
            den[i] = one if dn == zero else dn
    else:
        for j in range(n_models):
            row = wd[j]
            for i in range(n):
                acc[i] = acc[i] + row[i]
        den[:n] = den0
    for i in range(n):
        acc[i] = round_op(acc[i], w_code)
    if normalize:
        for i in range(n):
            acc[i] = round_op(acc[i] / den[i], w_code)
    for i in range(n):
        xb[i] = round_op(xb[i] + round_op(s32 * acc[i], w_code), w_code)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _combine(wd, n, wq, sign, normalize, den0, s32, w_code, xb, acc, den, elect):
    """``_combine_loops`` with the working dtype a constant in each branch."""
    if w_code == _BF16:
        _combine_loops(wd, n, wq, sign, normalize, den0, s32, _BF16, xb, acc, den, elect)
    elif w_code == _F16:
        _combine_loops(wd, n, wq, sign, normalize, den0, s32, _F16, xb, acc, den, elect)
    else:
        _combine_loops(wd, n, wq, sign, normalize, den0, s32, _F32, xb, acc, den, elect)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _della_rows(inputs, codes, base_row, model_rows, r_lo, r_hi, row_len, start, k0, k1,
                drop, thr, inv, rescale, wq, sign, normalize, den0, s32, w_code, out, out_code,
                ids):  # fmt: skip
    """Rows r_lo .. r_hi - 1 of the chunk, with one set of scratch arrays. (The parallel
    loop only calls this: loops written inside its body were not vectorized.)"""
    n_models = model_rows.shape[0]
    n = row_len
    xb = np.empty(n, np.float32)
    d = np.empty(n, np.float32)
    wd = np.empty((n_models, n), np.float32)
    mags = np.empty(n, np.uint32)
    rank = np.empty(n, np.int32)
    pos = np.empty(max(COUNT_BINS_PER_ELEM * n, COUNT_BINS_MIN), np.int32)
    perm = np.empty(n, np.int64)
    spare = np.empty(n, np.int64)
    hist = np.empty(256, np.int64)
    acc = np.empty(n, np.float32)
    den = np.empty(n, np.float32)
    elect = np.empty(n, np.float32)
    words = np.empty((4, n), np.uint32)
    for r in range(r_lo, r_hi):
        lo = r * n
        group = -1
        _decode_block(inputs[base_row], codes[base_row], lo, n, xb)
        round_all(xb, n, w_code)
        for j in range(n_models):
            task_vector(inputs[model_rows[j]], codes[model_rows[j]], lo, n, xb, w_code, d)
            row, wj = wd[j], wq[j]
            if not drop[j]:
                weigh(d, n, wj, w_code, row)
                continue
            for i in range(n):
                mags[i] = _f32_bits(d[i]) & np.uint32(0x7FFFFFFF)
            _ranks(mags, n, rank, pos, perm, spare, hist)
            if ids[j] // 4 != group:  # fine-tunes 4g .. 4g+3 share one Philox call
                group = ids[j] // 4
                _philox_range(start + lo, n, np.uint64(group), k0, k1, words[0], words[1],
                              words[2], words[3])  # fmt: skip
            _thin(d, n, rank, words[ids[j] % 4], thr[j], inv[j], rescale, wj, w_code, row)
        _combine(wd, n, wq, sign, normalize, den0, s32, w_code, xb, acc, den, elect)
        _encode_block(xb, out_code, lo, n, out)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _della_kernel(inputs, codes, base_row, model_rows, n_rows, row_len, start, k0, k1, drop,
                  thr, inv, rescale, wq, sign, normalize, den0, s32, w_code, out, out_code,
                  ids):  # fmt: skip
    n_items = (n_rows + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    for it in numba.prange(n_items):
        _della_rows(inputs, codes, base_row, model_rows, it * ROWS_PER_ITEM,
                    min(n_rows, (it + 1) * ROWS_PER_ITEM), row_len, start, k0, k1, drop, thr,
                    inv, rescale, wq, sign, normalize, den0, s32, w_code, out, out_code, ids)  # fmt: skip


def della_chunk(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
                n_rows: int, row_len: int, start: int, key: int, weights, density, epsilon,
                rescale: bool, sign: bool, normalize: bool, scale: float, out: np.ndarray,
                out_dtype: str, work: str | None = None, model_ids=None) -> None:  # fmt: skip
    """The merged value of ``n_rows`` whole rows into the raw byte row ``out`` (SPEC "DELLA").

    Args:
        inputs: the slot's rows (np.uint8 [rows, bytes]); dtypes: each row's dtype.
        base_row, model_rows: the rows of the base and of the N fine-tunes (SPEC order).
        start: tensor index of the chunk's first element; key: the tensor's key_t.
        weights, density, epsilon: per fine-tune w_j, rho_j, eps_j (float64).
        sign: sign election (``della``); normalize; scale: s (mergekit's lambda).
        work: the working dtype D, or None: the inputs' promoted dtype.
        model_ids: SPEC index j of each fine-tune row (its Philox word), default 0 .. N-1.

    Raises:
        ValueError: bad rows, dtypes, output, a row of 2**31 elements or more, or density
            +/- epsilon outside (0, 1).
    """
    from .cpu_ram import _slot
    from .common import round_host

    n = n_rows * row_len
    if row_len >= 2**31:  # the ranks and their counters are int32
        raise ValueError(f"della ranks rows of fewer than 2**31 elements, not {row_len}")
    codes, mr, w_code, w = _slot(inputs, dtypes, base_row, model_rows, n, work)
    co = _checked(out, out_dtype, n, "out")
    nm = len(model_rows)
    if not len(weights) == len(density) == len(epsilon) == nm:
        raise ValueError(f"need {nm} weights, densities and epsilons")
    ids = np.array(range(nm) if model_ids is None else model_ids, np.int64)
    drop = np.array([float(r) < 1.0 for r in density], np.bool_)
    ab = [della_thresholds(float(r), float(e)) if dr else (0, 0)
          for r, e, dr in zip(density, epsilon, drop)]  # fmt: skip
    tha = np.array([a for a, _ in ab], np.uint64)
    thb = np.array([b for _, b in ab], np.uint64)
    wq = np.array([round_host(float(x), w) for x in weights], np.float32)
    den0 = np.float32(0.0)
    for x in wq:
        den0 = np.float32(den0 + x)
    den0 = round_host(float(den0), w)
    if abs(float(den0)) < 1e-8:
        den0 = np.float32(1.0)
    if n:
        thr = np.zeros((nm, row_len), np.uint32)
        inv = np.zeros((nm, row_len), np.float32)
        _keep_tables(tha, thb, drop, row_len, thr, inv)
        _della_kernel(inputs, codes, base_row, mr, n_rows, row_len, start,
                      np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32), drop, thr, inv,
                      bool(rescale), wq, bool(sign), bool(normalize), den0,
                      np.float32(scale), w_code, out, co, ids)  # fmt: skip


def warmup() -> None:
    """Compile (or load from numba's cache) the kernel for each dtype."""
    for dt in FLOAT_CODES:
        s = np.zeros((3, 16), np.uint8)
        della_chunk(s, [dt] * 3, 0, [1, 2], 1, 2, 0, 1, [1.0, 1.0], [0.5, 1.0], [0.1, 0.1],
                    True, True, True, 1.0, np.zeros(16, np.uint8), dt)  # fmt: skip
