"""The numpy SPEC reference itself: Philox known answers, rounding against torch/numpy."""

from __future__ import annotations

import os

import numpy as np
import pytest
import spec_reference as ref

# Random123 known-answer tests for Philox4x32-10 (kat_vectors): counter, key, result.
PHILOX_KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,want", PHILOX_KATS)
def test_philox_known_answers(ctr, key, want):
    c = [np.array([v], dtype=np.uint32) for v in ctr]
    got = ref.philox4x32_10(*c, np.uint32(key[0]), np.uint32(key[1]))
    assert [int(r[0]) for r in got] == list(want)


def test_philox_vectorized_matches_scalar():
    rng = np.random.default_rng(0)
    c = [rng.integers(0, 2**32, 64, dtype=np.uint32) for _ in range(4)]
    k0, k1 = rng.integers(0, 2**32, 2, dtype=np.uint32)
    vec = ref.philox4x32_10(*c, k0, k1)
    for i in (0, 17, 63):
        one = ref.philox4x32_10(*(np.array([x[i]]) for x in c), k0, k1)
        assert [int(r[0]) for r in one] == [int(r[i]) for r in vec]


def test_spec_key_and_kept_shape():
    key = ref.spec_key(42, "model.layers.0.mlp.up_proj.weight")
    assert 0 <= key < 2**63
    idx = np.arange(2**32 - 3, 2**32 + 3, dtype=np.int64)
    kept = ref.spec_kept(key, 5, 0.5, idx)
    assert kept.dtype == bool and kept.shape == idx.shape
    assert ref.spec_kept(key, 0, 0.0, idx).all()
    # Roughly a fraction p dropped.
    frac = 1 - ref.spec_kept(key, 1, 0.9, np.arange(100_000)).mean()
    assert 0.88 < frac < 0.92


def _special_f32_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random float32 bit patterns plus subnormals, infinities, NaNs, and rounding edges."""
    bits = [rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)]
    bits.append(rng.integers(0, 2**23, n // 8, dtype=np.uint32))  # f32 subnormals
    bits.append(rng.integers(0, 2**23, n // 8, dtype=np.uint32) | np.uint32(0x80000000))
    # Near the top of the range (bf16 / f16 overflow), near f16 subnormal range.
    for lo, hi in ((0x7F7F0000, 0x7F800000), (0x477F0000, 0x47800000), (0x33000000, 0x38800000)):
        bits.append(rng.integers(lo, hi, n // 8, dtype=np.uint64).astype(np.uint32))
    # Exact ties for bf16 (low half 0x8000) and f16 (13 low bits 0x1000).
    t = rng.integers(0, 2**32, n // 8, dtype=np.uint64).astype(np.uint32)
    bits.append((t & np.uint32(0xFFFF0000)) | np.uint32(0x8000))
    bits.append((t & np.uint32(0xFFFFE000)) | np.uint32(0x1000))
    specials = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF]
    specials += [0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x007FFFFF, 0x7F7F8000, 0x477FF000]
    bits.append(np.array(specials, dtype=np.uint32))
    return np.concatenate(bits)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    x = _special_f32_bits(np.random.default_rng(1), 200_000).view(np.float32)
    got = ref.from_float32(x, "BF16")
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.isnan(ref.to_float32(got[nan], "BF16")).all()
    bad = np.flatnonzero(got[~nan] != want[~nan])
    assert bad.size == 0, f"first mismatches at {x[~nan][bad[:5]].view(np.uint32)}"


def test_f16_rounding_matches_numpy():
    x = _special_f32_bits(np.random.default_rng(2), 200_000).view(np.float32)
    got = ref.from_float32(x, "F16")
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    nan = np.isnan(x)
    assert np.isnan(got[nan]).all()
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
    torch = pytest.importorskip("torch")
    theirs = torch.from_numpy(x).to(torch.float16).numpy()
    assert np.array_equal(got[~nan].view(np.uint16), theirs[~nan].view(np.uint16))


@pytest.mark.parametrize("dtype", ref.FLOAT_DTYPES)
def test_upcast_roundtrip_exact(dtype):
    rng = np.random.default_rng(3)
    carrier = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}[dtype]
    bits = rng.integers(0, np.iinfo(carrier).max, 100_000, dtype=np.uint64, endpoint=True)
    stored = bits.astype(carrier)
    if dtype != "BF16":
        stored = stored.view({"F32": np.float32, "F16": np.float16}[dtype])
    f = ref.to_float32(stored, dtype)
    back = ref.from_float32(f, dtype)
    nan = np.isnan(f)
    assert np.array_equal(back.view(carrier)[~nan], stored.view(carrier)[~nan])
    assert np.isnan(ref.to_float32(back[nan], dtype)).all()


def test_merge_hand_computed():
    # p = 0, N = 2: out = b + s * (w0 * (m0 - b) + w1 * (m1 - b)) in float32.
    b = np.array([1.0, -2.0, 0.5], np.float32)
    m0 = np.array([2.0, -2.0, 0.25], np.float32)
    m1 = np.array([0.0, 1.0, 0.75], np.float32)
    got = ref.spec_merge(
        b, "F32", [m0, m1], ["F32", "F32"], "F32", key=1, start=0, model_ids=[0, 1],
        drop=[0.0, 0.0], weights=[0.25, 0.75], scale=2.0,
    )  # fmt: skip
    assert got.tolist() == [1.0 + 2 * (0.25 - 0.75), -2.0 + 2 * 2.25, 0.5 + 2 * (-0.0625 + 0.1875)]


def test_kept_matches_triton_randint4x():
    """SPEC: for j < 4 the mask words are ``tl.randint4x(key_t, i)`` with int64 offsets i."""
    torch = pytest.importorskip("torch")
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _words(out_ptr, seed, start, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        r0, r1, r2, r3 = tl.randint4x(seed, offs + start)
        tl.store(out_ptr + offs * 4 + 0, r0, mask=mask)
        tl.store(out_ptr + offs * 4 + 1, r1, mask=mask)
        tl.store(out_ptr + offs * 4 + 2, r2, mask=mask)
        tl.store(out_ptr + offs * 4 + 3, r3, mask=mask)

    n, start, key = 100, 2**32 - 37, ref.spec_key(7, "layers.0.mlp.up.weight")
    device = (
        "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"
    )
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    out = torch.zeros(n * 4, dtype=torch.int32, device=device)
    _words[(2,)](out, key, start, n, BLOCK=64)
    got = out.cpu().numpy().view(np.uint32).reshape(n, 4)
    idx = np.arange(n, dtype=np.int64) + start
    c = (idx & 0xFFFFFFFF).astype(np.uint32), (idx >> 32).astype(np.uint32)
    zero = np.zeros(n, np.uint32)
    want = ref.philox4x32_10(*c, zero, zero, np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32))
    assert np.array_equal(got, np.stack(want, 1))
    for j in range(4):
        assert np.array_equal(ref.spec_kept(key, j, 0.5, idx), got[:, j] >= 2**31)
