"""RAM Triton kernels: the GPU twins of ``kernels/cpu_ram.py`` (docs/SPEC.md "RAM (ram,
ramplus_tl)"), byte-identical to them (``tests/test_ram.py``).

Elementwise, one program per ``BLOCK`` elements, the fine-tunes a tuple of pointers
unrolled at compile time (``tl.static_range``): a first loop counts the models that changed
each element, a second recomputes each task vector and adds its term, left to right from
+0.0. Each op rounded to the working dtype W as ``triton_nearswap.round_work`` does; the
division by the count by ``div_rn`` (IEEE); ``enable_fp_fusion=False`` (no FMA). The
statistics kernel sums its per-model counts per program (int64) and adds them atomically:
integer sums, so the order does not matter.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import FLOAT_CODES
from .cpu_ram import epsilon_in_work, work_dtype
from .triton_merge import _load_f32, _store_rounded
from .triton_nearswap import _TORCH_TO_SAFETENSORS, round_work

#: Elements per program.
BLOCK = 1024


@triton.jit
def _count(base_ptr, model_ptrs, idx, inside, e, W: tl.constexpr):
    """(x_b, cnt): the base's values and how many models changed each element."""
    xb = round_work(_load_f32(base_ptr, idx, inside), W)  # the inputs in W
    cnt = tl.zeros(idx.shape, tl.int32)
    for j in tl.static_range(len(model_ptrs)):
        d = round_work(round_work(_load_f32(model_ptrs[j], idx, inside), W) - xb, W)
        cnt += (tl.abs(d) > e).to(tl.int32)
    return xb, cnt


@triton.jit
def _counts_kernel(base_ptr, model_ptrs, shared_ptr, unique_ptr, n, e, W: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    xb, cnt = _count(base_ptr, model_ptrs, idx, inside, e, W)
    for j in tl.static_range(len(model_ptrs)):
        d = round_work(round_work(_load_f32(model_ptrs[j], idx, inside), W) - xb, W)
        nz = (tl.abs(d) > e) & inside
        sh = tl.sum((nz & (cnt > 1)).to(tl.int64), axis=0)
        un = tl.sum((nz & (cnt == 1)).to(tl.int64), axis=0)
        tl.atomic_add(shared_ptr + j, sh)
        tl.atomic_add(unique_ptr + j, un)


@triton.jit
def _ram_kernel(base_ptr, model_ptrs, lams, out_ptr, n, e, W: tl.constexpr, PLUS: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    xb, cnt = _count(base_ptr, model_ptrs, idx, inside, e, W)
    uniq = tl.where(cnt == 1, 1.0, 0.0)
    ovl = tl.where(cnt > 1, 1.0, 0.0)
    div = tl.maximum(cnt, 1).to(tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(len(model_ptrs)):
        d = round_work(round_work(_load_f32(model_ptrs[j], idx, inside), W) - xb, W)
        z = round_work(d * tl.where(tl.abs(d) > e, 1.0, 0.0), W)
        u = round_work(z * uniq, W)
        o = round_work(tl.math.div_rn(round_work(z * ovl, W), div), W)
        if PLUS:
            s = u * lams[j] + o
        else:
            s = round_work(u + o, W)
        acc = acc + s
    if PLUS:
        out = xb + acc
    else:
        out = round_work(xb + round_work(acc, W), W)
    _store_rounded(out_ptr, idx, out, inside)


def _work(base: torch.Tensor, models: list[torch.Tensor], work: str | None) -> tuple[str, int]:
    w = work or work_dtype([_TORCH_TO_SAFETENSORS[x.dtype] for x in (base, *models)])
    return w, FLOAT_CODES[w]


def ram_counts_triton(base: torch.Tensor, models: list[torch.Tensor], n: int, epsilon: float,
                      shared: torch.Tensor, unique: torch.Tensor,
                      work: str | None = None) -> None:  # fmt: skip
    """Add ramplus_tl's per-model counts of the first ``n`` elements into ``shared`` /
    ``unique`` (int64 [N] tensors on the inputs' device; SPEC "RAM")."""
    if n <= 0:
        return
    w, code = _work(base, models, work)
    _counts_kernel[(triton.cdiv(n, BLOCK),)](base, tuple(models), shared, unique, n,
                                             float(epsilon_in_work(epsilon, w)), W=code,
                                             BLOCK=BLOCK)  # fmt: skip


def ram_triton(base: torch.Tensor, models: list[torch.Tensor], n: int, epsilon: float,
               out: torch.Tensor, lam: np.ndarray | None = None,
               work: str | None = None) -> None:  # fmt: skip
    """ram (``lam`` None) or ramplus_tl (``lam``: float32 [N], ``cpu_ram.ram_lambdas``) of
    the first ``n`` elements into ``out`` (1-D tensors of float32 / float16 / bfloat16 on one
    device; SPEC "RAM")."""
    if n <= 0:
        return
    w, code = _work(base, models, work)
    lams = tuple(float(v) for v in (lam if lam is not None else np.ones(len(models), np.float32)))
    _ram_kernel[(triton.cdiv(n, BLOCK),)](base, tuple(models), lams, out, n,
                                          float(epsilon_in_work(epsilon, w)), W=code,
                                          PLUS=lam is not None, BLOCK=BLOCK,
                                          enable_fp_fusion=False)  # fmt: skip
