"""The Triton merge kernel (kernels/triton_merge.py) against the numpy SPEC reference
(tests/spec_reference.py), bit for bit, and its launcher's argument checks.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set here and in
conftest.py before triton is imported) on CPU tensors; on a machine where the kernel is
compiled (TRITON_INTERPRET unset and a CUDA GPU) the same grid runs on the GPU. Stored bytes
are compared exactly; the one freedom SPEC allows, a NaN's bit pattern, is compared as "both
NaN". The interpreter is slow (tens of ms per Philox draw per program on 2 cores), so sizes
stay small and the 4099-element cases (five programs, the last partial) take a subset of the
grid.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import spec_reference as ref
from streammerge.kernels import triton_merge
from streammerge.kernels.triton_merge import merge_chunk_triton

if triton_merge._INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton compiles for a GPU here but none is present", allow_module_level=True)

# The interpreter runs the float32 math in numpy, which warns on inf - inf, overflow, NaN.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CARRIER = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
UINT = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}
KEY = 0x5DEECE66D_2545F491 & (2**63 - 1)

# (base dtype, fine-tune dtypes cycled over the N models, output dtype)
DTYPE_CASES = {
    "f32": ("F32", ("F32",), "F32"),
    "f16": ("F16", ("F16",), "F16"),
    "bf16": ("BF16", ("BF16",), "BF16"),
    "f16-base-bf16-models": ("F16", ("BF16",), "F16"),
    "bf16-base-mixed-models-f32-out": ("BF16", ("F32", "F16", "BF16"), "F32"),
    "bf16-to-f16": ("BF16", ("BF16", "F16"), "F16"),
    "f32-to-bf16": ("F32", ("F32", "BF16"), "BF16"),
}


def _start(kind: str, n: int) -> int:
    """Chunk start: 0, straddling 2**32 (the Philox counter's high word turns 0 -> 1 inside
    the chunk), past 2**32 (high word 5), or the last chunk a tensor can have."""
    if kind == "straddle":
        return 2**32 - n // 2 - 1
    if kind == "past":
        return 5 * 2**32 + 12345
    if kind == "top":
        return 2**63 - n
    return 0


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored chunk (CPU carrier: bf16 as uint16 bits) as a torch tensor on DEVICE."""
    a = np.ascontiguousarray(a, dtype=CARRIER[dtype])
    if dtype == "BF16":
        t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a.copy())
    return t.to(DEVICE)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's stored values as the CPU carrier (bf16 as uint16 bits)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def is_nan(a: np.ndarray, dtype: str) -> np.ndarray:
    return np.isnan(ref.to_float32(a, dtype))


def assert_same_bytes(got: np.ndarray, want: np.ndarray, dtype: str, what: str = "") -> None:
    """Stored values equal bit for bit, except that any NaN matches any NaN (SPEC's one
    freedom); on failure, names the first mismatching elements with their bit patterns."""
    assert got.shape == want.shape, (got.shape, want.shape)
    gb, wb = got.view(UINT[dtype]), want.view(UINT[dtype])
    gn, wn = is_nan(got, dtype), is_nan(want, dtype)
    bad = np.flatnonzero(((gb != wb) & ~(gn & wn)) | (gn != wn))
    if bad.size:
        gf, wf = ref.to_float32(got, dtype), ref.to_float32(want, dtype)
        rows = "\n".join(
            f"  [{i}] got {int(gb[i]):#x} ({gf[i]!r}) want {int(wb[i]):#x} ({wf[i]!r})"
            for i in bad[:8]
        )
        pytest.fail(f"{what}: {bad.size} of {got.size} {dtype} elements differ:\n{rows}")


@functools.cache
def inputs(base_dtype: str, model_dtypes: tuple[str, ...], n: int, seed: int = 0):
    """A base chunk and N fine-tune chunks (base + small deltas), as stored arrays.

    Values spread over many binades so that rounding is exercised; cached per module (the
    numpy arrays, read-only, are shared by the tests that ask for the same inputs)."""
    rng = np.random.default_rng([seed, n, len(model_dtypes)])
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-12, 4, n))).astype(np.float32)
    base = ref.from_float32(x, base_dtype)
    models = []
    for dt in model_dtypes:
        delta = rng.standard_normal(n).astype(np.float32) * np.float32(0.01) * x
        models.append(ref.from_float32(x + delta, dt))
    for a in (base, *models):
        a.setflags(write=False)
    return base, tuple(models)


