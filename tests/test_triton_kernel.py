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
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import spec_reference as ref
from ptx_stub import compile_in_child, stub_driver_preamble
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
# v2 methods (SPEC "Methods"): keep window, sign consensus, normalize, linear
# ----------------------------------------------------------------------------------------


@functools.cache
def tie_inputs(base_dtype: str | None, model_dtypes: tuple[str, ...], n: int, seed: int = 0):
    """A base and N fine-tunes for the v2 methods, as stored arrays (base None: absent).

    Task vectors tie often (60% of the elements move by k * 2**-8, k in -6..6, the others by
    a random 1%), so thresholds fall on tied magnitudes; elements 0..39 equal the base in
    every model (S = 0: no model agrees, den = 0 -> 1) and model 1 also equals it up to
    n // 3 (a stretch of zero task vector). The base takes multiples of 2**-6 there, exact
    in every dtype, so d = 0 exactly whatever the dtypes."""
    rng = np.random.default_rng([seed, n, len(model_dtypes), 2])
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-4, 3, n))).astype(np.float32)
    x[: n // 3] = rng.integers(-100, 101, n // 3).astype(np.float32) * np.float32(2**-6)
    base = None if base_dtype is None else ref.from_float32(x, base_dtype)
    xb = x if base is None else ref.to_float32(base, base_dtype)
    models = []
    for k, dt in enumerate(model_dtypes):
        step = rng.integers(-6, 7, n).astype(np.float32) * np.float32(2**-8)
        noise = rng.standard_normal(n).astype(np.float32) * np.float32(0.01) * xb
        m = xb + np.where(rng.random(n) < 0.6, step, noise).astype(np.float32)
        m[: n // 3 if k == 1 else 40] = x[: n // 3 if k == 1 else 40]
        models.append(ref.from_float32(m, dt))
    for a in (base, *models):
        if a is not None:
            a.setflags(write=False)
    return base, tuple(models)


def v2_kernel_args(method: str, entries: list, recipe: dict) -> dict:
    """The kernel arguments (merge_chunk_triton and numba merge_arrays alike) for one SPEC v2
    method: its thresholds entries as keep windows, its consensus, normalize and linear."""
    _, sparsifier, consensus, normalize = ref.METHODS[method]
    n_models = len(entries)
    if recipe.get("normalize") is not None:
        normalize = recipe["normalize"]
    if sparsifier != "dare":
        drop = [0.0] * n_models
    elif recipe.get("drop") is not None:
        drop = list(recipe["drop"])
    else:
        drop = [1.0 - float(r) for r in recipe["density"]]  # float64, as SPEC says
    kw = {
        "key": recipe["key"],
        "start": recipe.get("start", 0),
        "drop": drop,
        "weights": list(recipe["weights"]),
        "scale": recipe.get("scale", 1.0),
        "model_ids": recipe.get("model_ids"),
        "consensus": consensus,
        "normalize": bool(normalize),
        "linear": method == "linear",
        "compute_dtype": recipe.get("compute_dtype", "F32"),
    }
    if sparsifier in ("magnitude", "breadcrumbs"):
        windows = [ref.spec_keep_window(e, sparsifier) for e in entries]
        kw["keep_lo"] = [lo for lo, _ in windows]
        kw["keep_hi"] = [hi for _, hi in windows]
    return kw


def run_v2(method, base, base_dtype, models, model_dtypes, out_dtype, **recipe):
    """(kernel output, reference output, thresholds entries, kernel arguments): the
    reference ``spec_merge_v2`` computes the thresholds (trim_scope tensor over these
    elements, unless ``thresholds`` is given) and the kernel gets them as keep windows."""
    want, entries = ref.spec_merge_v2(
        base,
        list(models),
        out_dtype,
        method=method,
        base_dtype=base_dtype,
        model_dtypes=list(model_dtypes),
        **recipe,
    )
    kw = v2_kernel_args(method, entries, recipe)
    out = torch.empty(len(models[0]), dtype=TORCH[out_dtype], device=DEVICE)
    merge_chunk_triton(
        None if base is None else to_torch(base, base_dtype),
        [to_torch(m, dt) for m, dt in zip(models, model_dtypes)],
        out,
        **kw,
    )
    return to_numpy(out), want, entries, kw


def per_model(values: list, n_models: int) -> list:
    return [values[k % len(values)] for k in range(n_models)]


#: SPEC v2 rows with per-model parameters cycled over the N models: densities include 1.0
#: (magnitude keeps all, breadcrumbs L = a[0]) and 0.2; gammas include 0.
V2_RECIPES = {
    "ties": {"method": "ties", "density": [0.5, 0.3, 1.0, 0.7, 0.2]},
    "ties-unnormalized": {"method": "ties", "density": [0.4, 0.6], "normalize": False},
    "dare_ties": {"method": "dare_ties", "density": [0.5, 0.1, 1.0, 0.7, 0.3]},
    "dare_ties-normalized": {"method": "dare_ties", "density": [0.6, 0.2], "normalize": True},
    "breadcrumbs": {
        "method": "breadcrumbs",
        "density": [0.5, 0.8, 0.3],
        "gamma": [0.1, 0.0, 0.25],
    },
    "breadcrumbs_ties": {
        "method": "breadcrumbs_ties",
        "density": [0.6, 0.3, 1.0, 0.4, 0.9],
        "gamma": [0.05, 0.2, 0.0, 0.5, 0.01],
    },
    "linear": {"method": "linear"},
    "linear-unnormalized": {"method": "linear", "normalize": False},
    "task_arithmetic-normalized": {"method": "task_arithmetic", "normalize": True},
    "dare_linear-normalized": {"method": "dare_linear", "density": [0.5, 0.7], "normalize": True},
}
V2_DTYPES = ["bf16", "f16", "f32", "bf16-base-mixed-models-f32-out"]


def v2_recipe(name: str, n_models: int, start: int, **over) -> dict:
    recipe = {"key": KEY, "start": start, "weights": weights_for(n_models), "scale": 0.9}
    for k, v in V2_RECIPES[name].items():
        recipe[k] = per_model(v, n_models) if isinstance(v, list) else v
    recipe.update(over)
    return recipe


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("case", V2_DTYPES)
@pytest.mark.parametrize("name", list(V2_RECIPES))
def test_v2_methods_match_reference(name, case, n_models):
    """Every v2 row x dtypes x N on 2051 elements (three programs, the last partial), with
    negative weights, ties at the thresholds and zero task vectors; the start rotates
    through 0 / straddling 2**32 / past 2**32 / the top of the index range."""
    base_dtype, pattern, out_dtype = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(n_models))
    n = 2051
    recipe = v2_recipe(name, n_models, 0)
    if recipe["method"] == "linear":
        base_dtype = None
    base, models = tie_inputs(base_dtype, model_dtypes, n)
    i = list(V2_RECIPES).index(name) + V2_DTYPES.index(case) + n_models
    recipe["start"] = _start(STARTS[i % len(STARTS)], n)
    got, want, entries, _ = run_v2(
        recipe.pop("method"), base, base_dtype, models, model_dtypes, out_dtype, **recipe
    )
    assert_same_bytes(got, want, out_dtype, f"{name} {case} N={n_models} {entries}")


def test_v2_inputs_tie_at_the_thresholds():
    """The grid's inputs do what it claims: magnitude and breadcrumbs thresholds fall on
    magnitudes a hundred elements or more share (models 0 and 2; model 1 is zero on a
    third), model 1's task vector is zero there, and the sign election rejects models."""
    model_dtypes = ("BF16", "F16", "F32")
    n = 2051
    base, models = tie_inputs("BF16", model_dtypes, n)
    xb = ref.to_float32(base, "BF16")
    ds = [ref.to_float32(m, dt) - xb for m, dt in zip(models, model_dtypes)]
    mags = [ref.spec_mag(d) for d in ds]
    for sparsifier, density, gamma in (("magnitude", 0.5, None), ("breadcrumbs", 0.6, 0.05)):
        for mag in (mags[0], mags[2]):
            for t in ref.spec_thresholds(sparsifier, mag, density, gamma):
                assert (mag == t).sum() >= 100, (sparsifier, t)
    assert (mags[1][: n // 3] == 0).all() and (mags[1][n // 3 :] != 0).mean() > 0.9
    wd = [np.float32(w) * d for w, d in zip(weights_for(3), ds)]
    s = wd[0] + wd[1] + wd[2]
    disagree = [((x > 0) & (s < 0)) | ((x < 0) & (s >= 0)) for x in wd]
    assert all(a.sum() > 100 for a in disagree)


@pytest.mark.parametrize(
    "method,weights,tiny",
    [
        ("task_arithmetic", [float(np.float32(1e-8)), 0.0], True),  # float32(1e-8) < 1e-8
        ("task_arithmetic", [-float(np.float32(1e-8)), 0.0], True),
        ("task_arithmetic", [float(np.nextafter(np.float32(1e-8), np.float32(1))), 0.0], False),
        ("task_arithmetic", [0.5, -0.5], True),  # den = +0.0
        ("task_arithmetic", [0.7, -0.3, -0.4], False),  # den = float32 rounding residue
        ("dare_linear", [3e-9, 7e-9, -1e-10], True),
        ("linear", [0.25, -0.25, 1e-9], True),
    ],
)
def test_v2_normalize_tiny_denominator(method, weights, tiny):
    """consensus none: den = sum of float32(w) in order, replaced by 1 when |den| < 1e-8 as
    real numbers (the boundary is float32(1e-8), which is below 1e-8)."""
    n_models = len(weights)
    model_dtypes = ("F32",) * n_models
    base_dtype = None if method == "linear" else "F32"
    base, models = tie_inputs(base_dtype, model_dtypes, 1100, seed=3)
    recipe = {"key": KEY, "start": 2**32 + 3, "weights": weights, "normalize": True}
    if method == "dare_linear":
        recipe["drop"] = [0.5] * n_models
    got, want, _, _ = run_v2(method, base, base_dtype, models, model_dtypes, "F32", **recipe)
    assert_same_bytes(got, want, "F32", f"{method} w={weights}")
    den = np.float32(0.0)
    for w in weights:
        den = np.float32(den + np.float32(w))
    assert (abs(float(den)) < 1e-8) == tiny, den
    unnormalized, _, _, _ = run_v2(
        method, base, base_dtype, models, model_dtypes, "F32", **{**recipe, "normalize": False}
    )
    assert np.array_equal(got, unnormalized) == (tiny or den == 1), den


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "breadcrumbs"])
@pytest.mark.parametrize("which", ["one", "all"])
def test_v2_all_zero_task_vectors(method, which):
    """A fine-tune equal to the base (its mags all 0: T = 0 keeps all, breadcrumbs L = H = 0),
    or every fine-tune equal to it (S = 0, no model agrees, den = 1, out = base)."""
    model_dtypes = ("BF16", "BF16", "BF16")
    base, models = tie_inputs("BF16", model_dtypes, 1500, seed=4)
    models = list(models)
    for k in range(3 if which == "all" else 1):
        models[k] = base
    recipe = v2_recipe(method, 3, 2**40 + 17, normalize=True)
    recipe.pop("method")
    got, want, entries, _ = run_v2(method, base, "BF16", models, model_dtypes, "BF16", **recipe)
    assert_same_bytes(got, want, "BF16", f"{method} {which} zero {entries}")
    if which == "all":
        assert np.array_equal(got, base)


@pytest.mark.parametrize(
    "windows",
    [
        [(0x80000000, 0xFFFFFFFF), (0, 0xFFFFFFFF)],  # unsigned: a bound >= 2**31 keeps none
        [(0x7F800000, 0x7F800000), (0, 0x7F7FFFFF)],  # infinities only / every finite value
        [(1, 0), (0, 0)],  # keep none (an empty window) / zeros only
        [(0x7F800001, 0xFFFFFFFF), (0x3F800000, 0x3F800000)],  # NaNs only / |d| = 1 only
    ],
)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_v2_window_bounds_are_unsigned_and_inclusive(method, windows):
    """Keep windows at the uint32 extremes (special values as inputs): the comparison is
    unsigned 32-bit and inclusive at both ends."""
    base, models = _special_grid("F32", ("F32", "F32"))
    got, want, _, kw = run_v2(
        method,
        base,
        "F32",
        models,
        ("F32", "F32"),
        "F32",
        key=KEY,
        start=5,
        weights=[0.7, -0.2],
        scale=1.5,
        thresholds=[list(w) for w in windows],
    )
    assert kw["keep_lo"] == [w[0] for w in windows]
    assert_same_bytes(got, want, "F32", f"{method} {windows}")


def _special_grid(base_dtype: str, model_dtypes: tuple[str, ...]):
    """Every (base, model 0) pair of special values; other models take shifted copies."""
    sb = special_values(base_dtype)
    sm = [special_values(dt) for dt in model_dtypes]
    size = max(len(sb), *(len(s) for s in sm))
    ib, i0 = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    ib, i0 = ib.ravel(), i0.ravel()
    models = [sm[0][i0 % len(sm[0])]] + [
        s[(i0 * (k + 2) + ib) % len(s)] for k, s in enumerate(sm[1:])
    ]
    return sb[ib % len(sb)], models


@pytest.mark.parametrize(
    "name", ["ties", "dare_ties-normalized", "breadcrumbs_ties", "linear", "dare_linear-normalized"]
)
@pytest.mark.parametrize("case", ["f32", "bf16", "f16-base-bf16-models", "bf16-to-f16"])
def test_v2_special_values(name, case):
    """NaN, infinities, signed zeros, subnormals through every v2 path: the window on NaN and
    inf magnitudes, a NaN sum S (elects negative), inf - inf, division by den."""
    base_dtype, pattern, out_dtype = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(3))
    base, models = _special_grid(base_dtype, model_dtypes)
    recipe = v2_recipe(name, 3, 2**32 - 300, weights=[0.7, 0.5, -0.2], scale=1.5)
    method = recipe.pop("method")
    if method == "linear":
        base, base_dtype = None, None
    # Up to 34% of these task vectors are NaN: thresholds stay below the NaN magnitudes
    # (see the end) with a magnitude density >= 0.5 and breadcrumbs' gamma >= 0.4.
    if method == "ties":
        recipe["density"] = [0.5, 0.6, 1.0]
    if method == "breadcrumbs_ties":
        recipe["density"], recipe["gamma"] = [0.5, 0.3, 0.4], [0.4, 0.45, 0.5]
    got, want, entries, _ = run_v2(
        method, base, base_dtype, models, model_dtypes, out_dtype, **recipe
    )
    assert_same_bytes(got, want, out_dtype, f"{name} {case} special values {entries}")
    # Thresholds on NaN magnitudes would depend on NaN payloads, which differ across
    # devices (a GPU's arithmetic returns 0x7FFFFFFF): keep them finite so this test holds
    # bit for bit on a GPU too.
    assert all(t <= 0x7F800000 for e in entries if e for t in e), entries


