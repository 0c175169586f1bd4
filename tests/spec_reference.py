"""Slow, obviously-correct numpy reference of the merge contract (shared/SPEC.md).

Written from SPEC.md alone, independent of ``kernels/``: every kernel (numba, Triton) is
tested against it bit for bit. Vectorized numpy, float32 throughout, one rounding per
operation in SPEC's order (numpy never fuses a multiply and an add).

Conventions: a tensor chunk is a 1-D numpy array in its stored dtype, named by the
safetensors dtype strings "F32", "F16", "BF16"; bfloat16 is carried as ``np.uint16`` bits.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

_M32 = np.uint64(0xFFFFFFFF)
# Philox4x32 constants, as in triton.language.random.philox_impl (Salmon et al., SC'11).
_PHILOX_KEY_A = np.uint64(0x9E3779B9)
_PHILOX_KEY_B = np.uint64(0xBB67AE85)
_PHILOX_ROUND_A = np.uint64(0xD2511F53)
_PHILOX_ROUND_B = np.uint64(0xCD9E8D57)

FLOAT_DTYPES = ("F32", "F16", "BF16")


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 arrays, exactly as ``triton.language.random.philox_impl``.

    Args:
        c0, c1, c2, c3: counter words, uint32 arrays of one shape (or scalars).
        k0, k1: key words, uint32 scalars or arrays broadcastable to the counters.

    Returns:
        (r0, r1, r2, r3): uint32 arrays of the counters' shape.
    """
    # Work in uint64 lanes holding 32-bit values; a product of two is exact in uint64.
    c0, c1, c2, c3, k0, k1 = (
        np.asarray(v, dtype=np.uint64) & _M32 for v in np.broadcast_arrays(c0, c1, c2, c3, k0, k1)
    )
    for _ in range(10):
        p_b = _PHILOX_ROUND_B * c2  # umulhi / mul of B and c2
        p_a = _PHILOX_ROUND_A * c0
        c0, c1, c2, c3 = (
            (p_b >> np.uint64(32)) ^ c1 ^ k0,
            p_b & _M32,
            (p_a >> np.uint64(32)) ^ c3 ^ k1,
            p_a & _M32,
        )
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return tuple(v.astype(np.uint32) for v in (c0, c1, c2, c3))


def spec_key(seed: int, name: str) -> int:
    """key_t of SPEC "Per-tensor key": blake2b-64 of the name keyed by the seed, top bit cleared."""
    assert 0 <= seed < 2**64
    digest = hashlib.blake2b(
        name.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")
    ).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def spec_threshold(p: float) -> int:
    """floor(p_j * 2**32) (SPEC "Random drop (DARE) masks")."""
    assert 0.0 <= p < 1.0
    return math.floor(p * 2**32)


def spec_rescale(p: float) -> np.float32:
    """float32(1 / (1 - p_j)): the quotient in Python float (float64), then rounded."""
    assert 0.0 <= p < 1.0
    return np.float32(1.0 / (1.0 - p))


def spec_kept(key: int, j: int, p: float, idx: np.ndarray) -> np.ndarray:
    """kept_j(i) for tensor elements ``idx`` (int64 or uint64, >= 0): a bool array."""
    i = np.asarray(idx).astype(np.uint64)
    c0 = (i & _M32).astype(np.uint32)
    c1 = (i >> np.uint64(32)).astype(np.uint32)
    c2 = np.full(i.shape, j // 4, dtype=np.uint32)
    c3 = np.zeros(i.shape, dtype=np.uint32)
    r = philox4x32_10(c0, c1, c2, c3, np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32))[j % 4]
    return r.astype(np.uint64) >= np.uint64(spec_threshold(p))


