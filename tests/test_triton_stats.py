"""The Triton histogram kernels (kernels/triton_stats.py) against np.bincount of the
magnitudes computed by the numpy SPEC reference (tests/spec_reference.py), count for count,
against the numba kernels (kernels/cpu_stats.py) when they are there, and their launchers'
argument checks.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here and
in conftest.py before triton is imported) on CPU tensors. A NaN's magnitude depends on its
payload, which the hardware picks (numpy keeps the input's, an NVIDIA GPU's subtraction
returns 0x7FFFFFFF): under the interpreter every bin is compared; on a GPU the bins of
finite magnitudes are, and the infinity-and-NaN tail (high bins >= 0x7F80) by its total.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import functools
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import spec_reference as ref
from ptx_stub import compile_in_child, stub_driver_preamble
from streammerge.kernels import triton_stats
from streammerge.kernels.triton_stats import hist_high_triton, hist_low_triton

INTERPRETED = triton_stats._INTERPRETED
if INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton compiles for a GPU here but none is present", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

CARRIER = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
TAIL = 0x7F80  # first high bin holding infinities and NaNs

# (base dtype or None, model dtypes cycled over the K models)
DTYPE_CASES = {
    "f32": ("F32", ("F32",)),
    "f16": ("F16", ("F16",)),
    "bf16": ("BF16", ("BF16",)),
    "bf16-base-mixed-models": ("BF16", ("F32", "F16", "BF16")),
    "f16-base-bf16-models": ("F16", ("BF16", "F32")),
    "no-base-mixed": (None, ("BF16", "F16", "F32")),
}


def to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored chunk (CPU carrier: bf16 as uint16 bits) as a torch tensor on DEVICE."""
    a = np.ascontiguousarray(a, dtype=CARRIER[dtype])
    if dtype == "BF16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(DEVICE)
    return torch.from_numpy(a.copy()).to(DEVICE)


def mags_of(base, base_dtype, models, model_dtypes, compute="F32") -> list[np.ndarray]:
    """SPEC mag_k = bits(rd(rd(float32(model_k)) - rd(x_b))) & 0x7FFFFFFF per model (x_b =
    +0.0 without a base; rd rounds to the working dtype ``compute``, SPEC v3), computed by
    the numpy reference."""
    n = len(models[0])
    xb = np.zeros(n, np.float32) if base is None else ref.to_float32(base, base_dtype)
    rd = lambda v: ref.spec_rd(v, compute)  # noqa: E731
    with np.errstate(all="ignore"):
        return [ref.spec_mag(rd(rd(ref.to_float32(m, dt)) - rd(xb)))
                for m, dt in zip(models, model_dtypes)]  # fmt: skip


