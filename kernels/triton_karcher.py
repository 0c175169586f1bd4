"""Karcher mean Triton kernel: the GPU twin of ``kernels/cpu_karcher.py`` (docs/SPEC.md
"Karcher mean"), byte-identical to it (``tests/test_karcher.py``).

``_chain_kernel``: one program per block of ``STOCK_BLOCK`` elements; it recomputes
mergekit's elementwise chain from the inputs up to the pass's stage (a constexpr) with the
tensor's scalars so far, every op rounded to the working dtype (``round_work``), divisions
by ``div_rn`` (a GPU's default float32 division is approximate), no FMA; the statistics
stages write per-block sums (pairwise trees of exact float64 products,
``triton_rows._tree``), the host adds the blocks left to right; stage 5 stores
``rW(s * u)`` as the output dtype.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import FLOAT_CODES
from .cpu_stock import STOCK_BLOCK
from .triton_merge import _load_f32, _store_rounded
from .triton_nearswap import round_work
from .triton_rows import _tree


@triton.jit
def _unit(ptr, idx, inside, n32_ptr, j: tl.constexpr, W: tl.constexpr):
    x = round_work(tl.where(inside, _load_f32(ptr, idx, inside), 0.0), W)
    nj = tl.load(n32_ptr + j)
    return tl.where(nj != 0.0, round_work(tl.math.div_rn(x, nj), W), 0.0)


@triton.jit
def _tangent(model_ptrs, idx, inside, n32_ptr, valid_ptr, u, ri, dot_ptr, coef_ptr, skip_ptr,
             W: tl.constexpr, N: tl.constexpr):  # fmt: skip
    T = tl.zeros(u.shape, tl.float32)
    for j in tl.static_range(N):
        on = (tl.load(valid_ptr + j) != 0) & (tl.load(skip_ptr + ri * N + j) == 0)
        d = tl.load(dot_ptr + ri * N + j)
        c = tl.load(coef_ptr + ri * N + j)
        uj = _unit(model_ptrs[j], idx, inside, n32_ptr, j, W)
        v = round_work(uj - round_work(d * u, W), W)
        T = tl.where(on, round_work(T + round_work(c * v, W), W), T)
    return T


@triton.jit
def _step(u, T, ri, cs_ptr, sn_ptr, nt_ptr, W: tl.constexpr):
    a = round_work(tl.load(cs_ptr + ri) * u, W)
    b = round_work(tl.load(sn_ptr + ri) * round_work(tl.math.div_rn(T, tl.load(nt_ptr + ri)), W), W)
    return round_work(a + b, W)


@triton.jit
def _chain_kernel(model_ptrs, n32_ptr, valid_ptr, na_ptr, dot_ptr, coef_ptr, skip_ptr, cs_ptr,
                  sn_ptr, nt_ptr, un_ptr, unapply_ptr, sums_ptr, out_ptr, n, full, fb, v0, m0,
                  s32, STAGE: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    N: tl.constexpr = len(model_ptrs)
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    one = tl.arange(0, 1)
    if STAGE == 0:
        for j in tl.static_range(N):
            x = round_work(tl.where(inside, _load_f32(model_ptrs[j], idx, inside), 0.0), W)
            x64 = x.to(tl.float64)
            tl.store(sums_ptr + pid * N + j + one, _tree(tl.where(inside, x64 * x64, 0.0)))
    else:
        u = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(N):
            uj = _unit(model_ptrs[j], idx, inside, n32_ptr, j, W)
            nj = tl.load(na_ptr + j)
            u = tl.where(tl.load(valid_ptr + j) != 0, round_work(u + round_work(nj * uj, W), W), u)
        if STAGE == 1:
            u64 = u.to(tl.float64)
            tl.store(sums_ptr + pid * N + one, _tree(tl.where(inside, u64 * u64, 0.0)))
        else:
            first = tl.zeros([BLOCK], tl.float32)
            for j in tl.static_range(N):
                first = tl.where(v0 == j, _unit(model_ptrs[j], idx, inside, n32_ptr, j, W), first)
            u = tl.where(fb != 0, first, round_work(tl.math.div_rn(u, m0), W))
            for ri in range(full):
                T = _tangent(model_ptrs, idx, inside, n32_ptr, valid_ptr, u, ri, dot_ptr,
                             coef_ptr, skip_ptr, W, N)  # fmt: skip
                u = _step(u, T, ri, cs_ptr, sn_ptr, nt_ptr, W)
                un = tl.load(un_ptr + ri)
                u = tl.where(tl.load(unapply_ptr + ri) != 0, round_work(tl.math.div_rn(u, un), W), u)
            if STAGE == 2:
                for j in tl.static_range(N):
                    uj = _unit(model_ptrs[j], idx, inside, n32_ptr, j, W)
                    p = tl.where(inside & (tl.load(valid_ptr + j) != 0),
                                 u.to(tl.float64) * uj.to(tl.float64), 0.0)  # fmt: skip
                    tl.store(sums_ptr + pid * N + j + one, _tree(p))
            elif STAGE == 3:
                T = _tangent(model_ptrs, idx, inside, n32_ptr, valid_ptr, u, full, dot_ptr,
                             coef_ptr, skip_ptr, W, N)  # fmt: skip
                t64 = T.to(tl.float64)
                tl.store(sums_ptr + pid * N + one, _tree(tl.where(inside, t64 * t64, 0.0)))
            elif STAGE == 4:
                T = _tangent(model_ptrs, idx, inside, n32_ptr, valid_ptr, u, full, dot_ptr,
                             coef_ptr, skip_ptr, W, N)  # fmt: skip
                v64 = _step(u, T, full, cs_ptr, sn_ptr, nt_ptr, W).to(tl.float64)
                tl.store(sums_ptr + pid * N + one, _tree(tl.where(inside, v64 * v64, 0.0)))
            else:
                _store_rounded(out_ptr, idx, round_work(s32 * u, W), inside)


def karcher_pass_triton(models: list[torch.Tensor], n: int, prog, stage: int,
                        out: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
    """One pass of the chain over the first ``n`` elements of each model (SPEC "Karcher
    mean"; ``prog``: ``streammerge.methods.karcher.Program``): stages 0 .. 4 return the
    per-block sums (float64 [blocks, N], the host adds them left to right), stage 5 writes
    ``out``."""
    nm = len(models)
    dev = models[0].device
    blocks = triton.cdiv(n, STOCK_BLOCK) if n > 0 else 0
    sums = torch.zeros((blocks, nm), dtype=torch.float64, device=dev)
    if not blocks:
        return None if stage == 5 else sums

    def d(a):
        return torch.from_numpy(np.ascontiguousarray(a).reshape(-1).copy()).to(dev)

    _chain_kernel[(blocks,)](
        tuple(models), d(prog.n32), d(prog.valid), d(prog.na32), d(prog.dot), d(prog.coef),
        d(prog.skip), d(prog.cs), d(prog.sn), d(prog.nt), d(prog.un), d(prog.unapply), sums,
        out if stage == 5 else sums, n, int(prog.full), int(prog.fb), int(prog.v0),
        float(prog.m0), float(prog.s32), STAGE=stage, W=FLOAT_CODES[prog.work],
        BLOCK=STOCK_BLOCK, enable_fp_fusion=False)  # fmt: skip
    return None if stage == 5 else sums