def run_both(base, base_dtype, models, model_dtypes, out_dtype, **recipe):
    """(kernel output, reference output) as stored arrays; ``base`` None: base absent."""
    n = len(models[0])
    out = torch.empty(n, dtype=TORCH[out_dtype], device=DEVICE)
    ids = recipe.pop("model_ids", None)
    merge_chunk_triton(
        None if base is None else to_torch(base, base_dtype),
        [to_torch(m, dt) for m, dt in zip(models, model_dtypes)],
        out,
        model_ids=ids,
        **recipe,
    )
    want = ref.spec_merge(
        base,
        base_dtype,
        list(models),
        list(model_dtypes),
        out_dtype,
        model_ids=list(range(len(models))) if ids is None else list(ids),
        **recipe,
    )
    return to_numpy(out), want


def weights_for(n_models: int) -> list[float]:
    """Weights that are not exact in float32 and include a negative one."""
    return [0.3 + 0.1 * k for k in range(n_models - 1)] + [-0.15]


# ----------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------

STARTS = ("zero", "straddle", "past", "top")


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("n", [1, 5, 1000])
@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_matches_reference_small(case, n, n_models, p):
    """dtypes x sizes 1, 5, 1000 x N x p, one program each; the start rotates through
    0 / straddling 2**32 / past 2**32 / the top of the index range over the grid."""
    base_dtype, pattern, out_dtype = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(n_models))
    base, models = inputs(base_dtype, model_dtypes, n)
    i = list(DTYPE_CASES).index(case) + n + n_models + int(p * 10)
    start = _start(STARTS[i % len(STARTS)], n)
    got, want = run_both(
        base,
        base_dtype,
        models,
        model_dtypes,
        out_dtype,
        key=KEY,
        start=start,
        drop=[p] * n_models,
        weights=weights_for(n_models),
        scale=0.9,
    )
    assert_same_bytes(got, want, out_dtype, f"{case} n={n} N={n_models} p={p} start={start}")


# Every dtype case with (N, p) in (2, 0.5), (3, 0.9), (5, 0.5); bf16 and f16 also with the
# other (N, p) pairs of the grid (the interpreter runs five programs per launch here).
GRID_4099 = (
    [(case, 2, 0.5) for case in DTYPE_CASES]
    + [(case, n_models, p) for case in DTYPE_CASES for n_models, p in ((3, 0.9), (5, 0.5))]
    + [
        (case, n_models, p)
        for case in ("bf16", "f16")
        for n_models, p in ((2, 0.0), (2, 0.9), (3, 0.0), (3, 0.5), (5, 0.0), (5, 0.9))
    ]
)


@pytest.mark.parametrize("case,n_models,p", GRID_4099)
def test_matches_reference_4099(case, n_models, p):
    """4099 elements: five programs of 1024, the last partial, with the chunk straddling
    2**32 (the carry into Philox counter word 1 happens mid-block)."""
    base_dtype, pattern, out_dtype = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(n_models))
    base, models = inputs(base_dtype, model_dtypes, 4099)
    start = _start("straddle", 4099)
    got, want = run_both(
        base,
        base_dtype,
        models,
        model_dtypes,
        out_dtype,
        key=KEY,
        start=start,
        drop=[p] * n_models,
        weights=weights_for(n_models),
        scale=1.0,
    )
    assert_same_bytes(got, want, out_dtype, f"{case} n=4099 N={n_models} p={p}")


