"""Arcee Fusion CPU kernels (numba): mergekit's ``arcee_fusion`` (docs/SPEC.md "Arcee Fusion").

Contract: docs/SPEC.md "Arcee Fusion", tested bit for bit against ``tests/spec_reference.py``.

A chunk holds whole rows (the last dimension): ``n_rows`` rows of ``row_len`` elements of
the base ``a`` and the other model ``b``, raw little-endian byte rows as in ``cpu_merge``.

- ``fusion_k``: each row's divergence k (float32, rounded to W): mergekit's softmaxes, ratio,
  log and products op by op in W, exp and log from SPEC's ``exp64`` / ``log64`` (IEEE
  float64 operations only, no libm) rounded to float32, the sums float64 in a fixed order.
- ``fusion_hist``: histograms of the importances' 32-bit order keys: the high 16 bits
  (``buckets`` None), or the low 16 bits of the keys inside up to three buckets; exact
  counts, any chunking; each thread counts its part of the rows into its own histogram.
- ``fusion_write``: ``out = x + d * (imp >= thr)``, stored rounded to the output dtype.
- host helpers: ``ranks`` (mergekit's quantile ranks), ``find_buckets``, ``threshold``.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from .common import FLOAT_CODES, low_bits_vary
from .cpu_loops import BF16, F16, F32, round_all
from .cpu_merge import _bits_f32, _decode_block, _encode_block, _f32_bits
from .cpu_nearswap import round_op, round_work
from .cpu_rows import _checked, block_sum
from .rounding_ir import bits_f64, f64_bits

#: Elements per block of a row sum (SPEC "SLERP (v3)"'s pairwise tree).
SUM_BLOCK = 1024
#: mergekit's eps added to both softmaxes.
EPS = 1e-8
#: float64(1 / j!) for j = 0 .. 13 and float64(1 / j) for j = 0 .. 21 (SPEC's exp64, log64).
INV_FACT = np.array([1.0 / math.factorial(j) for j in range(14)], np.float64)
INV_ODD = np.array([0.0] + [1.0 / j for j in range(1, 22)], np.float64)
# The same constants as Python floats, which numba compiles in as constants.
(_F1, _F2, _F3, _F4, _F5, _F6, _F7, _F8, _F9, _F10, _F11, _F12, _F13) = (
    float(v) for v in INV_FACT[1:])
_O3, _O5, _O7, _O9, _O11, _O13, _O15, _O17, _O19, _O21 = (float(v) for v in INV_ODD[3::2])
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
LN2 = 0.6931471805599453
INV_LN2 = 1.4426950408889634
SQRT_HALF = 0.7071067811865476
#: Histograms ``fusion_hist`` counts into side by side, one per part of the rows (at most
#: this many: 512 KiB per part and bucket), so that the counting runs on every thread.
PARTS_MAX = 4
#: The order key of every NaN (0x7FC00000 ^ 0x80000000).
NAN_KEY = 0xFFC00000


@numba.njit(inline="always")
def exp64(r):
    """SPEC's exp64 of a float64 r <= 0 (branch-free, so a loop of it vectorizes: r <
    -708 computes exp64(-708) and selects 0.0)."""
    rc = max(r, -708.0)
    n = math.floor(rc * INV_LN2 + 0.5)
    s = (rc - n * LN2_HI) - n * LN2_LO
    # Horner's scheme written out (a loop over INV_FACT here is an inner loop, which keeps
    # LLVM from vectorizing the caller's loop over elements: 13 ns against ~1 per element).
    e = _F13 * s + _F12
    e = e * s + _F11
    e = e * s + _F10
    e = e * s + _F9
    e = e * s + _F8
    e = e * s + _F7
    e = e * s + _F6
    e = e * s + _F5
    e = e * s + _F4
    e = e * s + _F3
    e = e * s + _F2
    e = e * s + _F1
    e = e * s + 1.0
    # ldexp(e, n) as e * 2^n with 2^n from its bits: n >= -1021 and e > 0.7 keep the
    # product normal, so the scaling is exact (as Triton's _exp64). The integer n + 1023
    # (2 .. 2046) is read from the bits of n + 1023 + 2**52 (no float -> int conversion).
    two_n = bits_f64(f64_bits((n + 1023.0) + 4503599627370496.0) << np.uint64(52))
    return 0.0 if r < -708.0 else e * two_n


@numba.njit(inline="always")
def log64(v):
    """SPEC's log64 of a positive normal float64 v."""
    bits = f64_bits(v)  # frexp on the bits (v is positive and normal)
    # the exponent field as a float64, exactly (2**52 + field, minus 2**52: no conversion)
    field = bits_f64(((bits >> np.uint64(52)) & np.uint64(0x7FF)) | np.uint64(0x4330000000000000))
    e = (field - 4503599627370496.0) - 1022.0
    m = bits_f64((bits & np.uint64(0x000FFFFFFFFFFFFF)) | np.uint64(0x3FE0000000000000))
    small = m < SQRT_HALF
    m = 2.0 * m if small else m
    e = e - 1.0 if small else e
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    acc = _O21 * z + _O19  # written out, as exp64's
    acc = acc * z + _O17
    acc = acc * z + _O15
    acc = acc * z + _O13
    acc = acc * z + _O11
    acc = acc * z + _O9
    acc = acc * z + _O7
    acc = acc * z + _O5
    acc = acc * z + _O3
    acc = acc * z + 1.0
    return e * LN2 + (2.0 * s) * acc


