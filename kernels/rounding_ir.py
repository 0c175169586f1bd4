"""Rounding to a working dtype as inline LLVM IR (numba intrinsics).

``round_work_ir(v, code)`` is ``rW(v)`` of docs/SPEC.md ("Working dtype (v3)", "NearSwap":
float32 ``v`` rounded to the working dtype ``code`` and widened back), bit for bit
``kernels/cpu_merge``'s ``_f16_to_f32(_f32_to_f16(v))`` (``code`` F16) and
``_bf16_to_f32(_f32_to_bf16(v))`` (BF16), the identity for F32.

Why IR: the row-wise kernels call rW ten to thirty times per element. A plain njit call
stays an out-of-line call in the large kernels (2x slower loops), and numba's
``inline="always"`` inlines at numba-IR level, which cost 20-80 s of compile time per
kernel (the whole set took 520 s on a cold cache). An intrinsic is emitted inline as a few
integer instructions behind a branch on the code (LLVM unswitches the loop around it), and
compiles at once. ``tests/test_rounding_ir.py`` checks it against the numba functions on
every float32 bit pattern class (all exponents, boundary mantissas, NaNs, infinities,
subnormals).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .common import FLOAT_CODES

_F16, _BF16 = FLOAT_CODES["F16"], FLOAT_CODES["BF16"]
_I32 = ir.IntType(32)


def bf16_round_op_bits(builder, u):
    """IR: bits of float32 -> bfloat16 (nearest even) -> float32 without a NaN test, for
    the result of an arithmetic op on rounded values (``round_op_ir`` says when that is
    ``bf16_round_trip_bits``'s result)."""
    lsb = builder.and_(builder.lshr(u, _I32(16)), _I32(1))
    return builder.and_(builder.add(builder.add(u, _I32(0x7FFF)), lsb), _I32(0xFFFF0000))


def bf16_round_trip_bits(builder, u):
    """IR: bits of float32 -> bfloat16 (nearest even; a NaN keeps its top 16 bits, made
    quiet) -> float32, on uint32 bit patterns (also ``cpu_merge._rd_bf16_ir``'s body)."""
    rounded = bf16_round_op_bits(builder, u)
    quiet = builder.and_(builder.or_(u, _I32(0x00400000)), _I32(0xFFFF0000))
    is_nan = builder.icmp_unsigned(">", builder.and_(u, _I32(0x7FFFFFFF)), _I32(0x7F800000))
    return builder.select(is_nan, quiet, rounded)


def _f32_to_f16_bits(builder, u):
    """``cpu_merge._f32_to_f16`` (F. Giesen's float_to_half_fast3_rtne) on uint32 bits:
    the float16 bits in the low 16 bits of a uint32."""
    f32 = ir.FloatType()
    sign = builder.lshr(builder.and_(u, _I32(0x80000000)), _I32(16))
    a = builder.and_(u, _I32(0x7FFFFFFF))
    big = builder.select(builder.icmp_unsigned(">", a, _I32(0x7F800000)), _I32(0x7E00),
                         _I32(0x7C00))  # fmt: skip
    magic = _I32(126 << 23)
    added = builder.fadd(builder.bitcast(a, f32), builder.bitcast(magic, f32))
    sub = builder.sub(builder.bitcast(added, _I32), magic)
    odd = builder.and_(builder.lshr(a, _I32(13)), _I32(1))
    norm = builder.add(builder.add(a, _I32(((15 - 127) << 23) & 0xFFFFFFFF)), _I32(0xFFF))
    norm = builder.lshr(builder.add(norm, odd), _I32(13))
    o = builder.select(builder.icmp_unsigned("<", a, _I32(113 << 23)), sub, norm)
    o = builder.select(builder.icmp_unsigned(">=", a, _I32((127 + 16) << 23)), big, o)
    return builder.and_(builder.or_(o, sign), _I32(0xFFFF))


def _f16_bits_to_f32_bits(builder, h):
    """``cpu_merge._f16_to_f32`` on uint32 bits holding float16 bits: exact, subnormals,
    infinities and NaN payloads included."""
    f32 = ir.FloatType()
    sign = builder.shl(builder.and_(h, _I32(0x8000)), _I32(16))
    em = builder.and_(h, _I32(0x7FFF))
    normal = builder.add(builder.shl(em, _I32(13)), _I32((127 - 15) << 23))
    special = builder.or_(_I32(0x7F800000), builder.shl(builder.and_(em, _I32(0x3FF)), _I32(13)))
    sub = builder.fmul(builder.uitofp(em, f32), ir.Constant(f32, 2.0**-24))
    sub = builder.bitcast(sub, _I32)
    bits = builder.select(builder.icmp_unsigned(">=", em, _I32(0x0400)), normal, sub)
    bits = builder.select(builder.icmp_unsigned(">=", em, _I32(0x7C00)), special, bits)
    return builder.or_(bits, sign)


@intrinsic
def round_work_ir(typingctx, v, code):
    """float32 ``v`` rounded to the working dtype ``code`` (``FLOAT_CODES``: F32 the
    identity, F16, BF16; nearest even, a NaN stays a quiet NaN) and widened back to float32.
    """
    if v != types.float32 or not isinstance(code, types.Integer):
        return None

    return types.float32(v, code), _rounding_codegen(bf16_round_trip_bits)


@intrinsic
def round_op_ir(typingctx, v, code):
    """``round_work_ir`` for the result ``v`` of a float32 op whose operands are values of
    W (each already rounded), float32 scalars made from them, or constants: the same bits,
    with the bf16 rounding's NaN test left out (5 integer ops, not 10: 0.76 -> 0.43 ns an
    element for four roundings and four ops, one thread, AVX-512).

    Why the bits are the same: the bf16 rounding without the test differs from the test's
    only on a NaN whose low 16 bits are not zero (its carry can reach the exponent) or a
    signaling NaN (the test makes it quiet). A rounded value is finite or a quiet NaN with
    low 16 bits zero; an IEEE op on such operands returns a finite value, an infinity, the
    default NaN (0xFFC00000 on x86, 0x7FC00000 on Arm) or one operand's NaN, made quiet,
    payload kept (x86 SSE/AVX and Arm without default-NaN mode: numba's targets): every NaN
    it gives has its low 16 bits zero and is quiet, and both roundings leave it as it is.
    So only a value read from storage (a float32 or float16 NaN may carry low bits; a bf16
    one may be signaling) needs ``round_work_ir``. F16 and F32 are ``round_work_ir``'s.
    """
    if v != types.float32 or not isinstance(code, types.Integer):
        return None
    return types.float32(v, code), _rounding_codegen(bf16_round_op_bits)


def _rounding_codegen(bf16_bits):
    """The codegen of a rounding intrinsic whose BF16 branch is ``bf16_bits``."""

    def codegen(context, builder, signature, args):
        x, c = args
        c64 = context.cast(builder, c, signature.args[1], types.int64)
        i64, f32 = ir.IntType(64), ir.FloatType()
        # branches on the (loop-invariant) code, not selects: LLVM unswitches the loops
        # around them, so each dtype's loop runs (and vectorizes) with its own rounding only
        fn = builder.function
        bf_bb, not_bf_bb = fn.append_basic_block("rw_bf16"), fn.append_basic_block("rw_not_bf16")
        f16_bb, done_bb = fn.append_basic_block("rw_f16"), fn.append_basic_block("rw_done")
        builder.cbranch(builder.icmp_signed("==", c64, ir.Constant(i64, _BF16)), bf_bb, not_bf_bb)
        builder.position_at_end(bf_bb)
        bf = builder.bitcast(bf16_bits(builder, builder.bitcast(x, _I32)), f32)
        builder.branch(done_bb)
        builder.position_at_end(not_bf_bb)
        builder.cbranch(builder.icmp_signed("==", c64, ir.Constant(i64, _F16)), f16_bb, done_bb)
        builder.position_at_end(f16_bb)
        half = _f16_bits_to_f32_bits(builder, _f32_to_f16_bits(builder, builder.bitcast(x, _I32)))
        hf = builder.bitcast(half, f32)
        builder.branch(done_bb)
        builder.position_at_end(done_bb)
        out = builder.phi(f32)
        out.add_incoming(bf, bf_bb)
        out.add_incoming(x, not_bf_bb)
        out.add_incoming(hf, f16_bb)
        return out

    return codegen


@intrinsic
def f64_bits(typingctx, x):
    """The uint64 bit pattern of a float64 (no array round trip: a register move)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.uint64(x), codegen


@intrinsic
def bits_f64(typingctx, x):
    """The float64 whose bit pattern is the uint64 (or int64) ``x``."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(x), codegen