@functools.cache
def inputs(base_dtype, model_dtypes: tuple[str, ...], n: int, seed: int = 0):
    """A base and K fine-tunes (base + deltas over many binades, ties, zero stretches)."""
    rng = np.random.default_rng([seed, n, len(model_dtypes)])
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 8, n))).astype(np.float32)
    x[: n // 4] = rng.integers(-50, 51, n // 4).astype(np.float32) * np.float32(2**-6)
    base = None if base_dtype is None else ref.from_float32(x, base_dtype)
    xb = x if base is None else ref.to_float32(base, base_dtype)
    models = []
    for k, dt in enumerate(model_dtypes):
        step = rng.integers(-6, 7, n).astype(np.float32) * np.float32(2**-8)
        noise = rng.standard_normal(n).astype(np.float32) * np.exp2(rng.integers(-30, 2, n))
        m = xb + np.where(rng.random(n) < 0.5, step, noise.astype(np.float32) * xb)
        m[: n // 8 if k % 2 else 0] = x[: n // 8 if k % 2 else 0]  # zero task vector there
        models.append(ref.from_float32(m, dt))
    for a in (base, *models):
        if a is not None:
            a.setflags(write=False)
    return base, tuple(models)


def special_values(dtype: str) -> np.ndarray:
    """NaN (quiet, signaling, negative), +-inf, +-0, subnormals, the largest values."""
    x = np.array(
        [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 3.0e38, -3.4e38, 1e-40,
         -1e-45, 1.17e-38, 6.0e-8, -6.1e-5, 65504.0, 65520.0, 1.0e-3],
        dtype=np.float32,
    )  # fmt: skip
    if dtype == "F32":
        extra = np.array([0x7F800001, 0xFFC00001, 0x7FFFFFFF, 0x00000001], np.uint32)
        return np.concatenate([x, extra.view(np.float32)])
    if dtype == "F16":
        with np.errstate(over="ignore"):
            h = x.astype(np.float16)
        extra = np.array([0x0001, 0x83FF, 0x7BFF, 0x7C01, 0xFE00], np.uint16)
        return np.concatenate([h, extra.view(np.float16)])
    extra = np.array([0x0001, 0x807F, 0x7F7F, 0x7F81, 0xFFC1], np.uint16)
    return np.concatenate([ref.from_float32(x, "BF16"), extra])


def special_grid(base_dtype, model_dtypes):
    """Every (base, model 0) pair of special values; other models take shifted copies."""
    sb = special_values(base_dtype or "F32")
    sm = [special_values(dt) for dt in model_dtypes]
    size = max(len(sb), *(len(s) for s in sm))
    ib, i0 = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    ib, i0 = ib.ravel(), i0.ravel()
    models = [sm[0][i0 % len(sm[0])]] + [
        s[(i0 * (k + 2) + ib) % len(s)] for k, s in enumerate(sm[1:])
    ]
    return (None if base_dtype is None else sb[ib % len(sb)]), models


def want_high(mags: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.bincount(m >> 16, minlength=32768) for m in mags]).astype(np.int64)


def want_low(mags: list[np.ndarray], buckets: np.ndarray) -> np.ndarray:
    k_models, n_slots = buckets.shape
    out = np.zeros((k_models, n_slots, 65536), np.int64)
    for k in range(k_models):
        for b in range(n_slots):
            sel = mags[k][(mags[k] >> 16) == buckets[k, b]] & 0xFFFF
            out[k, b] = np.bincount(sel.astype(np.int64), minlength=65536)
    return out


def assert_high_equal(got: torch.Tensor, want: np.ndarray, what: str = "") -> None:
    """Counts equal bin for bin (on a GPU: finite bins, and the inf/NaN tail's total)."""
    got = got.cpu().numpy().astype(np.int64)
    assert got.shape == want.shape, (got.shape, want.shape)
    lim = got.shape[1] if INTERPRETED else TAIL
    for k in range(got.shape[0]):
        bad = np.flatnonzero(got[k, :lim] != want[k, :lim])
        if bad.size:
            rows = ", ".join(f"[{i:#x}] got {got[k, i]} want {want[k, i]}" for i in bad[:8])
            pytest.fail(f"{what}: model {k}: {bad.size} high bins differ: {rows}")
        assert got[k, TAIL:].sum() == want[k, TAIL:].sum(), (what, k)


def assert_low_equal(got: torch.Tensor, want: np.ndarray, what: str = "") -> None:
    got = got.cpu().numpy().astype(np.int64)
    assert got.shape == want.shape, (got.shape, want.shape)
    bad = np.argwhere(got != want)
    if bad.size:
        rows = ", ".join(
            f"[{k}, {b}, {i:#x}] got {got[k, b, i]} want {want[k, b, i]}" for k, b, i in bad[:8]
        )
        pytest.fail(f"{what}: {len(bad)} low bins differ: {rows}")


def run_high(base, base_dtype, models, model_dtypes, hist_dtype=torch.int64, compute="F32"):
    hist = torch.zeros(len(models), 32768, dtype=hist_dtype, device=DEVICE)
    out = hist_high_triton(
        None if base is None else to_torch(base, base_dtype),
        [to_torch(m, dt) for m, dt in zip(models, model_dtypes)],
        hist,
        compute_dtype=compute,
    )
    assert out is hist
    return hist


def run_low(base, base_dtype, models, model_dtypes, buckets, hist_dtype=torch.int64,
            compute="F32"):  # fmt: skip
    buckets = np.asarray(buckets, np.int64)
    hist = torch.zeros(*buckets.shape, 65536, dtype=hist_dtype, device=DEVICE)
    out = hist_low_triton(
        None if base is None else to_torch(base, base_dtype),
        [to_torch(m, dt) for m, dt in zip(models, model_dtypes)],
        torch.from_numpy(buckets).to(DEVICE),
        hist,
        compute_dtype=compute,
    )
    assert out is hist
    return hist


def busy_buckets(mags: list[np.ndarray], n_slots: int) -> np.ndarray:
    """Per model, the fullest high bucket, the median's, and -1 (unused) or a repeat."""
    rows = []
    for m in mags:
        high = (m >> 16).astype(np.int64)
        fullest = int(np.bincount(high).argmax())
        median = int(np.sort(high)[len(high) // 2])
        rows.append([median, fullest, -1, median][:n_slots])
    return np.array(rows, np.int64)


# ----------------------------------------------------------------------------------------
# Counts
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 7, 1025, 3001])
@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_hist_high_matches_bincount(case, n, n_models):
    """dtypes (mixed, base absent) x sizes (one element, odd, across blocks) x K."""
    base_dtype, pattern = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(n_models))
    base, models = inputs(base_dtype, model_dtypes, n)
    got = run_high(base, base_dtype, models, model_dtypes)
    assert_high_equal(got, want_high(mags_of(base, base_dtype, models, model_dtypes)), case)
    assert int(got.sum()) == n * n_models


