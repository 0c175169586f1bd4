"""NuSLERP Triton kernels: the GPU twins of ``kernels/cpu_nuslerp.py`` (docs/SPEC.md
"NuSLERP"), byte-identical to them (``tests/test_nuslerp.py``).

- ``_tv_row_dots_kernel``: ``triton_rows._row_dots_kernel`` on the task vectors (one program
  per row, blocks of 1024, the pairwise tree, blocks left to right).
- ``_col_dots_kernel``: one program per ``COL_BLOCK`` columns, the rows added in row order
  into the accumulator (float64 exact products: no rounding but the additions).
- ``_combine_kernel``: elementwise ``float32(ca[k] * x) + float32(cb[k] * y)`` (``+ b``
  with a base), k the element's row or column, ``enable_fp_fusion=False`` (no FMA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_merge import _load_f32, _store_rounded
from .triton_rows import DOT_BLOCK, _tree

#: Columns per program of the column sums; elements per program of the combination.
COL_BLOCK = 256
COMBINE_BLOCK = 1024


@triton.jit
def _inputs(v0_ptr, v1_ptr, b_ptr, idx, inside, HAS_BASE: tl.constexpr):
    x = _load_f32(v0_ptr, idx, inside)
    y = _load_f32(v1_ptr, idx, inside)
    if HAS_BASE:
        b = _load_f32(b_ptr, idx, inside)
        x = x - b
        y = y - b
    return x, y


@triton.jit
def _tv_row_dots_kernel(v0_ptr, v1_ptr, b_ptr, stats_ptr, row_len, HAS_BASE: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    first = r * row_len
    lanes = tl.arange(0, BLOCK)
    s00 = tl.zeros([1], dtype=tl.float64)
    s11 = tl.zeros([1], dtype=tl.float64)
    s01 = tl.zeros([1], dtype=tl.float64)
    for lo in range(0, row_len, BLOCK):
        inside = lo + lanes < row_len
        x, y = _inputs(v0_ptr, v1_ptr, b_ptr, first + lo + lanes, inside, HAS_BASE)
        x = tl.where(inside, x, 0.0).to(tl.float64)
        y = tl.where(inside, y, 0.0).to(tl.float64)
        s00 = s00 + _tree(x * x)
        s11 = s11 + _tree(y * y)
        s01 = s01 + _tree(x * y)
    one = tl.arange(0, 1)
    tl.store(stats_ptr + r * 3 + one, s00)
    tl.store(stats_ptr + r * 3 + 1 + one, s11)
    tl.store(stats_ptr + r * 3 + 2 + one, s01)


@triton.jit
def _col_dots_kernel(v0_ptr, v1_ptr, b_ptr, acc_ptr, n_rows, row_len, HAS_BASE: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = c < row_len
    s00 = tl.load(acc_ptr + c * 3, mask=inside, other=0.0)
    s11 = tl.load(acc_ptr + c * 3 + 1, mask=inside, other=0.0)
    s01 = tl.load(acc_ptr + c * 3 + 2, mask=inside, other=0.0)
    idx = c  # int64: element r * row_len + c of row r
    for r in range(0, n_rows):  # row order
        x, y = _inputs(v0_ptr, v1_ptr, b_ptr, idx, inside, HAS_BASE)
        idx = idx + row_len
        x = x.to(tl.float64)
        y = y.to(tl.float64)
        s00 = s00 + x * x
        s11 = s11 + y * y
        s01 = s01 + x * y
    tl.store(acc_ptr + c * 3, s00, mask=inside)
    tl.store(acc_ptr + c * 3 + 1, s11, mask=inside)
    tl.store(acc_ptr + c * 3 + 2, s01, mask=inside)


@triton.jit
def _combine_kernel(v0_ptr, v1_ptr, b_ptr, ca_ptr, cb_ptr, out_ptr, n, row_len,
                    HAS_BASE: tl.constexpr, PER_COL: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    if PER_COL:
        k = idx % row_len
    else:
        k = idx // row_len
    a = tl.load(ca_ptr + k, mask=inside, other=0.0)
    b = tl.load(cb_ptr + k, mask=inside, other=0.0)
    x = _load_f32(v0_ptr, idx, inside)
    y = _load_f32(v1_ptr, idx, inside)
    if HAS_BASE:
        xb = _load_f32(b_ptr, idx, inside)
        out = a * (x - xb) + b * (y - xb)
        out = out + xb
    else:
        out = a * x + b * y
    _store_rounded(out_ptr, idx, out, inside)


def tv_row_dots_triton(v0: torch.Tensor, v1: torch.Tensor, base: torch.Tensor | None, n_rows: int,
                       row_len: int) -> torch.Tensor:  # fmt: skip
    """Per-row S00, S11, S01 (float64 [n_rows, 3]) of the task vectors (``base`` None: of
    the inputs); tensors 1-D of at least n_rows * row_len elements."""
    stats = torch.zeros((n_rows, 3), dtype=torch.float64, device=v0.device)
    if n_rows and row_len:
        _tv_row_dots_kernel[(n_rows,)](v0, v1, v0 if base is None else base, stats, row_len,
                                       HAS_BASE=base is not None, BLOCK=DOT_BLOCK,
                                       enable_fp_fusion=False)  # fmt: skip
    return stats


def col_dots_triton(v0: torch.Tensor, v1: torch.Tensor, base: torch.Tensor | None, n_rows: int,
                    row_len: int, acc: torch.Tensor) -> None:  # fmt: skip
    """Adds the chunk's rows into ``acc`` (float64 [row_len, 3] on the device), row by row."""
    if n_rows and row_len:
        grid = (triton.cdiv(row_len, COL_BLOCK),)
        _col_dots_kernel[grid](v0, v1, v0 if base is None else base, acc, n_rows, row_len,
                               HAS_BASE=base is not None, BLOCK=COL_BLOCK,
                               enable_fp_fusion=False)  # fmt: skip


def combine_triton(v0: torch.Tensor, v1: torch.Tensor, base: torch.Tensor | None, n: int,
                   row_len: int, per_col: bool, ca: torch.Tensor, cb: torch.Tensor,
                   out: torch.Tensor) -> None:  # fmt: skip
    """``out = float32(ca[k] * x) + float32(cb[k] * y)`` (``+ b``), k the element's column
    (``per_col``) or row; ca, cb float32 on the device."""
    if n:
        grid = (triton.cdiv(n, COMBINE_BLOCK),)
        _combine_kernel[grid](v0, v1, v0 if base is None else base, ca, cb, out, n, row_len,
                              HAS_BASE=base is not None, PER_COL=bool(per_col),
                              BLOCK=COMBINE_BLOCK, enable_fp_fusion=False)  # fmt: skip
