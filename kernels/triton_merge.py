"""The Triton merge kernel: SPEC "Random drop (DARE) masks", "The merged value" and v2
"Methods" over one chunk of one tensor, for N fine-tunes at once (contract: docs/SPEC.md and
the kernel contract's section 1; tested bit for bit against ``tests/spec_reference.py`` and
the numba kernel in ``tests/test_triton_kernel.py``).

One private ``@triton.jit`` kernel, ``_task_vector_kernel``, and its public launcher,
``merge_chunk_triton``. The kernel reads top to bottom: program id (int64) -> local offsets
-> bounds mask -> tensor offsets (chunk start + local index, int64) -> loads upcast to
float32 -> Philox masks -> float32 math in SPEC's order -> round -> store.

How the N fine-tunes reach the kernel: as a *tuple* of N pointers (Triton's tuple kernel
arguments; tested with Triton 3.8). Each pointer keeps its own element type, so fine-tunes of
mixed dtypes need no grouping or conversion, and each is specialized on 16-byte alignment like
any pointer argument (vectorized loads). The per-model constants travel as tuples of scalars
in the launch arguments: no device tensors, no host-to-device copy per launch. The model ids
j are ``constexpr``: the kernel is unrolled over the N models (``tl.static_range``), Philox
word ``j % 4`` is picked at compile time, and the four words of one Philox draw serve every
model with the same counter ``j // 4`` (``DRAW``), so N = 2 (ids 0, 1) costs one Philox draw
per element, N = 5 two. N = 2 is thus the fast path without a second kernel: each N (and each
tuple of input dtypes and model ids) compiles its own fully unrolled specialization; key,
start, p, w and s are runtime values and never cause a recompile.

The v2 methods are four more ``constexpr`` flags, so each method compiles its own kernel and
v1 (all four off) compiles to v1's code (the sm_90 PTX is identical but for line numbers):
``WINDOW`` (magnitude keep window, bounds at run time), ``SIGN`` (TIES sign consensus: a first
pass keeps each model's wd_j in registers, a tuple built over the unrolled loop, so each input
is still loaded once), ``NORMALIZE`` (``tl.math.div_rn``, never an approximate division) and
``LINEAR`` (no base added back).

Rounding on the way out: float32 -> bfloat16 is done in integer arithmetic on the float32
bits (round to nearest even, NaN kept a quiet NaN) because Triton's interpreter truncates in
``x.to(tl.bfloat16)`` (measured: ~30% of random values differ from torch), and bfloat16 ->
float32 on the way in is a 16-bit shift because the interpreter's conversion flushes bf16
subnormals to zero. float32 -> float16 uses ``x.to(tl.float16)``: numpy's ``astype`` under the
interpreter and ``cvt.rn.f16.f32`` on NVIDIA GPUs, both round to nearest even (subnormals and
overflow to inf included; checked against numpy over all the special cases in the tests).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from .common import FLOAT_CODES, drop_rescale, drop_threshold, round_host

#: torch dtypes the kernel loads and stores, with their safetensors names (for messages).
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@triton.jit
def _load_f32(ptr, offsets, mask):
    """float32(ptr[offsets]) for a float32 / float16 / bfloat16 pointer; bf16 by a 16-bit
    shift (exact, subnormals kept: the interpreter's own conversion flushes them)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        h = tl.load(ptr + offsets, mask=mask).to(tl.uint16, bitcast=True)
        return (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offsets, mask=mask).to(tl.float32)


@triton.jit
def _rd(x, D: tl.constexpr):
    """rd of docs/SPEC.md "Working dtype (v3)": float32 ``x`` rounded to the working dtype
    D (a FLOAT_CODES value: 0 F32, 1 F16, 2 BF16), round to nearest even, back to float32.
    BF16 on the bits as ``_store_rounded`` (a NaN keeps its top 16 bits, made quiet); F16 by
    ``.to`` (RNE in the interpreter and on NVIDIA GPUs), a NaN made the quiet NaN
    0x7FC00000 with x's sign (the numba kernel's; SPEC v3 "Rounding to D"); F32: the
    identity, compiled away."""
    if D == 2:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        quiet = ((bits >> 16) | 0x40) << 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(is_nan, quiet, rounded).to(tl.float32, bitcast=True)
    elif D == 1:
        bits = x.to(tl.uint32, bitcast=True)
        canonical = ((bits & 0x80000000) | 0x7FC00000).to(tl.float32, bitcast=True)
        return tl.where(x != x, canonical, x.to(tl.float16).to(tl.float32))
    else:
        return x


@triton.jit
def _load_d(ptr, offsets, mask, D: tl.constexpr):
    """``_load_f32``, rounded to D when the pointer's dtype does not fit in it (mergekit's
    cast of every input to ``dtype:`` at load)."""
    x = _load_f32(ptr, offsets, mask)
    if D == 2:
        if ptr.dtype.element_ty != tl.bfloat16:
            x = _rd(x, D)
    elif D == 1:
        if ptr.dtype.element_ty != tl.float16:
            x = _rd(x, D)
    return x


@triton.jit
def _store_rounded(out_ptr, offsets, out, mask):
    """Store float32 ``out`` rounded to ``out_ptr``'s dtype: bf16 to nearest even on the
    float32 bits (a NaN keeps its top bits, made quiet); f16 / f32 by ``.to``."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = out.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        b16 = tl.where(is_nan, (bits >> 16) | 0x40, rounded).to(tl.uint16)
        tl.store(out_ptr + offsets, b16.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _in_window(d, lo, hi):
    """keep_lo <= mag(d) <= keep_hi, unsigned 32-bit; lo and hi arrive as 2**33 + 2 * v + 1."""
    mag = d.to(tl.uint32, bitcast=True) & 0x7FFFFFFF  # bits(d) without the sign
    return (mag >= (lo >> 1).to(tl.uint32)) & (mag <= (hi >> 1).to(tl.uint32))


#: bits(float32(1e-8)): |den| < 1e-8 (real numbers) <=> |den| <= float32(1e-8), which rounds
#: below 1e-8, <=> bits(den) & 0x7FFFFFFF <= this (den is never NaN: the weights are finite).
_DEN_TINY_BITS = tl.constexpr(int(np.float32(1e-8).view(np.uint32)))


@triton.jit(do_not_specialize=["key", "start"])
def _task_vector_kernel(
    base_ptr,  # [n] f32 / f16 / bf16, or None when HAS_BASE is False (x_b = +0.0)
    model_ptrs,  # tuple of N pointers, [n] each, f32 / f16 / bf16 (may differ)
    out_ptr,  # [n] f32 / f16 / bf16
    thresholds,  # tuple of N ints, 2**33 + 2 * floor(p_j * 2**32) + 1 (see the launcher)
    rescales,  # tuple of N floats, float32(1 / (1 - p_j))
    weights,  # tuple of N floats, w'_j = rd(float32(w_j))
    scale,  # float, float32(s)
    n,  # elements in the chunk
    key: tl.int64,  # key_t in [0, 2**63), runtime (one compile for every tensor)
    start: tl.int64,  # tensor index of the chunk's element 0, runtime
    keep_lo,  # tuple of N ints 2**33 + 2 * keep_lo_j + 1, or None when WINDOW is False
    keep_hi,  # tuple of N ints 2**33 + 2 * keep_hi_j + 1, or None when WINDOW is False
    MODEL_IDS: tl.constexpr,  # tuple of N SPEC model indices j
    MASKED: tl.constexpr,  # tuple of N bools, p_j > 0 (False: every element kept, no Philox)
    DRAW: tl.constexpr,  # tuple of N bools: draw Philox words here (else reuse the last ones)
    HAS_BASE: tl.constexpr,
    WINDOW: tl.constexpr,  # magnitude keep window (magnitude / breadcrumbs sparsifiers)
    SIGN: tl.constexpr,  # consensus "sign" (TIES); False: consensus "none"
    NORMALIZE: tl.constexpr,  # m = acc / den; False: m = acc
    LINEAR: tl.constexpr,  # out = m; False: out = x_b + s * m
    D: tl.constexpr,  # working dtype code (SPEC "Working dtype (v3)"): 0 F32, 1 F16, 2 BF16
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    local = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64 index in the chunk
    in_bounds = local < n
    # The interpreter passes ints by value (i32 below 2**31); the GPU signature says i64.
    offsets = start.to(tl.int64) + local  # [BLOCK] int64 index i in the tensor

    # x_b = float32(base[i]), or +0.0 when the base is absent.
    if HAS_BASE:
        x_b = _load_d(base_ptr, local, in_bounds, D)
    else:
        x_b = tl.zeros([BLOCK], dtype=tl.float32)

    acc = tl.zeros([BLOCK], dtype=tl.float32)  # +0.0; with SIGN, S (the sign election sum)
    wds = ()  # with SIGN, wd_j of every model, for the second pass
    for k in tl.static_range(len(MODEL_IDS)):
        d = _rd(_load_d(model_ptrs[k], local, in_bounds, D) - x_b, D)  # the task vector
        if MASKED[k]:
            # Philox4x32-10, key (key_t lo, key_t hi), counter (i lo, i hi, j // 4, 0). Its
            # four uint32 words serve up to four models (equal j // 4): drawn once for them.
            if DRAW[k]:
                if MODEL_IDS[k] // 4 == 0:
                    r0, r1, r2, r3 = tl.randint4x(key, offsets)
                else:
                    lo = offsets.to(tl.uint32)
                    hi = (offsets >> 32).to(tl.uint32)
                    zero = lo * 0
                    r0, r1, r2, r3 = tl.philox(key, lo, hi, zero + MODEL_IDS[k] // 4, zero)
            if MODEL_IDS[k] % 4 == 0:
                r = r0
            elif MODEL_IDS[k] % 4 == 1:
                r = r1
            elif MODEL_IDS[k] % 4 == 2:
                r = r2
            else:
                r = r3
            threshold = (thresholds[k] >> 1).to(tl.uint32)  # floor(p_j * 2**32)
            kept = r >= threshold  # unsigned 32-bit comparison
            if WINDOW:
                kept = kept & _in_window(d, keep_lo[k], keep_hi[k])
            e = tl.where(kept, _rd(d * rescales[k], D), 0.0)
        elif WINDOW:
            e = tl.where(_in_window(d, keep_lo[k], keep_hi[k]), _rd(d * rescales[k], D), 0.0)
        else:
            e = _rd(d * rescales[k], D)  # p_j = 0: threshold 0 keeps every element
        wd = _rd(weights[k] * e, D)
        acc = acc + wd
        if SIGN:
            wds = wds + (wd,)

    if SIGN:
        # Elect the sign of S = sum wd_j (S = -0.0 counts as positive, NaN as negative),
        # then sum the agreeing wd_j (and their weights) in model order.
        pos = _rd(acc, D) >= 0.0
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        den = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(len(MODEL_IDS)):
            agree = ((wds[k] > 0.0) & pos) | ((wds[k] < 0.0) & ~pos)
            acc = tl.where(agree, acc + wds[k], acc)
            if NORMALIZE:
                den = tl.where(agree, den + weights[k], den)
        acc = _rd(acc, D)
        if NORMALIZE:
            den = _rd(den, D)
            den = tl.where(den == 0.0, 1.0, den)
    elif NORMALIZE:
        acc = _rd(acc, D)
        den = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(len(MODEL_IDS)):
            den = den + weights[k]
        den = _rd(den, D)
        tiny = (den.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) <= _DEN_TINY_BITS
        den = tl.where(tiny, 1.0, den)
    else:
        acc = _rd(acc, D)
    if NORMALIZE:
        m = _rd(tl.math.div_rn(acc, den), D)  # IEEE division, round to nearest even
    else:
        m = acc
    if LINEAR:
        out = m
    else:
        # float32, each product and sum rounded to D; no FMA: enable_fp_fusion=False
        out = _rd(x_b + _rd(scale * m, D), D)

    _store_rounded(out_ptr, local, out, in_bounds)


#: True under TRITON_INTERPRET=1 (set before triton was imported): the kernel runs on CPU
#: tensors, one program at a time, in numpy.
_INTERPRETED = not isinstance(_task_vector_kernel, triton.runtime.JITFunction)


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a chunk of ``n`` elements.

    On a GPU: 1024 elements and 4 warps, 8 elements per thread, so each bf16 input is one
    16-byte vector load per thread (``ld.global.v4.b32`` in the sm_90 PTX). Not yet measured
    on a device: ``bench/bench_kernel.py --sweep`` times the alternatives. Under the
    interpreter each program is a round of numpy calls (tens of ms per Philox draw at any block
    size on 2 cores), so chunks over 2**16 elements get blocks of 2**14; smaller ones keep
    1024, so the tests cross block boundaries.
    """
    if _INTERPRETED and n > 2**16:
        return 2**14, 4
    return 1024, 4


def _check_tensor(t: object, what: str, shape: torch.Size, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(
            f"{what} has dtype {t.dtype}; the merge kernel reads and writes torch.float32, "
            "torch.float16 and torch.bfloat16"
        )
    if t.device != device:
        raise ValueError(f"{what} is on {t.device} but out is on {device}; put them on one device")
    if t.shape != shape:
        raise ValueError(
            f"{what} has shape {tuple(t.shape)}, out has {tuple(shape)}: they must match"
        )
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (call .contiguous() or copy it into a buffer)")


def merge_chunk_triton(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor] | torch.Tensor,
    out: torch.Tensor,
    *,
    key: int,
    start: int,
    drop: Sequence[float],
    weights: Sequence[float],
    scale: float = 1.0,
    model_ids: Sequence[int] | None = None,
    keep_lo: Sequence[int] | None = None,
    keep_hi: Sequence[int] | None = None,
    consensus: str = "none",
    normalize: bool = False,
    linear: bool = False,
    compute_dtype: str = "F32",
) -> torch.Tensor:
    """Merge one chunk of one tensor into ``out`` with the Triton kernel (SPEC "Random drop
    (DARE) masks", "The merged value", "Methods"; kernel contract section 1; bit for bit
    equal to the numba kernel).

    Element t of the chunk (row-major order) is element ``start + t`` of the tensor; masks
    depend only on (key, j, start + t), so any chunking gives the same bytes. Asynchronous on
    a GPU (queued on the current stream, like any torch op); synchronous under the
    interpreter (``TRITON_INTERPRET=1``), which takes CPU tensors (CUDA ones work too there:
    Triton copies their whole storage to the host and back on every launch, slowly).

    The defaults (no window, consensus "none", no normalize, not linear) are v1's formula and
    compile to v1's code: each feature is a compile-time flag of the kernel (one
    specialization per method), while key, start, p, w, s and the window bounds are runtime
    values.

    Args:
        base: the base's chunk, out's shape, float32 / float16 / bfloat16, or None when the
            base lacks these elements (x_b = +0.0, e.g. vocabulary rows only fine-tunes have,
            or the ``linear`` method).
        models: the N >= 1 participating fine-tunes' chunks, in model order: a sequence of
            tensors of out's shape, or one 2-D tensor [N, n] whose rows are the models (each
            row contiguous; rows may be strided, e.g. ``buf[:, :n]``). dtypes may differ from
            one another and from the base: each pointer is loaded as its own dtype.
        out: [n] (any shape; contiguous) float32 / float16 / bfloat16, the output buffer,
            written in place. It must not overlap the inputs unless it is one of them with
            the same dtype.
        key: key_t in [0, 2**63) (``kernels.common.tensor_key``); a runtime argument.
        start: tensor index of the chunk's element 0, >= 0, start + n <= 2**63; runtime.
        drop: N drop rates p_j, 0 <= p_j < 1.
        weights: N contribution weights w_j (rounded to float32 on the host, finite).
        scale: scaling coefficient s (rounded to float32 on the host, finite).
        model_ids: N SPEC model indices j in [0, 2**32) (Philox word j % 4, counter word
            2 = j // 4); default 0 .. N-1. Compile-time constants of the kernel.
        keep_lo, keep_hi: N ints in [0, 2**32) each, or None (all 0 / all 0xFFFFFFFF): model
            j's element is kept only if keep_lo[j] <= mag <= keep_hi[j], mag = bits(d) &
            0x7FFFFFFF (unsigned; keep_lo 1, keep_hi 0 keeps none). ANDed with the DARE mask.
            Runtime values; a window that keeps everything for every model compiles away.
        consensus: "none" (sum in model order) or "sign" (TIES: sum the wd_j that agree with
            the sign of their sum).
        normalize: divide by the sum of the (agreeing) weights, IEEE round to nearest even
            (a sum with |den| < 1e-8, or no agreeing model, divides by 1).
        linear: out = m (SPEC ``linear``: base must be None, so d_j is the model value and
            s is not used); otherwise out = x_b + s * m.
        compute_dtype: the working dtype D ("F32", "BF16", "F16"; SPEC "Working dtype
            (v3)"): every intermediate rounded to D, a compile-time constant (F32 compiles
            to the float32 code). "F32" with ``linear`` only.

    Returns:
        ``out``.

    Raises:
        TypeError: an input or out is not a torch.Tensor of float32 / float16 / bfloat16;
            key, start, a model id or a window bound is not an integer; normalize or linear
            is not a bool.
        ValueError: shapes, devices or lengths that disagree, a non-contiguous tensor, a
            CPU tensor without ``TRITON_INTERPRET=1`` (set before triton is imported), p
            outside [0, 1), non-finite weights or scale, key / start / j / window bounds out
            of range, an unknown consensus, a base with ``linear``.
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    device = out.device
    if device.type == "cpu" and not _INTERPRETED:
        raise ValueError(
            "out is a CPU tensor but Triton is not in interpreter mode: set TRITON_INTERPRET=1 "
            "before triton is imported (the test path), or pass CUDA tensors"
        )
    if isinstance(models, torch.Tensor):
        if models.ndim != 2 or out.ndim != 1:
            raise ValueError(
                "models given as one tensor must be 2-D [N, n] (one row per model) with a 1-D "
                f"out [n]; got models {tuple(models.shape)}, out {tuple(out.shape)}"
            )
        models = list(models.unbind(0))
    models = list(models)
    n_models = len(models)
    ids = list(range(n_models)) if model_ids is None else [operator.index(j) for j in model_ids]
    key, start = operator.index(key), operator.index(start)
    lo = [0] * n_models if keep_lo is None else [operator.index(v) for v in keep_lo]
    hi = [0xFFFFFFFF] * n_models if keep_hi is None else [operator.index(v) for v in keep_hi]
    if n_models < 1:
        raise ValueError("merge_chunk_triton needs at least one fine-tune")
    if not (len(drop) == len(weights) == len(ids) == len(lo) == len(hi) == n_models):
        raise ValueError(
            f"models, drop, weights, model_ids, keep_lo and keep_hi must have one entry per "
            f"model; got {n_models}, {len(drop)}, {len(weights)}, {len(ids)}, {len(lo)}, "
            f"{len(hi)}"
        )
    if consensus not in ("none", "sign"):
        raise ValueError(f'consensus must be "none" or "sign", got {consensus!r}')
    for what, flag in (("normalize", normalize), ("linear", linear)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{what} must be a bool, got {type(flag).__name__}")
    if linear and base is not None:
        raise ValueError("linear has no base (out = m, d_j the model value): pass base=None")
    if compute_dtype not in FLOAT_CODES:
        raise ValueError(f"compute_dtype must be F32, F16 or BF16, got {compute_dtype!r}")
    if linear and compute_dtype != "F32":
        raise ValueError(f"linear computes in F32 (SPEC 'Working dtype (v3)'), got {compute_dtype}")
    _check_tensor(out, "out", out.shape, device)
    if base is not None:
        _check_tensor(base, "base", out.shape, device)
    for k, m in enumerate(models):
        _check_tensor(m, f"models[{k}]", out.shape, device)
    for k, p in enumerate(drop):
        if not 0.0 <= p < 1.0:  # also rejects NaN
            raise ValueError(f"drop[{k}] = {p}: a drop rate p must satisfy 0 <= p < 1")
    for j in ids:
        if not 0 <= j < 2**32:
            raise ValueError(f"model id j must be in [0, 2**32), got {j}")
    for what, bounds in (("keep_lo", lo), ("keep_hi", hi)):
        for k, v in enumerate(bounds):
            if not 0 <= v < 2**32:
                raise ValueError(f"{what}[{k}] = {v}: window bounds must be in [0, 2**32)")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite, got {list(weights)}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    n = out.numel()
    if not 0 <= key < 2**63:
        raise ValueError(f"key must be in [0, 2**63), got {key}")
    if start < 0 or start + n > 2**63:
        raise ValueError(f"start must satisfy 0 <= start and start + n <= 2**63, got {start}")
    if n == 0:
        return out

    # Philox words are drawn for a masked model unless the previous masked model shares
    # its counter (j // 4); then the same four words are reused.
    masked = tuple(drop_threshold(p) > 0 for p in drop)
    draw, group = [], None
    for j, m in zip(ids, masked):
        draw.append(m and j // 4 != group)
        group = j // 4 if m else group
    # The window compiles in only where some model's window excludes something.
    window = any(v != 0 for v in lo) or any(v != 0xFFFFFFFF for v in hi)
    block, num_warps = _launch_config(n)
    _task_vector_kernel[(triton.cdiv(n, block),)](
        base,
        tuple(models),
        out,
        # Ints in a tuple are specialized whatever do_not_specialize says: 1 becomes a
        # constexpr, values below 2**31 i32, multiples of 16 get an alignment attribute.
        # Sent as 2**33 + 2 * v + 1 (always an odd int64), p and the window bounds never
        # recompile.
        tuple(_odd_int64(drop_threshold(p)) for p in drop),
        tuple(float(drop_rescale(p)) for p in drop),
        tuple(float(round_host(w, compute_dtype)) for w in weights),
        float(np.float32(scale)),
        n,
        key,
        start,
        tuple(map(_odd_int64, lo)) if window else None,
        tuple(map(_odd_int64, hi)) if window else None,
        MODEL_IDS=tuple(ids),
        MASKED=masked,
        DRAW=tuple(draw),
        HAS_BASE=base is not None,
        WINDOW=window,
        SIGN=consensus == "sign",
        NORMALIZE=bool(normalize),
        LINEAR=bool(linear),
        D=FLOAT_CODES[compute_dtype],
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out


def _odd_int64(v: int) -> int:
    """A uint32 ``v`` as the int64 2**33 + 2 * v + 1, which Triton never specializes (the
    kernel recovers v as ``(x >> 1).to(tl.uint32)``)."""
    return 2**33 + 2 * v + 1
