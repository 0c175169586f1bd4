"""The numba histogram kernels (kernels/cpu_stats.py) against np.bincount, count for count.

mag_k = bits(float32(model_k) - x_b) & 0x7FFFFFFF (kernel contract section 2, SPEC v2
"Magnitudes and thresholds"); the reference computes it with numpy from
``spec_reference.to_float32`` and counts with ``np.bincount``. Sizes do not divide the
kernel's block (nor its 64-element bit words), dtypes are mixed, the base may be absent,
inputs hold NaN / inf / -0.0, and the low pass is exercised with sparse, dense (one value
repeated: the exact zeros) and empty buckets.
"""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest
import spec_reference as ref
from streammerge.kernels import cpu_stats

BLOCK = cpu_stats.BLOCK
HIGH, LOW = cpu_stats.HIGH_BINS, cpu_stats.LOW_BINS
CARRIER = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
SPECIALS = np.array(
    [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-45, 6e-8, 65504.0, 3.0e38, -1.0],
    np.float32,
)


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    return ref.from_float32(np.asarray(x, np.float32), dtype)


def make_case(rng, n, dtypes, *, base=True, specials=False, unchanged=0.0, spread=0.02):
    """Stored arrays: the base (if ``base``) then one fine-tune per remaining dtype.

    A fine-tune is base + small noise; ``unchanged`` is the fraction of its elements left
    equal to the base (task vector exactly 0, as in real bf16 fine-tunes)."""
    x = (rng.standard_normal(n) * spread).astype(np.float32)
    out = []
    for r, dt in enumerate(dtypes):
        if base and r == 0:
            v = x.copy()
        else:
            v = x + (rng.standard_normal(n) * spread / 10).astype(np.float32)
            if unchanged:
                keep = rng.random(n) < unchanged
                v[keep] = x[keep]
        if specials and n:
            pos = rng.integers(0, n, min(n, 2 * SPECIALS.size))
            v[pos] = rng.choice(SPECIALS, pos.size)
        out.append(stored(v, dt))
    return out


def pack(arrays, pad=3):
    """[R, cap] uint8 rows holding the arrays' raw bytes (cap a little larger than needed)."""
    n = len(arrays[0])
    cap = n * 4 + pad
    buf = np.zeros((len(arrays), cap), np.uint8)
    for r, a in enumerate(arrays):
        raw = np.ascontiguousarray(a).view(np.uint8)
        buf[r, : raw.size] = raw
    return buf


def ref_mags(arrays, dtypes, base, compute="F32"):
    """[K] uint32 magnitude arrays of the fine-tunes (arrays[1:] when ``base``): those of
    d = rd(rd(x_j) - rd(x_b)) in the working dtype ``compute`` (SPEC "Working dtype (v3)")."""
    rd = lambda v: ref.spec_rd(v, compute)  # noqa: E731
    if base:
        xb = rd(ref.to_float32(arrays[0], dtypes[0]))
        models = list(zip(arrays[1:], dtypes[1:]))
    else:
        xb = np.zeros(len(arrays[0]), np.float32)
        models = list(zip(arrays, dtypes))
    with np.errstate(all="ignore"):
        return [ref.spec_mag(rd(rd(ref.to_float32(a, dt)) - xb)) for a, dt in models]


def ref_high(mags):
    return np.stack([np.bincount(m >> 16, minlength=HIGH).astype(np.int64) for m in mags])


def ref_low(mags, buckets):
    k_, b_ = buckets.shape
    out = np.zeros((k_, b_, LOW), np.int64)
    for k in range(k_):
        for b in range(b_):
            if buckets[k, b] >= 0:
                sel = mags[k][(mags[k] >> 16) == buckets[k, b]]
                out[k, b] = np.bincount(sel & 0xFFFF, minlength=LOW)
    return out


def run_high(arrays, dtypes, base, compute="F32"):
    rows = list(range(1, len(arrays))) if base else list(range(len(arrays)))
    hist = np.zeros((len(rows), HIGH), np.int64)
    cpu_stats.hist_high(pack(arrays), list(dtypes), 0 if base else -1, rows, len(arrays[0]), hist,
                        compute_dtype=compute)  # fmt: skip
    return hist


def run_low(arrays, dtypes, base, buckets, compute="F32"):
    rows = list(range(1, len(arrays))) if base else list(range(len(arrays)))
    hist = np.zeros((len(rows), buckets.shape[1], LOW), np.int64)
    cpu_stats.hist_low(
        pack(arrays), list(dtypes), 0 if base else -1, rows, len(arrays[0]), buckets, hist,
        compute_dtype=compute,
    )
    return hist


