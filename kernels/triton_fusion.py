"""Arcee Fusion Triton kernels: the GPU twins of ``kernels/cpu_fusion.py`` (docs/SPEC.md
"Arcee Fusion"), byte-identical to them (``tests/test_arcee_fusion.py``).

- ``_k_kernel``: one program per row; the maxima, then the softmax sums, then the
  divergence (mergekit's ops in W, as ``cpu_fusion``) in blocks of ``SUM_BLOCK`` elements, each block summed as SPEC's pairwise tree
  (``triton_rows._tree``), the block results added left to right; SPEC's ``exp64`` and
  ``log64`` from float64 IEEE operations only (2^n and frexp on the bits), launched with
  ``enable_fp_fusion=False`` (no FMA).
- ``_elem_kernel``: elementwise importance; the order keys (then counted by
  ``torch.bincount``: exact integers), or the merged value ``x + d * m``.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import FLOAT_CODES
from .cpu_fusion import (EPS, INV_FACT, INV_LN2, INV_ODD, LN2, LN2_HI, LN2_LO,  # noqa: F401
                         SQRT_HALF, work_dtype)
from .triton_merge import _load_f32, _store_rounded
from .triton_nearswap import round_work
from .triton_rows import _tree

SUM_BLOCK = 1024
ELEM_BLOCK = 1024
_TORCH_TO_SAFETENSORS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_F = [float(v) for v in INV_FACT]
_O = [float(v) for v in INV_ODD]
EPS_F32 = float(np.float32(EPS))


@triton.jit
def _exp64(r):
    """SPEC's exp64 of float64 r <= 0 (0 below -708)."""
    small = r < -708.0
    r = tl.where(small, 0.0, r)
    n = tl.floor(r * INV_LN2 + 0.5)
    s = (r - n * LN2_HI) - n * LN2_LO
    e = s * 0.0 + _F[13]
    e = e * s + _F[12]
    e = e * s + _F[11]
    e = e * s + _F[10]
    e = e * s + _F[9]
    e = e * s + _F[8]
    e = e * s + _F[7]
    e = e * s + _F[6]
    e = e * s + _F[5]
    e = e * s + _F[4]
    e = e * s + _F[3]
    e = e * s + _F[2]
    e = e * s + _F[1]
    e = e * s + 1.0
    scale = ((n.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    return tl.where(small, 0.0, e * scale)


@triton.jit
def _log64(v):
    """SPEC's log64 of a positive normal float64 v (frexp on the bits)."""
    bits = v.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1022
    m = ((bits & 0x000FFFFFFFFFFFFF) | 0x3FE0000000000000).to(tl.float64, bitcast=True)
    lo = m < SQRT_HALF
    m = tl.where(lo, 2.0 * m, m)
    e = tl.where(lo, e - 1, e)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    acc = z * 0.0 + _O[21]
    acc = acc * z + _O[19]
    acc = acc * z + _O[17]
    acc = acc * z + _O[15]
    acc = acc * z + _O[13]
    acc = acc * z + _O[11]
    acc = acc * z + _O[9]
    acc = acc * z + _O[7]
    acc = acc * z + _O[5]
    acc = acc * z + _O[3]
    acc = acc * z + 1.0
    return e.to(tl.float64) * LN2 + (2.0 * s) * acc


@triton.jit
def _load_w(ptr, idx, inside, W: tl.constexpr):
    return round_work(_load_f32(ptr, idx, inside), W)


@triton.jit
def _log32(r):
    """SPEC's float32 log: float32(log64(r)); 0 -> -inf, inf -> inf, NaN -> NaN."""
    ok = (r > 0.0) & (r < float("inf"))
    v = _log64(tl.where(ok, r, 1.0).to(tl.float64)).to(tl.float32)
    v = tl.where(r == 0.0, float("-inf"), v)
    v = tl.where(r == float("inf"), float("inf"), v)
    return tl.where(ok | (r == 0.0) | (r == float("inf")), v, float("nan"))


@triton.jit
def _exp32(v, m, inside):
    """float32(exp64(float64(float32(v - m)))) (0 outside the row), widened to float64."""
    e = _exp64(tl.where(inside, v - m, 0.0).to(tl.float64)).to(tl.float32)
    return tl.where(inside, e, 0.0).to(tl.float64)


@triton.jit
def _soft(e, rz, W: tl.constexpr):
    return round_work(round_work(e.to(tl.float32) * rz, W) + EPS_F32, W)


@triton.jit
def _k_kernel(a_ptr, b_ptr, k_ptr, row_len, W: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    first = r * row_len
    lanes = tl.arange(0, BLOCK)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    my = tl.full([BLOCK], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for lo in range(0, row_len, BLOCK):
        inside = lo + lanes < row_len
        x = _load_w(a_ptr, first + lo + lanes, inside, W)
        y = _load_w(b_ptr, first + lo + lanes, inside, W)
        fin = (tl.abs(x) <= 3.4028234663852886e38) & (tl.abs(y) <= 3.4028234663852886e38)
        bad = bad | (inside & (fin == 0)).to(tl.int32)
        mx = tl.where(inside & (x > mx), x, mx)
        my = tl.where(inside & (y > my), y, my)
    bx = tl.max(mx, axis=0)
    by = tl.max(my, axis=0)
    zx = tl.zeros([1], dtype=tl.float64)
    zy = tl.zeros([1], dtype=tl.float64)
    for lo in range(0, row_len, BLOCK):
        inside = lo + lanes < row_len
        x = _load_w(a_ptr, first + lo + lanes, inside, W)
        y = _load_w(b_ptr, first + lo + lanes, inside, W)
        zx = zx + _tree(_exp32(x, bx, inside))
        zy = zy + _tree(_exp32(y, by, inside))
    one = tl.full([1], 1.0, tl.float32)
    rzx = tl.math.div_rn(one, zx.to(tl.float32))
    rzy = tl.math.div_rn(one, zy.to(tl.float32))
    kl = tl.zeros([1], dtype=tl.float64)
    for lo in range(0, row_len, BLOCK):
        inside = lo + lanes < row_len
        x = _load_w(a_ptr, first + lo + lanes, inside, W)
        y = _load_w(b_ptr, first + lo + lanes, inside, W)
        q = _soft(_exp32(x, bx, inside), rzx, W)
        p = _soft(_exp32(y, by, inside), rzy, W)
        rr = round_work(tl.math.div_rn(p, q), W)
        t = round_work(p * round_work(_log32(rr), W), W)
        kl = kl + _tree(tl.where(inside, t, 0.0).to(tl.float64))
    nan = tl.sum(bad, axis=0) > 0
    k = round_work(kl.to(tl.float32), W)
    k = tl.where(nan, float("nan"), k)
    tl.store(k_ptr + r + tl.arange(0, 1), k)


@triton.jit
def _elem_kernel(a_ptr, b_ptr, k_ptr, out_ptr, n, row_len, thr, W: tl.constexpr,
                 KEYS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    x = _load_w(a_ptr, idx, inside, W)
    y = _load_w(b_ptr, idx, inside, W)
    kr = tl.load(k_ptr + idx // row_len, mask=inside, other=0.0)
    d = round_work(y - x, W)
    imp = round_work(tl.abs(d) * kr, W)
    if KEYS:
        bits = imp.to(tl.uint32, bitcast=True)
        key = tl.where((bits & 0x80000000) != 0, ~bits, bits ^ 0x80000000)
        key = tl.where(imp == 0.0, 0x80000000, key)
        key = tl.where(imp != imp, 0xFFC00000, key)
        tl.store(out_ptr + idx, key.to(tl.int64), mask=inside)
    else:
        m = tl.where(imp >= thr, 1.0, 0.0)
        _store_rounded(out_ptr, idx, x + d * m, inside)


def _w(a, b, work):
    return work or work_dtype(_TORCH_TO_SAFETENSORS[a.dtype], _TORCH_TO_SAFETENSORS[b.dtype])


def fusion_k_triton(a: torch.Tensor, b: torch.Tensor, n_rows: int, row_len: int,
                    work: str | None = None) -> torch.Tensor:  # fmt: skip
    """Each row's k (float32 [n_rows], same device) of 1-D tensors of whole rows."""
    k = torch.zeros(n_rows, dtype=torch.float32, device=a.device)
    if n_rows and row_len:
        _k_kernel[(n_rows,)](a, b, k, row_len, W=FLOAT_CODES[_w(a, b, work)], BLOCK=SUM_BLOCK,
                             enable_fp_fusion=False)  # fmt: skip
    return k


def fusion_keys_triton(a, b, n_rows, row_len, k, work=None) -> torch.Tensor:
    """The importances' order keys (int64 [n], same device)."""
    n = n_rows * row_len
    keys = torch.zeros(n, dtype=torch.int64, device=a.device)
    if n:
        grid = (triton.cdiv(n, ELEM_BLOCK),)
        _elem_kernel[grid](a, b, k, keys, n, row_len, 0.0, W=FLOAT_CODES[_w(a, b, work)],
                           KEYS=True, BLOCK=ELEM_BLOCK, enable_fp_fusion=False)  # fmt: skip
    return keys


def fusion_hist_triton(a, b, n_rows, row_len, k, buckets=None, work=None) -> np.ndarray:
    """int64 [65536] (high 16 bits) or [len(buckets), 65536] (low 16 bits inside
    ``buckets``) histograms of the chunk's importance keys, on the host."""
    keys = fusion_keys_triton(a, b, n_rows, row_len, k, work)
    high = keys >> 16
    if buckets is None:
        return torch.bincount(high, minlength=65536).cpu().numpy()
    rows = [torch.bincount(keys[high == int(bk)] & 0xFFFF, minlength=65536).cpu().numpy()
            for bk in buckets]  # fmt: skip
    return np.stack(rows).astype(np.int64)


def fusion_write_triton(a, b, n_rows, row_len, k, thr, out, work=None) -> None:
    """The merged chunk into ``out`` (SPEC "The merged value")."""
    n = n_rows * row_len
    if n:
        grid = (triton.cdiv(n, ELEM_BLOCK),)
        _elem_kernel[grid](a, b, k, out, n, row_len, float(np.float32(thr)),
                           W=FLOAT_CODES[_w(a, b, work)], KEYS=False, BLOCK=ELEM_BLOCK,
                           enable_fp_fusion=False)  # fmt: skip