@numba.njit(inline="always")
def _row_sum(v, buf):
    """SPEC's row sum of the float64 array v: blocks of SUM_BLOCK as pairwise trees."""
    total = 0.0
    n = v.shape[0]
    for lo in range(0, n, SUM_BLOCK):
        total = total + block_sum(buf, v[lo:], min(SUM_BLOCK, n - lo))
    return total


@numba.njit(inline="always")
def _load_row(row, code, first, m, w_code, dst):
    _decode_block(row, code, first, m, dst)
    round_all(dst, m, w_code)


@numba.njit(inline="always")
def log32(r):
    """SPEC's float32 log: float32(log64(r)); 0 -> -inf, inf -> inf, NaN -> NaN
    (branch-free: log64 of 1.0 where r is none of the positive finite values, then a
    select)."""
    ok = (r > np.float32(0.0)) & (r < np.float32(np.inf))
    lg = np.float32(log64(np.float64(r if ok else np.float32(1.0))))
    other = np.float32(-np.inf) if r == np.float32(0.0) else (r if r == np.float32(np.inf)
                                                                else np.float32(np.nan))  # fmt: skip
    return lg if ok else other


@numba.njit(inline="always")
def _softmax(v, m, e64, buf, c, dst):
    """dst = SPEC's softmax of the row v (float32 in W) in W, plus eps in W."""
    n = v.shape[0]
    for i in range(n):
        e64[i] = np.float64(np.float32(exp64(np.float64(np.float32(v[i] - m)))))
    z = np.float32(_row_sum(e64, buf))
    rz = np.float32(1.0) / z
    eps = np.float32(EPS)
    for i in range(n):
        dst[i] = round_op(round_op(np.float32(e64[i]) * rz, c) + eps, c)


@numba.njit(inline="always")
def _order32(b):
    """A float32's bits (int32) as an int32 monotone in the value for every finite float
    (-0 just below +0): negative values have their 31 low bits flipped. Its own inverse."""
    return b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))


