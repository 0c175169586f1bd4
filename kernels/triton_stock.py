"""Model Stock Triton kernels: the GPU twins of ``kernels/cpu_stock.py`` (docs/SPEC.md
"Model Stock"), byte-identical to them (``tests/test_model_stock.py``).

- ``_dots_kernel``: one program per block of ``STOCK_BLOCK`` elements; each of the K sums
  a pairwise tree (``triton_rows._tree``: ten reshape-and-add levels, a fixed order on any
  device); the host adds the blocks left to right.
- ``_stock_kernel``: elementwise, each op rounded to the working dtype
  (``triton_nearswap.round_work``), the division by ``div_rn``, no FMA.
- ``filter_wise``: ``_row_dots_kernel`` (one program per row, its blocks from the row's
  start, each a pairwise tree, left to right) and ``_stock_rows_kernel`` (each element's
  row's t and q).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import FLOAT_CODES
from .cpu_ram import work_dtype
from .cpu_stock import STOCK_BLOCK, n_stats
from .triton_merge import _load_f32, _store_rounded
from .triton_nearswap import _TORCH_TO_SAFETENSORS, round_work
from .triton_rows import _tree


@triton.jit
def _delta(base_ptr, model_ptr, idx, inside, xb, W: tl.constexpr):
    x = round_work(_load_f32(model_ptr, idx, inside), W)  # the inputs in W
    return tl.where(inside, round_work(x - xb, W), 0.0)


@triton.jit
def _dots_kernel(base_ptr, model_ptrs, out_ptr, n, K: tl.constexpr, W: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    xb = round_work(_load_f32(base_ptr, idx, inside), W)
    one = tl.arange(0, 1)
    for j in tl.static_range(len(model_ptrs)):
        d = _delta(base_ptr, model_ptrs[j], idx, inside, xb, W).to(tl.float64)
        tl.store(out_ptr + pid * K + j + one, _tree(d * d))
    N: tl.constexpr = len(model_ptrs)
    for j in tl.static_range(N):
        for k in tl.static_range(j + 1, N):
            dj = _delta(base_ptr, model_ptrs[j], idx, inside, xb, W)
            dk = _delta(base_ptr, model_ptrs[k], idx, inside, xb, W)
            p = tl.where(inside, round_work(dj * dk, W), 0.0).to(tl.float64)
            s = N + j * (2 * N - j - 1) // 2 + (k - j - 1)  # pair (j, k) in order
            tl.store(out_ptr + pid * K + s + one, _tree(p))


@triton.jit
def _stock_kernel(base_ptr, model_ptrs, out_ptr, n, t32, q, W: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    a = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(len(model_ptrs)):
        a = round_work(a + round_work(_load_f32(model_ptrs[j], idx, inside), W), W)
    count = tl.full([BLOCK], len(model_ptrs), tl.float32)
    avg = round_work(tl.math.div_rn(a, count), W)
    p = round_work(t32 * avg, W)
    xb = round_work(_load_f32(base_ptr, idx, inside), W)
    _store_rounded(out_ptr, idx, round_work(p + round_work(q * xb, W), W), inside)


@triton.jit
def _row_dots_kernel(base_ptr, model_ptrs, out_ptr, row_len, K: tl.constexpr, W: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    first = r * row_len
    lanes = tl.arange(0, BLOCK)
    one = tl.arange(0, 1)
    N: tl.constexpr = len(model_ptrs)
    for lo in range(0, row_len, BLOCK):
        inside = lo + lanes < row_len
        idx = first + lo + lanes
        xb = round_work(_load_f32(base_ptr, idx, inside), W)
        for j in tl.static_range(N):
            d = _delta(base_ptr, model_ptrs[j], idx, inside, xb, W).to(tl.float64)
            acc = tl.load(out_ptr + r * K + j + one)
            tl.store(out_ptr + r * K + j + one, acc + _tree(d * d))
        for j in tl.static_range(N):
            for k in tl.static_range(j + 1, N):
                dj = _delta(base_ptr, model_ptrs[j], idx, inside, xb, W)
                dk = _delta(base_ptr, model_ptrs[k], idx, inside, xb, W)
                p = tl.where(inside, round_work(dj * dk, W), 0.0).to(tl.float64)
                s = N + j * (2 * N - j - 1) // 2 + (k - j - 1)  # pair (j, k) in order
                acc = tl.load(out_ptr + r * K + s + one)
                tl.store(out_ptr + r * K + s + one, acc + _tree(p))


@triton.jit
def _stock_rows_kernel(base_ptr, model_ptrs, out_ptr, n, row_len, t_ptr, q_ptr, W: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    row = idx // row_len
    t32 = tl.load(t_ptr + row, mask=inside, other=0.0)
    q = tl.load(q_ptr + row, mask=inside, other=0.0)
    a = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(len(model_ptrs)):
        a = round_work(a + round_work(_load_f32(model_ptrs[j], idx, inside), W), W)
    count = tl.full([BLOCK], len(model_ptrs), tl.float32)
    avg = round_work(tl.math.div_rn(a, count), W)
    p = round_work(t32 * avg, W)
    xb = round_work(_load_f32(base_ptr, idx, inside), W)
    _store_rounded(out_ptr, idx, round_work(p + round_work(q * xb, W), W), inside)


def _work(base: torch.Tensor, models: list[torch.Tensor], work: str | None) -> int:
    return FLOAT_CODES[work or work_dtype([_TORCH_TO_SAFETENSORS[x.dtype] for x in (base, *models)])]


def stock_dots_triton(base: torch.Tensor, models: list[torch.Tensor], n: int,
                      work: str | None = None) -> torch.Tensor:  # fmt: skip
    """Per-block statistics (float64 [ceil(n / STOCK_BLOCK), K]) of the first ``n`` elements
    (SPEC "Model Stock"; the host adds the blocks left to right)."""
    k = n_stats(len(models))
    blocks = triton.cdiv(n, STOCK_BLOCK) if n > 0 else 0
    out = torch.zeros((blocks, k), dtype=torch.float64, device=base.device)
    if blocks:
        _dots_kernel[(blocks,)](base, tuple(models), out, n, K=k, W=_work(base, models, work),
                                BLOCK=STOCK_BLOCK, enable_fp_fusion=False)  # fmt: skip
    return out


def stock_triton(base: torch.Tensor, models: list[torch.Tensor], n: int, t: np.float32,
                 q: np.float32, out: torch.Tensor, work: str | None = None) -> None:  # fmt: skip
    """The merged value of the first ``n`` elements into ``out`` (t: the tensor's t, q:
    rW(1 - t), float32 values of the working dtype; SPEC "Model Stock")."""
    if n > 0:
        _stock_kernel[(triton.cdiv(n, STOCK_BLOCK),)](base, tuple(models), out, n, float(t),
                                                      float(q), W=_work(base, models, work),
                                                      BLOCK=STOCK_BLOCK,
                                                      enable_fp_fusion=False)  # fmt: skip


def stock_row_dots_triton(base: torch.Tensor, models: list[torch.Tensor], n_rows: int, row_len: int,
                          work: str | None = None) -> torch.Tensor:  # fmt: skip
    """The K sums of each row (float64 [n_rows, K]; ``filter_wise``, SPEC "Model Stock")."""
    k = n_stats(len(models))
    out = torch.zeros((n_rows, k), dtype=torch.float64, device=base.device)
    if n_rows and row_len:
        _row_dots_kernel[(n_rows,)](base, tuple(models), out, row_len, K=k,
                                    W=_work(base, models, work), BLOCK=STOCK_BLOCK,
                                    enable_fp_fusion=False)  # fmt: skip
    return out


def stock_rows_triton(base: torch.Tensor, models: list[torch.Tensor], n: int, row_len: int,
                      t: torch.Tensor, q: torch.Tensor, out: torch.Tensor,
                      work: str | None = None) -> None:  # fmt: skip
    """The merged value of the first ``n`` elements (whole rows) with each row's t and q
    (float32 on the device; ``filter_wise``)."""
    if n > 0:
        _stock_rows_kernel[(triton.cdiv(n, STOCK_BLOCK),)](base, tuple(models), out, n, row_len, t,
                                                           q, W=_work(base, models, work),
                                                           BLOCK=STOCK_BLOCK,
                                                           enable_fp_fusion=False)  # fmt: skip
