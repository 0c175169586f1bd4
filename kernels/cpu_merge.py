"""The CPU merge kernel (numba): SPEC "The merged value" over one chunk of one tensor.

Contract: docs/SPEC.md, tested bit for bit against ``tests/spec_reference.py``.

Layout: the streaming pipeline reads each input's chunk as raw little-endian bytes into
one row of a 2-D ``uint8`` buffer (``inputs[r]``), and the kernel writes raw bytes of the
output dtype into ``out``. Inside, ``prange`` runs over blocks of ``BLOCK`` elements; each
block is a few short loops LLVM vectorizes (AVX-512 where the CPU has it): Philox words
for the block (once per group of four models sharing a counter; skipped when every p is
0), the base decoded to float32, one fused decode-subtract-drop-accumulate loop per
model, and one combine-and-encode loop. Dtype branches sit outside the element loops.
Conversions are integer bit manipulation (bf16 <-> f32 by shifts, f16 <-> f32 including
subnormals, infinities and NaN), rounding to nearest even. All float math is float32, one
rounding per operation, in SPEC's order; no fast-math (so no fused multiply-add).

Philox is the cost (~1 ns per element per core); the other loops are memory bound. The
Philox loop therefore prefetches the next block's input lines, which hides most of the
memory traffic behind it.

Thinning methods (SPEC v2 "Methods": a magnitude keep window, TIES sign consensus, normalize,
linear; docs/kernels.md section 1) run in a second kernel, ``_thin_merge_kernel``, so
v1's kernel and its speed stay exactly as they were: ``merge_chunk`` picks it only when a
v2 argument differs from its default. Per block of ``BLOCK_V2`` elements it decodes the
base, then one fused decode-subtract-window-drop-weight loop per model writes wd_k into a
[K, BLOCK_V2] float32 scratch while summing it (S for sign, acc for none), then the sign
election (per model, over the scratch), the division and the store. Every flag is tested
outside the element loops, which LLVM vectorizes as in v1; float32 division is the IEEE
one (``error_model="numpy"``: no zero-divisor check, den is never 0 anyway).

Everything compiles to a single specialization per kernel (dtype codes, thresholds and
weights travel as small typed arrays), cached on disk (``cache=True``).
"""

from __future__ import annotations

import math
import types as types_mod
from collections.abc import Sequence

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import (
    FLOAT_CODES,
    FLOAT_ITEMSIZE,
    NUMPY_CARRIER,
    drop_rescale,
    drop_threshold,
    round_host,
)
from .rounding_ir import bf16_round_trip_bits, round_op_ir

#: Elements per parallel work item. N=2 bf16, p=0.5, 16M elements, 2 threads (2-core AMD
#: EPYC VM): 14.3 / 14.1 / 12.7 / 13.2 ms at 2048 / 4096 / 8192 / 16384.
BLOCK = 8192
#: Elements per work item of the v2 kernel (window / consensus / normalize / linear): its
#: per-block scratch ([K + 4] float32 rows) stays in L1/L2 at this size.
BLOCK_V2 = 2048
#: Elements per Philox sub-loop, between prefetches of the next block's lines.
SUB = 128

_F32, _F16, _BF16 = FLOAT_CODES["F32"], FLOAT_CODES["F16"], FLOAT_CODES["BF16"]
#: Bytes per element by dtype code (a tuple: numba indexes it at run time).
_CODE_ITEMSIZE = tuple(FLOAT_ITEMSIZE[d] for d in sorted(FLOAT_CODES, key=FLOAT_CODES.get))
_M32 = np.uint64(0xFFFFFFFF)
_SH32 = np.uint64(32)
# Philox4x32 constants (triton.language.random.philox_impl).
_PHILOX_KEY_A = np.uint64(0x9E3779B9)
_PHILOX_KEY_B = np.uint64(0xBB67AE85)
_PHILOX_ROUND_A = np.uint64(0xD2511F53)
_PHILOX_ROUND_B = np.uint64(0xCD9E8D57)


# ----------------------------------------------------------------------------------------
# Scalar helpers (inlined by LLVM into the element loops)
# ----------------------------------------------------------------------------------------


@intrinsic
def _bits_f32(typingctx, x):
    """Reinterpret the low 32 bits of an unsigned integer as a float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _f32_bits(typingctx, x):
    """Reinterpret a float32 as its uint32 bit pattern."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


@intrinsic
def _prefetch(typingctx, arr, idx, write):
    """Hint the cache to fetch the line holding ``arr[idx]`` (``write``: a literal 0 or 1)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None
    if not isinstance(write, types.IntegerLiteral):
        return None
    rw = write.literal_value

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # (address, rw, locality 3 = keep in all levels, data cache)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(rw), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, idx, write), codegen


@numba.njit(inline="always")
def _prefetch_chunk(row, lo_byte, hi_byte, write):
    for off in range(lo_byte, hi_byte, 64):
        _prefetch(row, off, write)


@numba.njit(inline="always")
def _bf16_to_f32(h):
    return _bits_f32(np.uint32(h) << np.uint32(16))


@numba.njit(inline="always")
def _f16_to_f32(h):
    """Exact float16 bits -> float32, subnormals, infinities and NaN payloads included."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    em = h & np.uint32(0x7FFF)
    normal = (em << np.uint32(13)) + np.uint32((127 - 15) << 23)
    special = np.uint32(0x7F800000) | ((em & np.uint32(0x3FF)) << np.uint32(13))
    # Subnormal (or zero): em * 2**-24, exact in float32.
    sub = _f32_bits(np.float32(em) * np.float32(2.0**-24))
    bits = special if em >= np.uint32(0x7C00) else (normal if em >= np.uint32(0x0400) else sub)
    return _bits_f32(bits | sign)


@numba.njit(inline="always")
def _f32_to_bf16(x):
    """float32 -> bfloat16 bits, round to nearest even; a NaN stays a (quiet) NaN."""
    u = np.uint32(_f32_bits(x))
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet = (u >> np.uint32(16)) | np.uint32(0x40)
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.uint16(quiet if is_nan else rounded)


@numba.njit(inline="always")
def _f32_to_f16(x):
    """float32 -> float16 bits, round to nearest even (F. Giesen's float_to_half_fast3_rtne).

    Overflow gives +-inf, a NaN gives a quiet NaN, half subnormals are rounded by one
    float32 addition of a magic constant (exact RNE under the default rounding mode).
    """
    u = np.uint32(_f32_bits(x))
    sign = (u & np.uint32(0x80000000)) >> np.uint32(16)
    a = u & np.uint32(0x7FFFFFFF)
    # |x| >= 65536: inf, or NaN when above the float32 infinity.
    big = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
    # |x| < 2**-14: half subnormal or zero. Magic = 0.5 (exponent 126): aligns bit 2**-24 at
    # the float32 ulp so the addition rounds to nearest even.
    magic = np.uint32(126 << 23)
    sub = _f32_bits(_bits_f32(a) + _bits_f32(magic)) - magic
    # Normal half: rebias the exponent, round the 13 dropped bits to nearest even.
    odd = (a >> np.uint32(13)) & np.uint32(1)
    norm = (a + np.uint32(((15 - 127) << 23) & 0xFFFFFFFF) + np.uint32(0xFFF) + odd) >> np.uint32(
        13
    )
    o = big if a >= np.uint32((127 + 16) << 23) else (sub if a < np.uint32(113 << 23) else norm)
    return np.uint16(o | sign)


