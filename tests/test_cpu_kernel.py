"""The numba CPU kernel (kernels/cpu_merge.py) against the numpy SPEC reference, bit for bit.

Outputs are compared as stored bytes; the one freedom SPEC allows is a NaN's bit pattern,
so two NaNs compare equal. Sizes include ones that do not divide the kernel's block, and
starts past 2**32 (Philox counter word 1).
"""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest
import spec_reference as ref
from streammerge.kernels import cpu_merge

DTYPES = ("F32", "F16", "BF16")
CARRIER = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
BITS = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}
KEY = ref.spec_key(20240611, "model.layers.0.mlp.up_proj.weight")


def assert_same_bits(got: np.ndarray, want: np.ndarray, dtype: str, what: str = "") -> None:
    """Equal stored bits, NaN == NaN; on failure print the first mismatches."""
    g = np.asarray(got).view(BITS[dtype])
    w = np.asarray(want).view(BITS[dtype])
    assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
    gf, wf = (
        ref.to_float32(g.view(CARRIER[dtype]), dtype),
        ref.to_float32(w.view(CARRIER[dtype]), dtype),
    )
    both_nan = np.isnan(gf) & np.isnan(wf)
    bad = np.flatnonzero((g != w) & ~both_nan)
    if bad.size:
        lines = [
            f"  [{i}] got {int(g[i]):#x} ({gf[i]!r}) want {int(w[i]):#x} ({wf[i]!r})"
            for i in bad[:8]
        ]
        raise AssertionError(
            f"{what}: {bad.size} of {g.size} {dtype} elements differ; first:\n" + "\n".join(lines)
        )


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to ``dtype``'s carrier (bf16 as uint16 bits)."""
    return ref.from_float32(np.asarray(x, np.float32), dtype)


SPECIALS = np.array(
    [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-45, 6e-8, -3e-5, 65504.0, -65504.0, 65519.0,
     3.3895e38, -3.4028235e38, 3.4028235e38, 1e-5, 1.0, -1.0, 2.0**-24, 2.0**-14, 1e38],
    np.float32,
)  # fmt: skip


def make_inputs(rng, n, dtypes, specials=False, spread=0.02):
    """A base and fine-tunes (base + small noise) of length n, stored in ``dtypes`` (base first)."""
    base = (rng.standard_normal(n) * spread).astype(np.float32)
    arrays = []
    for k, dt in enumerate(dtypes):
        x = base if k == 0 else base + (rng.standard_normal(n) * spread / 10).astype(np.float32)
        x = x.copy()
        if specials and n:
            pos = rng.integers(0, n, min(n, 3 * SPECIALS.size))
            x[pos] = rng.choice(SPECIALS, pos.size)
        arrays.append(stored(x, dt))
    return arrays


def run_both(
    arrays, dtypes, out_dtype, *, drop, weights, scale=1.0, start=0, model_ids=None, base=True
):
    """(kernel, reference) results for the base (arrays[0], if ``base``) and models."""
    models, mdts = (arrays[1:], dtypes[1:]) if base else (arrays, dtypes)
    ids = list(range(len(models))) if model_ids is None else model_ids
    kw = {
        "key": KEY,
        "start": start,
        "drop": drop,
        "weights": weights,
        "scale": scale,
        "model_ids": ids,
    }
    b = arrays[0] if base else None
    got = cpu_merge.merge_arrays(
        b, models, out_dtype, base_dtype=dtypes[0] if base else None, model_dtypes=mdts, **kw
    )
    want = ref.spec_merge(b, dtypes[0] if base else None, models, mdts, out_dtype, **kw)
    return got, want


@pytest.mark.parametrize(
    "in_dtypes",
    [
        ("F32", "F32", "F32"),
        ("F16", "F16", "F16"),
        ("BF16", "BF16", "BF16"),
        ("F16", "BF16", "BF16"),  # f16 base, bf16 fine-tunes
        ("BF16", "F32", "F16"),
        ("F32", "BF16", "F16"),
    ],
)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dtypes(in_dtypes, out_dtype):
    rng = np.random.default_rng(1)
    arrays = make_inputs(rng, 4097, in_dtypes, specials=True)
    got, want = run_both(
        arrays, in_dtypes, out_dtype, drop=[0.3, 0.6], weights=[0.7, 0.3], scale=1.25, start=77
    )
    assert_same_bits(got, want, out_dtype, f"{in_dtypes}->{out_dtype}")


@pytest.mark.parametrize("n", [1, 3, 4097, cpu_merge.BLOCK + 1, 100003])
@pytest.mark.parametrize("start", [0, 12345, 2**32 - 37, 3 * 2**33 + 5])
def test_sizes_and_starts(n, start):
    rng = np.random.default_rng(n)
    dts = ("BF16", "BF16", "BF16")
    arrays = make_inputs(rng, n, dts)
    got, want = run_both(arrays, dts, "BF16", drop=[0.5, 0.5], weights=[0.4, 0.6], start=start)
    assert_same_bits(got, want, "BF16", f"n={n} start={start}")