def test_v2_chunking_does_not_change_the_bytes():
    """Thresholds of the whole tensor applied to chunks (any start): the same bytes as one
    launch, for a window + sign + DARE + normalize path."""
    n, t0 = 3001, 2**32 - 1500
    model_dtypes = ("BF16", "F16", "BF16")
    base, models = tie_inputs("BF16", model_dtypes, n, seed=5)
    for name in ("breadcrumbs_ties", "dare_ties-normalized", "ties"):
        recipe = v2_recipe(name, 3, t0)
        method = recipe.pop("method")
        whole, want, entries, _ = run_v2(
            method, base, "BF16", models, model_dtypes, "BF16", **recipe
        )
        assert_same_bytes(whole, want, "BF16", name)
        for k in ("density", "gamma"):
            recipe.pop(k, None) if method != "dare_ties" else None
        pieces = []
        for lo, hi in [(0, 1000), (1000, 1001), (1001, 2500), (2500, n)]:
            chunk_recipe = {**recipe, "start": t0 + lo}
            if entries[0] is not None:
                chunk_recipe["thresholds"] = entries
            got, _, _, _ = run_v2(
                method,
                base[lo:hi],
                "BF16",
                [m[lo:hi] for m in models],
                model_dtypes,
                "BF16",
                **chunk_recipe,
            )
            pieces.append(got)
        assert_same_bytes(np.concatenate(pieces), whole, "BF16", f"{name} chunked")