# ----------------------------------------------------------------------------------------
# Block loops
# ----------------------------------------------------------------------------------------


@numba.njit(inline="always")
def _philox_range(first, m, grp, k0_init, k1_init, r0, r1, r2, r3):
    """Philox4x32-10 words r*[t] for counters (i & 0xFFFFFFFF, i >> 32, grp, 0), i = first + t,
    0 <= t < m. (Loops from 0: numba then knows t >= 0 and LLVM vectorizes.)"""
    for t in range(m):
        i = np.uint64(first + t)
        c0 = i & _M32
        c1 = i >> _SH32
        c2 = grp
        c3 = np.uint64(0)
        k0 = k0_init
        k1 = k1_init
        for _ in range(10):
            pb = _PHILOX_ROUND_B * c2
            pa = _PHILOX_ROUND_A * c0
            c0 = (pb >> _SH32) ^ c1 ^ k0
            c2 = (pa >> _SH32) ^ c3 ^ k1
            c1 = pb & _M32
            c3 = pa & _M32
            k0 = (k0 + _PHILOX_KEY_A) & _M32
            k1 = (k1 + _PHILOX_KEY_B) & _M32
        r0[t] = np.uint32(c0)
        r1[t] = np.uint32(c1)
        r2[t] = np.uint32(c2)
        r3[t] = np.uint32(c3)


@numba.njit(inline="always")
def _philox_block(first, m, grp, k0_init, k1_init, r0, r1, r2, r3, inputs, offs, pf_rows, codes,
                  out, out_code, pf_lo, pf_m):  # fmt: skip
    """``_philox_range`` over m elements in sub-blocks of SUB, prefetching as it goes.

    After each sub-block it asks the cache for the matching part of elements pf_lo ..
    pf_lo + pf_m - 1 of the rows ``pf_rows`` and of ``out`` (the next block's data), so
    memory streams in while the core is busy with Philox (pf_m = 0: no prefetch). N=2 bf16,
    p=0.5, 16M elements, 1 thread: 33.5 ms without, 25 ms with.
    """
    for s in range(0, m, SUB):
        e = min(s + SUB, m)
        _philox_range(first + s, e - s, grp, k0_init, k1_init, r0[s:e], r1[s:e], r2[s:e], r3[s:e])
        if s < pf_m:
            pe = min(s + SUB, pf_m)
            for row in pf_rows:
                isz = _CODE_ITEMSIZE[codes[row]]
                _prefetch_chunk(inputs[row, offs[row]:], (pf_lo + s) * isz, (pf_lo + pe) * isz, 0)
            osz = _CODE_ITEMSIZE[out_code]
            _prefetch_chunk(out, (pf_lo + s) * osz, (pf_lo + pe) * osz, 1)


@numba.njit(inline="always")
def _decode_block(row, code, lo, m, dst):
    """dst[:m] = float32(stored elements lo .. lo + m - 1 of a raw byte row)."""
    if code == _F32:
        src = row[lo * 4 : (lo + m) * 4].view(np.float32)
        for t in range(m):
            dst[t] = src[t]
    elif code == _F16:
        src = row[lo * 2 : (lo + m) * 2].view(np.uint16)
        for t in range(m):
            dst[t] = _f16_to_f32(src[t])
    else:
        src = row[lo * 2 : (lo + m) * 2].view(np.uint16)
        for t in range(m):
            dst[t] = _bf16_to_f32(src[t])


@numba.njit(inline="always")
def _encode_block(src, code, lo, m, out):
    """Stored elements lo .. lo + m - 1 of the raw byte row ``out`` = round(src[:m])."""
    if code == _F32:
        dst = out[lo * 4 : (lo + m) * 4].view(np.float32)
        for t in range(m):
            dst[t] = src[t]
    elif code == _F16:
        dst = out[lo * 2 : (lo + m) * 2].view(np.uint16)
        for t in range(m):
            dst[t] = _f32_to_f16(src[t])
    else:
        dst = out[lo * 2 : (lo + m) * 2].view(np.uint16)
        for t in range(m):
            dst[t] = _f32_to_bf16(src[t])


@numba.njit(inline="always")
def _accumulate(row, code, lo, m, xb, r, thr, masked, rescale, w, acc):
    """acc[t] = acc[t] + w * e_j for one model (SPEC "The merged value")."""
    zero = np.float32(0.0)
    if code == _F32:
        src = row[lo * 4 : (lo + m) * 4].view(np.float32)
        if masked:
            for t in range(m):
                e = (src[t] - xb[t]) * rescale if r[t] >= thr else zero
                acc[t] = acc[t] + w * e
        else:
            for t in range(m):
                acc[t] = acc[t] + w * ((src[t] - xb[t]) * rescale)
    elif code == _F16:
        src16 = row[lo * 2 : (lo + m) * 2].view(np.uint16)
        if masked:
            for t in range(m):
                e = (_f16_to_f32(src16[t]) - xb[t]) * rescale if r[t] >= thr else zero
                acc[t] = acc[t] + w * e
        else:
            for t in range(m):
                acc[t] = acc[t] + w * ((_f16_to_f32(src16[t]) - xb[t]) * rescale)
    else:
        src16 = row[lo * 2 : (lo + m) * 2].view(np.uint16)
        if masked:
            for t in range(m):
                e = (_bf16_to_f32(src16[t]) - xb[t]) * rescale if r[t] >= thr else zero
                acc[t] = acc[t] + w * e
        else:
            for t in range(m):
                acc[t] = acc[t] + w * ((_bf16_to_f32(src16[t]) - xb[t]) * rescale)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _merge_kernel(
    inputs,  # [R, cap_bytes] uint8
    offs,  # [R] int64 byte offset of each row's element 0 (where its O_DIRECT read landed)
    codes,  # [R] int64 dtype codes
    base_row,  # int64, -1: absent
    rows,  # [K] int64 input row of each participating model
    pf_rows,  # [K or K + 1] int64 rows to prefetch: the models' and the base's
    groups,  # [K] uint64 Philox counter word 2 (j // 4)
    words,  # [K] int64 Philox output word (j % 4)
    thresholds,  # [K] uint32 floor(p_j * 2**32)
    rescales,  # [K] float32 float32(1 / (1 - p_j))
    weights,  # [K] float32 float32(w_j)
    scale,  # float32 s
    out,  # [>= n * itemsize] uint8
    out_code,  # int64
    n,  # int64 elements
    key_lo,  # uint64 key_t & 0xFFFFFFFF
    key_hi,  # uint64 key_t >> 32
    start,  # int64 tensor index of element 0
    block,  # int64 elements per work item
):
    n_models = rows.shape[0]
    n_blocks = (n + block - 1) // block
    for b in numba.prange(n_blocks):
        lo = b * block
        m = min(block, n - lo)
        xb = np.empty(block, np.float32)  # [m] float32 x_b
        acc = np.zeros(block, np.float32)  # [m] float32, +0.0
        rw = np.empty((4, block), np.uint32)  # [4, m] Philox words of the current group
        pf_lo = lo + block  # the next block, most often this thread's next work item
        pf_m = max(0, min(block, n - pf_lo))
        cached = np.uint64(0xFFFFFFFFFFFFFFFF)  # no group yet
        for k in range(n_models):
            if thresholds[k] != np.uint32(0):
                _philox_block(start + lo, m, groups[k], key_lo, key_hi, rw[0], rw[1], rw[2], rw[3],
                              inputs, offs, pf_rows, codes, out, out_code, pf_lo, pf_m)  # fmt: skip
                cached = groups[k]
                break
        if base_row >= 0:
            _decode_block(inputs[base_row, offs[base_row]:], codes[base_row], lo, m, xb)
        else:
            xb[:m] = np.float32(0.0)
        for k in range(n_models):
            masked = thresholds[k] != np.uint32(0)
            if masked and groups[k] != cached:
                _philox_block(start + lo, m, groups[k], key_lo, key_hi, rw[0], rw[1], rw[2], rw[3],
                              inputs, offs, pf_rows, codes, out, out_code, pf_lo, 0)  # fmt: skip
                cached = groups[k]
            row = rows[k]
            _accumulate(
                inputs[row, offs[row]:], codes[row], lo, m, xb, rw[words[k]], thresholds[k], masked,
                rescales[k], weights[k], acc,
            )  # fmt: skip
        # out = x_b + s * acc, rounded to the output dtype (reuse acc as the float32 result).
        for t in range(m):
            acc[t] = xb[t] + scale * acc[t]
        _encode_block(acc, out_code, lo, m, out)