# ----------------------------------------------------------------------------------------
# Per-model drop rates, model ids, base absent, special values, rounding
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "drop,ids",
    [
        ([0.9, 0.0, 0.3, 0.5, 0.999], None),  # per-model p, one model never dropped
        ([0.5, 0.2, 0.7, 0.4, 0.6], [7, 0, 4, 13, 2]),  # counter groups 1, 0, 1, 3, 0
        ([0.5, 0.5], [2**32 - 1, 3]),  # the largest j: group 2**30 - 1, word 3
        ([0.25], [6]),  # a single participating model (a segment only it covers)
        ([2.5e-10, 0.999999], None),  # thresholds 1 and 2**32 - 4295
    ],
)
def test_per_model_drop_and_model_ids(drop, ids):
    n = 1500
    model_dtypes = tuple(("BF16", "F16", "F32")[k % 3] for k in range(len(drop)))
    base, models = inputs("BF16", model_dtypes, n, seed=1)
    got, want = run_both(
        base,
        "BF16",
        models,
        model_dtypes,
        "BF16",
        key=KEY,
        start=2**32 - 700,
        drop=drop,
        weights=weights_for(len(drop)),
        scale=1.25,
        model_ids=ids,
    )
    assert_same_bytes(got, want, "BF16", f"drop={drop} ids={ids}")
    if drop[0] >= 0.5:
        # Model 0's mask is live: different rates must give different outputs somewhere.
        assert not np.array_equal(
            got,
            run_both(
                base,
                "BF16",
                models,
                model_dtypes,
                "BF16",
                key=KEY,
                start=2**32 - 700,
                drop=[0.0] * len(drop),
                weights=weights_for(len(drop)),
                scale=1.25,
                model_ids=ids,
            )[0],
        )


@pytest.mark.parametrize("word", [0, 1, 2, 3, 5])
def test_threshold_boundary_is_inclusive(word):
    """kept = r >= floor(p * 2**32), unsigned: with p = r / 2**32 for one element's Philox
    word r, that element is kept; with p = (r + 1) / 2**32 it is dropped."""
    n, start, t = 64, 2**32 + 100, 10
    i = np.arange(start, start + n, dtype=np.uint64)
    m32 = np.uint64(0xFFFFFFFF)
    words = ref.philox4x32_10(
        (i & m32).astype(np.uint32),
        (i >> np.uint64(32)).astype(np.uint32),
        np.full(n, word // 4, np.uint32),
        np.zeros(n, np.uint32),
        np.uint32(KEY & 0xFFFFFFFF),
        np.uint32(KEY >> 32),
    )
    r = int(words[word % 4][t])
    assert 0 < r < 2**32 - 1
    ones = np.ones(n, np.float32)
    for p, kept in ((r / 2**32, True), ((r + 1) / 2**32, False)):
        got, want = run_both(
            np.zeros(n, np.float32),
            "F32",
            [ones],
            ["F32"],
            "F32",
            key=KEY,
            start=start,
            drop=[p],
            weights=[1.0],
            scale=1.0,
            model_ids=[word],
        )
        assert_same_bytes(got, want, "F32", f"p = {p}")
        assert (got[t] != 0) == kept, (p, got[t])


@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("case", ["f32", "bf16", "bf16-base-mixed-models-f32-out"])
def test_base_absent(case, n_models):
    """base None: x_b = +0.0 (vocabulary rows the base lacks); a -0.0 model value stays
    -0.0 in d, and the stored value matches the reference."""
    _, pattern, out_dtype = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(n_models))
    _, models = inputs("F32", model_dtypes, 1025, seed=2)
    models = [m.copy() for m in models]
    for m, dt in zip(models, model_dtypes):
        m[:3] = ref.from_float32(np.array([-0.0, 0.0, -1e-30], np.float32), dt)
    got, want = run_both(
        None,
        None,
        models,
        model_dtypes,
        out_dtype,
        key=KEY,
        start=2**33,
        drop=[0.5] * n_models,
        weights=weights_for(n_models),
        scale=1.0,
    )
    assert_same_bytes(got, want, out_dtype, f"{case} base absent")