@pytest.mark.parametrize(
    "method,ids",
    [("dare_ties", [7, 0, 4]), ("dare_ties", [2**32 - 1, 3, 5]), ("ties", [9, 1, 2])],
)
def test_v2_model_ids(method, ids):
    """SPEC model indices other than 0..N-1 (Philox groups and words) with the v2 flags."""
    model_dtypes = ("BF16", "F16", "F32")
    base, models = tie_inputs("BF16", model_dtypes, 1500, seed=6)
    recipe = {"key": KEY, "start": 2**32 - 700, "weights": [0.5, 0.3, -0.4], "model_ids": ids}
    recipe["density"] = [0.5, 0.3, 0.8]
    got, want, _, _ = run_v2(
        method, base, "BF16", models, model_dtypes, "BF16", normalize=True, **recipe
    )
    assert_same_bytes(got, want, "BF16", f"{method} ids={ids}")


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "linear"])
def test_v2_single_model(name):
    """One participating model (a segment only it covers): the sign election of one."""
    base, models = tie_inputs(None if name == "linear" else "F16", ("BF16",), 1030, seed=7)
    recipe = v2_recipe(name, 1, 2**33, weights=[-0.6], normalize=True)
    method = recipe.pop("method")
    got, want, _, _ = run_v2(
        method, base, None if name == "linear" else "F16", models, ("BF16",), "F16", **recipe
    )
    assert_same_bytes(got, want, "F16", name)