@pytest.mark.parametrize("compute", ["BF16", "F16"])
@pytest.mark.parametrize("dtypes", [("BF16",) * 3, ("F16",) * 3, ("F32", "BF16", "F16")])
def test_working_dtype_magnitudes(compute, dtypes):
    """SPEC "Working dtype (v3)": both histograms count the magnitudes of rd(x_j - x_b) in
    D (inputs of other dtypes rounded to D first), over odd sizes with special values."""
    rng = np.random.default_rng(hash((compute, dtypes)) % 2**32)
    for n in (1, 4_099, 3 * cpu_stats.BLOCK + 17):
        arrays = make_case(rng, n, dtypes, specials=True, unchanged=0.3)
        mags = ref_mags(arrays, dtypes, True, compute)
        assert_hist_equal(run_high(arrays, dtypes, True, compute), ref_high(mags), f"{compute} high")
        buckets = pick_buckets(mags, rng, 2)
        assert_hist_equal(run_low(arrays, dtypes, True, buckets, compute), ref_low(mags, buckets),
                          f"{compute} low")  # fmt: skip


def assert_hist_equal(got, want, what):
    bad = np.argwhere(got != want)
    if bad.size:
        first = [f"{tuple(int(v) for v in i)}: got {got[tuple(i)]} want {want[tuple(i)]}"
                 for i in bad[:6]]  # fmt: skip
        raise AssertionError(f"{what}: {len(bad)} counts differ; first: " + "; ".join(first))


def pick_buckets(mags, rng, n_slots):
    """Per model: the fullest bucket, a sparse one, one that holds nothing, repeats, -1."""
    rows = []
    for m in mags:
        counts = np.bincount(m >> 16, minlength=HIGH)
        full = np.flatnonzero(counts)
        order = full[np.argsort(counts[full])[::-1]]
        choice = [int(order[0]), int(order[-1]), int(np.flatnonzero(counts == 0)[0])]
        choice += [int(rng.choice(order)), -1, int(order[0])]
        rows.append([choice[int(i)] for i in rng.permutation(len(choice))[:n_slots]])
    return np.array(rows, np.int64)


DTYPE_SETS = {
    1: [("BF16", "BF16"), ("F16", "F32"), ("F32", "F16")],
    2: [("BF16", "BF16", "BF16"), ("F16", "BF16", "F32"), ("F32", "F32", "F16")],
    3: [("BF16", "F16", "BF16", "F32"), ("F16", "F16", "F16", "F16")],
    5: [("BF16", "BF16", "F16", "F32", "BF16", "F16"), ("F32",) * 6],
}
SIZES = [1, 63, 65, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 17, 100_003]


@pytest.mark.parametrize("k_models", [1, 2, 3, 5])
@pytest.mark.parametrize("base", [True, False])
@pytest.mark.parametrize("n", SIZES)
def test_hist_high_matches_bincount(k_models, base, n):
    rng = np.random.default_rng(1000 * k_models + n + base)
    for dts in DTYPE_SETS[k_models]:
        dts = dts if base else dts[1:]
        arrays = make_case(rng, n, dts, base=base, specials=True, unchanged=0.3)
        got = run_high(arrays, dts, base)
        want = ref_high(ref_mags(arrays, dts, base))
        assert got.sum() == n * k_models
        assert_hist_equal(got, want, f"hist_high K={k_models} n={n} {dts} base={base}")


@pytest.mark.parametrize("k_models", [1, 2, 3, 5])
@pytest.mark.parametrize("base", [True, False])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("n_slots", [1, 2, 3])
def test_hist_low_matches_bincount(k_models, base, n, n_slots):
    rng = np.random.default_rng(7 * k_models + n + 100 * n_slots + base)
    for dts in DTYPE_SETS[k_models]:
        dts = dts if base else dts[1:]
        arrays = make_case(rng, n, dts, base=base, specials=True, unchanged=0.3)
        mags = ref_mags(arrays, dts, base)
        buckets = pick_buckets(mags, rng, n_slots)
        got = run_low(arrays, dts, base, buckets)
        assert_hist_equal(got, ref_low(mags, buckets), f"hist_low K={k_models} n={n} {buckets}")