@pytest.mark.parametrize("n_slots", [1, 2, 3, 4])
@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_hist_low_matches_bincount(case, n_models, n_slots):
    """B slots per model: the median's bucket (where radix select refines), the fullest, an
    unused slot (-1), a repeated bucket (both slots count); 3001 elements."""
    base_dtype, pattern = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(n_models))
    base, models = inputs(base_dtype, model_dtypes, 3001)
    mags = mags_of(base, base_dtype, models, model_dtypes)
    buckets = busy_buckets(mags, n_slots)
    got = run_low(base, base_dtype, models, model_dtypes, buckets)
    want = want_low(mags, buckets)
    assert_low_equal(got, want, f"{case} B={n_slots}")
    assert want[:, 0].sum() > 0  # the median's bucket is never empty
    if n_slots == 4:
        assert torch.equal(got[:, 0], got[:, 3]) and int(got[:, 2].sum()) == 0


@pytest.mark.parametrize("case", ["f32", "bf16", "bf16-base-mixed-models", "no-base-mixed"])
def test_special_values(case):
    """NaN, +-inf, +-0.0 (both magnitude 0), subnormals, inf - inf, as base and models;
    the low histogram of the zero bucket (+0 and -0 together) and of the infinities' bucket
    (0x7F80: infinities, plus NaNs of payload 0x7F80xxxx)."""
    base_dtype, pattern = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(3))
    base, models = special_grid(base_dtype, model_dtypes)
    mags = mags_of(base, base_dtype, models, model_dtypes)
    assert all((m > 0x7F800000).any() and (m == 0x7F800000).any() for m in mags)
    got = run_high(base, base_dtype, models, model_dtypes)
    assert_high_equal(got, want_high(mags), f"{case} special")
    buckets = np.array([[0, 0x3F80, 0x7FC0 if INTERPRETED else -1]] * 3, np.int64)
    if not INTERPRETED:  # NaN payloads are the GPU's: compare the zero and 1.0 buckets
        mags = [np.where(m > 0x7F800000, 0x7FFFFFFF, m) for m in mags]
    low = run_low(base, base_dtype, models, model_dtypes, buckets)
    assert_low_equal(low, want_low(mags, buckets), f"{case} special low")
    assert int(low[:, 0, 0].min()) > 0  # +-0.0 were counted in bin 0 of bucket 0


