"""SCE CPU kernels (numba): mergekit's ``sce`` op by op in the working dtype.

Contract: docs/SPEC.md "SCE", tested bit for bit against ``tests/spec_reference.py``.

A chunk is ``n`` elements of the base (slot row ``base_row``) and of N fine-tunes (slot rows
``model_rows``), raw little-endian byte rows as in ``cpu_merge``, starting at a multiple of
``SCE_BLOCK`` elements of the tensor.

- ``sce_hist``: the variance keys' radix-select histograms: ``bucket < 0`` counts the high
  15 bits of every key and the nonzero keys; ``bucket >= 0`` counts the low 16 bits of the
  keys whose high bits are ``bucket`` (int64, added into the caller's arrays: exact whatever
  the chunking or thread count).
- ``sce_energy``: per block of ``SCE_BLOCK`` elements, each model's float64 sum of the
  squared selected task vectors (a pairwise tree over the block padded with +0.0); the
  caller adds the blocks left to right.
- ``sce_chunk``: the merged value (sign election, energy weights, one division).
"""

from __future__ import annotations

import numba
import numpy as np

from .cpu_loops import BF16, F16, F32, base_and_task_vectors, power_of_two
from .cpu_merge import _encode_block, _f32_bits
from .cpu_nearswap import _round_host, round_op, round_work
from .cpu_ram import _slot
from .cpu_rows import _checked, _tree

#: Elements per block of a statistic (SPEC), a power of two; chunks start at its multiples.
SCE_BLOCK = 1024
#: Buckets of the high histogram (key >> 16, the sign bit cleared) and of the low one.
HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16
#: Threshold meaning "keep nothing" (above every uint32 key).
KEEP_NONE = 1 << 32


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, tv, key, mean, m2):
    """xb = the base block in W, tv[j] = rW(x_j - x_b), key = the variance keys.
    mean, m2: float64 [>= m] scratch."""
    n_models = model_rows.shape[0]
    base_and_task_vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, tv)
    mean[:m] = 0.0
    m2[:m] = 0.0
    for j in range(n_models):  # torch's Welford recurrence, float64, elements inside
        jj = np.float64(j + 1)
        row = tv[j]
        if power_of_two(j + 1):  # delta / 2**k = delta * 2**-k exactly: a multiply
            inv = 1.0 / jj
            for i in range(m):
                x = np.float64(row[i])
                delta = x - mean[i]
                mean[i] = mean[i] + delta * inv
                m2[i] = m2[i] + delta * (x - mean[i])
        else:
            for i in range(m):
                x = np.float64(row[i])
                delta = x - mean[i]
                mean[i] = mean[i] + delta / jj
                m2[i] = m2[i] + delta * (x - mean[i])
    _keys(m2, m, n_models, w_code, key)


@numba.njit(inline="always")
def _keys_loop(m2, m, n_models, c, key):
    nm = np.float64(n_models)
    if power_of_two(n_models):  # as in _vectors: m2 / N = m2 * (1 / N) exactly
        inv = 1.0 / nm
        for i in range(m):
            v = round_op(np.float32(m2[i] * inv), c)
            key[i] = np.int64(_f32_bits(v) & np.uint32(0x7FFFFFFF))
    else:
        for i in range(m):
            v = round_op(np.float32(m2[i] / nm), c)
            key[i] = np.int64(_f32_bits(v) & np.uint32(0x7FFFFFFF))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _keys(m2, m, n_models, w_code, key):
    """key = the variance keys: bits of rW(float32(m2 / N)), the sign bit cleared."""
    if w_code == BF16:
        _keys_loop(m2, m, n_models, BF16, key)
    elif w_code == F16:
        _keys_loop(m2, m, n_models, F16, key)
    else:
        _keys_loop(m2, m, n_models, F32, key)


