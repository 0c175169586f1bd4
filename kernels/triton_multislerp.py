"""Multi-SLERP Triton kernels: the GPU twins of ``kernels/cpu_multislerp.py`` (docs/SPEC.md
"Multi-SLERP"), byte-identical to them (``tests/test_multislerp.py``).

- ``_gram_kernel``: one program per block of ``MSL_BLOCK`` elements; each of the K sums a
  pairwise tree of exact float64 products (``triton_rows._tree``); the host adds the blocks
  left to right.
- ``_msl_kernel``: elementwise, ``acc = sum_j c_j * v_j`` in float32 (no FMA), rounded to
  the working dtype (``triton_nearswap.round_work``), plus the base when there is one.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import FLOAT_CODES
from .cpu_multislerp import MSL_BLOCK
from .cpu_ram import work_dtype
from .cpu_stock import n_stats
from .triton_merge import _load_f32, _store_rounded
from .triton_nearswap import _TORCH_TO_SAFETENSORS, round_work
from .triton_rows import _tree


@triton.jit
def _vector(base_ptr, model_ptr, idx, inside, HAS_BASE: tl.constexpr, W: tl.constexpr):
    """v_j: model j in W, or its task vector rW(rW(x_j) - rW(x_b)); 0 outside."""
    x = round_work(_load_f32(model_ptr, idx, inside), W)
    if HAS_BASE:
        xb = round_work(_load_f32(base_ptr, idx, inside), W)
        x = round_work(x - xb, W)
    return tl.where(inside, x, 0.0)


@triton.jit
def _gram_kernel(base_ptr, model_ptrs, out_ptr, n, K: tl.constexpr, HAS_BASE: tl.constexpr,
                 W: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    one = tl.arange(0, 1)
    N: tl.constexpr = len(model_ptrs)
    for j in tl.static_range(N):
        d = _vector(base_ptr, model_ptrs[j], idx, inside, HAS_BASE, W).to(tl.float64)
        tl.store(out_ptr + pid * K + j + one, _tree(d * d))
    for j in tl.static_range(N):
        for k in tl.static_range(j + 1, N):
            dj = _vector(base_ptr, model_ptrs[j], idx, inside, HAS_BASE, W).to(tl.float64)
            dk = _vector(base_ptr, model_ptrs[k], idx, inside, HAS_BASE, W).to(tl.float64)
            s = N + j * (2 * N - j - 1) // 2 + (k - j - 1)  # pair (j, k) in order
            tl.store(out_ptr + pid * K + s + one, _tree(dj * dk))


@triton.jit
def _msl_kernel(base_ptr, model_ptrs, coef_ptr, out_ptr, n, HAS_BASE: tl.constexpr,
                W: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(len(model_ptrs)):
        c = tl.load(coef_ptr + j)
        acc = acc + c * _vector(base_ptr, model_ptrs[j], idx, inside, HAS_BASE, W)
    out = round_work(acc, W)
    if HAS_BASE:
        out = round_work(out + round_work(_load_f32(base_ptr, idx, inside), W), W)
    _store_rounded(out_ptr, idx, out, inside)


def _work(base: torch.Tensor | None, models: list[torch.Tensor], work: str | None) -> int:
    rows = ([] if base is None else [base]) + list(models)
    return FLOAT_CODES[work or work_dtype([_TORCH_TO_SAFETENSORS[x.dtype] for x in rows])]


def msl_gram_triton(base: torch.Tensor | None, models: list[torch.Tensor], n: int,
                    work: str | None = None) -> torch.Tensor:  # fmt: skip
    """Per-block Gram sums (float64 [ceil(n / MSL_BLOCK), K]) of the first ``n`` elements
    (SPEC "Multi-SLERP"; ``base`` None: the models themselves; the host adds the blocks left
    to right)."""
    k = n_stats(len(models))
    blocks = triton.cdiv(n, MSL_BLOCK) if n > 0 else 0
    out = torch.zeros((blocks, k), dtype=torch.float64, device=models[0].device)
    if blocks:
        _gram_kernel[(blocks,)](models[0] if base is None else base, tuple(models), out, n, K=k,
                                HAS_BASE=base is not None, W=_work(base, models, work),
                                BLOCK=MSL_BLOCK, enable_fp_fusion=False)  # fmt: skip
    return out


def msl_triton(base: torch.Tensor | None, models: list[torch.Tensor], n: int, coef: np.ndarray,
               out: torch.Tensor, work: str | None = None) -> None:  # fmt: skip
    """The merged value of the first ``n`` elements into ``out`` (coef: float32 [N], the
    tensor's c_j; SPEC "Multi-SLERP")."""
    if n > 0:
        c = torch.from_numpy(np.ascontiguousarray(coef, np.float32)).to(models[0].device)
        _msl_kernel[(triton.cdiv(n, MSL_BLOCK),)](models[0] if base is None else base,
                                                  tuple(models), c, out, n,
                                                  HAS_BASE=base is not None,
                                                  W=_work(base, models, work), BLOCK=MSL_BLOCK,
                                                  enable_fp_fusion=False)  # fmt: skip
