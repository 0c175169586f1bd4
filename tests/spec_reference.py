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