@numba.njit(inline="always")
def _select_loop(row, key, m, thr, c):
    zero = np.float32(0.0)
    for i in range(m):  # off the top-k: rW(tv * 0) (+-0, NaN for inf/NaN)
        off = round_op(row[i] * zero, c)
        row[i] = row[i] if key[i] >= thr else off


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _select(tv, key, m, keep_all, thr, w_code):
    """tv[j] = the selected task vectors m_j: tv where key >= thr (or keep_all), else
    rW(tv * 0)."""
    if keep_all:
        return
    for j in range(tv.shape[0]):
        if w_code == BF16:
            _select_loop(tv[j], key, m, thr, BF16)
        elif w_code == F16:
            _select_loop(tv[j], key, m, thr, F16)
        else:
            _select_loop(tv[j], key, m, thr, F32)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _hist_kernel(inputs, codes, base_row, model_rows, n, w_code, bucket, parts, nz):
    n_models = model_rows.shape[0]
    n_parts = parts.shape[0]
    n_blocks = (n + SCE_BLOCK - 1) // SCE_BLOCK
    for p in numba.prange(n_parts):
        xb = np.empty(SCE_BLOCK, np.float32)
        tv = np.empty((n_models, SCE_BLOCK), np.float32)
        key = np.empty(SCE_BLOCK, np.int64)
        mean = np.empty(SCE_BLOCK, np.float64)
        m2 = np.empty(SCE_BLOCK, np.float64)
        for k in range(p, n_blocks, n_parts):
            first = k * SCE_BLOCK
            m = min(SCE_BLOCK, n - first)
            _vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, tv, key, mean,
                     m2)  # fmt: skip
            _count(key, m, bucket, parts[p], nz, p)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _count(key, m, bucket, hist, nz, p):
    """Add the block's keys into ``hist`` (high bits and nz[p] the nonzero keys when
    bucket < 0, else the low bits of the keys in ``bucket``)."""
    if bucket < 0:
        for i in range(m):
            hist[key[i] >> 16] += 1
        c = 0
        for i in range(m):
            c += key[i] != 0
        nz[p] += c
    else:
        for i in range(m):
            if (key[i] >> 16) == bucket:
                hist[key[i] & 0xFFFF] += 1


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _energy_block(inputs, codes, base_row, model_rows, first, m, w_code, keep_all, thr, out_k):
    """out_k[j] = the block's float64 sum of rW(m_j * m_j) (a pairwise tree over
    SCE_BLOCK elements, padded with +0.0)."""
    n_models = model_rows.shape[0]
    xb = np.empty(SCE_BLOCK, np.float32)
    tv = np.empty((n_models, SCE_BLOCK), np.float32)
    key = np.empty(SCE_BLOCK, np.int64)
    mean = np.empty(SCE_BLOCK, np.float64)
    m2 = np.empty(SCE_BLOCK, np.float64)
    p = np.empty(SCE_BLOCK, np.float64)
    _vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, tv, key, mean, m2)
    _select(tv, key, m, keep_all, thr, w_code)
    for j in range(n_models):
        row = tv[j]
        round_all_sq(row, m, w_code, p)
        p[m:] = 0.0
        out_k[j] = _tree(p)


