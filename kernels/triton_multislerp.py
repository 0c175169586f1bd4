"""Multi-SLERP Triton kernels: the GPU twins of ``kernels/cpu_multislerp.py`` (docs/SPEC.md
"Multi-SLERP"), byte-identical to them (``tests/test_multislerp.py``).

One kernel, one program per block of ``MSL_BLOCK`` elements, its ``STAGE`` a constexpr:
stages 0..3 store the block's float64 sums (``triton_rows._tree``; the host adds the blocks
left to right), stage 4 writes the merged value (or the weighted-sum fallback). Every
elementwise op float32 rounded to W (``triton_nearswap.round_work``), the divisions by
``div_rn``, no FMA; ``sc`` the host scalars (``cpu_multislerp``'s layout).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import FLOAT_CODES
from .cpu_multislerp import MSL_BLOCK, n_scalars, stage_width
from .cpu_ram import work_dtype
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
def _unit(base_ptr, model_ptr, sc_ptr, j: tl.constexpr, N: tl.constexpr, idx, inside,
          HAS_BASE: tl.constexpr, W: tl.constexpr):  # fmt: skip
    d = tl.load(sc_ptr + N + j)
    u = round_work(tl.math.div_rn(_vector(base_ptr, model_ptr, idx, inside, HAS_BASE, W), d), W)
    return tl.where(inside, u, 0.0)


@triton.jit
def _msl_kernel(base_ptr, model_ptrs, sc_ptr, sums_ptr, out_ptr, n, STAGE: tl.constexpr,
                HAS_BASE: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    one = tl.arange(0, 1)
    N: tl.constexpr = len(model_ptrs)
    if STAGE == 0:
        for j in tl.static_range(N):
            d = _vector(base_ptr, model_ptrs[j], idx, inside, HAS_BASE, W).to(tl.float64)
            tl.store(sums_ptr + pid * N + j + one, _tree(d * d))
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(N):
            u = _unit(base_ptr, model_ptrs[j], sc_ptr, j, N, idx, inside, HAS_BASE, W)
            acc = acc + round_work(u * tl.load(sc_ptr + j), W)
        m = tl.where(inside, round_work(acc, W), 0.0)
        if STAGE == 1:
            m64 = m.to(tl.float64)
            tl.store(sums_ptr + pid + one, _tree(m64 * m64))
        else:
            mh = tl.where(inside, round_work(tl.math.div_rn(m, tl.load(sc_ptr + 2 * N)), W),
                          0.0)  # fmt: skip
            if STAGE == 2:
                for j in tl.static_range(N):
                    u = _unit(base_ptr, model_ptrs[j], sc_ptr, j, N, idx, inside, HAS_BASE, W)
                    p = tl.where(inside, round_work(u * mh, W), 0.0).to(tl.float64)
                    tl.store(sums_ptr + pid * N + j + one, _tree(p))
            else:
                acc = tl.zeros([BLOCK], tl.float32)
                for j in tl.static_range(N):
                    u = _unit(base_ptr, model_ptrs[j], sc_ptr, j, N, idx, inside, HAS_BASE, W)
                    dm = round_work(tl.load(sc_ptr + 2 * N + 1 + j) * mh, W)
                    acc = acc + round_work(round_work(u - dm, W) * tl.load(sc_ptr + j), W)
                t = tl.where(inside, round_work(acc, W), 0.0)
                if STAGE == 3:
                    t64 = t.to(tl.float64)
                    tl.store(sums_ptr + pid + one, _tree(t64 * t64))
                else:
                    c = tl.load(sc_ptr + 3 * N + 1)
                    sf = tl.load(sc_ptr + 3 * N + 2)
                    avg = tl.load(sc_ptr + 3 * N + 3)
                    r = round_work(round_work(mh * c, W) + round_work(t * sf, W), W)
                    r = round_work(r * avg, W)
                    a = round_work(tl.load(sc_ptr) * _vector(base_ptr, model_ptrs[0], idx, inside,
                                                             HAS_BASE, W), W)  # fmt: skip
                    for j in tl.static_range(1, N):  # the fallback: the weighted sum in W
                        vj = _vector(base_ptr, model_ptrs[j], idx, inside, HAS_BASE, W)
                        a = round_work(a + round_work(tl.load(sc_ptr + j) * vj, W), W)
                    r = tl.where(tl.load(sc_ptr + 3 * N + 4) != 0, a, r)
                    if HAS_BASE:
                        r = round_work(r + round_work(_load_f32(base_ptr, idx, inside), W), W)
                    _store_rounded(out_ptr, idx, r, inside)


def _work(base: torch.Tensor | None, models: list[torch.Tensor], work: str | None) -> int:
    rows = ([] if base is None else [base]) + list(models)
    return FLOAT_CODES[work or work_dtype([_TORCH_TO_SAFETENSORS[x.dtype] for x in rows])]


def _launch(base, models, n, stage, sc, sums, out, work):
    s = torch.from_numpy(np.ascontiguousarray(sc, np.float32)).to(models[0].device)
    if s.numel() != n_scalars(len(models)):
        raise ValueError(f"need {n_scalars(len(models))} scalars, got {s.numel()}")
    _msl_kernel[(triton.cdiv(n, MSL_BLOCK),)](models[0] if base is None else base, tuple(models),
                                              s, sums, out, n, STAGE=stage,
                                              HAS_BASE=base is not None,
                                              W=_work(base, models, work), BLOCK=MSL_BLOCK,
                                              enable_fp_fusion=False)  # fmt: skip


def msl_stats_triton(base: torch.Tensor | None, models: list[torch.Tensor], n: int, stage: int,
                     sc: np.ndarray, work: str | None = None) -> torch.Tensor:  # fmt: skip
    """Per-block sums (float64 [ceil(n / MSL_BLOCK), stage_width]) of statistics stage
    ``stage`` (0..3) of the first ``n`` elements (SPEC "Multi-SLERP"; ``base`` None: the
    models themselves; the host adds the blocks left to right)."""
    blocks = triton.cdiv(n, MSL_BLOCK) if n > 0 else 0
    sums = torch.zeros((blocks, stage_width(stage, len(models))), dtype=torch.float64,
                       device=models[0].device)  # fmt: skip
    if blocks:
        _launch(base, models, n, stage, sc, sums, sums, work)
    return sums


def msl_triton(base: torch.Tensor | None, models: list[torch.Tensor], n: int, sc: np.ndarray,
               out: torch.Tensor, work: str | None = None) -> None:  # fmt: skip
    """The merged value of the first ``n`` elements into ``out`` (sc: float32 [3N + 5], the
    tensor's scalars; SPEC "Multi-SLERP")."""
    if n > 0:
        _launch(base, models, n, 4, sc, out, out, work)
