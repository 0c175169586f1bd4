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
from streammerge.kernels.rounding_ir import round_op_ir, round_work_ir

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


@numba.njit(parallel=True)
def _op_mismatches(patterns, code):
    """Per pattern: 1 where ``round_op_ir`` and ``round_work_ir`` give different bits."""
    out = np.zeros(patterns.shape[0], np.uint8)
    for k in numba.prange(patterns.shape[0]):
        x = _bits_f32(patterns[k])
        if _f32_bits(round_op_ir(x, code)) != _f32_bits(round_work_ir(x, code)):
            out[k] = 1
    return out


def test_round_op_differs_only_on_nans_no_op_gives():
    """``round_op_ir`` is ``round_work_ir`` on every float32 except the NaNs an op on
    rounded values never returns: low 16 bits not zero, or signaling (quiet bit clear)."""
    p = _patterns()
    nan = (p & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    odd = nan & (((p & np.uint32(0xFFFF)) != 0) | ((p & np.uint32(0x400000)) == 0))
    for code in (F32, F16):
        assert not _op_mismatches(p, code).any()
    bad = _op_mismatches(p, BF16).astype(bool)
    assert not (bad & ~odd).any()
    assert bad[odd].any()  # the test the fast rounding leaves out is needed there


def test_ops_on_rounded_values_give_nans_round_op_keeps():
    """The NaNs IEEE ops return from rounded operands (a quiet NaN with low bits zero, or
    none) are ones ``round_op_ir`` leaves as ``round_work_ir`` does, on this machine."""

    @numba.njit(error_model="numpy")
    def ops(a, b):
        r = np.empty(6, np.float32)
        r[0], r[1], r[2] = a + b, a * b, a / b
        r[3], r[4], r[5] = a - b, b / a, np.float32(0.0) * b
        return r

    rounded_nans = np.array([0x7FC10000, 0xFFC00000, 0x7FFF0000], np.uint32).view(np.float32)
    vals = [np.float32(v) for v in (0.0, -1.5, np.inf, -np.inf)] + list(rounded_nans)
    for a in vals:
        for b in vals:
            got = ops(a, b).view(np.uint32)
            assert not _op_mismatches(got, BF16).any(), (a, b, [hex(g) for g in got])