@pytest.mark.parametrize("unchanged", [0.0, 0.3, 0.9, 1.0])
def test_low_dense_and_sparse_buckets(unchanged):
    """The zero bucket holding from none to all elements (one low value repeated, the dense
    path of the low pass), equal buckets in one row (both count) and distinct ones."""
    rng = np.random.default_rng(int(unchanged * 10))
    n = 5 * BLOCK + 33
    dts = ("BF16", "BF16", "F16")
    arrays = make_case(rng, n, dts, unchanged=unchanged)
    mags = ref_mags(arrays, dts, True)
    top = [int(np.argmax(np.bincount(m >> 16, minlength=HIGH))) for m in mags]
    for buckets in (
        [[0, 0], [0, top[1]]],  # equal buckets in a row; zero bucket dense or empty
        [[top[0], 0], [top[1], top[1]]],
        [[0, -1], [-1, 0]],
    ):
        b = np.array(buckets, np.int64)
        got = run_low(arrays, dts, True, b)
        assert_hist_equal(got, ref_low(mags, b), f"unchanged={unchanged} buckets={buckets}")
        if buckets[0][0] == buckets[0][1]:
            assert np.array_equal(got[0, 0], got[0, 1])
        if unchanged == 1.0 and buckets[0][0] == 0:
            assert got[0, 0, 0] == n  # every task-vector element is +0.0


def test_nan_inf_and_signed_zeros():
    """Every mag class: +-0 -> 0, subnormals, infinities -> 0x7F800000, NaNs above; NaN and
    inf in the base as well as in the models (inf - inf is NaN)."""
    vals = np.concatenate([SPECIALS, -SPECIALS, np.float32([1.5, -2.25, 1e-30])])
    grid_b, grid_m = np.meshgrid(vals, vals)
    base_f = grid_b.ravel().astype(np.float32)
    model_f = grid_m.ravel().astype(np.float32)
    for bdt, mdt in (("F32", "F32"), ("BF16", "F16"), ("F16", "BF16")):
        arrays = [stored(base_f, bdt), stored(model_f, mdt), stored(-model_f, mdt)]
        dts = (bdt, mdt, mdt)
        mags = ref_mags(arrays, dts, True)
        assert_hist_equal(run_high(arrays, dts, True), ref_high(mags), f"high {dts}")
        buckets = np.array([[0x7F80, 0x7FC0], [0, 0x7F80]], np.int64)  # inf, NaN, zero
        assert_hist_equal(run_low(arrays, dts, True, buckets), ref_low(mags, buckets), f"low {dts}")
    # -0.0 with no base: -0.0 - (+0.0) = -0.0, magnitude 0, high bucket 0, low value 0.
    z = np.array([-0.0, 0.0, -0.0], np.float32)
    hist = run_high([z], ("F32",), False)
    assert hist[0, 0] == 3 and hist.sum() == 3


def test_accumulates_and_chunking_invariance():
    """hist is +=: counting a tensor in uneven chunks into one histogram equals one call."""
    rng = np.random.default_rng(5)
    n = 4 * BLOCK + 999
    dts = ("F16", "BF16", "F32", "BF16")
    arrays = make_case(rng, n, dts, specials=True, unchanged=0.5)
    mags = ref_mags(arrays, dts, True)
    buckets = pick_buckets(mags, rng, 2)
    whole_h = run_high(arrays, dts, True)
    whole_l = run_low(arrays, dts, True, buckets)
    h = np.zeros_like(whole_h)
    low = np.zeros_like(whole_l)
    bounds = [0, 1, 64, BLOCK + 3, 2 * BLOCK, n]
    for lo, hi in itertools.pairwise(bounds):
        piece = pack([a[lo:hi] for a in arrays])
        cpu_stats.hist_high(piece, list(dts), 0, [1, 2, 3], hi - lo, h)
        cpu_stats.hist_low(piece, list(dts), 0, [1, 2, 3], hi - lo, buckets, low)
    assert np.array_equal(h, whole_h)
    assert np.array_equal(low, whole_l)
    assert_hist_equal(whole_h, ref_high(mags), "whole")


def test_thread_count_invariance():
    rng = np.random.default_rng(6)
    n = 9 * BLOCK + 5
    dts = ("BF16", "BF16", "BF16")
    arrays = make_case(rng, n, dts, unchanged=0.4)
    buckets = pick_buckets(ref_mags(arrays, dts, True), rng, 2)
    before = numba.get_num_threads()
    try:
        results = []
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            results.append((run_high(arrays, dts, True), run_low(arrays, dts, True, buckets)))
    finally:
        numba.set_num_threads(before)
    for hi, lo in results[1:]:
        assert np.array_equal(hi, results[0][0]) and np.array_equal(lo, results[0][1])