@intrinsic
def _rd_bf16_ir(typingctx, x):
    """float32 -> bfloat16 (nearest even; a NaN keeps its top 16 bits, made quiet) -> float32,
    as inline LLVM IR: a plain njit call may stay an out-of-line call in the large kernels
    (measured: 2x slower loops), numba's inline="always" costs minutes of compile time."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        u = builder.bitcast(args[0], ir.IntType(32))
        return builder.bitcast(bf16_round_trip_bits(builder, u), ir.FloatType())

    return types.float32(x), codegen


@numba.njit(inline="always")
def _rd_bf16(x):
    """rd for D = BF16 (SPEC "Working dtype (v3)"): x rounded to bfloat16, back to float32
    (bit for bit ``_bf16_to_f32(_f32_to_bf16(x))``)."""
    return _rd_bf16_ir(x)


@numba.njit(inline="always")
def _rdo_bf16(x):
    """``_rd_bf16`` of an op's result on rd values (not of a stored value): the same bits
    without the NaN test (``rounding_ir.round_op_ir`` says why)."""
    return round_op_ir(x, _BF16)


@numba.njit
def _rd_f16(x):
    """rd for D = F16: x rounded to float16 (RNE, subnormals, overflow to inf), widened back."""
    return _f16_to_f32(_f32_to_f16(x))


@numba.njit(inline="always")
def _f32_to_f32(x):
    """rd for D = F32 (and the decoder of F32 rows): the identity."""
    return x


@numba.njit(inline="always")
def _thin_one(d, keep, rescale, w, keep_lo, keep_hi, rd, rd_e, rd_w):
    """wd = rd(w' * e) for one element (d already rd-rounded): e = kept ? rd(d * rescale) :
    +0.0, where kept = ``keep`` (the DARE test) and keep_lo <= bits(d) & 0x7FFFFFFF <=
    keep_hi. (rescale = 1 without DARE: rd(d * 1) = d.) ``rd_e``, ``rd_w``: ``rd``, or the
    identity where it provably changes nothing (``_thin_rows``)."""
    mag = _f32_bits(d) & np.uint32(0x7FFFFFFF)
    kept = keep & (mag >= keep_lo) & (mag <= keep_hi)
    e = rd_e(d * rescale)  # for every element: no branch around rd (the loop vectorizes)
    return rd_w(w * (e if kept else np.float32(0.0)))


@numba.njit(inline="always")
def _thin_loop(src, dec, rin, rd, rd_e, rd_w, xb, m, r, thr, masked, rescale, w, keep_lo,
               keep_hi, wd, keep_wd, s_):  # fmt: skip
    """wd[t] = wd_k(t) (if ``keep_wd``: a loop-invariant test, which LLVM unswitches) and
    s_[t] = s_[t] + wd_k(t), for m elements of one source (``dec``
    decodes one stored element to float32, ``rin`` rounds it to D (the identity when the
    row's dtype fits in D), ``rd`` rounds to D; ``rd_e`` and ``rd_w`` round e and w' * e:
    ``rd`` or, where exact, the identity)."""
    if masked:
        for t in range(m):
            v = _thin_one(rd(rin(dec(src[t])) - xb[t]), r[t] >= thr, rescale, w, keep_lo,
                          keep_hi, rd, rd_e, rd_w)  # fmt: skip
            if keep_wd:
                wd[t] = v
            s_[t] = s_[t] + v
    else:  # no DARE mask, so p = 0 and rescale = 1: e = d, no multiplication
        for t in range(m):
            d = rd(rin(dec(src[t])) - xb[t])
            mag = _f32_bits(d) & np.uint32(0x7FFFFFFF)
            kept = (mag >= keep_lo) & (mag <= keep_hi)
            v = rd_w(w * (d if kept else np.float32(0.0)))
            if keep_wd:
                wd[t] = v
            s_[t] = s_[t] + v


@numba.njit(inline="always")
def _exact_rescale(rescale):
    """rescale is 2**k, k >= 0 (p = 0 or 0.5, 0.75, ...): then d * rescale is exact for
    every bfloat16 value d (or overflows to inf, as rd would), so rd(d * rescale) =
    d * rescale bit for bit, NaN payloads included. Not so for float16 (its range ends
    before float32's)."""
    u = _f32_bits(rescale)
    return ((u & np.uint32(0x007FFFFF)) == np.uint32(0) and u >= np.uint32(0x3F800000)
            and u < np.uint32(0x7F800000))  # fmt: skip


@numba.njit(inline="always")
def _thin_rows(src, dec, round_in, rd, rdo, xb, m, r, thr, masked, rescale, w, keep_lo, keep_hi,
               wd, keep_wd, s_):  # fmt: skip
    """``_thin_loop`` with the input rounded to D (``round_in``: ``rd``, the stored value
    may be any NaN) or not: one branch per block. ``rdo`` rounds the ops' results."""
    if round_in:
        _thin_loop(src, dec, rd, rdo, rdo, rdo, xb, m, r, thr, masked, rescale, w, keep_lo,
                   keep_hi, wd, keep_wd, s_)  # fmt: skip
    else:
        _thin_loop(src, dec, _f32_to_f32, rdo, rdo, rdo, xb, m, r, thr, masked, rescale, w,
                   keep_lo, keep_hi, wd, keep_wd, s_)  # fmt: skip


@numba.njit(inline="always")
def _thin_rows_exact(src, dec, round_in, rd, rdo, exact, xb, m, r, thr, masked, rescale, w,
                     keep_lo, keep_hi, wd, keep_wd, s_):  # fmt: skip
    """``_thin_rows`` for bfloat16 rows, with exact shortcuts where ``exact`` (D = BF16; the
    input then fits in D): rd(w' * x) = x for w' = 1 and x an rd value (rd is idempotent,
    1 * x = x, NaN included), and rd(d * rescale) = d * rescale for rescale = 2**k, k >= 0
    (``_exact_rescale``). Each removes a rounding per element; outputs are unchanged bit for
    bit. (Only here: each variant is another compiled loop.)"""
    fast_e = exact and ((not masked) or _exact_rescale(rescale))
    fast_w = exact and w == np.float32(1.0)
    if round_in:
        _thin_loop(src, dec, rd, rdo, rdo, rdo, xb, m, r, thr, masked, rescale, w, keep_lo,
                   keep_hi, wd, keep_wd, s_)  # fmt: skip
    elif fast_e and fast_w:
        _thin_loop(src, dec, _f32_to_f32, rdo, _f32_to_f32, _f32_to_f32, xb, m, r, thr, masked,
                   rescale, w, keep_lo, keep_hi, wd, keep_wd, s_)  # fmt: skip
    elif fast_e:
        _thin_loop(src, dec, _f32_to_f32, rdo, _f32_to_f32, rdo, xb, m, r, thr, masked, rescale,
                   w, keep_lo, keep_hi, wd, keep_wd, s_)  # fmt: skip
    else:
        _thin_loop(src, dec, _f32_to_f32, rdo, rdo, rdo, xb, m, r, thr, masked, rescale, w,
                   keep_lo, keep_hi, wd, keep_wd, s_)  # fmt: skip


@numba.njit(inline="always")
def _thin_block(row, code, round_in, rd, rdo, exact, lo, m, xb, r, thr, masked, rescale, w,
                keep_lo, keep_hi, wd, keep_wd, s_):  # fmt: skip
    """``_thin_loop`` over stored elements lo .. lo + m - 1 of a raw byte row (contract 1);
    ``rd`` rounds a stored value to D, ``rdo`` an op's result (the same bits on rd values)."""
    if code == _F32:
        src = row[lo * 4 : (lo + m) * 4].view(np.float32)
        _thin_rows(src, _f32_to_f32, round_in, rd, rdo, xb, m, r, thr, masked, rescale, w,
                   keep_lo, keep_hi, wd, keep_wd, s_)  # fmt: skip
    elif code == _F16:
        src16 = row[lo * 2 : (lo + m) * 2].view(np.uint16)
        _thin_rows(src16, _f16_to_f32, round_in, rd, rdo, xb, m, r, thr, masked, rescale, w,
                   keep_lo, keep_hi, wd, keep_wd, s_)  # fmt: skip
    else:
        src16 = row[lo * 2 : (lo + m) * 2].view(np.uint16)
        _thin_rows_exact(src16, _bf16_to_f32, round_in, rd, rdo, exact, xb, m, r, thr, masked,
                         rescale, w, keep_lo, keep_hi, wd, keep_wd, s_)  # fmt: skip


#: Bound per kernel by ``_thin_kernel``: D = BF16 (exact shortcuts on).
EXACT = False


def _thin_merge_kernel_py(
    inputs,  # [R, cap_bytes] uint8
    offs,  # [R] int64 byte offset of each row's element 0 (where its O_DIRECT read landed)
    codes,  # [R] int64 dtype codes
    round_in,  # [R] bool: row r's dtype does not fit in D (its values are rounded to D)
    base_row,  # int64, -1: absent
    rows,  # [K] int64 input row of each participating model
    pf_rows,  # [K or K + 1] int64 rows to prefetch: the models' and the base's
    groups,  # [K] uint64 Philox counter word 2 (j // 4)
    words,  # [K] int64 Philox output word (j % 4)
    thresholds,  # [K] uint32 floor(p_k * 2**32)
    rescales,  # [K] float32 float32(1 / (1 - p_k))
    weights,  # [K] float32 w'_k = rd(float32(w_k))
    keep_lo,  # [K] uint32 magnitude window, inclusive
    keep_hi,  # [K] uint32
    sign,  # bool: consensus "sign" (else "none")
    normalize,  # bool: m = acc / den
    den_none,  # float32 den of consensus "none" (host: rd(sum of w' in order), |den| < 1e-8 -> 1)
    linear,  # bool: out = m (else x_b + s * m)
    scale,  # float32 s
    out,  # [>= n * itemsize] uint8
    out_code,  # int64
    n,  # int64 elements
    key_lo,  # uint64 key_t & 0xFFFFFFFF
    key_hi,  # uint64 key_t >> 32
    start,  # int64 tensor index of element 0
    block,  # int64 elements per work item
):
    """Kernel contract 1 in full (window, DARE, consensus none/sign, normalize, linear).

    Per block: x_b, then each model's wd_k into a [K, block] float32 scratch (decode, then
    one thinning loop), then the consensus over the scratch, then the store. Every flag is
    tested outside the element loops. ``rd`` (a module global bound per working dtype D by
    ``_thin_kernel``: the identity for F32) rounds to D where SPEC "Working dtype (v3)" says;
    ``rdo`` (bound with it) is the same rounding of an op's result on rd values: for
    D = BF16 without the NaN test no such result needs (``rounding_ir.round_op_ir``).
    """
    n_models = rows.shape[0]
    n_blocks = (n + block - 1) // block
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for b in numba.prange(n_blocks):
        lo = b * block
        m = min(block, n - lo)
        xb = np.empty(block, np.float32)  # [m] float32 x_b
        wd = np.empty((n_models, block), np.float32)  # [K, m] float32 wd_k
        s_ = np.empty(block, np.float32)  # [m] float32 running sum of wd: S (sign) or acc
        acc = np.empty(block, np.float32)  # [m] float32 acc over agreeing k (sign), result
        den = np.empty(block, np.float32)  # [m] float32 den over agreeing k (sign)
        rw = np.empty((4, block), np.uint32)  # [4, m] Philox words of the current group
        pf_lo = lo + block
        pf_m = max(0, min(block, n - pf_lo))
        cached = np.uint64(0xFFFFFFFFFFFFFFFF)  # no group yet
        for k in range(n_models):
            if thresholds[k] != np.uint32(0):
                _philox_block(start + lo, m, groups[k], key_lo, key_hi, rw[0], rw[1], rw[2], rw[3],
                              inputs, offs, pf_rows, codes, out, out_code, pf_lo, pf_m)  # fmt: skip
                cached = groups[k]
                break
        if base_row >= 0:
            _decode_block(inputs[base_row, offs[base_row]:], codes[base_row], lo, m, xb)
            if round_in[base_row]:
                for t in range(m):
                    xb[t] = rd(xb[t])  # a stored value
        else:
            xb[:m] = zero
        s_[:m] = zero
        for k in range(n_models):
            masked = thresholds[k] != np.uint32(0)
            if masked and groups[k] != cached:
                _philox_block(start + lo, m, groups[k], key_lo, key_hi, rw[0], rw[1], rw[2], rw[3],
                              inputs, offs, pf_rows, codes, out, out_code, pf_lo, 0)  # fmt: skip
                cached = groups[k]
            row = rows[k]
            _thin_block(inputs[row, offs[row]:], codes[row], round_in[row], rd, rdo, EXACT, lo,
                        m, xb, rw[words[k]], thresholds[k], masked, rescales[k], weights[k],
                        keep_lo[k], keep_hi[k], wd[k], sign, s_)  # fmt: skip
        if sign:
            # S = rd(sum of wd_k); acc, den = sums over the k whose wd_k has S's sign (S >= 0:
            # +; S NaN: -).
            for t in range(m):
                s_[t] = rdo(s_[t])
            for k in range(n_models):
                wk = wd[k]
                wt = weights[k]
                if k == 0:
                    for t in range(m):
                        v = wk[t]
                        agree = (v > zero) if s_[t] >= zero else (v < zero)  # NaN: -
                        acc[t] = zero + v if agree else zero
                        den[t] = zero + wt if agree else zero
                else:
                    for t in range(m):
                        v = wk[t]
                        agree = (v > zero) if s_[t] >= zero else (v < zero)
                        acc[t] = acc[t] + v if agree else acc[t]
                        den[t] = den[t] + wt if agree else den[t]
            # acc, den rounded to D; m = normalize ? rd(acc / den) (den = 1 where 0) : acc;
            # out = linear ? m : rd(x_b + rd(s * m))
            if normalize:
                for t in range(m):
                    dn = rdo(den[t])
                    den[t] = one if dn == zero else dn
                    acc[t] = rdo(acc[t])
                for t in range(m):
                    acc[t] = rdo(acc[t] / den[t])
                if not linear:
                    if scale == one:  # rd(1 * x) = x for an rd value x
                        for t in range(m):
                            acc[t] = rdo(xb[t] + acc[t])
                    else:
                        for t in range(m):
                            acc[t] = rdo(xb[t] + rdo(scale * acc[t]))
            elif linear:
                for t in range(m):
                    acc[t] = rdo(acc[t])
            else:
                for t in range(m):
                    acc[t] = rdo(xb[t] + rdo(scale * rdo(acc[t])))
            res = acc
        else:
            # acc = rd(s_); m = normalize ? rd(acc / den_none) : acc; out = linear ? m :
            # rd(x_b + rd(s * m))
            res = acc
            if normalize:
                if linear:
                    for t in range(m):
                        acc[t] = rdo(rdo(s_[t]) / den_none)
                else:
                    for t in range(m):
                        acc[t] = rdo(xb[t] + rdo(scale * rdo(rdo(s_[t]) / den_none)))
            elif linear:
                for t in range(m):
                    acc[t] = rdo(s_[t])
            elif scale == one:  # rd(1 * x) = x for an rd value x
                for t in range(m):
                    acc[t] = rdo(xb[t] + rdo(s_[t]))
            else:
                for t in range(m):
                    acc[t] = rdo(xb[t] + rdo(scale * rdo(s_[t])))
        if EXACT and out_code == _BF16:
            # D = BF16: every res[t] is an rd value (low 16 bits 0, a NaN already quiet), so
            # _f32_to_bf16 is its top half.
            dst = out[lo * 2 : (lo + m) * 2].view(np.uint16)
            for t in range(m):
                dst[t] = np.uint16(_f32_bits(res[t]) >> np.uint32(16))
        else:
            _encode_block(res, out_code, lo, m, out)


def _thin_kernel(name: str, rd, rdo):
    """``_thin_merge_kernel_py`` compiled with the module global ``rd`` bound to one working
    dtype's rounding, and ``EXACT`` to D = BF16 (the kernel then drops roundings that
    provably change nothing): a separate function per D, so D = F32 compiles to v2's float32
    code, and each is cached on disk under its own name."""
    fn = types_mod.FunctionType(_thin_merge_kernel_py.__code__,
                                {**globals(), "rd": rd, "rdo": rdo, "EXACT": rd is _rd_bf16},
                                name,
                                _thin_merge_kernel_py.__defaults__, _thin_merge_kernel_py.__closure__)  # fmt: skip
    fn.__qualname__ = name
    fn.__doc__ = _thin_merge_kernel_py.__doc__
    return numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")(fn)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _convert_kernel(src, src_code, out, out_code, n, block, scale):
    n_blocks = (n + block - 1) // block
    one = np.float32(1.0)
    for b in numba.prange(n_blocks):
        lo = b * block
        m = min(block, n - lo)
        x = np.empty(block, np.float32)
        _decode_block(src, src_code, lo, m, x)
        if scale != one:  # passthrough's scale: float32(x) * float32(s), signed zeros kept
            for t in range(m):
                x[t] = x[t] * scale
        _encode_block(x, out_code, lo, m, out)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def count_exponent_ones(x, m):
    """Elements of the unsigned array ``x`` with every bit of ``m`` set ((x & m) == m: the
    non-finite values, ``streammerge.io.nonfinite``); one vectorized pass, GIL released."""
    n = 0
    for i in range(x.shape[0]):
        n += (x[i] & m) == m
    return n


#: The v2 kernel per working dtype D (SPEC "Working dtype (v3)"); ``_thin_merge_kernel`` is
#: D = F32, v2's float32 kernel.
_thin_merge_kernel = _thin_kernel("_thin_merge_kernel", _f32_to_f32, _f32_to_f32)
_thin_merge_kernel_bf16 = _thin_kernel("_thin_merge_kernel_bf16", _rd_bf16, _rdo_bf16)
_thin_merge_kernel_f16 = _thin_kernel("_thin_merge_kernel_f16", _rd_f16, _rd_f16)
_THIN_KERNELS = {_F32: _thin_merge_kernel, _BF16: _thin_merge_kernel_bf16, _F16: _thin_merge_kernel_f16}


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def _code(dtype: str, what: str) -> int:
    try:
        return FLOAT_CODES[dtype]
    except (KeyError, TypeError):
        raise ValueError(
            f"{what}: unsupported dtype {dtype!r}; the merge kernel reads and writes "
            f"{', '.join(FLOAT_CODES)}"
        ) from None


def _check_bytes(a: np.ndarray, ndim: int, what: str) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != ndim:
        raise ValueError(f"{what} must be a {ndim}-D np.uint8 array, got {_describe(a)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")


def _check_rows(
    inputs: np.ndarray, dtypes: Sequence[str], base_row: int, model_rows: Sequence[int], n: int,
    what: str, offsets: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[int], int, np.ndarray]:  # fmt: skip
    """Validate the raw input rows of a chunk of ``n`` elements (merge_chunk, cpu_stats).

    ``offsets``: the byte offset of each row's element 0 (where an O_DIRECT read landed:
    the kernels read the row from there, no memmove into place); None: 0 for every row.

    Returns:
        (codes [R] int64 dtype codes, the rows used: models then the base if any, int(n),
        [R] int64 offsets).

    Raises:
        ValueError: ``inputs`` not a C-contiguous 2-D uint8 array, dtypes of the wrong
            length or unknown, no model, n < 0, a row out of range or too short for n
            elements after its offset, offsets not R integers >= 0.
    """
    _check_bytes(inputs, 2, "inputs")
    n_rows, cap_bytes = inputs.shape
    if len(dtypes) != n_rows:
        raise ValueError(f"dtypes has {len(dtypes)} entries for {n_rows} input rows")
    codes = np.array([_code(d, f"dtypes[{r}]") for r, d in enumerate(dtypes)], np.int64)
    if len(model_rows) < 1:
        raise ValueError(f"{what} needs at least one participating model")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    offs = np.zeros(n_rows, np.int64) if offsets is None else np.array(offsets, np.int64)
    if offs.shape != (n_rows,) or (offs < 0).any():
        raise ValueError(f"offsets must be {n_rows} integers >= 0, got {offsets}")
    used = [int(r) for r in model_rows] + ([int(base_row)] if base_row != -1 else [])
    for r in used:
        if not 0 <= r < n_rows:
            raise ValueError(f"row {r} out of range for {n_rows} input rows (base_row may be -1)")
        if offs[r] + n * _CODE_ITEMSIZE[codes[r]] > cap_bytes:
            raise ValueError(
                f"row {r} holds {cap_bytes} bytes, too few for {n} {dtypes[r]} elements"
                + (f" after offset {offs[r]}" if offs[r] else "")
            )
    return codes, used, n, offs


def _window_bounds(bounds, n_models: int, default: int, what: str) -> np.ndarray:
    """keep_lo / keep_hi as a [K] uint32 array (None: every entry ``default``)."""
    if bounds is None:
        return np.full(n_models, default, np.uint32)
    try:
        vals = list(bounds)
    except TypeError:
        raise ValueError(f"{what} must be {n_models} integers or None, got {bounds!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in vals):
        raise ValueError(f"{what} must be {n_models} integers or None, got {bounds!r}")
    vals = [int(v) for v in vals]
    if len(vals) != n_models:
        raise ValueError(f"{what} has {len(vals)} entries for {n_models} models")
    for v in vals:
        if not 0 <= v < 2**32:
            raise ValueError(f"{what} entries must be in [0, 2**32), got {v}")
    return np.array(vals, np.uint32)


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.ndim}-D {a.dtype} array of shape {a.shape}"
    return type(a).__name__


def merge_chunk(
    inputs: np.ndarray,
    dtypes: Sequence[str],
    base_row: int,
    model_rows: Sequence[int],
    model_ids: Sequence[int],
    drop: Sequence[float],
    weights: Sequence[float],
    scale: float,
    out: np.ndarray,
    out_dtype: str,
    n: int,
    key: int,
    start: int,
    *,
    keep_lo: Sequence[int] | None = None,
    keep_hi: Sequence[int] | None = None,
    consensus: str = "none",
    normalize: bool = False,
    linear: bool = False,
    compute_dtype: str = "F32",
    offsets: Sequence[int] | None = None,
) -> None:
    """Merge one chunk of one tensor into ``out`` (SPEC "Random drop masks", "The merged
    value", v2 "Methods"; docs/kernels.md section 1).

    Element t of the chunk is element ``start + t`` of the tensor (row-major order);
    masks depend only on (key, j, start + t) and the keep window only on the element's own
    values, so any chunking gives the same bytes.

    With the defaults (no window, consensus "none", normalize and linear False) this is
    v1's formula and v1's kernel (``_merge_kernel``, unchanged); anything else runs
    ``_thin_merge_kernel``, which keeps each model's wd_k for the block in a [K, BLOCK]
    float32 scratch:
        d_k  = float32(model_k) - x_b;  mag_k = bits(d_k) & 0x7FFFFFFF (uint32)
        kept = DARE word >= floor(p_k * 2**32) (when p_k > 0) and keep_lo[k] <= mag_k <= keep_hi[k]
        wd_k = float32(w_k) * (kept ? d_k * float32(1 / (1 - p_k)) : +0.0)
        "none": acc = sum of wd_k in order; den = sum of float32(w_k), 1 when |den| < 1e-8
        "sign": S = sum of wd_k; acc, den = sums of wd_k, float32(w_k) over k whose wd_k has
                S's sign (S >= 0 counts as +, NaN as -; wd_k = 0 or NaN never agrees);
                den = 1 where it is 0
        m = normalize ? acc / den (IEEE float32 division, RNE) : acc
        out = linear ? m : x_b + float32(s) * m, stored RNE.

    Args:
        inputs: [R, cap_bytes] np.uint8, C-contiguous. Row r holds input r's chunk as raw
            little-endian bytes: ``n`` elements of ``dtypes[r]`` (cap_bytes >= n * itemsize
            for every row used).
        dtypes: R safetensors dtype strings, "F32", "F16" or "BF16" (rows not used may be
            anything in that set).
        base_row: the row holding the base, or -1 when the base is absent (x_b = +0.0).
        model_rows: K >= 1 rows of the participating fine-tunes, in model order.
        model_ids: K SPEC model indices j (Philox word j % 4, counter word 2 = j // 4),
            each in [0, 2**32).
        drop: K drop rates p_j, 0 <= p_j < 1.
        weights: K contribution weights w_j (rounded to float32).
        scale: scaling coefficient s (rounded to float32).
        out: [>= n * itemsize(out_dtype)] np.uint8, C-contiguous; receives the raw bytes.
        out_dtype: "F32", "F16" or "BF16".
        n: number of elements, >= 0.
        key: key_t in [0, 2**63) (``kernels.common.tensor_key``).
        start: tensor index of the chunk's first element, >= 0, start + n <= 2**63.
        keep_lo, keep_hi: K ints in [0, 2**32) (uint32 magnitudes), or None (all 0 / all
            0xFFFFFFFF): model k's element is kept only if keep_lo[k] <= mag_k <= keep_hi[k]
            (magnitude trim [T] -> (T, 0xFFFFFFFF); breadcrumbs [L, H] -> (L, H); keep none
            -> (1, 0)).
        consensus: "none" (plain sum) or "sign" (TIES sign election).
        normalize: divide by the summed weights (den above).
        linear: out = m (SPEC ``linear``: no base, so base_row must be -1 and d_k is the
            model value itself; ``scale`` is not used).
        compute_dtype: the working dtype D, "F32" (the formula above), "BF16" or "F16":
            every intermediate rounded to D as SPEC "Working dtype (v3)" says (d_k, DARE's
            rescaled value, w'_k, wd_k, the sums, the quotient, s * m and x_b + m; inputs
            whose dtype does not fit in D are rounded to it first). Always the v2 kernel
            (one compiled variant per D). "F32" with ``linear`` only.
        offsets: R byte offsets, or None (all 0): row r's element 0 is at
            ``inputs[r, offsets[r]]`` (where an O_DIRECT read landed, so the reader moves
            nothing into place); offsets[r] + n * itemsize <= cap_bytes.

    Raises:
        ValueError: wrong array type/shape/contiguity, a row too short for n elements, an
            unknown dtype, lengths that disagree, a row index out of range, p outside
            [0, 1), key/start/j out of range, a keep window bound outside [0, 2**32),
            an unknown consensus, normalize/linear not a bool, linear with a base row, or
            an unknown compute_dtype (or not F32 with linear).

    Speed (N=2 bf16 in and out, 16M-element chunk, 2-core AMD EPYC VM, 2 threads, best of
    9): p=0.5: 12.7-14.7 ms, 1.1-1.3 G elements/s, 6.8-7.9 GB/s of input; p=0: 7-9.4 ms,
    1.8-2.4 G elements/s, 11-14 GB/s. One thread, p=0.5: 25 ms. First call compiles in
    ~12 s of CPU (0.3 s from numba's cache); call ``warmup`` early.
    v2 kernel, same chunk, on a 2-core Intel Xeon VM (AVX-512, shared; best of many, where
    v1 gives p=0.5: 22.7 ms, p=0: 8.2 ms): ties (window + sign + normalize) 13.1 ms, 1.3 G
    elements/s; dare_ties p=0.5 26.3 ms; breadcrumbs 9.3 ms; task_arithmetic normalized
    9.5 ms.
    """
    codes, used, n, offs = _check_rows(inputs, dtypes, base_row, model_rows, n, "merge_chunk",
                                       offsets)  # fmt: skip
    _check_bytes(out, 1, "out")
    out_code = _code(out_dtype, "out_dtype")
    n_models = len(model_rows)
    if not (len(model_ids) == len(drop) == len(weights) == n_models):
        raise ValueError(
            f"model_rows, model_ids, drop and weights must have one entry per model; got "
            f"{n_models}, {len(model_ids)}, {len(drop)}, {len(weights)}"
        )
    if not 0 <= key < 2**63:
        raise ValueError(f"key must be in [0, 2**63), got {key}")
    if start < 0 or start + n > 2**63:
        raise ValueError(f"start must satisfy 0 <= start and start + n <= 2**63, got {start}")
    if n * FLOAT_ITEMSIZE[out_dtype] > out.shape[0]:
        raise ValueError(f"out holds {out.shape[0]} bytes, too few for {n} {out_dtype} elements")
    for j in model_ids:
        if not 0 <= j < 2**32:
            raise ValueError(f"model id j must be in [0, 2**32), got {j}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    for w in weights:
        if not math.isfinite(w):
            raise ValueError(f"weights must be finite, got {list(weights)}")
    thresholds = np.array([drop_threshold(p) for p in drop], np.uint32)  # validates p
    lo_arr = _window_bounds(keep_lo, n_models, 0, "keep_lo")
    hi_arr = _window_bounds(keep_hi, n_models, 0xFFFFFFFF, "keep_hi")
    if consensus not in ("none", "sign"):
        raise ValueError(f"consensus must be 'none' or 'sign', got {consensus!r}")
    for flag, what in ((normalize, "normalize"), (linear, "linear")):
        if not isinstance(flag, (bool, np.bool_)):  # ValueError, as every argument error here
            raise ValueError(f"{what} must be a bool, got {type(flag).__name__}")  # noqa: TRY004
    if linear and base_row != -1:
        raise ValueError(
            f"linear merges have no base (SPEC v2 'linear'): base_row must be -1, got {base_row}"
        )
    d_code = _code(compute_dtype, "compute_dtype")
    if linear and d_code != _F32:
        raise ValueError(f"linear computes in F32 (SPEC 'Working dtype (v3)'), got {compute_dtype}")
    if n == 0:
        return
    windowed = bool((lo_arr != 0).any() or (hi_arr != 0xFFFFFFFF).any())
    if windowed or consensus != "none" or normalize or linear or d_code != _F32:
        w32 = np.array([round_host(w, compute_dtype) for w in weights], np.float32)  # w'
        den = np.float32(0.0)
        for w in w32:
            den = np.float32(den + w)  # float32 sum in model order
        den = round_host(den, compute_dtype)
        if abs(den) <= np.float32(1e-8):  # |den| < 1e-8 as real numbers (contract 1)
            den = np.float32(1.0)
        round_in = np.array([d_code != _F32 and c != d_code for c in codes], np.bool_)
        _THIN_KERNELS[d_code](
            inputs,
            offs,
            codes,
            round_in,
            np.int64(base_row),
            np.array(model_rows, np.int64),
            np.array(used, np.int64),
            np.array([j // 4 for j in model_ids], np.uint64),
            np.array([j % 4 for j in model_ids], np.int64),
            thresholds,
            np.array([drop_rescale(p) for p in drop], np.float32),
            w32,
            lo_arr,
            hi_arr,
            consensus == "sign",
            bool(normalize),
            den,
            bool(linear),
            np.float32(scale),
            out,
            np.int64(out_code),
            np.int64(n),
            np.uint64(key & 0xFFFFFFFF),
            np.uint64(key >> 32),
            np.int64(start),
            np.int64(BLOCK_V2),
        )
        return
    _merge_kernel(
        inputs,
        offs,
        codes,
        np.int64(base_row),
        np.array(model_rows, np.int64),
        np.array(used, np.int64),
        np.array([j // 4 for j in model_ids], np.uint64),
        np.array([j % 4 for j in model_ids], np.int64),
        thresholds,
        np.array([drop_rescale(p) for p in drop], np.float32),
        np.array([np.float32(w) for w in weights], np.float32),
        np.float32(scale),
        out,
        np.int64(out_code),
        np.int64(n),
        np.uint64(key & 0xFFFFFFFF),
        np.uint64(key >> 32),
        np.int64(start),
        np.int64(BLOCK),
    )


def convert_chunk(src: np.ndarray, src_dtype: str, out: np.ndarray, out_dtype: str, n: int,
                  scale: float = 1.0) -> None:  # fmt: skip
    """Convert ``n`` float elements between dtypes, round to nearest even (exact upcasts),
    multiplied by ``scale`` first when it is not 1 (``float32(x) * float32(scale)``: a layer
    stack's ``scale``, docs/SPEC.md "Stacks (passthrough)").

    For float tensors copied (not merged) into an output of another dtype. Same rounding
    as the merge's final store; a NaN stays a NaN.

    Args:
        src: [>= n * itemsize(src_dtype)] np.uint8, C-contiguous, raw little-endian bytes.
        src_dtype: "F32", "F16" or "BF16".
        out: [>= n * itemsize(out_dtype)] np.uint8, C-contiguous; receives the raw bytes.
        out_dtype: "F32", "F16" or "BF16".
        n: number of elements, >= 0.

    Raises:
        ValueError: wrong array type or size, unknown dtype, n < 0.
    """
    _check_bytes(src, 1, "src")
    _check_bytes(out, 1, "out")
    src_code, out_code = _code(src_dtype, "src_dtype"), _code(out_dtype, "out_dtype")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n * FLOAT_ITEMSIZE[src_dtype] > src.shape[0]:
        raise ValueError(f"src holds {src.shape[0]} bytes, too few for {n} {src_dtype} elements")
    if n * FLOAT_ITEMSIZE[out_dtype] > out.shape[0]:
        raise ValueError(f"out holds {out.shape[0]} bytes, too few for {n} {out_dtype} elements")
    if n == 0:
        return
    if src_code == out_code and scale == 1.0:
        nbytes = n * FLOAT_ITEMSIZE[src_dtype]
        out[:nbytes] = src[:nbytes]
        return
    _convert_kernel(src, np.int64(src_code), out, np.int64(out_code), np.int64(n), np.int64(BLOCK),
                    np.float32(scale))  # fmt: skip


def _dtype_of(a: np.ndarray, given: str | None, what: str) -> str:
    if given is not None:
        _code(given, what)
        if a.dtype.itemsize != FLOAT_ITEMSIZE[given]:
            raise ValueError(f"{what}: {a.dtype} array cannot hold {given}")
        return given
    for name, carrier in NUMPY_CARRIER.items():
        if a.dtype == carrier:
            return name
    raise ValueError(
        f"{what}: cannot infer a float dtype from {a.dtype}; use float32, float16 or "
        "uint16 (bfloat16 bits), or pass the dtype"
    )


def merge_arrays(
    base: np.ndarray | None,
    models: Sequence[np.ndarray],
    out_dtype: str,
    *,
    key: int,
    start: int,
    drop: Sequence[float],
    weights: Sequence[float],
    scale: float = 1.0,
    model_ids: Sequence[int] | None = None,
    base_dtype: str | None = None,
    model_dtypes: Sequence[str] | None = None,
    keep_lo: Sequence[int] | None = None,
    keep_hi: Sequence[int] | None = None,
    consensus: str = "none",
    normalize: bool = False,
    linear: bool = False,
    compute_dtype: str = "F32",
) -> np.ndarray:
    """``merge_chunk`` on typed 1-D arrays (tests and benches; copies into a byte buffer).

    Args:
        base: [n] float32 / float16 / uint16 (= bfloat16 bits), or None (x_b = +0.0; must
            be None when ``linear``).
        models: K arrays [n], same conventions; dtypes may differ.
        out_dtype: "F32", "F16" or "BF16".
        key, start, drop, weights, scale: as in ``merge_chunk``.
        keep_lo, keep_hi, consensus, normalize, linear: as in ``merge_chunk`` (v2).
        compute_dtype: the working dtype D, as in ``merge_chunk`` (v3).
        model_ids: SPEC index j per model (default 0 .. K-1).
        base_dtype, model_dtypes: override the dtype inferred from the numpy dtype.

    Returns:
        [n] array of ``out_dtype``'s carrier: float32, float16, or uint16 (bf16 bits).

    Raises:
        ValueError: as ``merge_chunk``, or arrays that are not 1-D of one length.
    """
    arrays = ([] if base is None else [np.asarray(base)]) + [np.asarray(m) for m in models]
    if not models or any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
        raise ValueError("base and models must be 1-D arrays of one length (at least one model)")
    n = arrays[0].shape[0]
    dts = [] if base is None else [_dtype_of(arrays[0], base_dtype, "base")]
    given = model_dtypes if model_dtypes is not None else [None] * len(models)
    if len(given) != len(models):
        raise ValueError(f"model_dtypes has {len(given)} entries for {len(models)} models")
    off = len(dts)
    dts += [_dtype_of(arrays[off + k], g, f"models[{k}]") for k, g in enumerate(given)]
    cap_bytes = max(1, n * max(FLOAT_ITEMSIZE[d] for d in dts))
    buf = np.zeros((len(arrays), cap_bytes), np.uint8)  # [R, cap_bytes] raw bytes
    for r, a in enumerate(arrays):
        raw = np.ascontiguousarray(a).view(np.uint8)
        buf[r, : raw.shape[0]] = raw
    _code(out_dtype, "out_dtype")
    out = np.empty(max(1, n * FLOAT_ITEMSIZE[out_dtype]), np.uint8)
    ids = list(range(len(models))) if model_ids is None else list(model_ids)
    merge_chunk(
        buf, dts, -1 if base is None else 0, list(range(off, len(arrays))), ids,
        list(drop), list(weights), scale, out, out_dtype, n, key, start,
        keep_lo=keep_lo, keep_hi=keep_hi, consensus=consensus, normalize=normalize, linear=linear,
        compute_dtype=compute_dtype,
    )  # fmt: skip
    return out[: n * FLOAT_ITEMSIZE[out_dtype]].view(NUMPY_CARRIER[out_dtype]).copy()


def warmup() -> None:
    """Compile (or load from numba's on-disk cache) the kernels on tiny inputs: v1, v2 in
    float32 and in the working dtype BF16 (the common one; F16 compiles on first use), and
    the conversion."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(8).astype(np.float32)
    merge_arrays(x, [x, x], "BF16", key=1, start=0, drop=[0.5, 0.0], weights=[0.5, 0.5])
    for d in ("F32", "BF16"):
        merge_arrays(x, [x, x], "BF16", key=1, start=0, drop=[0.0, 0.0], weights=[0.5, 0.5],
                     keep_lo=[1, 0], consensus="sign", normalize=True, compute_dtype=d)  # fmt: skip
    out = np.empty(16, np.uint8)
    convert_chunk(x.view(np.uint8), "F32", out, "BF16", 8)
    u16 = out.view(np.uint16)
    count_exponent_ones(u16, u16.dtype.type(0x7F80))  # the writer's count of BF16 outputs