def test_negative_zero_counts_as_zero():
    """-0.0 - (+0.0) = -0.0 (base absent), +0.0 - (+0.0), -0.0 - -0.0: magnitude 0 each."""
    m = np.array([-0.0, 0.0, -0.0, 1.0], np.float32)
    for base in (None, np.array([0.0, 0.0, -0.0, 1.0], np.float32)):
        got = run_high(base, "F32", [m], ["F32"])
        assert int(got[0, 0]) == 4 - (base is None)
        low = run_low(base, "F32", [m], ["F32"], [[0]])
        assert int(low[0, 0, 0]) == int(got[0, 0])


def test_accumulates_into_hist_and_int32_counts():
    """+= into a histogram that already holds counts (chunks of a tensor, or every tensor of
    a model for trim_scope model); int32 histograms count the same."""
    model_dtypes = ("BF16", "F16")
    base, models = inputs("BF16", model_dtypes, 2500, seed=1)
    mags = mags_of(base, "BF16", models, model_dtypes)
    tb = to_torch(base, "BF16")
    tm = [to_torch(m, dt) for m, dt in zip(models, model_dtypes)]
    for dtype in (torch.int64, torch.int32):
        hist = torch.zeros(2, 32768, dtype=dtype, device=DEVICE)
        hist_high_triton(tb[:1000], [m[:1000] for m in tm], hist)
        hist_high_triton(tb[1000:], [m[1000:] for m in tm], hist)
        hist_high_triton(tb, tm, hist)
        assert_high_equal(hist, 2 * want_high(mags), f"{dtype} accumulated")
        buckets = busy_buckets(mags, 2)
        low = torch.ones(2, 2, 65536, dtype=dtype, device=DEVICE)
        hist_low_triton(tb, tm, torch.from_numpy(buckets).to(DEVICE), low)
        assert_low_equal(low, want_low(mags, buckets) + 1, f"{dtype} low accumulated")


def test_models_as_rows_of_one_buffer():
    """models given as a 2-D [K, n] view of a wider buffer count as a list of tensors."""
    base, models = inputs("F16", ("F16",) * 3, 1500, seed=2)
    buf = torch.zeros(3, 2048, dtype=torch.float16, device=DEVICE)
    for r, m in enumerate(models):
        buf[r, :1500] = to_torch(m, "F16")
    hist = torch.zeros(3, 32768, dtype=torch.int64, device=DEVICE)
    hist_high_triton(to_torch(base, "F16"), buf[:, :1500], hist)
    assert torch.equal(hist, run_high(base, "F16", models, ("F16",) * 3))
    buckets = torch.from_numpy(busy_buckets(mags_of(base, "F16", models, ("F16",) * 3), 2))
    low = torch.zeros(3, 2, 65536, dtype=torch.int64, device=DEVICE)
    hist_low_triton(to_torch(base, "F16"), buf[:, :1500], buckets.to(DEVICE), low)
    assert torch.equal(low, run_low(base, "F16", models, ("F16",) * 3, buckets.numpy()))


def radix_select(high: np.ndarray, low_of, rank: int) -> int:
    """The ``rank``-th smallest magnitude (0-based) from a high histogram and a function
    giving the low histogram of one high bucket: the host side of the stats pass."""
    cum = np.cumsum(high)
    bucket = int(np.searchsorted(cum, rank, side="right"))
    below = int(cum[bucket - 1]) if bucket else 0
    low = np.cumsum(low_of(bucket))
    return (bucket << 16) | int(np.searchsorted(low, rank - below, side="right"))