@numba.njit(inline="always")
def _sq_loop(row, m, c, p):
    for i in range(m):
        p[i] = np.float64(round_op(row[i] * row[i], c))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def round_all_sq(row, m, w_code, p):
    """p[:m] = float64(rW(row * row))."""
    if w_code == BF16:
        _sq_loop(row, m, BF16, p)
    elif w_code == F16:
        _sq_loop(row, m, F16, p)
    else:
        _sq_loop(row, m, F32, p)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _energy_kernel(inputs, codes, base_row, model_rows, n, w_code, keep_all, thr, out):
    for k in numba.prange((n + SCE_BLOCK - 1) // SCE_BLOCK):
        first = k * SCE_BLOCK
        _energy_block(inputs, codes, base_row, model_rows, first, min(SCE_BLOCK, n - first),
                      w_code, keep_all, thr, out[k])  # fmt: skip


@numba.njit(inline="always")
def _merge_loops(tv, m, c, wt, lo, xb, s_all, acc, den):
    """xb = rW(x_b + rW(a / d)) with the sign election and energy weights (SPEC "SCE")."""
    zero = np.float32(0.0)
    n_models = tv.shape[0]
    s_all[:m] = zero
    acc[:m] = zero
    den[:m] = zero
    for j in range(n_models):
        row = tv[j]
        for i in range(m):
            s_all[i] = s_all[i] + row[i]
    for i in range(m):
        s_all[i] = round_op(s_all[i], c)  # the elected sign's sum, rounded once
    for j in range(n_models):
        row = tv[j]
        w = wt[j]
        for i in range(m):
            v = row[i]
            agree = (v > zero) if s_all[i] >= zero else (v < zero)  # NaN: none agrees
            ew = round_op(w * (np.float32(1.0) if agree else zero), c)
            acc[i] = acc[i] + round_op(v * ew, c)
            den[i] = den[i] + ew
    for i in range(m):
        a = round_op(acc[i], c)
        d = round_op(den[i], c)
        d = lo if d < lo else d
        xb[i] = round_op(xb[i] + round_op(a / d, c), c)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _sce_block(inputs, codes, base_row, model_rows, first, m, w_code, keep_all, thr, wt, lo,
               out, out_code):  # fmt: skip
    """One block of the merged value (SPEC "SCE") into the raw byte row ``out``."""
    n_models = model_rows.shape[0]
    xb = np.empty(SCE_BLOCK, np.float32)
    tv = np.empty((n_models, SCE_BLOCK), np.float32)
    key = np.empty(SCE_BLOCK, np.int64)
    mean = np.empty(SCE_BLOCK, np.float64)
    m2 = np.empty(SCE_BLOCK, np.float64)
    s_all = np.empty(SCE_BLOCK, np.float32)
    acc = np.empty(SCE_BLOCK, np.float32)
    den = np.empty(SCE_BLOCK, np.float32)
    _vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, tv, key, mean, m2)
    _select(tv, key, m, keep_all, thr, w_code)
    if w_code == BF16:
        _merge_loops(tv, m, BF16, wt, lo, xb, s_all, acc, den)
    elif w_code == F16:
        _merge_loops(tv, m, F16, wt, lo, xb, s_all, acc, den)
    else:
        _merge_loops(tv, m, F32, wt, lo, xb, s_all, acc, den)
    _encode_block(xb, out_code, first, m, out)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _sce_kernel(inputs, codes, base_row, model_rows, n, w_code, keep_all, thr, wt, lo, out,
                out_code):  # fmt: skip
    for k in numba.prange((n + SCE_BLOCK - 1) // SCE_BLOCK):
        first = k * SCE_BLOCK
        _sce_block(inputs, codes, base_row, model_rows, first, min(SCE_BLOCK, n - first),
                   w_code, keep_all, thr, wt, lo, out, out_code)  # fmt: skip


def _parts() -> int:
    return max(1, numba.get_num_threads())


def sce_hist(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
             n: int, bucket: int, hist: np.ndarray, nonzero: np.ndarray | None = None,
             work: str | None = None) -> None:  # fmt: skip
    """Add the variance keys' histogram of ``n`` elements into ``hist`` (int64): the high
    bits (``bucket < 0``, HIGH_BINS, and the nonzero keys into ``nonzero[0]``) or the low
    bits inside ``bucket`` (LOW_BINS).

    Raises:
        ValueError: bad rows, dtypes or histogram.
    """
    codes, mr, w_code, _ = _slot(inputs, dtypes, base_row, model_rows, n, work)
    bins = HIGH_BINS if bucket < 0 else LOW_BINS
    if hist.dtype != np.int64 or hist.shape != (bins,):
        raise ValueError(f"hist must be int64 [{bins}]")
    if n == 0:
        return
    parts = np.zeros((_parts(), LOW_BINS), np.int64)
    nz = np.zeros(parts.shape[0], np.int64)
    _hist_kernel(inputs, codes, base_row, mr, n, w_code, bucket, parts, nz)
    hist += parts[:, :bins].sum(axis=0)
    if nonzero is not None:
        nonzero[0] += int(nz.sum())


def sce_energy(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
               n: int, keep_all: bool, thr: int, work: str | None = None) -> np.ndarray:  # fmt: skip
    """Each block's sums of squared selected task vectors: float64 [ceil(n / SCE_BLOCK), N].

    Raises:
        ValueError: bad rows or dtypes.
    """
    codes, mr, w_code, _ = _slot(inputs, dtypes, base_row, model_rows, n, work)
    out = np.zeros(((n + SCE_BLOCK - 1) // SCE_BLOCK, len(model_rows)), np.float64)
    if n:
        _energy_kernel(inputs, codes, base_row, mr, n, w_code, bool(keep_all), np.int64(thr),
                       out)  # fmt: skip
    return out


def sce_chunk(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
              n: int, keep_all: bool, thr: int, wt: np.ndarray, out: np.ndarray,
              out_dtype: str, work: str | None = None) -> None:  # fmt: skip
    """The merged value of ``n`` elements into the raw byte row ``out`` (SPEC "SCE").

    Args:
        keep_all, thr: the selection (every element, or key >= thr); wt: float32 [N], the
            energy weights (values of W).

    Raises:
        ValueError: bad rows, dtypes or output.
    """
    codes, mr, w_code, _ = _slot(inputs, dtypes, base_row, model_rows, n, work)
    co = _checked(out, out_dtype, n, "out")
    lo = np.float32(_round_host(np.float32(1e-6), w_code))
    wt = np.ascontiguousarray(wt, np.float32)
    if wt.shape != (len(model_rows),):
        raise ValueError(f"need {len(model_rows)} weights, got {wt.shape}")
    if n:
        _sce_kernel(inputs, codes, base_row, mr, n, w_code, bool(keep_all), np.int64(thr), wt,
                    lo, out, co)  # fmt: skip


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for each dtype."""
    for dt in ("F32", "F16", "BF16"):
        s = np.zeros((3, 16), np.uint8)
        sce_hist(s, [dt] * 3, 0, [1, 2], 2, -1, np.zeros(HIGH_BINS, np.int64),
                 np.zeros(1, np.int64))  # fmt: skip
        sce_hist(s, [dt] * 3, 0, [1, 2], 2, 0, np.zeros(LOW_BINS, np.int64))
        sce_energy(s, [dt] * 3, 0, [1, 2], 2, False, 1)
        sce_chunk(s, [dt] * 3, 0, [1, 2], 2, True, 0, np.ones(2, np.float32),
                  np.zeros(16, np.uint8), dt)  # fmt: skip