def test_last_counters_below_2_63():
    rng = np.random.default_rng(4)
    dts = ("F32", "BF16", "BF16")
    arrays = make_inputs(rng, 5, dts)
    got, want = run_both(arrays, dts, "F32", drop=[0.5, 0.5], weights=[0.5, 0.5], start=2**63 - 5)
    assert_same_bits(got, want, "F32", "start = 2**63 - 5")


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("drop", [0.0, 0.5, 0.9, "per-model"])
def test_models_and_drop_rates(n_models, drop):
    rng = np.random.default_rng(n_models)
    dts = ("F16",) + ("BF16",) * n_models
    arrays = make_inputs(rng, 20011, dts)
    p = [0.0, 0.9, 0.5, 0.1, 0.75][:n_models] if drop == "per-model" else [drop] * n_models
    w = list(rng.uniform(-1.0, 1.5, n_models))  # negative weights too
    got, want = run_both(
        arrays, dts, "F32", drop=p, weights=w, scale=0.7, start=2**32 - 5000
    )  # straddles 2**32; j = 4 uses counter word 2 = 1
    assert_same_bits(got, want, "F32", f"N={n_models} p={p}")


def test_model_ids_subset_and_groups():
    """Participating models may be any subset of j (the pipeline passes e.g. j = 1, 4, 6)."""
    rng = np.random.default_rng(5)
    dts = ("BF16",) * 4
    arrays = make_inputs(rng, 9001, dts, specials=True)
    for ids in ([1, 4, 6], [6, 4, 1], [7, 8, 3]):
        got, want = run_both(
            arrays, dts, "BF16", drop=[0.2, 0.5, 0.8], weights=[0.5, -0.25, 0.75], start=3,
            model_ids=ids,
        )  # fmt: skip
        assert_same_bits(got, want, "BF16", f"ids={ids}")


def test_keep_threshold_is_inclusive():
    """kept = r >= floor(p * 2**32): choose p so the threshold equals an element's own word."""
    n, start = 64, 2**32 - 7
    idx = np.arange(start, start + n, dtype=np.uint64)
    c = (idx & np.uint64(0xFFFFFFFF)).astype(np.uint32), (idx >> np.uint64(32)).astype(np.uint32)
    z = np.zeros(n, np.uint32)
    words = ref.philox4x32_10(*c, z, z, np.uint32(KEY & 0xFFFFFFFF), np.uint32(KEY >> 32))
    t = 9
    p = [int(words[j][t]) / 2**32 for j in range(2)]  # exact in float64
    assert all(ref.spec_threshold(pj) == int(words[j][t]) for j, pj in enumerate(p))
    ones = np.ones(n, np.float32)
    base = np.zeros(n, np.float32)
    got = cpu_merge.merge_arrays(base, [ones, ones], "F32", key=KEY, start=start, drop=p,
                                 weights=[1.0, 1.0])  # fmt: skip
    want = ref.spec_merge(base, "F32", [ones, ones], ["F32"] * 2, "F32", key=KEY, start=start,
                          model_ids=[0, 1], drop=p, weights=[1.0, 1.0], scale=1.0)  # fmt: skip
    assert got[t] > 0 and want[t] > 0
    assert_same_bits(got, want, "F32", "threshold edge")


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_base_absent(out_dtype):
    rng = np.random.default_rng(6)
    dts = ("F16", "BF16", "F32")
    arrays = make_inputs(rng, 5003, dts, specials=True)
    got, want = run_both(
        arrays, dts, out_dtype, drop=[0.0, 0.0, 0.0], weights=[0.2, 0.3, 0.5], base=False
    )
    assert_same_bits(got, want, out_dtype, "base absent, p=0")
    got, want = run_both(
        arrays, dts, out_dtype, drop=[0.4, 0.0, 0.7], weights=[1.0, -1.0, 2.0], scale=3.0,
        base=False, start=2**32,
    )  # fmt: skip
    assert_same_bits(got, want, out_dtype, "base absent, p>0")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_special_values(dtype, out_dtype):
    """NaN, +-inf, +-0, subnormals and max finite in every position, and results that
    overflow or land among the output's subnormals."""
    rng = np.random.default_rng(7)
    n = 3000
    bits = rng.integers(0, 2 ** (8 * np.dtype(BITS[dtype]).itemsize), (3, n), dtype=np.uint64)
    arrays = [b.astype(BITS[dtype]).view(CARRIER[dtype]) for b in bits]  # any bit pattern
    arrays = [np.concatenate([a, stored(SPECIALS, dtype)]) for a in arrays]
    arrays[1][n:] = np.roll(arrays[1][n:], 3)
    small = make_inputs(rng, 2000, (dtype,) * 3, spread=1e-6)  # f16 subnormal results
    big = make_inputs(rng, 2000, (dtype,) * 3, spread=6e4)  # f16 overflow
    arrays = [np.concatenate([a, s, g]) for a, s, g in zip(arrays, small, big)]
    for drop, scale in (([0.0, 0.0], 1.0), ([0.5, 0.3], -2.5)):
        got, want = run_both(
            arrays, (dtype,) * 3, out_dtype, drop=drop, weights=[0.6, 0.4], scale=scale, start=11
        )
        assert_same_bits(got, want, out_dtype, f"{dtype}->{out_dtype} p={drop} s={scale}")