def special_values(dtype: str) -> np.ndarray:
    """NaN (quiet, signaling, negative), +-inf, +-0, subnormals of the dtype and of float32,
    the largest finite values, and values next to them, as stored arrays."""
    f = np.float32
    common = [
        np.nan,
        -np.nan,
        np.inf,
        -np.inf,
        0.0,
        -0.0,
        1.0,
        -1.0,
        3.0e38,
        -3.4e38,
        1e-40,
        -1e-45,
        1.17e-38,
        6.0e-8,
        5.96e-8,
        -6.1e-5,
        65504.0,
        65520.0,
        -65519.0,
        1.0e-3,
        2.0e-44,
    ]
    x = np.array(common, dtype=f)
    if dtype == "F32":
        extra = np.array(
            [0x7F800001, 0xFFC00001, 0x7FFFFFFF, 0x00000001, 0x807FFFFF, 0x7F7FFFFF],
            dtype=np.uint32,
        ).view(f)
        return np.concatenate([x, extra])
    if dtype == "F16":
        with np.errstate(over="ignore"):
            h = x.astype(np.float16)
        extra = np.array([0x0001, 0x83FF, 0x7BFF, 0x7C01, 0xFE00, 0x0400], np.uint16)
        return np.concatenate([h, extra.view(np.float16)])
    bits = ref.from_float32(x, "BF16")
    extra = np.array([0x0001, 0x807F, 0x0080, 0x7F7F, 0xFF7F, 0x7F81, 0xFFC1], np.uint16)
    return np.concatenate([bits, extra])


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_special_values(case, p):
    """Every special value of each input dtype, as the base and as each fine-tune (all
    pairings, shifted per model), through the merge and into every output dtype."""
    base_dtype, pattern, out_dtype = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(3))
    sb = special_values(base_dtype)
    sm = [special_values(dt) for dt in model_dtypes]
    size = max(len(sb), *(len(s) for s in sm))
    # All (base, model 0) pairs; models 1 and 2 take shifted copies of their lists.
    ib, i0 = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    ib, i0 = ib.ravel(), i0.ravel()
    base = sb[ib % len(sb)]
    models = [sm[0][i0 % len(sm[0])]] + [
        s[(i0 * (k + 2) + ib) % len(s)] for k, s in enumerate(sm[1:])
    ]
    got, want = run_both(
        base,
        base_dtype,
        models,
        model_dtypes,
        out_dtype,
        key=KEY,
        start=2**32 - 300,
        drop=[p, p, 0.3],
        weights=[0.7, 0.5, -0.2],
        scale=1.5,
    )
    assert_same_bytes(got, want, out_dtype, f"{case} special values p={p}")
    assert is_nan(got, out_dtype).any()  # the NaNs reached the output


