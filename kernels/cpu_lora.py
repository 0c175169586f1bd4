"""A LoRA-adapted tensor's stored bytes on the CPU (numba), rows computed as they are read.

Contract: docs/SPEC.md "LoRA inputs (v3)": per element (i, c) of W [rows, cols],
``acc = sum_k left[i, k] * right[k, c]`` for k = 0, 1, ..., r-1 in float32, each product
and each sum rounded on its own (no FMA: numba compiles without fast-math, so LLVM does not
contract them), ``delta = acc * scale``, ``out = float32(W[i, c]) + delta``, stored rounded
to W's dtype (round to nearest even, a NaN stays a quiet NaN; ``cpu_merge``'s encoders).
Tested bit for bit against ``tests/spec_reference.py`` ``spec_lora``.

Not ``parallel``: it runs on the reader's threads (``nogil``), beside the merge kernels.
"""

from __future__ import annotations

import numba
import numpy as np

from .cpu_merge import _decode_block, _encode_block


@numba.njit(nogil=True, cache=True, error_model="numpy")
def lora_apply(raw, code, e0, n, cols, left, right, scale):
    """Rewrite ``raw`` (the stored bytes of W's flat elements e0 .. e0 + n - 1, F32/F16/BF16
    by ``code`` as ``kernels.common.FLOAT_CODES``) into the adapted tensor's, in place.

    Args:
        left: float32 [rows of W, r] (B, or A^T with fan_in_fan_out); right: float32
            [r, cols] (A, or B^T), C-contiguous; scale: float32.
    """
    r = left.shape[1]
    acc = np.empty(cols, np.float32)
    x = np.empty(cols, np.float32)
    i = e0 // cols
    end = e0 + n
    while i * cols < end:
        lo = max(i * cols, e0)
        hi = min((i + 1) * cols, end)
        for c in range(cols):
            acc[c] = np.float32(0.0)
        for k in range(r):
            a = left[i, k]
            rk = right[k]
            for c in range(cols):
                acc[c] = acc[c] + a * rk[c]
        m = hi - lo
        c0 = lo - i * cols
        _decode_block(raw, code, lo - e0, m, x)
        for t in range(m):
            x[t] = x[t] + acc[c0 + t] * scale
        _encode_block(x, code, lo - e0, m, raw)
        i += 1
