"""NearSwap Triton kernel: the GPU twin of ``kernels/cpu_nearswap.py`` (docs/SPEC.md
"NearSwap"), byte-identical to it (``tests/test_nearswap.py``).

Elementwise, one program per ``BLOCK`` elements: the SPEC's float32 operations, each
rounded to the working dtype W (bf16 on the float32 bits, f16 by ``.to``), the quotient
by ``div_rn`` (IEEE round to nearest: a GPU's default float32 division is approximate),
launched with ``enable_fp_fusion=False`` (no FMA), stored as ``triton_merge`` stores.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import FLOAT_CODES
from .cpu_nearswap import clamp_floor, work_dtype
from .triton_merge import _load_f32, _store_rounded

#: Elements per program.
BLOCK = 1024

_TORCH_TO_SAFETENSORS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@triton.jit
def round_work(v, W: tl.constexpr):
    """float32 ``v`` rounded to the working dtype (code W: 0 F32, 1 F16, 2 BF16), widened
    back; bf16 to nearest even on the bits, a NaN made quiet (as ``cpu_merge._f32_to_bf16``)."""
    if W == 0:
        return v
    elif W == 1:
        return v.to(tl.float16).to(tl.float32)
    else:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        top = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
        return (top << 16).to(tl.float32, bitcast=True)


@triton.jit
def _nearswap_kernel(a_ptr, b_ptr, out_ptr, n, t32, lo, W: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    x = round_work(_load_f32(a_ptr, idx, inside), W)  # the inputs in W
    y = round_work(_load_f32(b_ptr, idx, inside), W)
    d = round_work(x - y, W)
    ad = tl.abs(d)
    c = tl.where(ad < lo, lo, ad)
    one = tl.full([BLOCK], 1.0, tl.float32)
    r = round_work(tl.math.div_rn(one, c), W)
    w = round_work(r * t32, W)
    w = tl.where(w < 0.0, 0.0, tl.where(w > 1.0, 1.0, w))
    p = round_work(w * y, W)
    q = round_work(one - w, W)
    s = round_work(q * x, W)
    _store_rounded(out_ptr, idx, round_work(p + s, W), inside)


def nearswap_triton(a: torch.Tensor, b: torch.Tensor, n: int, t: float,
                    out: torch.Tensor, work: str | None = None) -> None:  # fmt: skip
    """NearSwap of the first ``n`` elements of ``a`` (the base) and ``b`` into ``out``
    (1-D tensors of float32 / float16 / bfloat16 on one device; SPEC "NearSwap"); ``work``:
    the working dtype (mergekit's ``dtype:``), else the inputs'."""
    if n <= 0:
        return
    w = work or work_dtype(_TORCH_TO_SAFETENSORS[a.dtype], _TORCH_TO_SAFETENSORS[b.dtype])
    grid = (triton.cdiv(n, BLOCK),)
    _nearswap_kernel[grid](a, b, out, n, float(np.float32(t)), float(clamp_floor(w)),
                           W=FLOAT_CODES[w], BLOCK=BLOCK, enable_fp_fusion=False)  # fmt: skip