@numba.njit(inline="always")
def _finite_maxima(x, y):
    """(every element of x and y finite, max x, max y) by integer compares on the bits,
    which LLVM vectorizes (a float max reduction it does not, without fast-math). The
    maxima are only used when every element is finite; of +0 and -0 either may come out,
    and ``v - max`` is then the same value, +-0, whose exp is 1 either way."""
    ex = np.int32(0)
    kx = np.int32(-2147483647 - 1)
    ky = kx
    for i in range(x.shape[0]):
        bx = np.int32(_f32_bits(x[i]))
        by = np.int32(_f32_bits(y[i]))
        ex = max(ex, max(bx & np.int32(0x7F800000), by & np.int32(0x7F800000)))
        kx = max(kx, _order32(bx))
        ky = max(ky, _order32(by))
    mx = _bits_f32(np.uint32(_order32(kx)))
    my = _bits_f32(np.uint32(_order32(ky)))
    return ex != np.int32(0x7F800000), mx, my


@numba.njit(inline="always")
def _k_body(x, y, c, e64, buf, q, p, logs):
    """SPEC's k of one row (x, y in W), the working dtype ``c`` a constant; ``logs`` the
    table of ``rW(log32(r))`` by a bf16 ``r``'s bits (``bf16_logs``; used when c is BF16)."""
    n = x.shape[0]
    finite, mx, my = _finite_maxima(x, y)
    if not finite:
        return round_work(np.float32(np.nan), c)
    _softmax(x, mx, e64, buf, c, q)
    _softmax(y, my, e64, buf, c, p)
    if c == BF16:  # rr is a bf16 value: its log from the table, exactly log32's
        for i in range(n):
            rr = round_op(p[i] / q[i], c)
            lg = logs[_f32_bits(rr) >> np.uint32(16)]
            e64[i] = np.float64(round_op(p[i] * lg, c))
    else:
        for i in range(n):
            rr = round_op(p[i] / q[i], c)
            e64[i] = np.float64(round_op(p[i] * round_op(log32(rr), c), c))
    return round_op(np.float32(_row_sum(e64, buf)), c)


@numba.njit(cache=True, error_model="numpy")
def _bf16_logs(out):
    for i in range(65536):
        r = _bits_f32(np.uint32(i) << np.uint32(16))
        out[i] = round_work(log32(r), BF16)


@functools.cache
def bf16_logs() -> np.ndarray:
    """float32 [65536]: ``rW(log32(r))`` in bf16 for every bf16 ``r`` by its 16 bits (SPEC
    "Row divergence": exactly the values log32 and rounding give; made once)."""
    t = np.empty(65536, np.float32)
    _bf16_logs(t)
    return t


@numba.njit(inline="always")
def _importance(x, y, kr, w_code):
    """(d, imp) of one element (x, y in W; kr the row's k)."""
    d = round_op(y - x, w_code)
    return d, round_op(abs(d) * kr, w_code)


@numba.njit(inline="always")
def order_key(v):
    """The 32-bit order key of a float32 (SPEC: -0 as +0, every NaN one key)."""
    if v != v:
        return np.uint32(NAN_KEY)
    if v == 0.0:
        return np.uint32(0x80000000)
    b = _f32_bits(v)
    if b & np.uint32(0x80000000):
        return ~b
    return b ^ np.uint32(0x80000000)