def _merge_rows(inputs, dtypes, out_dtype, n, start, split):
    """merge_chunk over [lo, hi) pieces of the rows, as the pipeline does per chunk."""
    isz = {"F32": 4, "F16": 2, "BF16": 2}
    out = np.zeros(n * isz[out_dtype], np.uint8)
    bounds = [0, *split, n]
    for lo, hi in itertools.pairwise(bounds):
        rows = np.zeros((len(dtypes), max(1, (hi - lo) * 4)), np.uint8)  # fresh chunk buffer
        for r, dt in enumerate(dtypes):
            piece = inputs[r][lo * isz[dt] : hi * isz[dt]]
            rows[r, : piece.size] = piece
        o = np.full(max(1, (hi - lo) * isz[out_dtype]), 0xAB, np.uint8)
        cpu_merge.merge_chunk(
            rows, list(dtypes), 0, [1, 2, 3], [0, 1, 2], [0.5, 0.25, 0.9], [0.5, 0.3, 0.2], 1.5,
            o, out_dtype, hi - lo, KEY, start + lo,
        )  # fmt: skip
        out[lo * isz[out_dtype] : hi * isz[out_dtype]] = o[: (hi - lo) * isz[out_dtype]]
    return out


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_chunking_invariance(out_dtype):
    """Any split of a tensor into chunks gives the same bytes as one call, and SPEC's."""
    rng = np.random.default_rng(8)
    n, start = 50_000, 2**32 - 20_000
    dts = ("BF16", "F16", "BF16", "F32")
    arrays = make_inputs(rng, n, dts, specials=True)
    raw = [np.ascontiguousarray(a).view(np.uint8) for a in arrays]
    whole = _merge_rows(raw, dts, out_dtype, n, start, [])
    for split in ([1], [4095, 4096, 4097], sorted(rng.choice(n, 7, replace=False)), [20_000]):
        pieces = _merge_rows(raw, dts, out_dtype, n, start, list(split))
        assert np.array_equal(pieces, whole), f"split {split} changes the bytes"
    want = ref.spec_merge(
        arrays[0], dts[0], arrays[1:], dts[1:], out_dtype, key=KEY, start=start,
        model_ids=[0, 1, 2], drop=[0.5, 0.25, 0.9], weights=[0.5, 0.3, 0.2], scale=1.5,
    )  # fmt: skip
    assert_same_bits(whole.view(BITS[out_dtype]), want, out_dtype, "one call vs SPEC")


def test_thread_count_invariance():
    rng = np.random.default_rng(9)
    dts = ("BF16",) * 3
    arrays = make_inputs(rng, 100_003, dts)
    kw = {"key": KEY, "start": 5, "drop": [0.5, 0.5], "weights": [0.5, 0.5], "scale": 1.0}
    before = numba.get_num_threads()
    try:
        results = []
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            results.append(cpu_merge.merge_arrays(arrays[0], arrays[1:], "BF16", **kw))
    finally:
        numba.set_num_threads(before)
    assert all(np.array_equal(r, results[0]) for r in results)


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_convert_chunk(src_dtype, out_dtype):
    rng = np.random.default_rng(10)
    nbits = 8 * np.dtype(BITS[src_dtype]).itemsize
    bits = rng.integers(0, 2**nbits, 70_001, dtype=np.uint64).astype(BITS[src_dtype])
    x = np.concatenate([bits.view(CARRIER[src_dtype]), stored(SPECIALS, src_dtype)])
    if src_dtype == "F32":  # values near the f16/bf16 rounding edges and overflow
        x = np.concatenate([x, (rng.standard_normal(10_000) * 3e4).astype(np.float32)])
    n = x.size
    out = np.zeros(n * np.dtype(BITS[out_dtype]).itemsize + 3, np.uint8)
    cpu_merge.convert_chunk(np.ascontiguousarray(x).view(np.uint8), src_dtype, out, out_dtype, n)
    want = ref.from_float32(ref.to_float32(x, src_dtype), out_dtype)
    got = out[: n * np.dtype(BITS[out_dtype]).itemsize].view(BITS[out_dtype])
    assert_same_bits(got, want, out_dtype, f"convert {src_dtype}->{out_dtype}")
    assert (out[-3:] == 0).all(), "wrote past n elements"


def test_writes_exactly_n_elements():
    rng = np.random.default_rng(11)
    arrays = make_inputs(rng, 4099, ("BF16",) * 3)
    buf = np.zeros((3, 4099 * 2 + 10), np.uint8)
    for r, a in enumerate(arrays):
        buf[r, : 4099 * 2] = a.view(np.uint8)
    out = np.full(4099 * 4 + 8, 0xCD, np.uint8)
    cpu_merge.merge_chunk(buf, ["BF16"] * 3, 0, [1, 2], [0, 1], [0.5, 0.5], [0.5, 0.5], 1.0, out,
                          "F32", 4099, KEY, 0)  # fmt: skip
    assert (out[4099 * 4 :] == 0xCD).all()


def _args(**over):
    base = {
        "inputs": np.zeros((3, 64), np.uint8), "dtypes": ["BF16"] * 3, "base_row": 0, "model_rows": [1, 2],
        "model_ids": [0, 1], "drop": [0.5, 0.5], "weights": [0.5, 0.5], "scale": 1.0,
        "out": np.zeros(64, np.uint8), "out_dtype": "BF16", "n": 32, "key": KEY, "start": 0,
    }  # fmt: skip
    base.update(over)
    return base