def test_v2_defaults_and_trivial_windows_are_v1():
    """Explicit defaults (a window keeping everything, consensus none, no normalize, not
    linear) give v1's bytes."""
    model_dtypes = ("BF16", "F16", "F32")
    base, models = inputs("BF16", model_dtypes, 1500, seed=8)
    recipe = {"key": KEY, "start": 2**32 - 9, "drop": [0.5, 0.0, 0.3], "weights": [0.5, 0.3, -0.2]}
    got, want = run_both(base, "BF16", models, model_dtypes, "BF16", scale=0.75, **recipe)
    assert_same_bytes(got, want, "BF16", "v1")
    out = torch.empty(1500, dtype=torch.bfloat16, device=DEVICE)
    merge_chunk_triton(
        to_torch(base, "BF16"),
        [to_torch(m, dt) for m, dt in zip(models, model_dtypes)],
        out,
        scale=0.75,
        keep_lo=[0, 0, 0],
        keep_hi=[2**32 - 1] * 3,
        consensus="none",
        normalize=False,
        linear=False,
        **recipe,
    )
    assert_same_bytes(to_numpy(out), want, "BF16", "v1 with explicit defaults")


def _numba_merge_arrays():
    """kernels.cpu_merge.merge_arrays when it takes the v2 arguments, else skip."""
    try:
        from streammerge.kernels import cpu_merge
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        pytest.skip(f"the numba kernel does not import: {exc}")
    if "keep_lo" not in inspect.signature(cpu_merge.merge_arrays).parameters:
        pytest.skip("the numba kernel has no v2 arguments yet")
    return cpu_merge.merge_arrays


