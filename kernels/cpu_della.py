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
from .cpu_merge import _decode_block, _encode_block, _f32_bits, _philox_range
from .cpu_nearswap import round_work
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


@numba.njit(nogil=True, cache=True)
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


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _della_kernel(inputs, codes, base_row, model_rows, n_rows, row_len, start, k0, k1, drop,
                  tha, thb, rescale, wq, sign, normalize, den0, s32, w_code, out, out_code, ids):  # fmt: skip
    n_models = model_rows.shape[0]
    zero = np.float32(0.0)
    two32 = np.float32(4294967296.0)
    for r in numba.prange(n_rows):
        lo = r * row_len
        xb = np.empty(row_len, np.float32)
        d = np.empty(row_len, np.float32)
        wd = np.empty((n_models, row_len), np.float32)
        mags = np.empty(row_len, np.uint32)
        perm = np.empty(row_len, np.int64)
        spare = np.empty(row_len, np.int64)
        hist = np.empty(256, np.int64)
        acc = np.empty(row_len, np.float32)
        den = np.empty(row_len, np.float32)
        elect = np.empty(row_len, np.float32)
        group = -1
        w0 = np.empty(row_len, np.uint32)
        w1 = np.empty(row_len, np.uint32)
        w2 = np.empty(row_len, np.uint32)
        w3 = np.empty(row_len, np.uint32)
        _decode_block(inputs[base_row], codes[base_row], lo, row_len, xb)
        for i in range(row_len):
            xb[i] = round_work(xb[i], w_code)
        for j in range(n_models):
            mr = model_rows[j]
            _decode_block(inputs[mr], codes[mr], lo, row_len, d)
            for i in range(row_len):
                d[i] = round_work(round_work(d[i], w_code) - xb[i], w_code)
            if drop[j]:
                for i in range(row_len):
                    mags[i] = _f32_bits(d[i]) & np.uint32(0x7FFFFFFF)
                order = _sorted_order(mags, row_len, perm, spare, hist)
                if ids[j] // 4 != group:  # fine-tunes 4g .. 4g+3 share one Philox call
                    group = ids[j] // 4
                    _philox_range(start + lo, row_len, np.uint64(group), k0, k1, w0, w1, w2, w3)
                q = ids[j] % 4
                words = w0 if q == 0 else (w1 if q == 1 else (w2 if q == 2 else w3))
                # K = A + (rank * B) // (row_len - 1), rank = 0, 1, ... in sorted order:
                # advanced by B // (row_len - 1), carrying B % (row_len - 1) (no division)
                span = np.uint64(max(row_len - 1, 1))
                step = np.uint64(thb[j]) // span if row_len > 1 else np.uint64(0)
                carry = np.uint64(thb[j]) % span if row_len > 1 else np.uint64(0)
                kk = np.uint64(tha[j])
                rem = np.uint64(0)
                for k in range(row_len):
                    i = order[k]
                    e = zero
                    if np.uint64(words[i]) < kk:
                        e = round_work(d[i] * (two32 / np.float32(kk)), w_code) if rescale else d[i]
                    wd[j, i] = round_work(wq[j] * e, w_code)
                    kk += step
                    rem += carry
                    if rem >= span:
                        kk += np.uint64(1)
                        rem -= span
            else:
                for i in range(row_len):
                    wd[j, i] = round_work(wq[j] * d[i], w_code)
        # the combination with the models outside and the elements inside (vectorized);
        # each element's sums still run over the models in order from +0.0
        for i in range(row_len):
            acc[i] = zero
            den[i] = zero
            elect[i] = zero
        if sign:
            for j in range(n_models):
                for i in range(row_len):
                    elect[i] = elect[i] + wd[j, i]
            for i in range(row_len):
                elect[i] = round_work(elect[i], w_code)  # the elected sign's sum
            for j in range(n_models):
                for i in range(row_len):
                    v = wd[j, i]
                    pos = elect[i] >= zero
                    agree = (v > zero and pos) or (v < zero and not pos)
                    acc[i] = acc[i] + (v if agree else zero)
                    den[i] = den[i] + (wq[j] if agree else zero)
        else:
            for j in range(n_models):
                for i in range(row_len):
                    acc[i] = acc[i] + wd[j, i]
        for i in range(row_len):
            a = round_work(acc[i], w_code)
            if sign:
                dn = round_work(den[i], w_code)
                if dn == zero:
                    dn = np.float32(1.0)
            else:
                dn = den0
            m = round_work(a / dn, w_code) if normalize else a
            m = round_work(s32 * m, w_code)
            xb[i] = round_work(xb[i] + m, w_code)
        _encode_block(xb, out_code, lo, row_len, out)


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
        ValueError: bad rows, dtypes, output, or density +/- epsilon outside (0, 1).
    """
    from .cpu_ram import _slot
    from .common import round_host

    n = n_rows * row_len
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
        _della_kernel(inputs, codes, base_row, mr, n_rows, row_len, start,
                      np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32), drop, tha, thb,
                      bool(rescale), wq, bool(sign), bool(normalize), den0,
                      np.float32(scale), w_code, out, co, ids)  # fmt: skip


def warmup() -> None:
    """Compile (or load from numba's cache) the kernel for each dtype."""
    for dt in FLOAT_CODES:
        s = np.zeros((3, 16), np.uint8)
        della_chunk(s, [dt] * 3, 0, [1, 2], 1, 2, 0, 1, [1.0, 1.0], [0.5, 1.0], [0.1, 0.1],
                    True, True, True, 1.0, np.zeros(16, np.uint8), dt)  # fmt: skip
