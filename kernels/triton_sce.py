"""SCE Triton kernels: the GPU twins of ``kernels/cpu_sce.py``'s energy and merge passes
(docs/SPEC.md "SCE"), byte-identical to them (``tests/test_sce.py``). The two variance
histogram passes run the numba kernels on the host (``RowPass.triton`` None).

- ``_energy_kernel``: one program per block of ``SCE_BLOCK`` elements; each model's sum of
  squared selected task vectors as a pairwise tree (``triton_rows._tree``).
- ``_sce_kernel``: elementwise, each op rounded to the working dtype, ``div_rn``, no FMA.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .cpu_sce import SCE_BLOCK
from .triton_merge import _load_f32, _store_rounded
from .triton_nearswap import round_work
from .triton_rows import _tree
from .triton_stock import _work


@triton.jit
def _delta(model_ptr, idx, inside, xb, W: tl.constexpr):
    x = round_work(_load_f32(model_ptr, idx, inside), W)  # the inputs in W
    return tl.where(inside, round_work(x - xb, W), 0.0)


@triton.jit
def _key(base_ptr, model_ptrs, idx, inside, xb, W: tl.constexpr):
    """The variance key of each element (torch's Welford recurrence in float64)."""
    mean = tl.zeros(idx.shape, tl.float64)
    m2 = tl.zeros(idx.shape, tl.float64)
    for j in tl.static_range(len(model_ptrs)):
        x = _delta(model_ptrs[j], idx, inside, xb, W).to(tl.float64)
        delta = x - mean
        mean = mean + delta / tl.full(idx.shape, j + 1, tl.float64)  # fp64 '/': IEEE (div.rn.f64)
        m2 = m2 + delta * (x - mean)
    v = (m2 / tl.full(idx.shape, len(model_ptrs), tl.float64)).to(tl.float32)
    bits = round_work(v, W).to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    return bits.to(tl.int64)


@triton.jit
def _select(d, key, keep_all, thr, W: tl.constexpr):
    if keep_all:
        return d
    return tl.where(key >= thr, d, round_work(d * 0.0, W))


@triton.jit
def _energy_kernel(base_ptr, model_ptrs, out_ptr, n, keep_all, thr, W: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    xb = round_work(_load_f32(base_ptr, idx, inside), W)
    key = _key(base_ptr, model_ptrs, idx, inside, xb, W)
    one = tl.arange(0, 1)
    N: tl.constexpr = len(model_ptrs)
    for j in tl.static_range(N):
        m = _select(_delta(model_ptrs[j], idx, inside, xb, W), key, keep_all, thr, W)
        p = tl.where(inside, round_work(m * m, W), 0.0).to(tl.float64)
        tl.store(out_ptr + pid * N + j + one, _tree(p))


@triton.jit
def _sce_kernel(base_ptr, model_ptrs, wt_ptr, out_ptr, n, keep_all, thr, lo,
                W: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    xb = round_work(_load_f32(base_ptr, idx, inside), W)
    key = _key(base_ptr, model_ptrs, idx, inside, xb, W)
    s = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(len(model_ptrs)):
        s = s + _select(_delta(model_ptrs[j], idx, inside, xb, W), key, keep_all, thr, W)
    pos = round_work(s, W) >= 0.0
    acc = tl.zeros([BLOCK], tl.float32)
    den = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(len(model_ptrs)):
        v = _select(_delta(model_ptrs[j], idx, inside, xb, W), key, keep_all, thr, W)
        agree = ((v > 0.0) & pos) | ((v < 0.0) & (pos == 0))
        w = tl.load(wt_ptr + j)
        ew = round_work(w * tl.where(agree, 1.0, 0.0), W)
        acc = acc + round_work(v * ew, W)
        den = den + ew
    acc = round_work(acc, W)
    den = round_work(den, W)
    den = tl.where(den < lo, lo, den)
    out = round_work(xb + round_work(tl.math.div_rn(acc, den), W), W)
    _store_rounded(out_ptr, idx, out, inside)


def sce_energy_triton(base: torch.Tensor, models: list[torch.Tensor], n: int, keep_all: bool,
                      thr: int, work: str | None = None) -> torch.Tensor:  # fmt: skip
    """Per-block energies (float64 [ceil(n / SCE_BLOCK), N]) of the first ``n`` elements."""
    blocks = triton.cdiv(n, SCE_BLOCK) if n > 0 else 0
    out = torch.zeros((blocks, len(models)), dtype=torch.float64, device=base.device)
    if blocks:
        _energy_kernel[(blocks,)](base, tuple(models), out, n, bool(keep_all), int(thr),
                                  W=_work(base, models, work), BLOCK=SCE_BLOCK,
                                  enable_fp_fusion=False)  # fmt: skip
    return out


def sce_triton(base: torch.Tensor, models: list[torch.Tensor], n: int, keep_all: bool, thr: int,
               wt: np.ndarray, lo: np.float32, out: torch.Tensor,
               work: str | None = None) -> None:  # fmt: skip
    """The merged value of the first ``n`` elements into ``out`` (SPEC "SCE")."""
    if n > 0:
        w = torch.from_numpy(np.ascontiguousarray(wt, np.float32)).to(base.device)
        _sce_kernel[(triton.cdiv(n, SCE_BLOCK),)](base, tuple(models), w, out, n, bool(keep_all),
                                                  int(thr), float(lo),
                                                  W=_work(base, models, work), BLOCK=SCE_BLOCK,
                                                  enable_fp_fusion=False)  # fmt: skip