@pytest.mark.parametrize("n_models", [2, 5])
@pytest.mark.parametrize(
    "name", ["ties", "dare_ties-normalized", "breadcrumbs_ties", "linear", "dare_linear-normalized"]
)
def test_v2_matches_numba_kernel(name, n_models):
    """The Triton and numba kernels agree bit for bit on the same v2 arguments (bf16 base,
    mixed fine-tunes, bf16 out; 4099 elements: several blocks of each kernel)."""
    merge_arrays = _numba_merge_arrays()
    pattern = ("BF16", "F16", "F32")
    model_dtypes = tuple(pattern[k % 3] for k in range(n_models))
    recipe = v2_recipe(name, n_models, 5 * 2**32 + 11)
    method = recipe.pop("method")
    base_dtype = None if method == "linear" else "BF16"
    base, models = tie_inputs(base_dtype, model_dtypes, 4099, seed=9)
    got, want, _, kw = run_v2(method, base, base_dtype, models, model_dtypes, "BF16", **recipe)
    assert_same_bytes(got, want, "BF16", f"{name} vs reference")
    theirs = merge_arrays(
        base, list(models), "BF16", base_dtype=base_dtype, model_dtypes=list(model_dtypes), **kw
    )
    assert_same_bytes(got, theirs, "BF16", f"{name} vs numba")