@numba.njit(inline="always")
def _keys_body(x, y, kr, c, keys):
    for i in range(x.shape[0]):
        _, imp = _importance(x[i], y[i], kr, c)
        keys[i] = order_key(imp)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _keys_row(ra, ca, rb, cb, first, row_len, kr, w_code, keys):
    """The order keys of one row's importances into ``keys`` [row_len]."""
    x = np.empty(row_len, np.float32)
    y = np.empty(row_len, np.float32)
    _load_row(ra, ca, first, row_len, w_code, x)
    _load_row(rb, cb, first, row_len, w_code, y)
    if w_code == BF16:
        _keys_body(x, y, kr, BF16, keys)
    elif w_code == F16:
        _keys_body(x, y, kr, F16, keys)
    else:
        _keys_body(x, y, kr, F32, keys)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _k_count_rows(ra, ca, rb, cb, r_lo, r_hi, row_len, w_code, logs, k, h0):
    """Rows r_lo .. r_hi - 1: each row's k into ``k[r]``, then its importance keys' high 16
    bits counted into ``h0`` [65536] int64 (the rows decoded once, the scratch made once)."""
    x = np.empty(row_len, np.float32)
    y = np.empty(row_len, np.float32)
    e64 = np.empty(row_len, np.float64)
    buf = np.empty(SUM_BLOCK, np.float64)
    q = np.empty(row_len, np.float32)
    p = np.empty(row_len, np.float32)
    keys = np.empty(row_len, np.uint32)
    for r in range(r_lo, r_hi):
        _load_row(ra, ca, r * row_len, row_len, w_code, x)
        _load_row(rb, cb, r * row_len, row_len, w_code, y)
        if w_code == BF16:
            kr = _k_body(x, y, BF16, e64, buf, q, p, logs)
            _keys_body(x, y, kr, BF16, keys)
        elif w_code == F16:
            kr = _k_body(x, y, F16, e64, buf, q, p, logs)
            _keys_body(x, y, kr, F16, keys)
        else:
            kr = _k_body(x, y, F32, e64, buf, q, p, logs)
            _keys_body(x, y, kr, F32, keys)
        k[r] = kr
        for i in range(row_len):
            h0[keys[i] >> np.uint32(16)] += 1


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _k_hist_kernel(ra, ca, rb, cb, n_rows, row_len, w_code, logs, k, parts):
    """``_k_count_rows`` over P parts of the rows, each into its own ``parts[p]``."""
    n_parts = parts.shape[0]
    for p in numba.prange(n_parts):
        _k_count_rows(ra, ca, rb, cb, p * n_rows // n_parts, (p + 1) * n_rows // n_parts,
                      row_len, w_code, logs, k, parts[p])  # fmt: skip


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _count_rows(ra, ca, rb, cb, r_lo, r_hi, row_len, k, w_code, lut, high, hist):
    """Add the importance keys of rows r_lo .. r_hi - 1 into ``hist`` [B, 65536] int64: the
    high 16 bits into row 0 (``high``), or the low 16 bits into row ``lut[key >> 16]`` where
    that is >= 0."""
    keys = np.empty(row_len, np.uint32)
    for r in range(r_lo, r_hi):
        _keys_row(ra, ca, rb, cb, r * row_len, row_len, k[r], w_code, keys)
        if high:
            h0 = hist[0]
            for i in range(row_len):
                h0[keys[i] >> np.uint32(16)] += 1
        else:
            for i in range(row_len):
                j = lut[keys[i] >> np.uint32(16)]
                if j >= 0:
                    hist[j, keys[i] & np.uint32(0xFFFF)] += 1


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _hist_kernel(ra, ca, rb, cb, n_rows, row_len, k, w_code, lut, high, parts):
    """Each of the P parts of the rows counted into its own histogram ``parts[p]`` (exact
    integer counts: the host's sum over parts does not depend on the split)."""
    n_parts = parts.shape[0]
    for p in numba.prange(n_parts):
        _count_rows(ra, ca, rb, cb, p * n_rows // n_parts, (p + 1) * n_rows // n_parts, row_len,
                    k, w_code, lut, high, parts[p])  # fmt: skip


@numba.njit(inline="always")
def _write_body(x, y, kr, thr, c):
    for i in range(x.shape[0]):
        d, imp = _importance(x[i], y[i], kr, c)
        m = np.float32(1.0) if imp >= thr else np.float32(0.0)
        x[i] = x[i] + d * m


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _write_row(ra, ca, rb, cb, first, row_len, kr, thr, w_code, out, out_code):
    """The merged row (x + d * mask) into the raw byte row ``out``."""
    x = np.empty(row_len, np.float32)
    y = np.empty(row_len, np.float32)
    _load_row(ra, ca, first, row_len, w_code, x)
    _load_row(rb, cb, first, row_len, w_code, y)
    if w_code == BF16:
        _write_body(x, y, kr, thr, BF16)
    elif w_code == F16:
        _write_body(x, y, kr, thr, F16)
    else:
        _write_body(x, y, kr, thr, F32)
    _encode_block(x, out_code, first, row_len, out)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _write_kernel(ra, ca, rb, cb, n_rows, row_len, k, thr, w_code, out, out_code):
    for r in numba.prange(n_rows):
        _write_row(ra, ca, rb, cb, r * row_len, row_len, k[r], thr, w_code, out, out_code)