@pytest.mark.parametrize(
    "over,match",
    [
        ({"inputs": np.zeros((3, 64), np.float32)}, "uint8"),
        ({"inputs": np.zeros((3, 128), np.uint8)[:, ::2]}, "C-contiguous"),
        ({"dtypes": ["BF16", "F64", "BF16"]}, "F64"),
        ({"dtypes": ["BF16"] * 2}, "dtypes"),
        ({"out_dtype": "I32"}, "I32"),
        ({"drop": [0.5, 1.0]}, "drop rate"),
        ({"drop": [-0.1, 0.5]}, "drop rate"),
        ({"weights": [0.5]}, "one entry per model"),
        ({"n": 33}, "too few"),
        ({"dtypes": ["F32"] * 3}, "too few"),
        ({"out_dtype": "F32"}, "too few"),
        ({"model_rows": [1, 3]}, "out of range"),
        ({"key": 2**63}, "key"),
        ({"start": -1}, "start"),
        ({"scale": float("nan")}, "scale"),
    ],
)
def test_merge_chunk_rejects_bad_arguments(over, match):
    with pytest.raises(ValueError, match=match):
        cpu_merge.merge_chunk(**_args(**over))


def test_merge_chunk_accepts_minimal_call():
    cpu_merge.merge_chunk(**_args())
    cpu_merge.merge_chunk(**_args(n=0))
    cpu_merge.merge_chunk(**_args(base_row=-1))


# ----------------------------------------------------------------------------------------
# v2: keep window, sign consensus, normalize, linear (SPEC v2 "Methods", kernel contract 1)
# against spec_reference.spec_merge_v2, bit for bit.
# ----------------------------------------------------------------------------------------

V2_DTYPES = {  # base (or the linear models' first) dtype, then the fine-tunes' cycle
    "bf16": ("BF16", ("BF16",)),
    "fp16": ("F16", ("F16",)),
    "f32": ("F32", ("F32",)),
    "mixed": ("F16", ("BF16", "F32", "F16")),
}
GAMMA = 0.01  # breadcrumbs' top fraction


def v2_inputs(rng, n, base_dtype, model_dtypes, kind):
    """(base, models) stored arrays for one v2 case.

    kind "noise": base ~ N(0, 0.02), fine-tunes = base + N(0, 0.002), with special values.
    kind "ties": small integers (exact in every dtype): magnitudes repeat a lot, so the
        thresholds fall on runs of equal values.
    kind "zero": model 0's task vector is all zeros (it equals the base), the others noise.
    """
    if kind == "ties":
        base = rng.integers(-8, 9, n).astype(np.float32)
        models = [base + rng.integers(-3, 4, n).astype(np.float32) for _ in model_dtypes]
    else:
        base = (rng.standard_normal(n) * 0.02).astype(np.float32)
        models = [base + (rng.standard_normal(n) * 0.002).astype(np.float32) for _ in model_dtypes]
        if kind == "zero":
            models[0] = base.copy()
        else:
            for x in [base, *models]:
                pos = rng.integers(0, n, 8)
                x[pos] = rng.choice(SPECIALS, pos.size)
    return stored(base, base_dtype), [stored(m, dt) for m, dt in zip(models, model_dtypes)]


def run_v2(method, base, models, out_dtype, *, weights, density, base_dtype, model_dtypes,
           start=0, scale=1.0, normalize=None, model_ids=None, thresholds=None,
           compute_dtype="F32"):  # fmt: skip
    """(kernel, reference, thresholds) for one tensor (or chunk) of a v2 method.

    The kernel gets the reference's thresholds as a keep window (``spec_keep_window``),
    DARE's p_j = 1 - rho_j (float64), and the method row's consensus / normalize / linear.
    """
    _, sparsifier, consensus, norm_default = ref.METHODS[method]
    k_models = len(models)
    gamma = [GAMMA] * k_models if sparsifier == "breadcrumbs" else None
    want, thr = ref.spec_merge_v2(
        base, models, out_dtype, method=method, key=KEY, start=start, weights=weights,
        density=density, gamma=gamma, scale=scale, normalize=normalize, thresholds=thresholds,
        model_ids=model_ids, base_dtype=base_dtype, model_dtypes=model_dtypes,
        compute_dtype=compute_dtype,
    )  # fmt: skip
    window = [ref.spec_keep_window(e, sparsifier) for e in thr]
    drop = [1.0 - float(r) for r in density] if sparsifier == "dare" else [0.0] * k_models
    got = cpu_merge.merge_arrays(
        base, models, out_dtype, key=KEY, start=start, drop=drop, weights=weights, scale=scale,
        model_ids=model_ids, base_dtype=base_dtype, model_dtypes=model_dtypes,
        keep_lo=[lo for lo, _ in window], keep_hi=[hi for _, hi in window],
        consensus=consensus, normalize=norm_default if normalize is None else normalize,
        linear=method == "linear", compute_dtype=compute_dtype,
    )  # fmt: skip
    return got, want, thr