def test_model_rows_any_order_and_untouched_slots():
    """Rows may be any subset in any order; unused slots' histograms keep their contents."""
    rng = np.random.default_rng(8)
    n = 2 * BLOCK + 7
    dts = ("BF16", "F32", "BF16", "F16")
    arrays = make_case(rng, n, dts)
    buf = pack(arrays)
    hist = np.zeros((2, HIGH), np.int64)
    cpu_stats.hist_high(buf, list(dts), 2, [3, 1], n, hist)
    mags = ref_mags([arrays[2], arrays[3], arrays[1]], (dts[2], dts[3], dts[1]), True)
    assert_hist_equal(hist, ref_high(mags), "rows [3, 1], base row 2")
    buckets = np.array([[-1], [int(np.argmax(hist[1]))]], np.int64)
    low = np.full((2, 1, LOW), 7, np.int64)
    cpu_stats.hist_low(buf, list(dts), 2, [3, 1], n, buckets, low)
    assert (low[0] == 7).all()
    assert_hist_equal(low[1:] - 7, ref_low(mags, buckets)[1:], "slot of row 1")


def test_n_zero_and_empty_bucket_rows():
    buf = np.zeros((2, 8), np.uint8)
    h = np.zeros((1, HIGH), np.int64)
    cpu_stats.hist_high(buf, ["F32", "F32"], 0, [1], 0, h)
    low = np.zeros((1, 2, LOW), np.int64)
    cpu_stats.hist_low(buf, ["F32", "F32"], 0, [1], 2, np.full((1, 2), -1, np.int64), low)
    assert not h.any() and not low.any()


def _high_args(**over):
    args = {
        "inputs": np.zeros((3, 64), np.uint8), "dtypes": ["BF16"] * 3, "base_row": 0,
        "model_rows": [1, 2], "n": 32, "hist": np.zeros((2, HIGH), np.int64),
    }  # fmt: skip
    args.update(over)
    return args


def _low_args(**over):
    args = _high_args(hist=np.zeros((2, 2, LOW), np.int64))
    args["buckets"] = np.array([[0, 5], [-1, 32767]], np.int64)
    args.update(over)
    return args


BAD_COMMON = [
    ({"inputs": np.zeros((3, 64), np.float32)}, "uint8"),
    ({"inputs": np.zeros((3, 128), np.uint8)[:, ::2]}, "C-contiguous"),
    ({"dtypes": ["BF16", "F64", "BF16"]}, "F64"),
    ({"dtypes": ["BF16"] * 2}, "dtypes"),
    ({"n": 33}, "too few"),
    ({"n": -1}, "n must be"),
    ({"dtypes": ["F32"] * 3}, "too few"),
    ({"model_rows": [1, 3]}, "out of range"),
    ({"base_row": 5}, "out of range"),
    ({"model_rows": []}, "at least one"),
]


@pytest.mark.parametrize(
    "over,match",
    BAD_COMMON
    + [
        ({"hist": np.zeros((2, HIGH), np.int32)}, "hist"),
        ({"hist": np.zeros((3, HIGH), np.int64)}, "hist"),
        ({"hist": np.zeros((2, 2 * HIGH), np.int64)[:, ::2]}, "hist"),
        ({"hist": [[0] * HIGH] * 2}, "hist"),
    ],
)
def test_hist_high_rejects_bad_arguments(over, match):
    with pytest.raises(ValueError, match=match):
        cpu_stats.hist_high(**_high_args(**over))


@pytest.mark.parametrize(
    "over,match",
    [(o, m) for o, m in BAD_COMMON if "model_rows" not in o]
    + [
        ({"hist": np.zeros((2, 1, LOW), np.int64)}, "hist"),
        ({"hist": np.zeros((2, 2, LOW), np.uint64)}, "hist"),
        ({"buckets": np.array([[0, 5]], np.int64)}, "buckets"),
        ({"buckets": np.zeros((2, 0), np.int64)}, "buckets"),
        ({"buckets": np.array([[0, 5], [-2, 1]], np.int64)}, "buckets"),
        ({"buckets": np.array([[0, 32768], [1, 1]], np.int64)}, "buckets"),
        ({"buckets": np.array([[0.0, 5.0], [1.0, 1.0]])}, "buckets"),
        ({"buckets": [[0, 5], [1, 1]]}, "buckets"),
    ],
)
def test_hist_low_rejects_bad_arguments(over, match):
    with pytest.raises(ValueError, match=match):
        cpu_stats.hist_low(**_low_args(**over))


def test_minimal_calls_and_warmup():
    cpu_stats.warmup()
    cpu_stats.hist_high(**_high_args())
    cpu_stats.hist_high(**_high_args(base_row=-1))
    cpu_stats.hist_low(**_low_args())