@pytest.mark.parametrize("out_dtype", ["F16", "BF16"])
def test_rounding_of_float32_bit_patterns(out_dtype):
    """One model, no base, p = 0, w = s = 1: out = x, so the store rounds arbitrary float32
    values (random bit patterns, ties at the rounding bit, subnormals, overflow to inf,
    NaN). The reference agrees with torch's own conversion on every non-NaN value."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 6000, dtype=np.uint64).astype(np.uint32)
    near = rng.integers(0x33000000, 0x47800000, 4000, dtype=np.uint64).astype(np.uint32)
    ties = (near & ~np.uint32(0x1FFF)) | np.uint32(0x1000)  # f16 ties in the normal range
    ties16 = (near & ~np.uint32(0xFFFF)) | np.uint32(0x8000)  # bf16 ties
    # NaNs whose rounding would carry: 0x7FFFFFFF is the NaN a GPU's arithmetic returns.
    nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC0FFFF, 0x7F80FFFF, 0xFFBF8000], np.uint32)
    x = np.concatenate([bits, near, ties, ties16, ties16 | np.uint32(1), nans]).view(np.float32)
    got, want = run_both(
        None,
        None,
        [x],
        ["F32"],
        out_dtype,
        key=KEY,
        start=0,
        drop=[0.0],
        weights=[1.0],
        scale=1.0,
    )
    assert_same_bytes(got, want, out_dtype, f"F32 -> {out_dtype}")
    x = np.where(x == 0, np.float32(0.0), x)  # out = +0.0 for -0.0 (acc = +0.0 + -0.0)
    ok = ~np.isnan(x)
    theirs = to_numpy(torch.from_numpy(x[ok]).to(TORCH[out_dtype]))
    assert np.array_equal(theirs.view(UINT[out_dtype]), want[ok].view(UINT[out_dtype]))


# ----------------------------------------------------------------------------------------
# Chunking, layouts, keys
# ----------------------------------------------------------------------------------------


def test_chunking_does_not_change_the_bytes():
    """The same tensor merged in one launch or in chunks (any start) gives the same bytes."""
    n = 3000
    base, models = inputs("BF16", ("BF16", "BF16", "F16"), n, seed=4)
    recipe = {"drop": [0.5, 0.9, 0.3], "weights": [0.5, 0.3, 0.2], "scale": 1.0}
    t0 = 2**32 - 1234
    b, ms = (
        to_torch(base, "BF16"),
        [to_torch(m, d) for m, d in zip(models, ("BF16",) * 2 + ("F16",))],
    )
    whole = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    merge_chunk_triton(b, ms, whole, key=KEY, start=t0, **recipe)
    pieces = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    for lo, hi in [(0, 1000), (1000, 1001), (1001, n)]:
        merge_chunk_triton(
            b[lo:hi], [m[lo:hi] for m in ms], pieces[lo:hi], key=KEY, start=t0 + lo, **recipe
        )
    assert torch.equal(whole.view(torch.int16), pieces.view(torch.int16))


def test_models_as_rows_of_one_buffer():
    """models given as a 2-D [N, n] view of a wider buffer (the GPU pipeline's layout) and as
    a list of 1-D tensors give the same bytes; the key changes the masks."""
    n, cap = 777, 1000
    base, models = inputs("BF16", ("BF16",) * 3, n, seed=5)
    buf = torch.zeros(3, cap, dtype=torch.bfloat16, device=DEVICE)
    for r, m in enumerate(models):
        buf[r, :n] = to_torch(m, "BF16")
    recipe = {"start": 7, "drop": [0.5] * 3, "weights": [0.4, 0.4, 0.2], "scale": 1.0}
    b = to_torch(base, "BF16")
    rows = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    listed = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    other_key = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    assert merge_chunk_triton(b, buf[:, :n], rows, key=KEY, **recipe) is rows
    merge_chunk_triton(b, [to_torch(m, "BF16") for m in models], listed, key=KEY, **recipe)
    merge_chunk_triton(b, buf[:, :n], other_key, key=KEY ^ 1, **recipe)
    assert torch.equal(rows.view(torch.int16), listed.view(torch.int16))
    assert not torch.equal(rows.view(torch.int16), other_key.view(torch.int16))
    want = ref.spec_merge(
        base, "BF16", list(models), ["BF16"] * 3, "BF16", key=KEY, model_ids=[0, 1, 2], **recipe
    )
    assert_same_bytes(to_numpy(rows), want, "BF16", "2-D models")


def test_keys_across_the_int64_range():
    """Keys with high words 0, small and near 2**31 (the key's top bit is always clear)."""
    base, models = inputs("F32", ("F32", "F32"), 300, seed=6)
    for key in (0, 1, 2**32 - 1, 2**32, 2**62 + 12345, 2**63 - 1):
        got, want = run_both(
            base,
            "F32",
            models,
            ("F32", "F32"),
            "F32",
            key=key,
            start=2**32 + 5,
            drop=[0.5, 0.5],
            weights=[0.5, 0.5],
            scale=1.0,
        )
        assert_same_bytes(got, want, "F32", f"key={key}")


# ----------------------------------------------------------------------------------------
# Launcher checks
# ----------------------------------------------------------------------------------------


def _args(n: int = 8, dtype=torch.bfloat16):
    base = torch.zeros(n, dtype=dtype, device=DEVICE)
    models = [torch.ones(n, dtype=dtype, device=DEVICE) for _ in range(2)]
    out = torch.empty(n, dtype=dtype, device=DEVICE)
    kw = {"key": 1, "start": 0, "drop": [0.5, 0.5], "weights": [0.5, 0.5], "scale": 1.0}
    return base, models, out, kw


def test_launcher_returns_out_and_handles_empty_chunks():
    base, models, out, kw = _args()
    assert merge_chunk_triton(base, models, out, **kw) is out
    e = torch.empty(0, dtype=torch.bfloat16, device=DEVICE)
    assert merge_chunk_triton(e, [e, e], e, **kw) is e


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda b, m, o, kw: (b.double(), m, o, kw), TypeError, "base has dtype torch.float64"),
        (lambda b, m, o, kw: (b, [m[0], m[1].int()], o, kw), TypeError, r"models\[1\] has dtype"),
        (lambda b, m, o, kw: (b, m, o.to(torch.int16), kw), TypeError, "out has dtype"),
        (lambda b, m, o, kw: (b, [m[0], np.ones(8)], o, kw), TypeError, "must be a torch.Tensor"),
        (lambda b, m, o, kw: (b, m, np.ones(8), kw), TypeError, "out must be a torch.Tensor"),
        (lambda b, m, o, kw: (b[:7], m, o, kw), ValueError, r"base has shape \(7,\)"),
        (lambda b, m, o, kw: (b, [m[0], m[1].reshape(2, 4)], o, kw), ValueError, "shape"),
        (
            lambda b, m, o, kw: (b, [m[0], torch.ones(16, dtype=torch.bfloat16)[::2]], o, kw),
            ValueError,
            "contiguous",
        ),
        (
            lambda b, m, o, kw: (
                b,
                [m[0], torch.empty(8, dtype=torch.bfloat16, device="meta")],
                o,
                kw,
            ),
            ValueError,
            "on meta",
        ),
        (lambda b, m, o, kw: (b, m, o, {**kw, "drop": [0.5, 1.0]}), ValueError, "0 <= p < 1"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "drop": [-0.1, 0.5]}), ValueError, "0 <= p < 1"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "drop": [float("nan"), 0.5]}), ValueError, "p < 1"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "drop": [0.5]}), ValueError, "one entry per model"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "model_ids": [0, 2**32]}), ValueError, "model id"),
        (
            lambda b, m, o, kw: (b, m, o, {**kw, "weights": [float("inf"), 0.5]}),
            ValueError,
            "weights must be finite",
        ),
        (lambda b, m, o, kw: (b, m, o, {**kw, "scale": float("nan")}), ValueError, "scale"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "key": 2**63}), ValueError, "key"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "key": -1}), ValueError, "key"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "key": 1.5}), TypeError, "integer"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "start": -1}), ValueError, "start"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "start": 2**63 - 7}), ValueError, "start"),
        (
            lambda b, m, o, kw: (b, [], o, {**kw, "drop": [], "weights": []}),
            ValueError,
            "at least one",
        ),
        (lambda b, m, o, kw: (b, torch.stack(m), o.reshape(2, 4), kw), ValueError, "2-D"),
    ],
)
def test_launcher_rejects_bad_arguments(mutate, exc, match):
    base, models, out, kw = _args()
    b, m, o, k = mutate(base, models, out, kw)
    before = out.clone()
    with pytest.raises(exc, match=match):
        merge_chunk_triton(b, m, o, **k)
    assert torch.equal(out.view(torch.int16), before.view(torch.int16))  # nothing written