@pytest.mark.parametrize("case", ["bf16", "f32", "bf16-base-mixed-models"])
def test_radix_select_gives_the_reference_thresholds(case):
    """The two histograms find SPEC's thresholds exactly: magnitude T (k-th largest) and
    breadcrumbs L, H (two order statistics of one model: B = 2), as the sort in
    ``spec_thresholds`` does."""
    base_dtype, pattern = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(3))
    n = 3001
    base, models = inputs(base_dtype, model_dtypes, n, seed=3)
    mags = mags_of(base, base_dtype, models, model_dtypes)
    high = run_high(base, base_dtype, models, model_dtypes).cpu().numpy()
    for k in range(3):
        density, gamma = (0.3, 0.5, 0.7)[k], (0.1, 0.0, 0.25)[k]
        (t,) = ref.spec_thresholds("magnitude", mags[k], density)
        (lo, hi) = ref.spec_thresholds("breadcrumbs", mags[k], density, gamma)
        target, n_top = int(density * n), int(gamma * n)
        n_bot = max(0, n - target - n_top)
        ranks = [n - max(1, int(density * n)), n_bot, min(n - 1, n_bot + target - 1)]
        cum = np.cumsum(high[k])
        buckets = np.full((3, 3), -1, np.int64)
        buckets[k] = [int(np.searchsorted(cum, r, side="right")) for r in ranks]
        low = run_low(base, base_dtype, models, model_dtypes, buckets).cpu().numpy()
        got = [radix_select(high[k], lambda b, row=low[k, s]: row, r) for s, r in enumerate(ranks)]
        assert got == [t, lo, hi], (k, [hex(v) for v in got], [hex(v) for v in (t, lo, hi)])


# ----------------------------------------------------------------------------------------
# Against the numba kernels
# ----------------------------------------------------------------------------------------


def _cpu_stats():
    try:
        from streammerge.kernels import cpu_stats
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        pytest.skip(f"the numba histogram kernels do not import: {exc}")
    return cpu_stats


@pytest.mark.parametrize("case", ["bf16-base-mixed-models", "no-base-mixed", "f16"])
def test_matches_numba_kernels(case):
    """hist_high / hist_low of kernels/cpu_stats.py on the same rows give the same counts
    (special values included: both run numpy-like x86 float32 under the interpreter)."""
    cpu_stats = _cpu_stats()
    base_dtype, pattern = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(3))
    base, models = inputs(base_dtype, model_dtypes, 4099, seed=4)
    sb, sm = special_grid(base_dtype, model_dtypes)
    if base is not None:
        base = np.concatenate([base, sb])
    models = [np.concatenate([m, s]) for m, s in zip(models, sm)]
    n = len(models[0])
    arrays = ([] if base is None else [base]) + models
    dtypes = ([] if base is None else [base_dtype]) + list(model_dtypes)
    rows = np.zeros((len(arrays), 4 * n), np.uint8)
    for r, a in enumerate(arrays):
        raw = np.ascontiguousarray(a).view(np.uint8)
        rows[r, : raw.size] = raw
    base_row = -1 if base is None else 0
    model_rows = list(range(len(arrays) - 3, len(arrays)))
    theirs = np.zeros((3, 32768), np.int64)
    cpu_stats.hist_high(rows, dtypes, base_row, model_rows, n, theirs)
    got = run_high(base, base_dtype, models, model_dtypes)
    assert_high_equal(got, theirs, f"{case} vs numba")
    buckets = busy_buckets(mags_of(base, base_dtype, models, model_dtypes), 2)
    theirs_low = np.zeros((3, 2, 65536), np.int64)
    cpu_stats.hist_low(rows, dtypes, base_row, model_rows, n, buckets, theirs_low)
    assert_low_equal(run_low(base, base_dtype, models, model_dtypes, buckets), theirs_low, case)