@pytest.mark.parametrize("method", list(ref.METHODS))
@pytest.mark.parametrize("dtype_set", list(V2_DTYPES))
@pytest.mark.parametrize("k_models", [2, 3, 5])
def test_v2_methods_against_reference(method, dtype_set, k_models):
    """Every method x dtypes x K x density (1, 0.5, 1e-3) x data (noise with specials,
    ties at the thresholds, an all-zero task vector), negative weights, odd sizes, starts
    past 2**32 (and one straddling it)."""
    rng = np.random.default_rng(hash((method, dtype_set, k_models)) % 2**32)
    base_dt, cycle = V2_DTYPES[dtype_set]
    mdts = [cycle[k % len(cycle)] for k in range(k_models)]
    linear = method == "linear"
    for case, (density, kind, n, start) in enumerate(
        [
            (1.0, "noise", 10_007, 2**32 + 12_345),
            (0.5, "noise", 3 * cpu_merge.BLOCK_V2 + 5, 2**32 - 3_000),
            (1e-3, "noise", 4_099, 3 * 2**33 + 1),
            (0.5, "ties", 9_001, 2**32 + 7),
            (1e-3, "ties", 2_049, 5),
            (0.5, "zero", 5_003, 2**34),
        ]
    ):
        out_dt = DTYPES[(case + k_models) % 3]
        base, models = v2_inputs(rng, n, base_dt, mdts, kind)
        weights = list(rng.uniform(-0.6, 1.2, k_models))  # negative weights too
        got, want, thr = run_v2(
            method, None if linear else base, models, out_dt, weights=weights,
            density=[density] * k_models, base_dtype=None if linear else base_dt,
            model_dtypes=mdts, start=start, scale=1.0 if case % 2 else 0.75,
        )  # fmt: skip
        assert_same_bits(
            got, want, out_dt, f"{method} {dtype_set} K={k_models} case {case} thr={thr}"
        )


@pytest.mark.parametrize("method", [m for m in ref.METHODS if m != "linear"])
@pytest.mark.parametrize("compute", ["BF16", "F16"])
@pytest.mark.parametrize("dtype_set", ["bf16", "fp16", "mixed"])
def test_v3_working_dtype_against_reference(method, compute, dtype_set):
    """SPEC "Working dtype (v3)": every task-vector method computed in D = BF16 / F16 (every
    intermediate rounded to D; inputs of other dtypes rounded to D first), bit for bit as
    the reference, over odd sizes, specials, ties, normalize both ways and a scale."""
    rng = np.random.default_rng(hash((method, compute, dtype_set, 3)) % 2**32)
    base_dt, cycle = V2_DTYPES[dtype_set]
    k_models = 3
    mdts = [cycle[k % len(cycle)] for k in range(k_models)]
    for case, (density, kind, n, start) in enumerate(
        [
            (1.0, "noise", 4_099, 2**32 + 12_345),
            (0.5, "noise", 2 * cpu_merge.BLOCK_V2 + 5, 7),
            (0.5, "ties", 3_001, 2**32 + 7),
            (0.3, "zero", 1_003, 0),
        ]
    ):
        out_dt = DTYPES[case % 3]
        base, models = v2_inputs(rng, n, base_dt, mdts, kind)
        weights = list(rng.uniform(-0.6, 1.2, k_models))
        for normalize in (None, True):
            got, want, thr = run_v2(
                method, base, models, out_dt, weights=weights, density=[density] * k_models,
                base_dtype=base_dt, model_dtypes=mdts, start=start,
                scale=1.0 if case % 2 else 0.7, normalize=normalize, compute_dtype=compute,
            )  # fmt: skip
            assert_same_bits(got, want, out_dt, f"{method} D={compute} {dtype_set} case {case}")


def test_v3_f32_working_dtype_is_v2():
    """D = F32 is v2's formula: the same bytes as the default (float32) kernel call."""
    rng = np.random.default_rng(5)
    base, models = v2_inputs(rng, 5_001, "BF16", ["BF16"] * 3, "noise")
    for method in ("ties", "task_arithmetic", "dare_linear"):
        a = run_v2(method, base, models, "BF16", weights=[0.6, 0.3, 0.9], density=[0.5] * 3,
                   base_dtype="BF16", model_dtypes=["BF16"] * 3, compute_dtype="F32")[0]  # fmt: skip
        b = run_v2(method, base, models, "BF16", weights=[0.6, 0.3, 0.9], density=[0.5] * 3,
                   base_dtype="BF16", model_dtypes=["BF16"] * 3)[0]  # fmt: skip
        assert_same_bits(a, b, "BF16", method)
        c = run_v2(method, base, models, "BF16", weights=[0.6, 0.3, 0.9], density=[0.5] * 3,
                   base_dtype="BF16", model_dtypes=["BF16"] * 3, compute_dtype="BF16")[0]  # fmt: skip
        assert (np.asarray(a) != np.asarray(c)).any(), f"{method}: bf16 arithmetic changed nothing"


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "breadcrumbs", "dare_ties"])
def test_v2_ties_at_threshold_keep_every_tied_element(method):
    """Magnitudes in a handful of values: the window keeps every element equal to a bound
    (no tie-break), so outputs change exactly where the bounds say."""
    rng = np.random.default_rng(21)
    n = 6_151
    base = np.zeros(n, np.float32)
    models = [rng.choice(np.float32([-2, -1, 0, 1, 2, 3]), n).astype(np.float32) for _ in range(3)]
    for density in (0.3, 0.5, 0.9):
        got, want, thr = run_v2(
            method, base, models, "F32", weights=[1.0, 0.5, -0.25], density=[density] * 3,
            base_dtype="F32", model_dtypes=["F32"] * 3, normalize=False,
        )  # fmt: skip
        assert_same_bits(got, want, "F32", f"{method} density {density} thr={thr}")
        if method == "ties":  # the threshold sits inside a run of ties: more than k kept
            mags = models[0].view(np.uint32) & np.uint32(0x7FFFFFFF)
            k = max(1, int(density * n))
            assert (mags >= thr[0][0]).sum() > k > (mags > thr[0][0]).sum()