# ----------------------------------------------------------------------------------------
# The compiled kernel (GPU code)
# ----------------------------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    # Compile for sm_90 with ptxas shipped in triton: no GPU needed (a stub driver names
    # the target). Prints the PTX of N = 2 bf16 and N = 5 mixed dtypes, fusion off and on.
    import os, re, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class StubDriver:
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")

    driver.set_active(StubDriver())
    from streammerge.kernels import triton_merge as tm

    def ptx(dtypes, fusion):
        n = 1 << 20
        ms = tuple(torch.empty(n, dtype=getattr(torch, d)) for d in dtypes)
        N = len(dtypes)
        k = tm._m3_dare_kernel.warmup(
            ms[0], ms, ms[0], tuple([2**33 + 2**32 + 1] * N), tuple([2.0] * N), tuple([0.5] * N),
            1.0, n, 2**40, 2**33, None, None, MODEL_IDS=tuple(range(N)), MASKED=(True,) * N,
            DRAW=tuple(j % 4 == 0 for j in range(N)), HAS_BASE=True, WINDOW=False, SIGN=False,
            NORMALIZE=False, LINEAR=False, BLOCK=1024, num_warps=4, enable_fp_fusion=fusion,
            grid=(1,))
        return k.asm["ptx"]

    for name, dtypes in (("n2", ["bfloat16"] * 2), ("n5", ["bfloat16", "float16", "float32"] * 2)):
        for fusion in (False, True):
            open(os.path.join(sys.argv[1], f"{name}_{fusion}.ptx"), "w").write(
                ptx(dtypes[:5], fusion))
    """
)


def test_compiled_ptx_has_no_fma_and_vector_loads(tmp_path):
    """The kernel compiles for sm_90 (no GPU needed): with enable_fp_fusion=False every
    float32 add/sub/mul is a separate .rn instruction (no fma, no ftz); with it on, fma
    appears (so the flag is what prevents it); N = 2 bf16 loads each input with one 16-byte
    vector load per thread and draws Philox once for both models; N = 5 draws it twice."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(tmp_path)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        pytest.fail(f"compiling for sm_90 failed:\n{r.stderr[-4000:]}")
    import re

    def read(name):
        return (tmp_path / name).read_text()

    for name in ("n2", "n5"):
        strict, fused = read(f"{name}_False.ptx"), read(f"{name}_True.ptx")
        assert not re.search(r"\bfma\.", strict), name
        assert ".ftz" not in strict, name
        assert not re.search(r"\b(add|sub|mul)\.f32", strict), name  # all .rn: no contraction
        assert re.search(r"\bfma\.", fused), name  # fusion on would fuse: the flag matters
    n2, n5 = read("n2_False.ptx"), read("n5_False.ptx")
    assert len(re.findall(r"ld\.global\.v4\.b32", n2)) == 3  # base + 2 models, 16 B each
    assert len(re.findall(r"st\.global\.v4\.b32", n2)) == 1
    # Philox: 2 mul.hi per round x 10 rounds x 8 elements per thread, once per counter group.
    hi2, hi5 = len(re.findall(r"mul\.hi", n2)), len(re.findall(r"mul\.hi", n5))
    assert 100 < hi2 <= 160 and 1.8 < hi5 / hi2 < 2.2, (hi2, hi5)


