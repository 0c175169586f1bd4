"""DELLA Triton kernels: the GPU twin of ``kernels/cpu_della.py`` (docs/SPEC.md "DELLA
(della, della_linear)"), byte-identical to it (``tests/test_della.py``).

Three steps per chunk of whole rows: ``_keys_kernel`` writes each task vector element's
sort key ``mag << 32 | (index in its row)`` (int64; the task vector rounded to the working
dtype D as in the merge); ``torch.argsort`` of each row's keys (unique keys: any sort gives
the same order) and a scatter give the exact ranks; ``_della_kernel`` draws the Philox
words (SPEC v1 counter and key), keeps an element when its word is below
``K = A_j + (rank * B_j) // (row_len - 1)``, rescales by ``div_rn(2**32, float32(K))``
and combines as the v3 task-vector merge, every op rounded to D, no FMA.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import FLOAT_CODES, round_host
from .cpu_della import della_thresholds
from .triton_merge import _load_f32, _odd_int64, _rd, _store_rounded
from .triton_nearswap import _TORCH_TO_SAFETENSORS

#: Elements per program.
BLOCK = 1024


@triton.jit
def _keys_kernel(base_ptr, model_ptr, keys_ptr, n, row_len, D: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    xb = _rd(_load_f32(base_ptr, idx, inside), D)
    d = _rd(_rd(_load_f32(model_ptr, idx, inside), D) - xb, D)
    mag = (d.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    tl.store(keys_ptr + idx, (mag << 32) | (idx % row_len), mask=inside)


@triton.jit
def _della_kernel(base_ptr, model_ptrs, rank_ptrs, out_ptr, n, row_len, start, key, tha, thb,
                  wq, den0, s32, MODEL_IDS: tl.constexpr, DROP: tl.constexpr,
                  RESCALE: tl.constexpr, SIGN: tl.constexpr, NORMALIZE: tl.constexpr,
                  D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    xb = _rd(_load_f32(base_ptr, idx, inside), D)
    g = idx + start
    lo = g.to(tl.uint32)
    hi = (g >> 32).to(tl.uint32)
    zero = lo * 0
    wds = ()
    s = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(len(MODEL_IDS)):
        d = _rd(_rd(_load_f32(model_ptrs[k], idx, inside), D) - xb, D)
        if DROP[k]:
            r0, r1, r2, r3 = tl.philox(key, lo, hi, zero + MODEL_IDS[k] // 4, zero)
            if MODEL_IDS[k] % 4 == 0:
                r = r0
            elif MODEL_IDS[k] % 4 == 1:
                r = r1
            elif MODEL_IDS[k] % 4 == 2:
                r = r2
            else:
                r = r3
            rank = tl.load(rank_ptrs[k] + idx, mask=inside, other=0)
            a_k = (tha[k] >> 1).to(tl.uint32).to(tl.int64)  # _odd_int64: never specialized
            b_k = (thb[k] >> 1).to(tl.uint32).to(tl.int64)
            kk = a_k + (rank * b_k) // tl.maximum(row_len - 1, 1)
            kept = r.to(tl.int64) < kk
            if RESCALE:
                e = _rd(d * tl.math.div_rn(tl.full([BLOCK], 4294967296.0, tl.float32),
                                           kk.to(tl.float32)), D)
            else:
                e = d
            e = tl.where(kept, e, 0.0)
        else:
            e = d
        wd = _rd(wq[k] * e, D)
        s = s + wd
        wds = wds + (wd,)
    s = _rd(s, D)
    if SIGN:
        pos = s >= 0.0
        acc = tl.zeros([BLOCK], tl.float32)
        den = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(len(MODEL_IDS)):
            wd = wds[k]
            agree = ((wd > 0.0) & pos) | ((wd < 0.0) & (s < 0.0)) | ((wd < 0.0) & (s != s))
            acc = tl.where(agree, acc + wd, acc)
            den = tl.where(agree, den + wq[k], den)
        acc = _rd(acc, D)
        den = _rd(den, D)
        den = tl.where(den == 0.0, 1.0, den)
    else:
        acc = s
        den = tl.zeros([BLOCK], tl.float32) + den0
    if NORMALIZE:
        m = _rd(tl.math.div_rn(acc, den), D)
    else:
        m = acc
    m = _rd(s32 * m, D)
    _store_rounded(out_ptr, idx, _rd(xb + m, D), inside)


def della_triton(base: torch.Tensor, models: list[torch.Tensor], n_rows: int, row_len: int,
                 start: int, key: int, model_ids, weights, density, epsilon, rescale: bool,
                 sign: bool, normalize: bool, scale: float, out: torch.Tensor,
                 work: str | None = None) -> None:  # fmt: skip
    """DELLA of ``n_rows`` whole rows into ``out`` (1-D tensors on one device; SPEC
    "DELLA"); the arguments as ``cpu_della.della_chunk``."""
    n = n_rows * row_len
    if n <= 0:
        return
    dts = [_TORCH_TO_SAFETENSORS[x.dtype] for x in (base, *models)]
    w = work or (dts[0] if len(set(dts)) == 1 else "F32")
    D = FLOAT_CODES[w]
    drop = tuple(float(r) < 1.0 for r in density)
    ab = [della_thresholds(float(r), float(e)) if dr else (0, 0)
          for r, e, dr in zip(density, epsilon, drop)]  # fmt: skip
    grid = (triton.cdiv(n, BLOCK),)
    ranks = []
    for m, dr in zip(models, drop):
        if not dr:
            ranks.append(base)  # not read
            continue
        keys = torch.empty(n, dtype=torch.int64, device=base.device)
        _keys_kernel[grid](base, m, keys, n, row_len, D=D, BLOCK=BLOCK, enable_fp_fusion=False)
        order = torch.argsort(keys.view(n_rows, row_len), dim=1)
        rank = torch.empty_like(order)
        pos = torch.arange(row_len, dtype=torch.int64, device=base.device).expand(n_rows, -1)
        rank.scatter_(1, order, pos)
        ranks.append(rank.reshape(-1))
    wq = tuple(float(round_host(float(x), w)) for x in weights)
    acc = np.float32(0.0)
    for x in wq:
        acc = np.float32(acc + np.float32(x))
    den0 = float(round_host(float(acc), w))
    if abs(den0) < 1e-8:
        den0 = 1.0
    _della_kernel[grid](base, tuple(models), tuple(ranks), out, n, row_len, start, key,
                        tuple(_odd_int64(a) for a, _ in ab), tuple(_odd_int64(b) for _, b in ab), wq,
                        den0, float(np.float32(scale)), MODEL_IDS=tuple(int(j) for j in model_ids),
                        DROP=drop, RESCALE=bool(rescale), SIGN=bool(sign),
                        NORMALIZE=bool(normalize), D=D, BLOCK=BLOCK,
                        enable_fp_fusion=False)  # fmt: skip
