"""Karcher mean Triton kernel: the GPU twin of ``kernels/cpu_karcher.py`` (docs/SPEC.md
"Karcher mean"), byte-identical to it (``tests/test_karcher.py``).

``_chain_kernel``: one program per block of ``STOCK_BLOCK`` elements; it recomputes
mergekit's elementwise chain from the inputs up to the pass's stage (a constexpr) with the
tensor's scalars so far, every op rounded to the working dtype (``round_work``), divisions
by ``div_rn`` (a GPU's default float32 division is approximate), no FMA; the statistics
stages write the float32 products each reduction adds (the host adds them in element
order: ``cpu_karcher.accumulate``); stage 5 stores
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
    if STAGE == 0:
        for j in tl.static_range(N):
            x = round_work(tl.where(inside, _load_f32(model_ptrs[j], idx, inside), 0.0), W)
            tl.store(sums_ptr + j * n + idx, x * x, mask=inside)
    else:
        u = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(N):
            uj = _unit(model_ptrs[j], idx, inside, n32_ptr, j, W)
            nj = tl.load(na_ptr + j)
            u = tl.where(tl.load(valid_ptr + j) != 0, round_work(u + round_work(nj * uj, W), W), u)
        if STAGE == 1:
            tl.store(sums_ptr + idx, u * u, mask=inside)
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
                un_on = tl.load(unapply_ptr + ri) != 0
                u = tl.where(un_on, round_work(tl.math.div_rn(u, un), W), u)
            if STAGE == 2:
                for j in tl.static_range(N):
                    uj = _unit(model_ptrs[j], idx, inside, n32_ptr, j, W)
                    tl.store(sums_ptr + j * n + idx, u * uj, mask=inside)
            elif STAGE == 3:
                T = _tangent(model_ptrs, idx, inside, n32_ptr, valid_ptr, u, full, dot_ptr,
                             coef_ptr, skip_ptr, W, N)  # fmt: skip
                tl.store(sums_ptr + idx, T * T, mask=inside)
            elif STAGE == 4:
                T = _tangent(model_ptrs, idx, inside, n32_ptr, valid_ptr, u, full, dot_ptr,
                             coef_ptr, skip_ptr, W, N)  # fmt: skip
                v = _step(u, T, full, cs_ptr, sn_ptr, nt_ptr, W)
                tl.store(sums_ptr + idx, v * v, mask=inside)
            else:
                _store_rounded(out_ptr, idx, round_work(s32 * u, W), inside)


def karcher_pass_triton(models: list[torch.Tensor], n: int, prog, stage: int,
                        out: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
    """One pass of the chain over the first ``n`` elements of each model (SPEC "Karcher
    mean"; ``prog``: ``streammerge.methods.karcher.Program``): stages 0 .. 4 return the
    float32 products [N, n] (``cpu_karcher.accumulate`` adds them in the SPEC's order on the
    host), stage 5 writes ``out``."""
    nm = len(models)
    dev = models[0].device
    blocks = triton.cdiv(n, STOCK_BLOCK) if n > 0 else 0
    sums = torch.zeros((nm, n), dtype=torch.float32, device=dev)
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