def _codes(a, da, b, db, n_rows, row_len):
    if n_rows < 0 or row_len < 0:
        raise ValueError(f"n_rows and row_len must be >= 0, got {n_rows}, {row_len}")
    n = n_rows * row_len
    return _checked(a, da, n, "a"), _checked(b, db, n, "b")


def work_dtype(dtype_a: str, dtype_b: str) -> str:
    """SPEC's W: the inputs' common dtype, ``F32`` when they differ."""
    return dtype_a if dtype_a == dtype_b else "F32"


def fusion_k(a: np.ndarray, da: str, b: np.ndarray, db: str, n_rows: int, row_len: int,
             work: str | None = None, high: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Each row's k (float32 [n_rows], in W) of a chunk of whole rows (SPEC "Row
    divergence"). ``a``, ``b``: raw byte rows of the base and the other model. The chunk's
    importance keys' high 16 bits are counted in the same pass (``fusion_hist`` with no
    buckets, exact counts) and added into ``high`` (int64 [65536]) when given.

    Raises:
        ValueError: bad rows or dtypes, or ``high`` not int64 [65536].
    """
    ca, cb = _codes(a, da, b, db, n_rows, row_len)
    w = FLOAT_CODES[work or work_dtype(da, db)]
    k = np.zeros(n_rows, np.float32)
    if high is not None and (high.dtype != np.int64 or high.shape != (65536,)):
        raise ValueError("high must be int64 [65536]")
    parts = np.zeros((max(1, min(PARTS_MAX, numba.get_num_threads(), n_rows)), 65536), np.int64)
    _k_hist_kernel(a, ca, b, cb, n_rows, row_len, w, bf16_logs(), k, parts)
    if high is not None:
        high += parts.sum(axis=0)
    return k


def fusion_hist(a: np.ndarray, da: str, b: np.ndarray, db: str, n_rows: int, row_len: int,
                k: np.ndarray, hist: np.ndarray, buckets: np.ndarray | None = None,
                work: str | None = None) -> None:  # fmt: skip
    """Add the chunk's importance keys into ``hist``: int64 [65536] of their high 16 bits
    (``buckets`` None), or int64 [len(buckets), 65536] of the low 16 bits of the keys whose
    high 16 bits are ``buckets[j]`` (int64; -1 matches nothing)."""
    ca, cb = _codes(a, da, b, db, n_rows, row_len)
    w = FLOAT_CODES[work or work_dtype(da, db)]
    k = np.ascontiguousarray(k, np.float32)
    lut = np.full(65536, -1, np.int64)  # high 16 bits -> the first histogram row counting it
    first = []
    if buckets is not None:
        for j, bk in enumerate(int(x) for x in buckets):
            if 0 <= bk < 65536 and lut[bk] < 0:
                lut[bk] = j
            first.append(int(lut[bk]) if 0 <= bk < 65536 else -1)
    n_hist = 1 if buckets is None else max(1, len(first))
    # one histogram per part (PARTS_MAX at most: 512 KiB each per bucket)
    n_parts = max(1, min(PARTS_MAX, numba.get_num_threads(), n_rows))
    parts = np.zeros((n_parts, n_hist, 65536), np.int64)
    _hist_kernel(a, ca, b, cb, n_rows, row_len, k, w, lut, buckets is None, parts)
    counts = parts.sum(axis=0)
    if buckets is None:
        hist += counts[0]
        return
    for j, f in enumerate(first):  # a bucket asked for twice is counted for each
        if f >= 0:
            hist[j] += counts[f]


def fusion_write(a: np.ndarray, da: str, b: np.ndarray, db: str, n_rows: int, row_len: int,
                 k: np.ndarray, thr: float, out: np.ndarray, out_dtype: str,
                 work: str | None = None) -> None:  # fmt: skip
    """The merged chunk (SPEC "The merged value") into the raw byte row ``out``."""
    ca, cb = _codes(a, da, b, db, n_rows, row_len)
    co = _checked(out, out_dtype, n_rows * row_len, "out")
    w = FLOAT_CODES[work or work_dtype(da, db)]
    _write_kernel(a, ca, b, cb, n_rows, row_len, np.ascontiguousarray(k, np.float32),
                  np.float32(thr), w, out, co)  # fmt: skip


def ranks(n: int) -> tuple[int, int, int]:
    """mergekit's quantile ranks of n values: q1, median, q3 (exact integers)."""
    return (n - 1) // 4, (n - 1) // 2, (3 * (n - 1)) // 4