@pytest.mark.parametrize("compute", ["BF16", "F16"])
@pytest.mark.parametrize("case", ["bf16-base-mixed-models", "f16", "no-base-mixed"])
def test_working_dtype_matches_reference_and_numba(case, compute):
    """SPEC "Working dtype (v3)": the magnitudes of rd(x_j - x_b) in D (inputs of other
    dtypes rounded to D first), special values included, as the reference and the numba
    kernels count them."""
    cpu_stats = _cpu_stats()
    base_dtype, pattern = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(3))
    base, models = inputs(base_dtype, model_dtypes, 3001, seed=6)
    sb, sm = special_grid(base_dtype, model_dtypes)
    if base is not None:
        base = np.concatenate([base, sb])
    models = [np.concatenate([m, s]) for m, s in zip(models, sm)]
    n = len(models[0])
    mags = mags_of(base, base_dtype, models, model_dtypes, compute)
    got = run_high(base, base_dtype, models, model_dtypes, compute=compute)
    assert_high_equal(got, want_high(mags), f"{case} D={compute}")
    buckets = busy_buckets(mags, 2)
    got_low = run_low(base, base_dtype, models, model_dtypes, buckets, compute=compute)
    assert_low_equal(got_low, want_low(mags, buckets), f"{case} D={compute} low")
    arrays = ([] if base is None else [base]) + models
    dtypes = ([] if base is None else [base_dtype]) + list(model_dtypes)
    rows = np.zeros((len(arrays), 4 * n), np.uint8)
    for r, a in enumerate(arrays):
        raw = np.ascontiguousarray(a).view(np.uint8)
        rows[r, : raw.size] = raw
    theirs = np.zeros((3, 32768), np.int64)
    cpu_stats.hist_high(rows, dtypes, -1 if base is None else 0,
                        list(range(len(arrays) - 3, len(arrays))), n, theirs, compute_dtype=compute)  # fmt: skip
    assert_high_equal(got, theirs, f"{case} D={compute} vs numba")


# ----------------------------------------------------------------------------------------
# Launcher checks
# ----------------------------------------------------------------------------------------


def _args(n: int = 8):
    base = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    models = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
    hist = torch.zeros(2, 32768, dtype=torch.int64, device=DEVICE)
    buckets = torch.tensor([[0x3F80, -1], [0, 0]], dtype=torch.int64, device=DEVICE)
    low = torch.zeros(2, 2, 65536, dtype=torch.int64, device=DEVICE)
    return base, models, hist, buckets, low


def test_launchers_return_hist_and_handle_empty_inputs():
    base, models, hist, buckets, low = _args()
    assert hist_high_triton(base, models, hist) is hist
    assert int(hist[:, 0x3F80].sum()) == 16  # d = 1.0
    assert hist_low_triton(base, models, buckets, low) is low
    assert int(low[0, 0, 0]) == 8 and int(low.sum()) == 8
    e = torch.empty(0, dtype=torch.float32, device=DEVICE)
    assert hist_high_triton(e, [e, e], hist) is hist
    assert hist_low_triton(None, [e, e], buckets, low) is low
    assert int(hist.sum()) == 16 and int(low.sum()) == 8
    hist_low_triton(base, models, buckets.int(), low)  # int32 buckets read the same
    assert int(low[0, 0, 0]) == 16 and int(low.sum()) == 16


BAD_HIGH = [
    (lambda b, m, h: (b.double(), m, h), TypeError, "base has dtype torch.float64"),
    (lambda b, m, h: (b, [m[0], m[1].int()], h), TypeError, r"models\[1\] has dtype"),
    (lambda b, m, h: (b, [m[0], np.ones(8)], h), TypeError, "must be a torch.Tensor"),
    (lambda b, m, h: (b[:7], m, h), ValueError, r"base has shape \(7,\)"),
    (lambda b, m, h: (b, [m[0], m[1].reshape(2, 4)], h), ValueError, "shape"),
    (lambda b, m, h: (b, [m[0], torch.ones(16, dtype=torch.bfloat16)[::2]], h), ValueError,
     "contiguous"),
    (lambda b, m, h: (b, [m[0], torch.empty(8, dtype=torch.bfloat16, device="meta")], h),
     ValueError, "on meta"),
    (lambda b, m, h: (b, m, h.float()), TypeError, "int64 or torch.int32"),
    (lambda b, m, h: (b, m, h[:1]), ValueError, r"must be \(2, 32768\)"),
    (lambda b, m, h: (b, m, h[:, :1024]), ValueError, "must be"),
    (lambda b, m, h: (b, m, h.to("meta")), ValueError, "on meta"),
    (lambda b, m, h: (b, m, h.t().contiguous().t()), ValueError, "contiguous"),
    (lambda b, m, h: (b, m, h.numpy()), TypeError, "hist must be a torch.Tensor"),
    (lambda b, m, h: (b, [], h), ValueError, "at least one model"),
    (lambda b, m, h: (b, torch.stack(m)[None], h), ValueError, "2-D"),
]  # fmt: skip