@pytest.mark.parametrize("method", list(ref.METHODS))
@pytest.mark.parametrize("out_dtype", ["F32", "BF16"])
def test_v2_normalize_both_ways(method, out_dtype):
    """Each method with normalize on and off (the recipe may override the row's default),
    on a zero base too, where out = s * m keeps every bit of the division (acc / den must
    be a true division, not a multiplication by 1 / den)."""
    rng = np.random.default_rng(list(ref.METHODS).index(method))
    linear = method == "linear"
    mdts = ["BF16", "F32", "F16"]
    for normalize in (True, False):
        for zero_base in (False, True):
            base, models = v2_inputs(rng, 7_001, "F32", mdts, "noise")
            if zero_base:
                base = np.zeros_like(base)
            got, want, _ = run_v2(
                method, None if linear else base, models, out_dtype, weights=[0.3, 0.45, 0.7],
                density=[0.6, 0.9, 0.5], base_dtype=None if linear else "F32", model_dtypes=mdts,
                start=2**32 + 9, scale=0.6, normalize=normalize,
            )  # fmt: skip
            assert_same_bits(
                got, want, out_dtype, f"{method} normalize={normalize} zero={zero_base}"
            )


def contract_merge(base, models, out_dtype, *, key, start, drop, weights, scale, keep_lo,
                   keep_hi, consensus, normalize, linear, base_dtype, model_dtypes):  # fmt: skip
    """kernel_contract.md section 1 in numpy, for any combination of the flags (the method
    table uses some; the kernel takes all: DARE and a window together, linear with sign...)."""
    n = len(models[0])
    idx = np.arange(n, dtype=np.uint64) + np.uint64(start)
    xb = np.zeros(n, np.float32) if base is None else ref.to_float32(base, base_dtype)
    wd = []
    with np.errstate(all="ignore"):
        for k, (m, dt) in enumerate(zip(models, model_dtypes)):
            d = ref.to_float32(m, dt) - xb
            mag = d.view(np.uint32) & np.uint32(0x7FFFFFFF)
            kept = ref.spec_kept(key, k, drop[k], idx) & (mag >= keep_lo[k]) & (mag <= keep_hi[k])
            wd.append(np.float32(weights[k]) * np.where(kept, d * ref.spec_rescale(drop[k]), 0))
        w32 = [np.float32(w) for w in weights]
        acc = np.zeros(n, np.float32)
        if consensus == "none":
            for v in wd:
                acc = acc + v
            den = np.float32(0.0)
            for w in w32:
                den = np.float32(den + w)
            den = np.float32(1.0) if abs(float(den)) < 1e-8 else den
        else:
            s_ = np.zeros(n, np.float32)
            for v in wd:
                s_ = s_ + v
            pos = s_ >= 0
            den = np.zeros(n, np.float32)
            for v, w in zip(wd, w32):
                agree = ((v > 0) & pos) | ((v < 0) & ~pos)
                acc = np.where(agree, acc + v, acc)
                den = np.where(agree, den + w, den)
            den = np.where(den == 0, np.float32(1.0), den)
        m = acc / den if normalize else acc
        out = m if linear else xb + np.float32(scale) * m
    assert out.dtype == np.float32
    return ref.from_float32(out, out_dtype)