@pytest.mark.parametrize("compute", ["BF16", "F16"])
@pytest.mark.parametrize("case", ["bf16", "f16", "bf16-base-mixed-models-f32-out"])
@pytest.mark.parametrize(
    "name", ["ties", "dare_ties-normalized", "breadcrumbs_ties", "task_arithmetic-normalized"]
)
def test_v3_working_dtype_matches_reference_and_numba(name, case, compute):
    """SPEC "Working dtype (v3)": every intermediate rounded to D (inputs of other dtypes
    rounded to D first), bit for bit as the reference and the numba kernel (3 models,
    2051 elements, a scale: the rd(s * m) step)."""
    merge_arrays = _numba_merge_arrays()
    base_dtype, pattern, out_dtype = DTYPE_CASES[case]
    model_dtypes = tuple(pattern[k % len(pattern)] for k in range(3))
    recipe = v2_recipe(name, 3, 2**32 - 700, compute_dtype=compute)
    method = recipe.pop("method")
    base, models = tie_inputs(base_dtype, model_dtypes, 2051, seed=4)
    got, want, _, kw = run_v2(method, base, base_dtype, models, model_dtypes, out_dtype, **recipe)
    assert_same_bytes(got, want, out_dtype, f"{name} {case} D={compute} vs reference")
    theirs = merge_arrays(
        base, list(models), out_dtype, base_dtype=base_dtype, model_dtypes=list(model_dtypes), **kw
    )
    assert_same_bytes(got, theirs, out_dtype, f"{name} {case} D={compute} vs numba")


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
        (lambda b, m, o, kw: (b, m, o, {**kw, "consensus": "mean"}), ValueError, "consensus"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "consensus": None}), ValueError, "consensus"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "keep_lo": [0, 2**32]}), ValueError, "keep_lo"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "keep_hi": [-1, 5]}), ValueError, "keep_hi"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "keep_hi": [5]}), ValueError, "one entry per"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "keep_lo": [0.5, 1]}), TypeError, "integer"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "normalize": "yes"}), TypeError, "normalize"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "linear": 1}), TypeError, "linear must be a bool"),
        (lambda b, m, o, kw: (b, m, o, {**kw, "linear": True}), ValueError, "base=None"),
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

