"""NearSwap CPU kernel (numba): mergekit's ``nearswap`` op by op in the working dtype.

Contract: docs/SPEC.md "NearSwap", tested bit for bit against ``tests/spec_reference.py``
and against the Triton kernel of ``kernels/triton_nearswap.py``.

Each element is independent: ``a`` (the base, model 0) and ``b`` (model 1) decoded to
float32, the SPEC's ten float32 operations each rounded to the working dtype W (the
inputs' common dtype, else float32), the result stored rounded to the output dtype.
Inputs and output are raw little-endian byte rows of a slot, as in ``cpu_merge``.
"""

from __future__ import annotations

import numba
import numpy as np

from .common import FLOAT_CODES
from .cpu_merge import _decode_block, _encode_block
from .cpu_rows import _checked
from .rounding_ir import round_op_ir, round_work_ir

_F32, _F16, _BF16 = FLOAT_CODES["F32"], FLOAT_CODES["F16"], FLOAT_CODES["BF16"]

#: Elements per parallel block.
BLOCK = 8192
#: mergekit's clamp floor of |a - b| (``absdiff.clamp(min=1e-6)``), before rounding to W.
CLAMP_MIN = 1e-6


def work_dtype(dtype_a: str, dtype_b: str) -> str:
    """SPEC's working dtype W: the inputs' common dtype, ``F32`` when they differ (torch's
    promotion of bf16 with f16, and of anything with f32)."""
    return dtype_a if dtype_a == dtype_b else "F32"


@numba.njit(inline="always")
def round_work(v, code):
    """float32 ``v`` rounded to the working dtype ``code`` and widened back (exact): inline
    LLVM IR (``kernels/rounding_ir.py`` says why), bit for bit ``_f16_to_f32(_f32_to_f16(v))``
    for F16 and ``_bf16_to_f32(_f32_to_bf16(v))`` for BF16."""
    return round_work_ir(v, code)


@numba.njit(inline="always")
def round_op(v, code):
    """``round_work`` of the result of an op on values already in W (not of a value read
    from storage): the same bits, fewer instructions (``rounding_ir.round_op_ir`` says
    why)."""
    return round_op_ir(v, code)


@numba.njit(inline="always")
def _nearswap_one(x, y, t32, lo, w_code):
    x = round_work(x, w_code)  # the inputs in W (mergekit's dtype: casts them at load)
    y = round_work(y, w_code)
    d = round_op(x - y, w_code)
    ad = abs(d)
    c = lo if ad < lo else ad  # noqa: FURB136 - a NaN stays NaN (torch clamp)
    r = round_op(np.float32(1.0) / c, w_code)
    w = round_op(r * t32, w_code)
    if w < np.float32(0.0):
        w = np.float32(0.0)
    elif w > np.float32(1.0):
        w = np.float32(1.0)
    p = round_op(w * y, w_code)
    q = round_op(np.float32(1.0) - w, w_code)
    s = round_op(q * x, w_code)
    return round_op(p + s, w_code)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _nearswap_kernel(row_a, code_a, row_b, code_b, n, t32, lo, w_code, out, out_code):
    for k in numba.prange((n + BLOCK - 1) // BLOCK):
        first = k * BLOCK
        m = min(BLOCK, n - first)
        x = np.empty(BLOCK, np.float32)
        y = np.empty(BLOCK, np.float32)
        _decode_block(row_a, code_a, first, m, x)
        _decode_block(row_b, code_b, first, m, y)
        if w_code == _BF16:  # the working dtype a constant in each loop (it vectorizes)
            _nearswap_loop(x, y, m, t32, lo, _BF16)
        elif w_code == _F16:
            _nearswap_loop(x, y, m, t32, lo, _F16)
        else:
            _nearswap_loop(x, y, m, t32, lo, _F32)
        _encode_block(x, out_code, first, m, out)


@numba.njit(inline="always")
def _nearswap_loop(x, y, m, t32, lo, c):
    for i in range(m):
        x[i] = _nearswap_one(x[i], y[i], t32, lo, c)


def nearswap_chunk(a: np.ndarray, dtype_a: str, b: np.ndarray, dtype_b: str, n: int, t: float,
                   out: np.ndarray, out_dtype: str, work: str | None = None) -> None:  # fmt: skip
    """NearSwap of ``n`` elements into the raw byte row ``out`` (SPEC "NearSwap").

    Args:
        a, b: raw byte rows (np.uint8) of the base and the other model, at least ``n``
            elements of ``dtype_a`` / ``dtype_b`` (``F32``, ``F16``, ``BF16``).
        t: the tensor's t (float64; rounded to float32 as torch rounds a Python scalar).
        out: raw byte row receiving ``n`` elements of ``out_dtype``.
        work: the working dtype W (mergekit's ``dtype:``), or None: ``work_dtype``.

    Raises:
        ValueError: a bad row or dtype, or a negative ``n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ca = _checked(a, dtype_a, n, "a")
    cb = _checked(b, dtype_b, n, "b")
    co = _checked(out, out_dtype, n, "out")
    w = work or work_dtype(dtype_a, dtype_b)
    lo = np.float32(clamp_floor(w))
    _nearswap_kernel(a, ca, b, cb, n, np.float32(t), lo, FLOAT_CODES[w], out, co)


def clamp_floor(w_dtype: str) -> np.float32:
    """``rW(float32(1e-6))``: mergekit's clamp floor in the working dtype (float32 value)."""
    return np.float32(_round_host(np.float32(CLAMP_MIN), FLOAT_CODES[w_dtype]))


@numba.njit(cache=True, error_model="numpy")
def _round_host(v, code):
    return round_work(v, code)


def warmup() -> None:
    """Compile (or load from numba's cache) the kernel for each dtype."""
    for dt in FLOAT_CODES:
        b = np.zeros(16, np.uint8)
        nearswap_chunk(b, dt, b, dt, 2, 0.5, b.copy(), dt)