@pytest.mark.parametrize("consensus", ["none", "sign"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("linear", [False, True])
def test_v2_every_flag_combination(consensus, normalize, linear):
    """All flag combinations, with DARE and windows alone and together, against the
    contract in numpy (``contract_merge``); zero bases make out = s * m keep every bit."""
    rng = np.random.default_rng(31 + 4 * (consensus == "sign") + 2 * normalize + linear)
    mdts = ["BF16", "F16", "F32"]
    for case, (drop, window) in enumerate(
        [
            ([0.0, 0.0, 0.0], None),
            ([0.5, 0.2, 0.0], None),
            ([0.0, 0.0, 0.0], ([0x3B000000, 0, 0x3A800000], [0xFFFFFFFF, 0x3C000000, 0x3B800000])),
            ([0.5, 0.0, 0.9], ([0x3B000000, 1, 0], [0xFFFFFFFF, 0, 0x7F800000])),  # and keep none
        ]
    ):
        base, models = v2_inputs(rng, 9_003, "BF16", mdts, "noise")
        if linear:
            base = None
        elif case % 2:
            base = np.zeros_like(base)
        lo, hi = window if window else ([0] * 3, [0xFFFFFFFF] * 3)
        kw = {"key": KEY, "start": 2**32 - 4_000, "drop": drop, "weights": [0.3, -0.45, 0.7],
              "scale": 0.6, "keep_lo": lo, "keep_hi": hi, "consensus": consensus,
              "normalize": normalize, "linear": linear, "base_dtype": "BF16",
              "model_dtypes": mdts}  # fmt: skip
        for out_dtype in ("F32", "BF16"):
            got = cpu_merge.merge_arrays(base, models, out_dtype, **kw)
            want = contract_merge(base, models, out_dtype, **kw)
            assert_same_bits(got, want, out_dtype, f"case {case} -> {out_dtype}")


def test_v2_consensus_and_den_rules_by_hand():
    """Hand-computed values (independent of the reference) for the sign election and den."""
    base = np.zeros(6, np.float32)
    d = [
        np.float32([1, 1, 0, -0.0, np.nan, 1]),
        np.float32([-2, 1, 0, -0.0, -1, -1]),
        np.float32([3, -3, 0, 0, 2, 0]),
    ]
    kw = {"key": KEY, "start": 0, "consensus": "sign"}
    got = cpu_merge.merge_arrays(base, d, "F32", drop=[0.0] * 3, weights=[1.0, 1.0, 1.0],
                                 normalize=True, **kw)  # fmt: skip
    # [0]: S=2>0, agree k0,k2: acc 4, den 2 -> 2. [1]: S=-1, agree k2: -3/1.
    # [2], [3]: all wd 0 (S=+0 or -0... >= 0): nobody agrees, den 0 -> 1, m = 0.
    # [4]: S = NaN -> negative side: agree k1: -1/1. [5]: S = 0 -> positive: k0: 1/1.
    want = np.float32([2.0, -3.0, 0.0, 0.0, -1.0, 1.0])
    assert np.array_equal(got, want) and not np.signbit(got[2:4]).any(), got
    got = cpu_merge.merge_arrays(base, d[:2], "F32", drop=[0.0] * 2, weights=[0.5, -0.5],
                                 normalize=True, **kw)  # fmt: skip
    # [0]: wd (0.5, 1), S 1.5: both agree, acc 1.5, den 0.5 - 0.5 = 0 -> 1. [1]: wd
    # (0.5, -0.5), S +0: k0 agrees, 0.5 / 0.5. [4]: wd (NaN, 0.5), S NaN: negative side,
    # nobody agrees: 0. [5]: wd (0.5, 0.5): acc 1, den 0 -> 1.
    assert np.array_equal(got, np.float32([1.5, 1.0, 0.0, 0.0, 0.0, 1.0])), got
    # consensus none: den = sum w (float32, in order); |den| < 1e-8 -> 1 (1e-8 rounds down
    # in float32, so w = float32(1e-8) is replaced, the next float32 up is not).
    ones = [np.ones(2, np.float32)] * 2
    tiny = float(np.float32(1e-8))
    above = float(np.nextafter(np.float32(1e-8), np.float32(1)))
    for w0, den in ((tiny, 1.0), (above, np.float32(above)), (0.0, 1.0), (-tiny, 1.0)):
        got = cpu_merge.merge_arrays(np.zeros(2, np.float32), ones, "F32", key=KEY, start=0,
                                     drop=[0.0, 0.0], weights=[w0, 0.0], normalize=True)  # fmt: skip
        assert got[0] == np.float32(np.float32(w0) / np.float32(den)), (w0, got)


def test_v2_window_bounds_are_inclusive():
    rng = np.random.default_rng(22)
    n = 2_500
    base = np.zeros(n, np.float32)
    x = (rng.standard_normal(n)).astype(np.float32)
    mags = x.view(np.uint32) & np.uint32(0x7FFFFFFF)
    lo, hi = int(np.sort(mags)[500]), int(np.sort(mags)[2000])
    got = cpu_merge.merge_arrays(base, [x, x], "F32", key=KEY, start=0, drop=[0.0, 0.0],
                                 weights=[1.0, 0.0], keep_lo=[lo, 0], keep_hi=[hi, 0])  # fmt: skip
    keep = (mags >= lo) & (mags <= hi)
    assert np.array_equal(got, np.where(keep, x, np.float32(0)))
    got = cpu_merge.merge_arrays(x, [x + 1, x - 1], "F32", key=KEY, start=0, drop=[0.0, 0.0],
                                 weights=[1.0, 1.0], keep_lo=[1, 1], keep_hi=[0, 0])  # fmt: skip
    assert np.array_equal(got.view(np.uint32), x.view(np.uint32)), "keep none: out = x_b"


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_v2_kernel_equals_v1_on_v1_formula(out_dtype):
    """A window that keeps every non-NaN magnitude sends a dare_linear merge through the v2
    kernel; its bytes equal v1's kernel (and the v1 reference) wherever no NaN is dropped."""
    rng = np.random.default_rng(23)
    dts = ("BF16", "F16", "BF16", "F32")
    arrays = make_inputs(rng, 20_011, dts)  # no specials: mag < 0x7F800001 everywhere
    kw = {"key": KEY, "start": 2**32 - 77, "drop": [0.5, 0.1, 0.9], "weights": [0.7, -0.2, 0.5],
          "scale": 1.3, "base_dtype": dts[0], "model_dtypes": list(dts[1:])}  # fmt: skip
    v1 = cpu_merge.merge_arrays(arrays[0], arrays[1:], out_dtype, **kw)
    v2 = cpu_merge.merge_arrays(arrays[0], arrays[1:], out_dtype, keep_hi=[0x7F800000] * 3, **kw)
    assert np.array_equal(v1, v2)
    want = ref.spec_merge(arrays[0], dts[0], arrays[1:], list(dts[1:]), out_dtype,
                          model_ids=[0, 1, 2], **{k: kw[k] for k in ("key", "start", "drop",
                                                                     "weights", "scale")})  # fmt: skip
    assert_same_bits(v2, want, out_dtype, "v2 kernel, v1 formula")


def test_v2_dare_ties_model_ids_subset():
    rng = np.random.default_rng(24)
    dts = ("BF16",) * 4
    arrays = make_inputs(rng, 9_001, dts, specials=True)
    for ids in ([1, 4, 6], [7, 8, 3]):
        got, want, _ = run_v2(
            "dare_ties", arrays[0], arrays[1:], "BF16", weights=[0.5, -0.25, 0.75],
            density=[0.8, 0.5, 0.2], base_dtype="BF16", model_dtypes=list(dts[1:]),
            start=2**32 + 3, model_ids=ids,
        )  # fmt: skip
        assert_same_bits(got, want, "BF16", f"ids={ids}")


def _merge_rows_v2(raw, dtypes, out_dtype, n, start, split, base, kwargs):
    """merge_chunk over [lo, hi) pieces, each in a fresh buffer, as the pipeline does."""
    isz = {"F32": 4, "F16": 2, "BF16": 2}
    out = np.zeros(n * isz[out_dtype], np.uint8)
    k_models = len(dtypes) - (1 if base else 0)
    for lo, hi in itertools.pairwise([0, *split, n]):
        rows = np.zeros((len(dtypes), max(1, (hi - lo) * 4)), np.uint8)
        for r, dt in enumerate(dtypes):
            piece = raw[r][lo * isz[dt] : hi * isz[dt]]
            rows[r, : piece.size] = piece
        o = np.full(max(1, (hi - lo) * isz[out_dtype]), 0xAB, np.uint8)
        model_rows = list(range(1, len(dtypes))) if base else list(range(len(dtypes)))
        cpu_merge.merge_chunk(
            rows, list(dtypes), 0 if base else -1, model_rows, list(range(k_models)),
            kwargs["drop"], kwargs["weights"], 0.9, o, out_dtype, hi - lo, KEY, start + lo,
            keep_lo=kwargs["keep_lo"], keep_hi=kwargs["keep_hi"], consensus=kwargs["consensus"],
            normalize=kwargs["normalize"], linear=not base,
        )  # fmt: skip
        out[lo * isz[out_dtype] : hi * isz[out_dtype]] = o[: (hi - lo) * isz[out_dtype]]
    return out


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "linear"])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_v2_chunking_invariance(method, out_dtype):
    """Uneven chunks with the whole tensor's thresholds give one call's bytes, and SPEC's."""
    rng = np.random.default_rng(25)
    n, start = 30_000, 2**32 - 10_000
    base_dt, mdts = "BF16", ["F16", "BF16", "F32"]
    base, models = v2_inputs(rng, n, base_dt, mdts, "noise")
    linear = method == "linear"
    _, sparsifier, consensus, normalize = ref.METHODS[method]
    weights, density = [0.6, -0.3, 0.5], [0.4, 0.6, 0.2]
    got, want, thr = run_v2(
        method, None if linear else base, models, out_dtype, weights=weights, density=density,
        base_dtype=None if linear else base_dt, model_dtypes=mdts, start=start, scale=0.9,
    )  # fmt: skip
    assert_same_bits(got, want, out_dtype, "one call vs SPEC")
    window = [ref.spec_keep_window(e, sparsifier) for e in thr]
    kwargs = {
        "drop": [1.0 - r for r in density] if sparsifier == "dare" else [0.0] * 3,
        "weights": weights, "keep_lo": [w[0] for w in window], "keep_hi": [w[1] for w in window],
        "consensus": consensus, "normalize": normalize,
    }  # fmt: skip
    arrays = models if linear else [base, *models]
    dts = mdts if linear else [base_dt, *mdts]
    raw = [np.ascontiguousarray(a).view(np.uint8) for a in arrays]
    whole = _merge_rows_v2(raw, dts, out_dtype, n, start, [], not linear, kwargs)
    assert_same_bits(whole.view(BITS[out_dtype]), got, out_dtype, "merge_chunk vs merge_arrays")
    for split in ([1], [2047, 2048, 2049, 8193], sorted(rng.choice(n, 6, replace=False))):
        pieces = _merge_rows_v2(raw, dts, out_dtype, n, start, list(split), not linear, kwargs)
        assert np.array_equal(pieces, whole), f"split {split} changes the bytes"


