"""Row-wise Triton kernels: the GPU twins of ``kernels/cpu_rows.py`` (docs/SPEC.md "SLERP
(v3)"), byte-identical to them (``tests/test_slerp.py``).

- ``_row_dots_kernel``: one program per row; the row in blocks of ``DOT_BLOCK`` elements,
  each block's float64 products summed as SPEC's pairwise tree (ten reshape-and-add
  levels: each level adds exactly two values, so the order is fixed on any device), the
  block results added left to right.
- ``_rows_combine_kernel``: elementwise ``float32(ca[r] * x) + float32(cb[r] * y)``, launched
  with ``enable_fp_fusion=False`` (no FMA), rounded to the output dtype as
  ``triton_merge`` rounds (bf16 on the float32 bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_merge import _load_f32, _store_rounded

#: Elements per block of a row sum (SPEC), as in ``cpu_rows.DOT_BLOCK``.
DOT_BLOCK = 1024
#: Elements per program of the combine kernel.
COMBINE_BLOCK = 1024


@triton.jit
def _tree(p):
    """SPEC's pairwise tree over 1024 float64 values: p[i] = p[2i] + p[2i+1], ten times."""
    p = tl.sum(tl.reshape(p, (512, 2)), axis=1)
    p = tl.sum(tl.reshape(p, (256, 2)), axis=1)
    p = tl.sum(tl.reshape(p, (128, 2)), axis=1)
    p = tl.sum(tl.reshape(p, (64, 2)), axis=1)
    p = tl.sum(tl.reshape(p, (32, 2)), axis=1)
    p = tl.sum(tl.reshape(p, (16, 2)), axis=1)
    p = tl.sum(tl.reshape(p, (8, 2)), axis=1)
    p = tl.sum(tl.reshape(p, (4, 2)), axis=1)
    p = tl.sum(tl.reshape(p, (2, 2)), axis=1)
    return tl.sum(tl.reshape(p, (1, 2)), axis=1)  # shape (1,)


@triton.jit
def _row_dots_kernel(v0_ptr, v1_ptr, stats_ptr, row_len, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    first = r * row_len
    lanes = tl.arange(0, BLOCK)
    s00 = tl.zeros([1], dtype=tl.float64)
    s11 = tl.zeros([1], dtype=tl.float64)
    s01 = tl.zeros([1], dtype=tl.float64)
    for lo in range(0, row_len, BLOCK):
        inside = lo + lanes < row_len
        x = tl.where(inside, _load_f32(v0_ptr, first + lo + lanes, inside), 0.0).to(tl.float64)
        y = tl.where(inside, _load_f32(v1_ptr, first + lo + lanes, inside), 0.0).to(tl.float64)
        s00 = s00 + _tree(x * x)
        s11 = s11 + _tree(y * y)
        s01 = s01 + _tree(x * y)
    one = tl.arange(0, 1)
    tl.store(stats_ptr + r * 3 + one, s00)
    tl.store(stats_ptr + r * 3 + 1 + one, s11)
    tl.store(stats_ptr + r * 3 + 2 + one, s01)


@triton.jit
def _rows_combine_kernel(v0_ptr, v1_ptr, ca_ptr, cb_ptr, out_ptr, n, row_len,
                         BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    r = idx // row_len
    a = tl.load(ca_ptr + r, mask=inside, other=0.0)
    b = tl.load(cb_ptr + r, mask=inside, other=0.0)
    x = _load_f32(v0_ptr, idx, inside)
    y = _load_f32(v1_ptr, idx, inside)
    out = a * x + b * y  # three float32 roundings: no FMA (enable_fp_fusion=False)
    _store_rounded(out_ptr, idx, out, inside)

def row_dots_triton(v0: torch.Tensor, v1: torch.Tensor, n_rows: int, row_len: int) -> torch.Tensor:
    """Per-row S00, S11, S01 (float64 [n_rows, 3]) of two tensors of whole rows (1-D, at
    least n_rows * row_len elements each, float32 / float16 / bfloat16)."""
    stats = torch.zeros((n_rows, 3), dtype=torch.float64, device=v0.device)
    if n_rows and row_len:
        _row_dots_kernel[(n_rows,)](v0, v1, stats, row_len, BLOCK=DOT_BLOCK)
    return stats


def rows_combine_triton(v0: torch.Tensor, v1: torch.Tensor, n_rows: int, row_len: int,
                        ca: torch.Tensor, cb: torch.Tensor, out: torch.Tensor) -> None:  # fmt: skip
    """``out = float32(ca[r] * x) + float32(cb[r] * y)`` rounded to ``out``'s dtype (ca, cb:
    float32 [n_rows] on the same device)."""
    n = n_rows * row_len
    if n:
        grid = (triton.cdiv(n, COMBINE_BLOCK),)
        _rows_combine_kernel[grid](v0, v1, ca, cb, out, n, row_len, BLOCK=COMBINE_BLOCK,
                                   enable_fp_fusion=False)  # fmt: skip