_COMPILE_SCRIPT = stub_driver_preamble("90", "cpu") + textwrap.dedent(
    """
    # Compile for sm_90 with ptxas shipped in triton: no GPU needed (a stub driver names
    # the target). Prints the PTX of N = 2 bf16 and N = 5 mixed dtypes, fusion off and on.
    from streammerge.kernels import triton_merge as tm

    def ptx(dtypes, fusion, masked=True, window=False, sign=False, normalize=False,
            linear=False, lo=2**33 + 3, d=0):
        n = 1 << 20
        ms = tuple(torch.empty(n, dtype=getattr(torch, d)) for d in dtypes)
        N = len(dtypes)
        keep = (tuple([lo] * N), tuple([2**33 + 2**32 + 1] * N)) if window else (None, None)
        k = tm._task_vector_kernel.warmup(
            None if linear else ms[0], ms, ms[0], tuple([2**33 + 2**32 + 1] * N),
            tuple([2.0] * N), tuple([0.5] * N), 1.0, n, 2**40, 2**33, *keep,
            MODEL_IDS=tuple(range(N)), MASKED=(masked,) * N,
            DRAW=tuple(masked and j % 4 == 0 for j in range(N)), HAS_BASE=not linear,
            WINDOW=window, SIGN=sign, NORMALIZE=normalize, LINEAR=linear, D=d, BLOCK=1024,
            num_warps=4, enable_fp_fusion=fusion, grid=(1,))
        return k.asm["ptx"]

    def compiled():
        return sum(len(c[0]) for c in tm._task_vector_kernel.device_caches.values())

    v2 = {  # N = 2 bf16 as the v2 methods launch it
        "ties": dict(masked=False, window=True, sign=True, normalize=True),
        "dare_ties": dict(sign=True),
        "linear": dict(masked=False, normalize=True, linear=True),
        "ties_bf16": dict(masked=False, window=True, sign=True, normalize=True, d=2),
        "ties_f16": dict(masked=False, window=True, sign=True, normalize=True, d=1),
    }
    for name, dtypes in (("n2", ["bfloat16"] * 2), ("n5", ["bfloat16", "float16", "float32"] * 2)):
        for fusion in (False, True):
            open(os.path.join(sys.argv[1], f"{name}_{fusion}.ptx"), "w").write(
                ptx(dtypes[:5], fusion))
            for method, flags in v2.items():
                open(os.path.join(sys.argv[1], f"{name}_{method}_{fusion}.ptx"), "w").write(
                    ptx(dtypes[:5], fusion, **flags))
    before = compiled()
    ptx(["bfloat16"] * 2, False, lo=2**33 + 2 * 12345 + 1, **v2["ties"])  # other window
    print("recompiled", compiled() - before)
    """
)


def test_compiled_ptx_has_no_fma_and_vector_loads(tmp_path):
    """The kernel compiles for sm_90 (no GPU needed): with enable_fp_fusion=False every
    float32 add/sub/mul is a separate .rn instruction (no fma, no ftz); with it on, fma
    appears (so the flag is what prevents it); N = 2 bf16 loads each input with one 16-byte
    vector load per thread and draws Philox once for both models; N = 5 draws it twice. The
    v2 flags (ties, dare_ties, linear) keep all that, normalize with div.rn.f32, v1 has no
    division, and new keep-window bounds reuse the compiled kernel. The working dtypes BF16
    and F16 (SPEC v3) keep the same strictness."""
    r = compile_in_child(_COMPILE_SCRIPT, str(tmp_path), cache=tmp_path / "cache")
    import re

    def read(name):
        return (tmp_path / name).read_text()

    for name in ("n2", "n5"):
        strict, fused = read(f"{name}_False.ptx"), read(f"{name}_True.ptx")
        assert not re.search(r"\bfma\.", strict), name
        assert ".ftz" not in strict, name
        assert not re.search(r"\b(add|sub|mul)\.f32", strict), name  # all .rn: no contraction
        assert re.search(r"\bfma\.", fused), name  # fusion on would fuse: the flag matters
    for name in ("n2", "n5"):  # v2 methods: same strictness, IEEE division where normalized
        for method in ("ties", "dare_ties", "linear", "ties_bf16", "ties_f16"):
            strict = read(f"{name}_{method}_False.ptx")
            assert not re.search(r"\bfma\.", strict), (name, method)
            assert ".ftz" not in strict and ".approx" not in strict, (name, method)
            assert not re.search(r"\b(add|sub|mul|div)\.f32", strict), (name, method)
            assert ("div.rn.f32" in strict) == (method != "dare_ties"), (name, method)
        assert re.search(r"\bfma\.", read(f"{name}_ties_True.ptx")), name
        assert not re.search(r"\bdiv\.", read(f"{name}_False.ptx")), name  # v1: no division
    # One 16-byte load per input and thread in the sign consensus too (wd_j kept, not reloaded).
    for method, loads in (("ties", 3), ("dare_ties", 3), ("linear", 2)):
        assert len(re.findall(r"ld\.global\.v4\.b32", read(f"n2_{method}_False.ptx"))) == loads
    assert r.stdout.split()[-2:] == ["recompiled", "0"], r.stdout  # window bounds: runtime
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
    caches = triton_merge._task_vector_kernel.device_caches
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