def test_v2_thread_count_invariance():
    rng = np.random.default_rng(26)
    base, models = v2_inputs(rng, 100_003, "BF16", ["BF16"] * 3, "noise")
    kw = {"key": KEY, "start": 5, "drop": [0.3, 0.0, 0.5], "weights": [0.5, 0.3, -0.2],
          "keep_lo": [0, 0x3A000000, 0], "consensus": "sign", "normalize": True}  # fmt: skip
    before = numba.get_num_threads()
    try:
        results = []
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            results.append(cpu_merge.merge_arrays(base, models, "BF16", **kw))
    finally:
        numba.set_num_threads(before)
    assert all(np.array_equal(r, results[0]) for r in results)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"keep_lo": [0]}, "keep_lo"),
        ({"keep_hi": [0, 2**32]}, "keep_hi"),
        ({"keep_lo": [-1, 0]}, "keep_lo"),
        ({"keep_lo": [0.5, 0]}, "keep_lo"),
        ({"keep_hi": 5}, "keep_hi"),
        ({"consensus": "majority"}, "consensus"),
        ({"consensus": None}, "consensus"),
        ({"normalize": 1}, "normalize"),
        ({"linear": "yes"}, "linear"),
        ({"linear": True}, "base_row"),
    ],
)
def test_merge_chunk_rejects_bad_v2_arguments(over, match):
    with pytest.raises(ValueError, match=match):
        cpu_merge.merge_chunk(**_args(**over))


def test_merge_chunk_accepts_v2_calls():
    cpu_merge.merge_chunk(**_args(keep_lo=[0, 5], keep_hi=[2**32 - 1, 7], consensus="sign"))
    cpu_merge.merge_chunk(**_args(base_row=-1, linear=True, normalize=np.bool_(True)))
    cpu_merge.merge_chunk(**_args(n=0, consensus="sign", normalize=True))