def to_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """Exact upcast of a stored chunk to float32 (bf16 given as uint16 bits)."""
    x = np.asarray(x)
    if dtype == "F32":
        return x.astype(np.float32)
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        return (x.astype(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    raise ValueError(f"unknown float dtype {dtype!r}")


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to ``dtype``, round-to-nearest-even (bf16 returned as uint16 bits)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F32":
        return x.copy()
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16)  # numpy rounds float32 -> float16 to nearest even
    if dtype == "BF16":
        bits = x.view(np.uint32).astype(np.uint64)
        lsb = (bits >> np.uint64(16)) & np.uint64(1)
        rounded = ((bits + np.uint64(0x7FFF) + lsb) >> np.uint64(16)).astype(np.uint16)
        nan = np.isnan(x)
        # A NaN stays a NaN: keep its top bits and set the quiet bit (rounding could carry
        # a NaN's payload into the exponent's neighbour, so never round it).
        quiet = ((bits >> np.uint64(16)) | np.uint64(0x40)).astype(np.uint16)
        return np.where(nan, quiet, rounded)
    raise ValueError(f"unknown float dtype {dtype!r}")


def spec_rd(x, compute_dtype: str) -> np.ndarray:
    """SPEC "Working dtype (v3)" rd: float32 values rounded to D (nearest even) and widened
    back to float32 (the identity for D = F32). A NaN: BF16 keeps its top 16 bits, made
    quiet; F16 gives 0x7FC00000 with the NaN's sign."""
    x = np.asarray(x, dtype=np.float32)
    if compute_dtype == "F32":
        return x
    r = to_float32(from_float32(x, compute_dtype), compute_dtype)
    if compute_dtype == "F16":  # a NaN becomes 0x7FC00000 with its sign (SPEC)
        sign = x.view(np.uint32) & np.uint32(0x80000000)
        nan = (sign | np.uint32(0x7FC00000)).view(np.float32)
        r = np.where(np.isnan(x), nan, r)
    return r


def spec_promote(dtypes) -> str:
    """SPEC "Working dtype (v3)": torch.promote_types over safetensors dtype strings."""
    ds = set(dtypes)
    if len(ds) == 1:
        return ds.pop()
    return "F32"


def spec_merge(
    base,
    base_dtype,
    models,
    model_dtypes,
    out_dtype,
    *,
    key,
    start,
    model_ids,
    drop,
    weights,
    scale,
) -> np.ndarray:
    """SPEC "The merged value" for elements ``start .. start + n - 1`` of one tensor.

    Args:
        base: [n] stored base chunk, or None when the base is absent (x_b = +0.0).
        base_dtype: its dtype string (ignored when base is None).
        models: list of [n] stored fine-tune chunks, in model order.
        model_dtypes: their dtype strings.
        out_dtype: dtype string of the result.
        key: key_t; start: tensor index of element 0; model_ids: SPEC index j per model;
        drop: p_j per model; weights: w_j per model; scale: s.

    Returns:
        [n] array in ``out_dtype``'s carrier (bf16 as uint16 bits).
    """
    n = len(models[0])
    assert all(len(m) == n for m in models)
    assert len(model_dtypes) == len(models) == len(model_ids) == len(drop) == len(weights)
    idx = np.arange(n, dtype=np.uint64) + np.uint64(start)
    if base is None:
        x_b = np.zeros(n, dtype=np.float32)
    else:
        assert len(base) == n
        x_b = to_float32(base, base_dtype)
    acc = np.zeros(n, dtype=np.float32)
    with np.errstate(all="ignore"):
        for m, dt, j, p, w in zip(models, model_dtypes, model_ids, drop, weights):
            d = to_float32(m, dt) - x_b
            kept = spec_kept(key, j, p, idx)
            e = np.where(kept, d * spec_rescale(p), np.float32(0.0))
            assert e.dtype == np.float32
            acc = acc + np.float32(w) * e
        out = x_b + np.float32(scale) * acc
    assert out.dtype == np.float32
    return from_float32(out, out_dtype)


# ---------------------------------------------------------------------------------------
# v2: SPEC "Methods" (sparsifier x consensus x normalize), whole tensor or one chunk.
# ---------------------------------------------------------------------------------------

#: SPEC v2 method table: method -> (needs base, sparsifier, consensus, normalize default).
METHODS = {
    "linear": (False, "none", "none", True),
    "task_arithmetic": (True, "none", "none", False),
    "dare_linear": (True, "dare", "none", False),
    "ties": (True, "magnitude", "sign", True),
    "dare_ties": (True, "dare", "sign", False),
    "breadcrumbs": (True, "breadcrumbs", "none", False),
    "breadcrumbs_ties": (True, "breadcrumbs", "sign", False),
}

_ALL_MAGS = 0xFFFFFFFF


def spec_mag(d: np.ndarray) -> np.ndarray:
    """SPEC "Magnitudes and thresholds": mag(i) = bits(d(i)) & 0x7FFFFFFF, as uint32.

    ``d`` is a float32 task vector. The float32 bit pattern without its sign orders |d|
    exactly as integers (+0 and -0 both give 0; infinities 0x7F800000; NaNs above that).
    """
    d = np.ascontiguousarray(d, dtype=np.float32)
    return d.view(np.uint32) & np.uint32(0x7FFFFFFF)


def spec_thresholds(sparsifier: str, mags: np.ndarray, density: float, gamma=None):
    """The exact integer thresholds of SPEC v2 "Magnitudes and thresholds", by sorting.

    Args:
        sparsifier: "magnitude", "breadcrumbs", "dare" or "none".
        mags: the population, 1-D uint32 magnitudes (``spec_mag`` of one task vector, or of
            every merged tensor of one fine-tune for trim_scope model).
        density: rho_j (0 < rho_j <= 1). gamma: gamma_j (breadcrumbs only).

    Returns:
        magnitude: ``[]`` (keep all) when density >= 1, else ``[T]`` with
        k = max(1, int(density * n)) and T = a[n - k], a = mags sorted ascending (the k-th
        largest, duplicates counted; keep iff mag >= T).
        breadcrumbs: ``[]`` (keep none) when target = int(density * n) is 0, else ``[L, H]``
        with n_top = int(gamma * n), n_bot = max(0, n - target - n_top), L = a[n_bot],
        H = a[min(n - 1, n_bot + target - 1)] (keep iff L <= mag <= H).
        dare / none: ``None`` (no threshold).
        An empty population (n = 0) gives ``[]`` for magnitude and breadcrumbs.
        Every float -> int is Python ``int()`` of a float64 product (truncation).
    """
    if sparsifier in ("dare", "none"):
        return None
    if sparsifier not in ("magnitude", "breadcrumbs"):
        raise ValueError(f"unknown sparsifier {sparsifier!r}")
    a = np.sort(np.asarray(mags, dtype=np.uint32).ravel())
    n = int(a.size)
    if n == 0:
        return []
    density = float(density)
    if sparsifier == "magnitude":
        if density >= 1.0:
            return []
        k = max(1, int(density * n))
        return [int(a[n - k])]
    if gamma is None:
        raise ValueError("breadcrumbs needs gamma")
    target = int(density * n)
    if target == 0:
        return []
    n_top = int(float(gamma) * n)
    n_bot = max(0, n - target - n_top)
    return [int(a[n_bot]), int(a[min(n - 1, n_bot + target - 1)])]


def spec_keep_window(thresholds_entry, sparsifier: str) -> tuple[int, int]:
    """A thresholds entry as the kernels' uint32 keep window (lo, hi): kept iff lo <= mag <= hi.

    magnitude ``[T]`` -> (T, 0xFFFFFFFF); magnitude ``[]`` -> (0, 0xFFFFFFFF) (keep all);
    breadcrumbs ``[L, H]`` -> (L, H); breadcrumbs ``[]`` -> (1, 0) (keep none);
    dare / none (entry None) -> (0, 0xFFFFFFFF) (no window).
    """
    if sparsifier in ("dare", "none"):
        assert thresholds_entry is None
        return (0, _ALL_MAGS)
    entry = list(thresholds_entry)
    if sparsifier == "magnitude":
        if not entry:
            return (0, _ALL_MAGS)
        (t,) = entry
        return (int(t), _ALL_MAGS)
    if sparsifier == "breadcrumbs":
        if not entry:
            return (1, 0)
        lo, hi = entry
        return (int(lo), int(hi))
    raise ValueError(f"unknown sparsifier {sparsifier!r}")


def _dtype_name(x: np.ndarray) -> str:
    """Stored dtype string of a carrier array: float32 F32, float16 F16, uint16 (bits) BF16."""
    dt = np.asarray(x).dtype
    if dt == np.float32:
        return "F32"
    if dt == np.float16:
        return "F16"
    if dt == np.uint16:
        return "BF16"
    raise ValueError(f"cannot tell the stored dtype of a {dt} array; pass it explicitly")


def _per_model(values, n_models: int, what: str) -> list:
    values = list(values)
    if len(values) != n_models:
        raise ValueError(f"{what}: {len(values)} values for {n_models} models")
    return values


def spec_merge_v2(
    base,
    models,
    out_dtype,
    *,
    method,
    key,
    start=0,
    weights,
    density=None,
    drop=None,
    gamma=None,
    scale=1.0,
    normalize=None,
    thresholds=None,
    model_ids=None,
    base_dtype=None,
    model_dtypes=None,
    compute_dtype="F32",
) -> tuple[np.ndarray, list]:
    """SPEC v2 "The merged value" for one tensor, or elements ``start ..`` of it.

    Args:
        base: [n] stored base chunk (F32 float32 / F16 float16 / BF16 uint16 bits); must be
            None for ``linear`` (x_b = +0.0, d_j = the model value) and given otherwise.
        models: list of [n] stored fine-tune chunks, in model order.
        out_dtype: dtype string of the result ("F32", "F16", "BF16").
        method: a row of the SPEC v2 table (see ``METHODS``).
        key: key_t (only the dare sparsifier reads it); start: tensor index of element 0.
        weights: w_j per model (rounded to float32 where used).
        density: rho_j per model (magnitude and breadcrumbs; dare when ``drop`` is None).
        drop: p_j per model (dare); when None, p_j = 1 - rho_j in float64.
        gamma: gamma_j per model (breadcrumbs).
        scale: s. normalize: None = the method's default.
        thresholds: None = trim_scope tensor, computed from these chunks with
            ``spec_thresholds`` (only right when the chunks are the whole tensor); or the
            per-model entries to use as they are (trim_scope model, or a chunk of a tensor).
        model_ids: SPEC index j per model (Philox word), default 0..N-1.
        base_dtype, model_dtypes: dtype strings; default from the arrays' numpy dtypes.
        compute_dtype: the working dtype D (SPEC "Working dtype (v3)"): "F32" (v2's
            formula), "BF16" or "F16"; every rd below rounds to it. Must be "F32" for linear.

    Returns:
        (stored output, thresholds): the output in ``out_dtype``'s carrier (bf16 as uint16
        bits), and one entry per model as streammerge.json records it: ``[T]``, ``[L, H]``,
        ``[]``, or None for the dare and none sparsifiers.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    needs_base, sparsifier, consensus, norm_default = METHODS[method]
    linear = method == "linear"
    normalize = norm_default if normalize is None else bool(normalize)
    N = len(models)
    n = len(models[0])
    assert all(len(m) == n for m in models)
    if needs_base != (base is not None):
        raise ValueError(f"{method}: base must be {'given' if needs_base else 'None'}")
    if model_dtypes is None:
        model_dtypes = [_dtype_name(m) for m in models]
    model_dtypes = _per_model(model_dtypes, N, "model_dtypes")
    model_ids = list(range(N)) if model_ids is None else _per_model(model_ids, N, "model_ids")
    weights = _per_model(weights, N, "weights")

    if sparsifier == "dare":
        if drop is not None:
            p = [float(x) for x in _per_model(drop, N, "drop")]
        else:
            p = [1.0 - float(r) for r in _per_model(density, N, "density")]  # float64
        assert all(0.0 <= x < 1.0 for x in p)
    if sparsifier in ("magnitude", "breadcrumbs") and thresholds is None:
        density = [float(r) for r in _per_model(density, N, "density")]
        assert all(0.0 < r <= 1.0 for r in density)
    if sparsifier == "breadcrumbs" and thresholds is None:
        gamma = [float(g) for g in _per_model(gamma, N, "gamma")]
        assert all(0.0 <= g < 1.0 for g in gamma)

    D = compute_dtype
    assert D in ("F32", "F16", "BF16") and (D == "F32" or not linear)

    def rd(v):
        return spec_rd(v, D)

    idx = np.arange(n, dtype=np.uint64) + np.uint64(start)
    if base is None:
        x_b = np.zeros(n, dtype=np.float32)  # +0.0
    else:
        assert len(base) == n
        x_b = rd(to_float32(base, _dtype_name(base) if base_dtype is None else base_dtype))

    recorded = []
    wd = []  # wd_j = rd(w'_j * e_j), in model order
    w32 = [np.float32(rd(np.float32(w))) for w in weights]  # w'_j = rd(float32(w_j))
    with np.errstate(all="ignore"):
        for k, (m, dt) in enumerate(zip(models, model_dtypes)):
            d = rd(rd(to_float32(m, dt)) - x_b)  # linear: m - (+0.0), the value itself
            assert d.dtype == np.float32
            if sparsifier == "dare":
                kept = spec_kept(key, model_ids[k], p[k], idx)
                e = np.where(kept, rd(d * spec_rescale(p[k])), np.float32(0.0))
                entry = None
            elif sparsifier == "none":
                e = d
                entry = None
            else:
                mag = spec_mag(d)
                if thresholds is None:
                    g = gamma[k] if sparsifier == "breadcrumbs" else None
                    entry = spec_thresholds(sparsifier, mag, density[k], g)
                else:
                    entry = list(thresholds[k])
                if sparsifier == "magnitude":
                    # [] keeps all; [T] keeps mag >= T (ties with T kept).
                    kept = np.ones(n, bool) if not entry else mag >= np.uint32(entry[0])
                else:
                    # [] keeps none; [L, H] keeps L <= mag <= H.
                    if not entry:
                        kept = np.zeros(n, bool)
                    else:
                        lo, hi = entry
                        kept = (mag >= np.uint32(lo)) & (mag <= np.uint32(hi))
                e = np.where(kept, d, np.float32(0.0))  # no multiplication
            assert e.dtype == np.float32
            recorded.append(entry)
            wd.append(rd(w32[k] * e))

        if consensus == "none":
            acc = np.zeros(n, dtype=np.float32)
            for x in wd:
                acc = acc + x
            acc = rd(acc)
            den = np.float32(0.0)
            for w in w32:
                den = np.float32(den + w)
            den = np.float32(rd(den))
            # |den| < 1e-8 as real numbers: compare in float64, not against float32(1e-8).
            if abs(float(den)) < 1e-8:
                den = np.float32(1.0)
            den = np.full(n, den, dtype=np.float32)
        elif consensus == "sign":
            S = np.zeros(n, dtype=np.float32)
            for x in wd:
                S = S + x
            pos = rd(S) >= np.float32(0.0)  # -0.0 >= 0 is True; NaN >= 0 is False
            acc = np.zeros(n, dtype=np.float32)
            den = np.zeros(n, dtype=np.float32)
            for x, w in zip(wd, w32):
                agree = ((x > 0) & pos) | ((x < 0) & ~pos)
                acc = np.where(agree, acc + x, acc)
                den = np.where(agree, den + w, den)
            acc, den = rd(acc), rd(den)
            den = np.where(den == np.float32(0.0), np.float32(1.0), den)
        else:
            raise AssertionError(consensus)
        assert acc.dtype == np.float32 and den.dtype == np.float32
        mval = rd(acc / den) if normalize else acc
        out = mval if linear else rd(x_b + rd(np.float32(scale) * mval))
    assert out.dtype == np.float32
    return from_float32(out, out_dtype), recorded


# ---------------------------------------------------------------------------------------
# SLERP (docs/SPEC.md "SLERP (v3)"), written from the SPEC alone
# ---------------------------------------------------------------------------------------


def _spec_pairwise_sum(p: np.ndarray) -> float:
    """SPEC's block sum: 1024 float64 values (padded with +0.0) as a pairwise tree."""
    q = np.zeros(1024, np.float64)
    q[: len(p)] = p
    while len(q) > 1:
        q = q[0::2] + q[1::2]
    return float(q[0])


def _spec_block_sum(p: np.ndarray) -> float:
    """SPEC's whole-tensor (or row) sum ("Model Stock"'s order): float64 terms, blocks of
    1024 from element 0 (each a pairwise tree, padded with +0.0), block results left to
    right from +0.0."""
    total = 0.0
    for lo in range(0, len(p), 1024):
        total = total + _spec_pairwise_sum(p[lo : lo + 1024])
    return total


def spec_row_sums(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """S00, S11, S01 of one row (float32 arrays), in SPEC's order."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    sums = [0.0, 0.0, 0.0]
    for lo in range(0, len(x), 1024):
        a, b = x64[lo : lo + 1024], y64[lo : lo + 1024]
        for k, p in enumerate((a * a, b * b, a * b)):
            sums[k] = sums[k] + _spec_pairwise_sum(p)
    return sums[0], sums[1], sums[2]


def spec_slerp_coefficients(s00: float, s11: float, s01: float, t: float):
    """(ca32, cb32) of a tensor from its totals, as SPEC writes them (float64 scalars)."""
    with np.errstate(all="ignore"):
        n0, n1 = np.sqrt(np.float64(s00)), np.sqrt(np.float64(s11))
        d0 = n0 if n0 > 1e-8 else 1.0
        d1 = n1 if n1 > 1e-8 else 1.0
        dot = min(max(np.float64(s01) / (d0 * d1), -1.0), 1.0) if not np.isnan(s01 / (d0 * d1)) \
            else np.float64("nan")  # fmt: skip
        if abs(dot) > 0.9995:
            ca, cb = 1.0 - t, t
        else:
            theta = np.arccos(dot)
            ca = np.sin((1.0 - t) * theta) / np.sin(theta)
            cb = np.sin(t * theta) / np.sin(theta)
    return np.float32(ca), np.float32(cb)


def spec_slerp(v0: np.ndarray, v1: np.ndarray, t: float, out_dtype: str, shape, dtype0: str,
               dtype1: str) -> np.ndarray:  # fmt: skip
    """The merged tensor (stored form, flat) of SLERP of two stored tensors of ``shape``: the
    rows' sums, the tensor's correctly rounded totals, one pair of coefficients."""
    import math

    x = to_float32(v0, dtype0).reshape(-1)
    y = to_float32(v1, dtype1).reshape(-1)
    rows = shape[0] if len(shape) else 1
    n = x.size // rows if rows else 0
    sums = [spec_row_sums(x[r * n : (r + 1) * n], y[r * n : (r + 1) * n]) for r in range(rows)]
    totals = [math.fsum(s[k] for s in sums) for k in range(3)]
    ca, cb = spec_slerp_coefficients(*totals, t)
    with np.errstate(all="ignore"):
        out = (ca * x).astype(np.float32) + (cb * y).astype(np.float32)
    return from_float32(out, out_dtype)


# ---------------------------------------------------------------------------------------
# NearSwap (docs/SPEC.md "NearSwap")
# ---------------------------------------------------------------------------------------


def spec_round_work(v: np.ndarray, w_dtype: str) -> np.ndarray:
    """rW(v): float32 values rounded to the working dtype W and widened back (exact)."""
    return to_float32(from_float32(np.asarray(v, np.float32), w_dtype), w_dtype)


def spec_work_dtype(dtype_a: str, dtype_b: str) -> str:
    """W: the inputs' common stored dtype, F32 when they differ."""
    return dtype_a if dtype_a == dtype_b else "F32"


def spec_nearswap(a: np.ndarray, b: np.ndarray, t: float, dtype_a: str, dtype_b: str,
                  out_dtype: str, work: str | None = None) -> np.ndarray:  # fmt: skip
    """NearSwap of two stored tensors (flat), in stored form of ``out_dtype`` (``work``:
    the recipe's W, every input rounded to it first)."""
    W = work or spec_work_dtype(dtype_a, dtype_b)
    f = np.float32
    x = spec_round_work(to_float32(a, dtype_a).reshape(-1), W)
    y = spec_round_work(to_float32(b, dtype_b).reshape(-1), W)
    with np.errstate(all="ignore"):
        d = spec_round_work(x - y, W)
        ad = np.abs(d)
        lo = spec_round_work(np.array([1e-6], f), W)[0]
        c = np.where(ad < lo, lo, ad).astype(f)
        r = spec_round_work(f(1.0) / c, W)
        w = spec_round_work(r * f(t), W)
        w = np.where(w < 0, f(0), np.where(w > 1, f(1), w)).astype(f)
        p = spec_round_work(w * y, W)
        q = spec_round_work(f(1.0) - w, W)
        s = spec_round_work(q * x, W)
        out = spec_round_work(p + s, W)
    return from_float32(out, out_dtype)


# ---------------------------------------------------------------------------------------
# RAM (docs/SPEC.md "RAM (ram, ramplus_tl)")
# ---------------------------------------------------------------------------------------


def _spec_ram_vectors(base, models, dtypes, epsilon, work=None):
    """(W, x_b, [tv_j], [nz_j], cnt) of stored tensors (dtypes: base's, then each model's;
    ``work``: the recipe's W, every input rounded to it first)."""
    W = work or (dtypes[0] if len(set(dtypes)) == 1 else "F32")
    xb = spec_round_work(to_float32(base, dtypes[0]).reshape(-1), W)
    e = spec_round_work(np.array([epsilon], np.float32), W)[0]
    with np.errstate(all="ignore"):
        tv = [spec_round_work(spec_round_work(to_float32(m, d).reshape(-1), W) - xb, W)
              for m, d in zip(models, dtypes[1:])]  # fmt: skip
        nz = [np.abs(v) > e for v in tv]
    cnt = np.sum(nz, axis=0, dtype=np.int64) if nz else np.zeros(xb.size, np.int64)
    return W, xb, tv, nz, cnt


def spec_ram_counts(base, models, dtypes, epsilon, work=None):
    """ramplus_tl's (shared_j, unique_j) int64 arrays over the whole tensor."""
    _, _, _, nz, cnt = _spec_ram_vectors(base, models, dtypes, epsilon, work)
    shared = np.array([np.count_nonzero(n & (cnt > 1)) for n in nz], np.int64)
    unique = np.array([np.count_nonzero(n & (cnt == 1)) for n in nz], np.int64)
    return shared, unique


def spec_ram_lambdas(shared, unique, epsilon, r, alpha):
    """ramplus_tl's lambda_j (float32), SPEC's host formula."""
    f = np.float32
    out = []
    with np.errstate(all="ignore"):
        for sh, un in zip(shared, unique):
            den = f(un) if f(un) >= f(epsilon) else f(epsilon)  # noqa: FURB136 - as SPEC
            rho = f(f(sh) / den)
            c = rho if np.isnan(rho) else min(max(rho, f(0)), f(alpha))
            out.append(f(f(1) + f(f(r) * c)))
    return np.array(out, np.float32)


def spec_ram(base, models, dtypes, epsilon, out_dtype, lam=None, work=None):
    """ram (lam None) or ramplus_tl (lam: float32 lambda_j) of stored tensors, flat, in
    stored form of ``out_dtype``."""
    W, xb, tv, nz, cnt = _spec_ram_vectors(base, models, dtypes, epsilon, work)
    f = np.float32
    uniq = (cnt == 1).astype(f)
    ovl = (cnt > 1).astype(f)
    div = np.maximum(cnt, 1).astype(f)
    acc = np.zeros(xb.size, f)
    with np.errstate(all="ignore"):
        for j in range(len(models)):
            z = spec_round_work(tv[j] * nz[j].astype(f), W)
            u = spec_round_work(z * uniq, W)
            o = spec_round_work(spec_round_work(z * ovl, W) / div, W)
            if lam is None:
                s = spec_round_work(u + o, W)
            else:
                s = ((u * lam[j]).astype(f) + o).astype(f)
            acc = (acc + s).astype(f)
        if lam is None:
            out = spec_round_work(xb + spec_round_work(acc, W), W)
        else:
            out = (xb + acc).astype(f)
    return from_float32(out, out_dtype)


# ---------------------------------------------------------------------------------------
# Model Stock (docs/SPEC.md "Model Stock")
# ---------------------------------------------------------------------------------------


def spec_stock_sums(base, models, dtypes, work=None) -> np.ndarray:
    """float64 [K]: S_jj of each fine-tune, then S_jk (j < k), SPEC's block order."""
    W = work or (dtypes[0] if len(set(dtypes)) == 1 else "F32")
    xb = spec_round_work(to_float32(base, dtypes[0]).reshape(-1), W)
    with np.errstate(all="ignore"):
        d = [spec_round_work(spec_round_work(to_float32(m, t).reshape(-1), W) - xb, W)
             for m, t in zip(models, dtypes[1:])]  # fmt: skip
        terms = [x.astype(np.float64) * x.astype(np.float64) for x in d]
        terms += [spec_round_work(d[j] * d[k], W).astype(np.float64)
                  for j in range(len(d)) for k in range(j + 1, len(d))]  # fmt: skip
    out = np.zeros(len(terms), np.float64)
    for s, p in enumerate(terms):
        total = 0.0
        for lo in range(0, p.size, 1024):
            block = np.zeros(1024, np.float64)
            block[: min(1024, p.size - lo)] = p[lo : lo + 1024]
            total = total + _spec_pairwise_sum(block)
        out[s] = total
    return out


def spec_stock_t(sums, n_models: int, W: str) -> np.float32:
    """t from the sums, SPEC's chain of W ops (float32 scalars)."""
    f = np.float32

    def r(v):
        return spec_round_work(np.array([v], f), W)[0]

    with np.errstate(all="ignore"):
        norms = [r(f(np.sqrt(sums[j]))) for j in range(n_models)]
        floor = r(f(1e-6))
        pairs = [(j, k) for j in range(n_models) for k in range(j + 1, n_models)]
        total = f(0.0)
        for s, (j, k) in enumerate(pairs):
            npr = r(norms[j] * norms[k])
            c = r(r(f(sums[n_models + s])) / max(npr, floor))
            total = f(total + (c if np.isnan(c) else min(max(c, f(-1)), f(1))))
        cos = r(total / f(len(pairs)))
        den = r(f(1) + r(f(n_models - 1) * cos))
        return f(0.0) if abs(den) < floor else r(r(f(n_models) * cos) / den)


def spec_model_stock(base, models, dtypes, out_dtype, work=None) -> np.ndarray:
    """Model Stock of stored tensors (flat), in stored form of ``out_dtype``."""
    W = work or (dtypes[0] if len(set(dtypes)) == 1 else "F32")
    t = spec_stock_t(spec_stock_sums(base, models, dtypes, work), len(models), W)
    f = np.float32
    xb = spec_round_work(to_float32(base, dtypes[0]).reshape(-1), W)
    a = np.zeros(xb.size, f)
    with np.errstate(all="ignore"):
        for m, d in zip(models, dtypes[1:]):
            a = spec_round_work(a + spec_round_work(to_float32(m, d).reshape(-1), W), W)
        avg = spec_round_work(a / f(len(models)), W)
        p = spec_round_work(t * avg, W)
        q = spec_round_work(np.array([f(1) - t], f), W)[0]
        out = spec_round_work(p + spec_round_work(q * xb, W), W)
    return from_float32(out, out_dtype)


# ---- LoRA inputs (docs/SPEC.md "LoRA inputs (v3)") ----


def spec_lora_rank_scale(cfg: dict, module: str) -> tuple[int, float]:
    """(r, float64 scale) of ``module`` from an adapter_config dict: the first
    rank_pattern / alpha_pattern key k (file order) with ``(.*\\.)?(k)$`` matching the whole
    module name, else r / lora_alpha; alpha / r, or alpha / sqrt(r) with use_rslora."""
    import math
    import re

    def pick(patterns, default):
        for k, v in (patterns or {}).items():
            if re.match(rf"(.*\.)?({k})$", module):
                return v
        return default

    r = pick(cfg.get("rank_pattern"), cfg["r"])
    alpha = pick(cfg.get("alpha_pattern"), cfg["lora_alpha"])
    return r, (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)


def spec_lora(w: np.ndarray, w_dtype: str, a: np.ndarray, b: np.ndarray, scale: float,
              fan_in_fan_out: bool = False) -> np.ndarray:  # fmt: skip
    """The adapted tensor: ``w`` [rows, cols] stored values (bf16 as uint16 bits), ``a``
    [r, in] and ``b`` [out, r] the adapter's values as float32 (exact), ``scale`` the
    float64 scale. Per element: acc = sum over k = 0..r-1 of float32(L[i,k] * R[k,c]) in
    that order (each product and sum rounded), delta = acc * float32(scale), out =
    float32(w) + delta, rounded to ``w_dtype``. Returns the stored values in w's carrier."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    left, right = (a.T, b.T) if fan_in_fan_out else (b, a)
    rows, cols = w.shape
    assert left.shape[0] == rows and right.shape[1] == cols
    acc = np.zeros((rows, cols), np.float32)
    for k in range(left.shape[1]):
        prod = np.multiply(left[:, k][:, None], right[k][None, :], dtype=np.float32)
        acc = np.add(acc, prod, dtype=np.float32)
    delta = np.multiply(acc, np.float32(scale), dtype=np.float32)
    out = np.add(to_float32(w, w_dtype).reshape(rows, cols), delta, dtype=np.float32)
    return from_float32(out, w_dtype).reshape(rows, cols)


# ---------------------------------------------------------------------------------------
# DELLA (docs/SPEC.md "DELLA (della, della_linear)")
# ---------------------------------------------------------------------------------------


def spec_della(base, models, dtypes, out_dtype, shape, key, weights, density, epsilon,
               rescale=True, sign=True, normalize=None, scale=1.0, work=None,
               model_ids=None):  # fmt: skip
    """della (sign True) / della_linear of stored tensors, flat, in stored form of
    ``out_dtype`` (SPEC "DELLA"): rows of numel / shape[0] elements, a 1-D tensor one row;
    ``model_ids``: each fine-tune's SPEC index j (its Philox word), default 0 .. N-1."""
    f = np.float32
    D = work or spec_promote(dtypes)
    numel = int(np.prod(shape)) if len(shape) else 1
    L = numel if len(shape) <= 1 else numel // shape[0]
    rows = numel // L
    if normalize is None:
        normalize = sign
    xb = spec_rd(to_float32(base, dtypes[0]).reshape(-1), D)
    wq = [spec_rd(np.array([f(w)], f), D)[0] for w in weights]
    idx = np.arange(numel, dtype=np.int64)
    wds = []
    with np.errstate(all="ignore"):
        for j, (m, dt) in enumerate(zip(models, dtypes[1:])):
            d = spec_rd(spec_rd(to_float32(m, dt).reshape(-1), D) - xb, D)
            rho, eps = float(density[j]), float(epsilon[j])
            if rho < 1.0:
                assert 0 < rho - eps and rho + eps < 1
                jj = j if model_ids is None else model_ids[j]
                A = math.floor((rho - eps) * 2**32)
                B = math.floor(2.0 * eps * 2**32)
                mag = (spec_mag(d).astype(np.uint64) << np.uint64(32)).reshape(rows, L)
                keys = mag | np.arange(L, dtype=np.uint64)[None, :]
                order = np.argsort(keys, axis=1, kind="stable")
                rank = np.empty((rows, L), np.int64)
                np.put_along_axis(rank, order, np.arange(L, dtype=np.int64)[None, :].repeat(rows, 0), 1)
                rank = rank.reshape(-1).astype(object)
                K = np.array([A + (int(r) * B) // (L - 1) if L > 1 else A for r in rank],
                             np.uint64)  # fmt: skip
                i = idx.astype(np.uint64)
                word = philox4x32_10((i & _M32).astype(np.uint32),
                                     (i >> np.uint64(32)).astype(np.uint32),
                                     np.full(numel, jj // 4, np.uint32), np.zeros(numel, np.uint32),
                                     np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32))[jj % 4]  # fmt: skip
                kept = word.astype(np.uint64) < K
                if rescale:
                    r = (f(2.0**32) / K.astype(f)).astype(f)
                    e = spec_rd(d * r, D)
                else:
                    e = d
                e = np.where(kept, e, f(0.0)).astype(f)
            else:
                e = d
            wds.append(spec_rd(wq[j] * e, D))
        if sign:
            S = np.zeros(numel, f)
            for wd in wds:
                S = (S + wd).astype(f)
            pos = spec_rd(S, D) >= 0
            acc = np.zeros(numel, f)
            den = np.zeros(numel, f)
            for j, wd in enumerate(wds):
                ag = ((wd > 0) & pos) | ((wd < 0) & ~pos)
                acc = np.where(ag, (acc + wd).astype(f), acc)
                den = np.where(ag, (den + wq[j]).astype(f), den)
            acc, den = spec_rd(acc, D), spec_rd(den, D)
            den = np.where(den == 0, f(1.0), den)
        else:
            acc = np.zeros(numel, f)
            for wd in wds:
                acc = (acc + wd).astype(f)
            acc = spec_rd(acc, D)
            d0 = f(0.0)
            for w in wq:
                d0 = f(d0 + w)
            d0 = spec_rd(np.array([d0]), D)[0]
            den = f(1.0) if abs(float(d0)) < 1e-8 else d0
        m = spec_rd((acc / den).astype(f), D) if normalize else acc
        m = spec_rd((f(scale) * m).astype(f), D)
        out = spec_rd((xb + m).astype(f), D)
    return from_float32(out, out_dtype)


# ---------------------------------------------------------------------------------------
# NuSLERP (docs/SPEC.md "NuSLERP")
# ---------------------------------------------------------------------------------------


def spec_nuslerp_t(w0: float, w1: float) -> float:
    """SPEC's factor: w1 / (w0 + w1), 0.5 when |w0 + w1| < 1e-6."""
    s = float(w0) + float(w1)
    return 0.5 if abs(s) < 1e-6 else float(w1) / s


def spec_nuslerp_coefficients(s00: float, s11: float, s01: float, t: float):
    """(ca32, cb32) of one vector from its sums, as SPEC writes them (float64 scalars)."""
    with np.errstate(all="ignore"):
        d0 = max(np.sqrt(np.float64(s00)), 1e-7) if not np.isnan(s00) else np.float64("nan")
        d1 = max(np.sqrt(np.float64(s11)), 1e-7) if not np.isnan(s11) else np.float64("nan")
        c = np.float64(s01) / (d0 * d1)
        theta = np.arccos(np.clip(c, -1.0, 1.0))
        st = np.sin(theta)
        if abs(st) < 1e-8:
            ca, cb = 1.0 - t, t
        else:
            ca = np.sin((1.0 - t) * theta) / st
            cb = np.sin(t * theta) / st
    return np.float32(ca), np.float32(cb)


def spec_nuslerp_work(dtype0: str, dtype1: str, dtype_base: str | None = None) -> str:
    """SPEC "NuSLERP"'s W: the inputs' (and base's) common stored dtype, F32 when they
    differ."""
    ds = {dtype0, dtype1} | ({dtype_base} if dtype_base else set())
    return ds.pop() if len(ds) == 1 else "F32"


def _spec_vectors(shape, n: int, flatten: bool, row_wise: bool) -> tuple[str, int]:
    """(kind, C): ``tensor`` (rows of C for the row sums), ``last`` (vectors of C) or
    ``column`` (C columns)."""
    if not flatten and row_wise and len(shape) >= 2:
        return "column", (n // shape[0] if shape[0] else 0)
    if flatten or len(shape) < 2:
        rows = shape[0] if len(shape) else 1
        return "tensor", (n // rows if rows else 0)
    return "last", shape[-1]


def _spec_sums_of(x, y, kind, c, which):
    """Per vector (float64 [k]): S00 (which 0), S11 (1) or S01 (2) of x, y in SPEC's order
    for the vector kind (rows + fsum, one row each, or row by row down the columns)."""
    import math

    if kind == "column":
        rows = x.size // c if c else 0
        x2, y2 = x.reshape(rows, c).astype(np.float64), y.reshape(rows, c).astype(np.float64)
        tot = np.zeros(c, np.float64)
        with np.errstate(all="ignore"):
            for r in range(rows):
                p = (x2[r] * x2[r], y2[r] * y2[r], x2[r] * y2[r])[which]
                tot = tot + p
        return tot
    if c == 0:
        return np.zeros(0 if kind == "last" else 1, np.float64)
    if kind == "last":
        return np.array([spec_row_sums(x[v * c : (v + 1) * c], y[v * c : (v + 1) * c])[which]
                         for v in range(x.size // c)], np.float64)  # fmt: skip
    if c == 1:
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        per = (x64 * x64, y64 * y64, x64 * y64)[which].tolist()
    else:
        per = [spec_row_sums(x[r * c : (r + 1) * c], y[r * c : (r + 1) * c])[which]
               for r in range(x.size // c)]  # fmt: skip
    return np.array([math.fsum(per)], np.float64)


def spec_nuslerp_chain(x, y, b, t, kind, c, w):
    """SPEC "NuSLERP", working dtype W not F32: mergekit's chain op by op in W (x, y: the
    inputs or task vectors in W, float32 flat; b: the base in W or None)."""
    f, r = np.float32, (lambda v: spec_round_work(v, w))
    if kind == "column":
        idx = np.arange(x.size) % c if c else np.zeros(x.size, np.int64)
    elif kind == "last":
        idx = np.arange(x.size) // c if c else np.zeros(x.size, np.int64)
    else:
        idx = np.zeros(x.size, np.int64)
    with np.errstate(all="ignore"):
        floor = r(f(1e-7))
        norms = []
        for which in (0, 1):
            nv = r(np.sqrt(_spec_sums_of(x, y, kind, c, which)).astype(np.float32))
            norms.append(np.where(np.isnan(nv), nv, np.maximum(nv, floor)).astype(np.float32))
        u0 = r(x / norms[0][idx])
        u1 = r(y / norms[1][idx])
        p = r(u0 * u1)
        cos = r(_spec_sums_of(p, np.ones_like(p), kind, c, 2).astype(np.float32))
        cos = np.where(np.isnan(cos), cos, np.clip(cos, f(-1), f(1))).astype(np.float32)
        lin = r(f(1) - r(cos * cos)) <= 1e-16
        theta = r(np.arccos(np.where(lin, f(0), cos).astype(np.float32)))
        st = r(np.sin(theta))
        ca = r(np.sin(r(f(1 - t) * theta)))
        cb = r(np.sin(r(f(t) * theta)))
        lerp = r(r(f(1 - t) * x) + r(f(t) * y))
        arc = r(r(r(ca[idx] * x) + r(cb[idx] * y)) / st[idx])
        out = np.where(lin[idx], lerp, arc).astype(np.float32)
        if b is not None:
            out = r(b + out)
    return out


def spec_nuslerp(v0: np.ndarray, v1: np.ndarray, w0: float, w1: float, out_dtype: str, shape,
                 dtype0: str, dtype1: str, flatten: bool = True, base: np.ndarray | None = None,
                 dtype_base: str | None = None, row_wise: bool = False,
                 work: str | None = None) -> np.ndarray:  # fmt: skip
    """The merged tensor (stored form, flat) of NuSLERP of two stored tensors of ``shape``:
    one vector per tensor (flatten, or fewer than 2 axes: slerp's rows and fsum totals), else
    one per last-axis vector (its own sums), or with ``row_wise`` one per column (sums row
    by row in order); with ``base`` (stored, ``dtype_base``) the task vectors, base added
    back. ``work``: W (default ``spec_nuslerp_work``); W not F32: ``spec_nuslerp_chain``."""
    import math

    t = spec_nuslerp_t(w0, w1)
    w = work or spec_nuslerp_work(dtype0, dtype1, dtype_base if base is not None else None)
    if w != "F32":
        r = lambda v: spec_round_work(v, w)  # noqa: E731
        x = r(to_float32(v0, dtype0).reshape(-1))
        y = r(to_float32(v1, dtype1).reshape(-1))
        b = None
        if base is not None:
            b = r(to_float32(base, dtype_base).reshape(-1))
            with np.errstate(all="ignore"):
                x, y = r(x - b), r(y - b)
        kind, c = _spec_vectors(shape, x.size, flatten, row_wise)
        return from_float32(spec_nuslerp_chain(x, y, b, t, kind, c, w), out_dtype)
    x = to_float32(v0, dtype0).reshape(-1)
    y = to_float32(v1, dtype1).reshape(-1)
    b = None
    if base is not None:
        b = to_float32(base, dtype_base).reshape(-1)
        with np.errstate(all="ignore"):
            x, y = (x - b).astype(np.float32), (y - b).astype(np.float32)
    if not flatten and row_wise and len(shape) >= 2:
        rows = shape[0]
        c = x.size // rows if rows else 0
        x2, y2 = x.reshape(rows, c).astype(np.float64), y.reshape(rows, c).astype(np.float64)
        tot = np.zeros((3, c), np.float64)
        with np.errstate(all="ignore"):
            for r in range(rows):  # row by row, in order
                tot[0] = tot[0] + x2[r] * x2[r]
                tot[1] = tot[1] + y2[r] * y2[r]
                tot[2] = tot[2] + x2[r] * y2[r]
        pairs = [spec_nuslerp_coefficients(*tot[:, k], t) for k in range(c)]
        ca_c = np.array([p[0] for p in pairs], np.float32)
        cb_c = np.array([p[1] for p in pairs], np.float32)
        cas, cbs = np.tile(ca_c, rows), np.tile(cb_c, rows)
    elif flatten or len(shape) < 2:
        rows = shape[0] if len(shape) else 1
        n = x.size // rows if rows else 0
        if n == 1:  # a row of one element: its sums are its exact float64 products
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            sums = list(zip((x64 * x64).tolist(), (y64 * y64).tolist(), (x64 * y64).tolist()))
        else:
            sums = [spec_row_sums(x[r * n : (r + 1) * n], y[r * n : (r + 1) * n])
                    for r in range(rows)]  # fmt: skip
        totals = [math.fsum(s[k] for s in sums) for k in range(3)]
        ca, cb = spec_nuslerp_coefficients(*totals, t)
        cas, cbs = np.full(x.size, ca, np.float32), np.full(x.size, cb, np.float32)
    else:
        n = shape[-1]
        cas, cbs = np.zeros(x.size, np.float32), np.zeros(x.size, np.float32)
        for v in range(x.size // n if n else 0):
            sl = slice(v * n, (v + 1) * n)
            cas[sl], cbs[sl] = spec_nuslerp_coefficients(*spec_row_sums(x[sl], y[sl]), t)
    with np.errstate(all="ignore"):
        out = (cas * x).astype(np.float32) + (cbs * y).astype(np.float32)
        if b is not None:
            out = (out + b).astype(np.float32)
    return from_float32(out, out_dtype)


# ---------------------------------------------------------------------------------------
# Arcee Fusion (docs/SPEC.md "Arcee Fusion")
# ---------------------------------------------------------------------------------------

_FUSION_EPS = 1e-8


def spec_exp64(r: np.ndarray) -> np.ndarray:
    """SPEC's exp64 of float64 values r <= 0 (IEEE float64 operations only)."""
    import math

    r = np.asarray(r, np.float64)
    with np.errstate(all="ignore"):
        n = np.floor(r * 1.4426950408889634 + 0.5)
        s = (r - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10
        e = np.full(r.shape, 1.0 / math.factorial(13))
        for j in range(12, 0, -1):
            e = e * s + 1.0 / math.factorial(j)
        e = e * s + 1.0
        out = np.ldexp(e, np.where(r < -708, 0, n).astype(np.int64))
    return np.where(r < -708, 0.0, out)


def spec_log64(v: np.ndarray) -> np.ndarray:
    """SPEC's log64 of positive normal float64 values."""
    m, e = np.frexp(np.asarray(v, np.float64))
    small = m < 0.7071067811865476
    m = np.where(small, 2.0 * m, m)
    e = np.where(small, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    acc = np.full(s.shape, 1.0 / 21)
    for j in range(19, 1, -2):
        acc = acc * z + 1.0 / j
    acc = acc * z + 1.0
    return e * 0.6931471805599453 + (2.0 * s) * acc


def spec_log32(r: np.ndarray) -> np.ndarray:
    """SPEC's float32 log: float32(log64(r)); 0 -> -inf, inf -> inf, NaN -> NaN."""
    r = np.asarray(r, np.float32)
    ok = np.isfinite(r) & (r > 0)
    with np.errstate(all="ignore"):
        v = spec_log64(np.where(ok, r, 1.0).astype(np.float64)).astype(np.float32)
        return np.where(ok, v, np.log(r)).astype(np.float32)


def spec_softmax_w(v: np.ndarray, W: str) -> np.ndarray:
    """SPEC's softmax of one row of float32 values in W (torch's CPU sequence)."""
    f = np.float32
    e = spec_exp64((v - v.max()).astype(f).astype(np.float64)).astype(f)
    z = f(_spec_block_sum(e.astype(np.float64)))
    return spec_round_work(e * (f(1.0) / z), W)


def spec_fusion_k(x: np.ndarray, y: np.ndarray, W: str) -> np.float32:
    """k of one row (x, y: float32 values already in W), SPEC "Arcee Fusion"."""
    f = np.float32
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return spec_round_work(np.array([np.nan], f), W)[0]
    with np.errstate(all="ignore"):
        q = spec_round_work(spec_softmax_w(x, W) + f(_FUSION_EPS), W)
        p = spec_round_work(spec_softmax_w(y, W) + f(_FUSION_EPS), W)
        r = spec_round_work(p / q, W)
        t = spec_round_work(p * spec_round_work(spec_log32(r), W), W)
        K = _spec_block_sum(t.astype(np.float64))
    return spec_round_work(np.array([K], f), W)[0]


def spec_fusion_threshold(imp: np.ndarray, W: str) -> np.float32:
    """thr from the tensor's importances (float32), SPEC's ranks."""
    v = np.sort(imp.astype(np.float32) + np.float32(0.0))  # -0 as +0; NaN last
    n = v.size
    q1, med, q3 = v[(n - 1) // 4], v[(n - 1) // 2], v[(3 * (n - 1)) // 4]
    with np.errstate(all="ignore"):
        iqr = spec_round_work(np.array([q3 - q1], np.float32), W)
        h = spec_round_work(np.float32(1.5) * iqr, W)
        return spec_round_work(np.float32(med) + h, W)[0]


def spec_arcee_fusion(a: np.ndarray, b: np.ndarray, shape, dtype_a: str, dtype_b: str,
                      out_dtype: str, work: str | None = None):  # fmt: skip
    """Arcee Fusion of two stored tensors of ``shape`` (flat, a the base): (stored output,
    thr)."""
    W = work or spec_work_dtype(dtype_a, dtype_b)
    x = spec_round_work(to_float32(a, dtype_a).reshape(-1), W)
    y = spec_round_work(to_float32(b, dtype_b).reshape(-1), W)
    C = int(shape[-1]) if len(shape) and shape[-1] else 1
    R = x.size // C
    with np.errstate(all="ignore"):
        k = np.array([spec_fusion_k(x[r * C : (r + 1) * C], y[r * C : (r + 1) * C], W)
                      for r in range(R)], np.float32)  # fmt: skip
        d = spec_round_work(y - x, W)
        imp = spec_round_work(np.abs(d) * np.repeat(k, C), W)
        thr = spec_fusion_threshold(imp, W)
        m = (imp >= thr).astype(np.float32)
        out = (x + (d * m).astype(np.float32)).astype(np.float32)
    return from_float32(out, out_dtype), thr


# ---------------------------------------------------------------------------------------
# SCE (docs/SPEC.md "SCE")
# ---------------------------------------------------------------------------------------


def _spec_sce_vectors(base, models, dtypes, work=None):
    """(W, x_b, [tv_j]) of stored tensors: tv_j = rW(x_j - x_b)."""
    W = work or (dtypes[0] if len(set(dtypes)) == 1 else "F32")
    xb = spec_round_work(to_float32(base, dtypes[0]).reshape(-1), W)
    with np.errstate(all="ignore"):
        tv = [spec_round_work(spec_round_work(to_float32(m, d).reshape(-1), W) - xb, W)
              for m, d in zip(models, dtypes[1:])]  # fmt: skip
    return W, xb, tv


def spec_sce_var_keys(tv, W: str) -> np.ndarray:
    """uint32 key of each element's variance over the models: bits(rW(float32(var))) with
    the sign bit cleared, var by Welford's recurrence in float64 (SPEC "SCE")."""
    n = len(tv)
    with np.errstate(all="ignore"):
        mean = np.zeros(tv[0].size, np.float64)
        m2 = np.zeros(tv[0].size, np.float64)
        for j, v in enumerate(tv):
            x = v.astype(np.float64)
            delta = x - mean
            mean = mean + delta / np.float64(j + 1)
            m2 = m2 + delta * (x - mean)
        var = spec_round_work((m2 / np.float64(n)).astype(np.float32), W)
    return var.view(np.uint32) & np.uint32(0x7FFFFFFF)


def spec_sce_threshold(keys: np.ndarray, select_topk: float):
    """(keep_all, T): every element kept (select_topk >= 1), or kept iff key >= T; T =
    0xFFFFFFFF + 1 (nothing kept) when k = 0 or select_topk <= 0."""
    if select_topk >= 1:
        return True, 0
    none = 1 << 32
    if select_topk <= 0:
        return False, none
    nonzero = int(np.count_nonzero(keys))
    k = int(np.float32(np.float32(nonzero) * np.float32(select_topk)))
    if k == 0:
        return False, none
    k = min(k, keys.size)
    return False, int(np.sort(keys)[keys.size - k])


def spec_sce_weights(energies, numel: int, W: str) -> np.ndarray:
    """float32 [N] values of W: each model's normalized energy (SPEC "SCE" host step)."""
    f = np.float32

    def r(v):
        return spec_round_work(np.array([v], f), W)[0]

    with np.errstate(all="ignore"):
        means = [r(f(f(e) / f(numel))) for e in energies]
        ws = f(0.0)
        for m in means:
            ws = f(ws + m)
        ws = r(ws)
        if abs(float(ws)) < 1e-6:
            return np.array([r(f(1) / f(len(means)))] * len(means), f)
        return np.array([r(m / ws) for m in means], f)


def spec_sce(base, models, dtypes, select_topk, out_dtype, work=None) -> np.ndarray:
    """SCE of stored tensors (flat), in stored form of ``out_dtype``."""
    W, xb, tv = _spec_sce_vectors(base, models, dtypes, work)
    f = np.float32
    n_models = len(tv)
    keys = spec_sce_var_keys(tv, W)
    keep_all, T = spec_sce_threshold(keys, select_topk)
    with np.errstate(all="ignore"):
        if keep_all:
            m = tv
        else:
            keep = keys.astype(np.int64) >= T
            m = [spec_round_work(v * keep.astype(f), W) for v in tv]
        energies = [_spec_block_sum(spec_round_work(v * v, W).astype(np.float64)) for v in m]
        wt = spec_sce_weights(energies, xb.size, W)
        s = np.zeros(xb.size, f)
        for v in m:
            s = (s + v).astype(f)
        pos = spec_round_work(s, W) >= 0
        acc = np.zeros(xb.size, f)
        den = np.zeros(xb.size, f)
        for j, v in enumerate(m):
            agree = ((v > 0) & pos) | ((v < 0) & ~pos)
            ew = spec_round_work(wt[j] * agree.astype(f), W)
            acc = (acc + spec_round_work(v * ew, W)).astype(f)
            den = (den + ew).astype(f)
        acc = spec_round_work(acc, W)
        den = spec_round_work(den, W)
        lo = spec_round_work(np.array([1e-6], f), W)[0]
        den = np.where(den < lo, lo, den)
        out = spec_round_work(xb + spec_round_work(acc / den, W), W)
    del n_models
    return from_float32(out, out_dtype)


# ---- Multi-SLERP (docs/SPEC.md "Multi-SLERP") ----


def _spec_msl_vectors(models, dtypes, base=None, base_dtype=None, work=None):
    """(v_j float32 flat, x_b or None, W): the models in W, or their task vectors."""
    ins = list(dtypes) + ([base_dtype] if base is not None else [])
    W = work or (ins[0] if len(set(ins)) == 1 else "F32")
    xb = None if base is None else spec_round_work(to_float32(base, base_dtype).reshape(-1), W)
    with np.errstate(all="ignore"):
        v = [spec_round_work(to_float32(m, d).reshape(-1), W) for m, d in zip(models, dtypes)]
        if xb is not None:
            v = [spec_round_work(x - xb, W) for x in v]
    return v, xb, W


def spec_multislerp(models, dtypes, weights, out_dtype, normalize=True, eps=1e-8, base=None,
                    base_dtype=None, work=None) -> np.ndarray:  # fmt: skip
    """Multi-SLERP of stored tensors (flat), in stored form of ``out_dtype``: mergekit's
    chain op for op in W (SPEC "Multi-SLERP")."""
    v, xb, W = _spec_msl_vectors(models, dtypes, base, base_dtype, work)
    f = np.float32
    N = len(v)

    def r(x):  # rW of a float32 array
        return spec_round_work(np.asarray(x, f), W)

    def rs(x):  # rW of a float32 scalar
        return spec_round_work(np.array([x], f), W)[0]

    def root(s):  # float32(sqrt(float64 sum))
        return f(np.sqrt(np.float64(s)))

    def sq(x):
        return _spec_block_sum(x.astype(np.float64) * x.astype(np.float64))

    with np.errstate(all="ignore"):
        w = [rs(f(x)) for x in weights]
        if normalize:
            s = f(0.0)
            for x in w:
                s = f(s + x)
            s = rs(s)
            w = [rs(x / s) for x in w]
        fe = f(eps)
        nrm = [rs(root(sq(x))) for x in v]
        d = [rs(x + fe) for x in nrm]
        u = [r(x / dj) for x, dj in zip(v, d)]
        acc = np.zeros(v[0].size, f)
        for j in range(N):
            acc = acc + r(u[j] * w[j])
        m = r(acc)
        mn = rs(root(sq(m)))
        if mn < rs(fe):  # fallback: the weighted sum in W
            out = r(v[0] * w[0])
            for j in range(1, N):
                out = r(out + r(v[j] * w[j]))
        else:
            mh = r(m / mn)
            dots = [rs(f(_spec_block_sum(r(x * mh).astype(np.float64)))) for x in u]
            acc = np.zeros(v[0].size, f)
            for j in range(N):
                acc = acc + r(r(u[j] - r(dots[j] * mh)) * w[j])
            T = r(acc)
            tn = rs(rs(root(sq(T))) + fe)
            c = rs(f(np.cos(np.float64(tn))))
            sn = rs(f(np.sin(np.float64(tn))))
            sf = rs(sn / tn)
            avg = f(0.0)
            for j in range(N):
                avg = f(avg + rs(nrm[j] * w[j]))
            avg = rs(avg)
            out = r(r(r(mh * c) + r(T * sf)) * avg)
        if xb is not None:
            out = r(out + xb)
    return from_float32(out, out_dtype)


# ---------------------------------------------------------------------------------------
# Karcher mean (docs/SPEC.md "Karcher mean")
# ---------------------------------------------------------------------------------------


def spec_karcher_chain(models, dtypes, out_dtype, weights=None, max_iter=10, tol=1e-5,
                       work=None, rounds_out=None) -> np.ndarray:  # fmt: skip
    """mergekit's karcher chain in the working dtype W (SPEC "Karcher mean"), stored as
    ``out_dtype``; ``rounds_out``: a list that gets the number of rounds that stepped."""
    f = np.float32
    W = work or (dtypes[0] if len(set(dtypes)) == 1 else "F32")

    def r(v):
        return spec_round_work(np.asarray(v, f), W)

    def red(v, w):  # a dot: the float64 block sums of the float32 products
        return _spec_block_sum((v * w).astype(f).astype(np.float64))

    def norm(v):  # torch's float32 2-norm: 8 lanes, each a float32 sum in order, then the tail
        k = v.size - v.size % 8
        p = (v * v).astype(f)
        acc = np.add.reduce(p[:k].reshape(-1, 8), axis=0, dtype=f) if k else np.zeros(8, f)
        b = acc[0]
        for e in (*acc[1:], *p[k:]):
            b = f(b + e)
        return f(np.sqrt(b))

    x = [r(to_float32(m, d).reshape(-1)) for m, d in zip(models, dtypes)]
    n = len(x)
    weights = [1.0] * n if weights is None else weights
    total = 0.0
    for w in weights:
        total = total + float(w)
    alphas = [float(w) / total for w in weights]
    with np.errstate(all="ignore"):
        norms, units = [], []
        for xj in x:
            nj = norm(xj)
            norms.append(0.0 if float(nj) == 0.0 else float(nj))
            units.append(np.zeros_like(xj) if float(nj) == 0.0 else r(xj / nj))
        valid = [j for j in range(n) if norms[j] > tol]
        asum = 0.0
        for j in valid:
            asum = asum + alphas[j]
        if not valid or asum == 0.0:
            return from_float32(np.zeros_like(x[0]), out_dtype)
        na = {j: f(alphas[j] / asum) for j in valid}
        u = np.zeros_like(x[0])
        for j in valid:
            u = r(u + r(na[j] * units[j]))
        m = norm(u)
        u = units[valid[0]].copy() if float(m) < tol else r(u / m)
        done = 0
        for _ in range(max_iter):
            T = np.zeros_like(u)
            for j in valid:
                d = r(np.array([f(red(u, units[j]))], f))
                d = np.clip(d, f(-1.0), f(1.0)) if not np.isnan(d[0]) else d
                th = r(np.arccos(d))
                if float(th[0]) < tol:
                    continue
                c = r(na[j] * r(th / r(np.sin(th))))[0]
                T = r(T + r(c * r(units[j] - r(d[0] * u))))
            nt = norm(T)
            if float(nt) < tol:
                break
            done += 1
            u = r(r(r(np.cos(nt)) * u) + r(r(np.sin(nt)) * r(T / nt)))
            un = norm(u)
            if float(un) > tol:
                u = r(u / un)
        if rounds_out is not None:
            rounds_out.append(done)
        s = f(0.0)  # sum(alpha * norm): 0-dim float32 tensors
        for a, nj in zip(alphas, norms):
            s = f(s + f(f(a) * f(nj)))
        return from_float32(r(r(np.array([s], f))[0] * u), out_dtype)


def spec_model_stock_filter_wise(base, models, dtypes, out_dtype, shape, work=None) -> np.ndarray:
    """Model Stock with ``filter_wise`` (docs/SPEC.md "Model Stock"): one t per row of the
    last dimension (a 1-D tensor one row), each from its row's sums; stored form, flat."""
    W = work or (dtypes[0] if len(set(dtypes)) == 1 else "F32")
    f = np.float32
    xb = spec_round_work(to_float32(base, dtypes[0]).reshape(-1), W)
    n = xb.size
    c = (shape[-1] if len(shape) else 1) or 1
    ms = [np.asarray(m).reshape(-1) for m in models]
    ts = np.zeros(n, f)
    for r in range(n // c):
        sl = slice(r * c, (r + 1) * c)
        sums = spec_stock_sums(np.asarray(base).reshape(-1)[sl], [m[sl] for m in ms], dtypes, work)
        ts[sl] = spec_stock_t(sums, len(models), W)
    a = np.zeros(n, f)
    with np.errstate(all="ignore"):
        for m, d in zip(ms, dtypes[1:]):
            a = spec_round_work(a + spec_round_work(to_float32(m, d), W), W)
        avg = spec_round_work(a / f(len(models)), W)
        p = spec_round_work(ts * avg, W)
        q = spec_round_work((f(1) - ts).astype(f), W)
        out = spec_round_work(p + spec_round_work(q * xb, W), W)
    return from_float32(out, out_dtype)