@pytest.mark.parametrize("mutate,exc,match", BAD_HIGH)
def test_hist_high_rejects_bad_arguments(mutate, exc, match):
    base, models, hist, _, _ = _args()
    b, m, h = mutate(base, models, hist)
    with pytest.raises(exc, match=match):
        hist_high_triton(b, m, h)
    assert int(hist.sum()) == 0  # nothing counted


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda bk, lo: (bk.float(), lo), TypeError, "buckets has dtype"),
        (lambda bk, lo: (bk[:1], lo), ValueError, r"buckets has shape \(1, 2\)"),
        (lambda bk, lo: (bk[:, :0], lo), ValueError, "B >= 1"),
        (lambda bk, lo: (bk.reshape(-1), lo), ValueError, "buckets has shape"),
        (lambda bk, lo: (bk.numpy(), lo), TypeError, "buckets must be a torch.Tensor"),
        (lambda bk, lo: (bk.t(), lo), ValueError, "contiguous"),
        (lambda bk, lo: (bk, lo[:, :1]), ValueError, r"must be \(2, 2, 65536\)"),
        (lambda bk, lo: (bk, lo.to(torch.int16)), TypeError, "int64 or torch.int32"),
        (lambda bk, lo: (bk.to("meta"), lo), ValueError, "on meta"),
    ],
)
def test_hist_low_rejects_bad_arguments(mutate, exc, match):
    base, models, _, buckets, low = _args()
    bk, lo = mutate(buckets, low)
    with pytest.raises(exc, match=match):
        hist_low_triton(base, models, bk, lo)
    assert int(low.sum()) == 0


# ----------------------------------------------------------------------------------------
# The compiled kernels (GPU code)
# ----------------------------------------------------------------------------------------

_COMPILE_SCRIPT = stub_driver_preamble("90", "cpu") + textwrap.dedent(
    """
    # Compile both histogram kernels for sm_90 with a stub driver (no GPU needed).
    from streammerge.kernels import triton_stats as ts

    n = 1 << 20
    ms = (torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.float16))
    hist = torch.empty(2, 32768, dtype=torch.int64)
    k = ts._hist_high_kernel.warmup(ms[0], ms, hist, n, HAS_BASE=True, D=2, BLOCK=1024,
                                    num_warps=4, enable_fp_fusion=False, grid=(1,))
    open(os.path.join(sys.argv[1], "high.ptx"), "w").write(k.asm["ptx"])
    buckets = torch.empty(2, 2, dtype=torch.int64)
    low = torch.empty(2, 2, 65536, dtype=torch.int64)
    k = ts._hist_low_kernel.warmup(None, ms, buckets, low, n, HAS_BASE=False, D=0, B=2, BLOCK=1024,
                                   num_warps=4, enable_fp_fusion=False, grid=(1,))
    open(os.path.join(sys.argv[1], "low.ptx"), "w").write(k.asm["ptx"])
    """
)


def test_compiled_ptx(tmp_path):
    """Both kernels compile for sm_90: relaxed 64-bit atomic adds into global memory, one
    per element and model (and slot), float32 subtraction without ftz (hist_high with the
    working dtype BF16, SPEC v3)."""
    compile_in_child(_COMPILE_SCRIPT, str(tmp_path), cache=tmp_path / "cache")
    import re

    for name in ("high", "low"):
        ptx = (tmp_path / f"{name}.ptx").read_text()
        adds = re.findall(r"\b(?:red|atom)\.global(?:\.[a-z]+)*\.add\.u64", ptx)
        assert adds, name
        assert ".ftz" not in ptx, name