# ----------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"
)

_CUDA_SCRIPT = textwrap.dedent(
    """
    # Runs the compiled kernel on the GPU, saves its output bytes, then launches it again
    # with other key, start, p, w, s and prints how many kernels were compiled in all.
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import numpy as np, torch
    from streammerge.kernels import triton_merge
    from streammerge.kernels.triton_merge import merge_chunk_triton
    d = np.load(sys.argv[1])
    t = lambda a, dt: torch.from_numpy(a.copy()).view(dt).cuda()
    base = t(d["base"], torch.bfloat16)
    models = [t(d["m0"], torch.bfloat16), t(d["m1"], torch.float16), t(d["m2"], torch.float32)]
    out = torch.empty(len(d["base"]), dtype=torch.bfloat16, device="cuda")
    merge_chunk_triton(base, models, out, key=int(d["key"]), start=int(d["start"]),
                       drop=[0.5, 0.9, 0.0], weights=[0.5, 0.3, 0.2], scale=1.0)
    np.save(sys.argv[2], out.view(torch.int16).cpu().numpy())
    for key, start, p, w, s in [(2, 1, 0.3, 0.1, 2.0), (2**62 + 3, 2**33 + 7, 0.75, -1.0, 1.0),
                                (17, 2**32 - 5, 2.5e-10, 0.25, 0.5)]:
        merge_chunk_triton(base, models, out, key=key, start=start, drop=[p, 0.9, 0.0],
                           weights=[w, 0.3, 0.2], scale=s)
    torch.cuda.synchronize()
    caches = triton_merge._m3_dare_kernel.device_caches
    print("compiled", sum(len(c[0]) for c in caches.values()))
    """
)


@needs_cuda
def test_cuda_launch_matches_reference(tmp_path):
    """The compiled kernel on the GPU (a child process without TRITON_INTERPRET) gives the
    reference's bytes, on 2**20 + 3 elements straddling 2**32 (many blocks), and new key,
    start, p, w and s values reuse the one compiled kernel (they are runtime arguments)."""
    n, start = 2**20 + 3, 2**32 - 2**19
    base, models = inputs("BF16", ("BF16", "F16", "F32"), n, seed=7)
    np.savez(
        tmp_path / "in.npz",
        base=base.view(np.int16),
        m0=models[0].view(np.int16),
        m1=models[1],
        m2=models[2],
        key=KEY,
        start=start,
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _CUDA_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    got = np.load(tmp_path / "out.npy").view(np.uint16)
    want = ref.spec_merge(
        base,
        "BF16",
        list(models),
        ["BF16", "F16", "F32"],
        "BF16",
        key=KEY,
        start=start,
        model_ids=[0, 1, 2],
        drop=[0.5, 0.9, 0.0],
        weights=[0.5, 0.3, 0.2],
        scale=1.0,
    )
    assert_same_bytes(got, want, "BF16", "CUDA launch")
    assert r.stdout.split()[-2:] == ["compiled", "1"], r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the bench measures for real")
def test_bench_without_a_gpu_says_so():
    """bench/bench_kernel.py exits with status 2 and a message naming the missing GPU."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "bench_kernel.py"
    r = subprocess.run(
        [sys.executable, str(bench), "--sizes", "1K"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("bench_kernel:") and "GPU" in r.stderr
