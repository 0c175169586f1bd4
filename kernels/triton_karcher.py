"""Karcher mean Triton kernels: the GPU twins of ``kernels/cpu_karcher.py`` (docs/SPEC.md
"Karcher mean"), byte-identical to them (``tests/test_karcher.py``).

- ``_gram_kernel``: one program per block of ``STOCK_BLOCK`` elements; each of the K sums of
  exact float64 products a pairwise tree (``triton_rows._tree``: ten reshape-and-add
  levels, a fixed order on any device); the host adds the blocks left to right.
- ``_karcher_kernel``: elementwise ``acc = float32(acc + float32(k_j * x_j))`` from +0.0 in
  model order, ``enable_fp_fusion=False`` (no FMA), stored as ``triton_merge`` stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cpu_stock import STOCK_BLOCK, n_stats
from .triton_merge import _load_f32, _store_rounded
from .triton_rows import _tree


@triton.jit
def _gram_kernel(model_ptrs, out_ptr, n, K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    one = tl.arange(0, 1)
    N: tl.constexpr = len(model_ptrs)
    for j in tl.static_range(N):
        x = tl.where(inside, _load_f32(model_ptrs[j], idx, inside), 0.0).to(tl.float64)
        tl.store(out_ptr + pid * K + j + one, _tree(x * x))
    for j in tl.static_range(N):
        for k in tl.static_range(j + 1, N):
            xj = tl.where(inside, _load_f32(model_ptrs[j], idx, inside), 0.0).to(tl.float64)
            xk = tl.where(inside, _load_f32(model_ptrs[k], idx, inside), 0.0).to(tl.float64)
            s = N + j * (2 * N - j - 1) // 2 + (k - j - 1)  # pair (j, k) in order
            tl.store(out_ptr + pid * K + s + one, _tree(xj * xk))


@triton.jit
def _karcher_kernel(model_ptrs, k_ptr, out_ptr, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(len(model_ptrs)):
        kj = tl.load(k_ptr + j)
        acc = acc + kj * _load_f32(model_ptrs[j], idx, inside)  # two roundings: no FMA
    _store_rounded(out_ptr, idx, acc, inside)


def karcher_gram_triton(models: list[torch.Tensor], n: int) -> torch.Tensor:
    """Per-block Gram sums (float64 [ceil(n / STOCK_BLOCK), K]) of the first ``n`` elements
    of each model (SPEC "Karcher mean"; the host adds the blocks left to right)."""
    k = n_stats(len(models))
    blocks = triton.cdiv(n, STOCK_BLOCK) if n > 0 else 0
    out = torch.zeros((blocks, k), dtype=torch.float64, device=models[0].device)
    if blocks:
        _gram_kernel[(blocks,)](tuple(models), out, n, K=k, BLOCK=STOCK_BLOCK,
                                enable_fp_fusion=False)  # fmt: skip
    return out


def karcher_triton(models: list[torch.Tensor], n: int, k: torch.Tensor, out: torch.Tensor) -> None:
    """``sum_j k_j x_j`` of the first ``n`` elements into ``out`` (k: float32 [N] on the
    device; SPEC "Karcher mean")."""
    if n > 0:
        _karcher_kernel[(triton.cdiv(n, STOCK_BLOCK),)](tuple(models), k, out, n,
                                                        BLOCK=STOCK_BLOCK,
                                                        enable_fp_fusion=False)  # fmt: skip