def find_buckets(high: np.ndarray, want: tuple[int, ...]) -> list[tuple[int, int]]:
    """(bucket, rank inside it) of each wanted rank from the high-16-bit histogram."""
    cum = np.cumsum(high)
    out = []
    for r in want:
        b = int(np.searchsorted(cum, r, side="right"))
        out.append((b, r - (int(cum[b - 1]) if b else 0)))
    return out


def key_value(key: int) -> np.float32:
    """The float32 of an order key."""
    bits = key ^ 0x80000000 if key & 0x80000000 else (~key) & 0xFFFFFFFF
    return np.array([bits], np.uint32).view(np.float32)[0]


def threshold(values: tuple[np.float32, np.float32, np.float32], work: str) -> np.float32:
    """thr = rW(med + rW(1.5 * rW(q3 - q1))) from (q1, med, q3) (float32 in W)."""
    q1, med, q3 = (np.float32(v) for v in values)
    w = FLOAT_CODES[work]
    with np.errstate(all="ignore"):
        iqr = _round(np.float32(q3 - q1), w)
        return _round(np.float32(med + _round(np.float32(np.float32(1.5) * iqr), w)), w)


@numba.njit(cache=True, error_model="numpy")
def _round(v, code):
    return round_work(v, code)


def quartile_values(found: list[tuple[int, int]], low: np.ndarray | None):
    """(q1, med, q3) as float32 from ``find_buckets``' (bucket, rank inside it) and the
    low histograms int64 [3, 65536] of those buckets (None when W is bf16:
    ``common.low_bits_vary``; then a bucket's one key has low bits 0 for a positive value
    or NaN, 0xFFFF for a negative one)."""
    vals = []
    for j, (b, r) in enumerate(found):
        if low is None:
            lo = 0 if b & 0x8000 else 0xFFFF
        else:
            lo = int(np.searchsorted(np.cumsum(low[j]), r, side="right"))
        vals.append(key_value((b << 16) | lo))
    return tuple(vals)


def select(high: np.ndarray, low_of, n: int, work: str = "F32"):
    """(q1, med, q3): ``low_of(buckets) -> int64 [3, 65536]`` the second histogram, not
    called when W (``work``) is bf16."""
    found = find_buckets(high, ranks(n))
    buckets = np.array([b for b, _ in found], np.int64)
    return quartile_values(found, low_of(buckets) if low_bits_vary(work) else None)


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for each dtype."""
    for dt in FLOAT_CODES:
        z = np.zeros(16, np.uint8)
        k = fusion_k(z, dt, z, dt, 2, 1)
        fusion_hist(z, dt, z, dt, 2, 1, k, np.zeros(65536, np.int64))
        fusion_hist(z, dt, z, dt, 2, 1, k, np.zeros((3, 65536), np.int64), np.zeros(3, np.int64))
        fusion_write(z, dt, z, dt, 2, 1, k, 0.0, z.copy(), dt)
