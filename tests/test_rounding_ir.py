"""kernels/rounding_ir.py: the inline-IR rounding to the working dtype is bit for bit the
numba functions it replaces in the row-wise kernels, on every float32 bit pattern."""

from __future__ import annotations

import numba
import numpy as np

from streammerge.kernels.common import FLOAT_CODES
from streammerge.kernels.cpu_merge import (
    _bf16_to_f32,
    _bits_f32,
    _f16_to_f32,
    _f32_bits,
    _f32_to_bf16,
    _f32_to_f16,
)
from streammerge.kernels.rounding_ir import round_work_ir

F32, F16, BF16 = FLOAT_CODES["F32"], FLOAT_CODES["F16"], FLOAT_CODES["BF16"]


@numba.njit(parallel=True)
def _mismatches(patterns):
    """Counts, over the float32 bit patterns given, of (F32, F16, BF16) results that differ."""
    bad = np.zeros(3, np.int64)
    for k in numba.prange(patterns.shape[0]):
        u = patterns[k]
        x = _bits_f32(u)
        if _f32_bits(round_work_ir(x, F32)) != u:
            bad[0] += 1
        if _f32_bits(round_work_ir(x, F16)) != _f32_bits(_f16_to_f32(_f32_to_f16(x))):
            bad[1] += 1
        if _f32_bits(round_work_ir(x, BF16)) != _f32_bits(_bf16_to_f32(_f32_to_bf16(x))):
            bad[2] += 1
    return bad


def _patterns() -> np.ndarray:
    """Every sign and exponent with the mantissas where rounding changes: each bf16 and f16
    rounding boundary (half an ulp, either side, ties), zero, all ones, NaN payloads; and a
    stride through all 2^32 (the full range passes too: ``_mismatches`` over
    ``np.arange(2**32, dtype=np.uint32)``, 4 s on 2 cores, too long for every run)."""
    top = np.arange(512, dtype=np.uint32) << np.uint32(23)
    low = np.array([0, 1, 2, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000,
                    0x8001, 0xFFFF, 0x10000, 0x18000, 0x7FFFFF, 0x400000, 0x3FFFFF],
                   np.uint32)  # fmt: skip
    mant = (np.arange(1 << 10, dtype=np.uint32) << np.uint32(13))[:, None] + low[None, :]
    mant = np.concatenate([mant.ravel(), low]) & np.uint32(0x7FFFFF)
    edges = (top[:, None] | mant[None, :]).ravel()
    return np.concatenate([edges, np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)])


def test_every_float32_bit_pattern_class_rounds_as_the_numba_functions():
    assert _mismatches(_patterns()).tolist() == [0, 0, 0]


def test_known_values():
    @numba.njit
    def rw(v, code):
        return round_work_ir(v, code)

    one_third = np.float32(1 / 3)
    assert rw(one_third, F32) == one_third
    assert rw(one_third, F16) == np.float32(np.float16(one_third))
    assert rw(np.float32(1e6), F16) == np.inf  # overflow
    assert rw(np.float32(1.00390625), BF16) == np.float32(1.0)  # a tie rounds to even
    assert rw(np.float32(1.01171875), BF16) == np.float32(1.015625)
    assert np.isnan(rw(np.float32(np.nan), F16)) and np.isnan(rw(np.float32(np.nan), BF16))
