"""The Triton histogram kernels of the stats pass: SPEC "Magnitudes and thresholds" (radix
select over the high, then the low 16 bits of mag = bits(d) & 0x7FFFFFFF; kernel contract
section 2), bit for bit equal to the numba ``kernels/cpu_stats.py`` (integer counts).

Two private ``@triton.jit`` kernels and their public launchers: ``hist_high_triton``
(``hist[k, mag >> 16] += 1``) and ``hist_low_triton`` (``hist[k, b, mag & 0xFFFF] += 1`` for
the elements whose high half equals ``buckets[k, b]``). Each reads top to bottom like the
merge kernel: program id (int64) -> offsets -> bounds mask -> loads upcast to float32 (bf16
by a 16-bit shift, ``triton_merge._load_f32``) -> d = x_m - x_b -> mag -> atomic adds.

Counting is one atomic add per element (and per model) into the global histogram: 32768 or
65536 bins are too many for a per-program ``tl.histogram`` (that would be a [bins] block per
program, then as many atomics to merge it). Integer atomics commute, so the counts are exact
and deterministic whatever the order. Not yet measured on a device: the high histogram's
atomics contend on the few hundred buckets where a tensor's magnitudes cluster.

NaN: d of a NaN input is a NaN whose payload is the hardware's (numpy / x86 propagate the
input's payload, NVIDIA GPUs return 0x7FFFFFFF), so a NaN's bucket can differ across devices
(SPEC's one freedom, a NaN's bit pattern); every NaN mag is above every non-NaN one either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .common import FLOAT_CODES
from .triton_merge import _DTYPES, _INTERPRETED, _launch_config, _load_d, _rd

HIGH_BINS = 32768  # mag >> 16: mag < 2**31
LOW_BINS = 65536  # mag & 0xFFFF

#: Histogram dtypes: integer counts (int32 wraps past 2**31 - 1 counts per bin).
_HIST_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _mag(base_ptr, ptr, local, in_bounds, HAS_BASE: tl.constexpr, D: tl.constexpr):
    """mag = bits(rd(x_j - x_b)) & 0x7FFFFFFF, uint32 ([BLOCK]), in the working dtype D
    (SPEC "Working dtype (v3)"; rd the identity for D = F32)."""
    d = _load_d(ptr, local, in_bounds, D)
    if HAS_BASE:
        d = d - _load_d(base_ptr, local, in_bounds, D)
    else:
        d = d - 0.0  # x_b = +0.0: -0.0 stays -0.0 (same mag), as in the merge
    return _rd(d, D).to(tl.uint32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _hist_high_kernel(
    base_ptr,  # [n] f32 / f16 / bf16, or None when HAS_BASE is False (x_b = +0.0)
    model_ptrs,  # tuple of K pointers, [n] each, f32 / f16 / bf16 (may differ)
    hist_ptr,  # [K, 32768] int64 / int32, contiguous, += counts
    n,  # elements
    HAS_BASE: tl.constexpr,
    D: tl.constexpr,  # working dtype code: 0 F32, 1 F16, 2 BF16
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    local = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
    in_bounds = local < n
    one = tl.full([BLOCK], 1, hist_ptr.dtype.element_ty)
    for k in tl.static_range(len(model_ptrs)):
        mag = _mag(base_ptr, model_ptrs[k], local, in_bounds, HAS_BASE, D)
        bucket = (mag >> 16).to(tl.int64)  # [BLOCK] in [0, 32768)
        tl.atomic_add(hist_ptr + (k * 32768 + bucket), one, mask=in_bounds, sem="relaxed")


@triton.jit
def _hist_low_kernel(
    base_ptr,  # [n] f32 / f16 / bf16, or None when HAS_BASE is False (x_b = +0.0)
    model_ptrs,  # tuple of K pointers, [n] each, f32 / f16 / bf16 (may differ)
    buckets_ptr,  # [K, B] int64 / int32, contiguous: the high halves to refine (-1 = unused)
    hist_ptr,  # [K, B, 65536] int64 / int32, contiguous, += counts
    n,  # elements
    HAS_BASE: tl.constexpr,
    D: tl.constexpr,  # working dtype code: 0 F32, 1 F16, 2 BF16
    B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    local = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
    in_bounds = local < n
    one = tl.full([BLOCK], 1, hist_ptr.dtype.element_ty)
    for k in tl.static_range(len(model_ptrs)):
        mag = _mag(base_ptr, model_ptrs[k], local, in_bounds, HAS_BASE, D)
        high = (mag >> 16).to(tl.int64)  # [BLOCK] in [0, 32768): never equal to -1
        low = (mag & 0xFFFF).to(tl.int64)
        for b in tl.static_range(B):
            bucket = tl.load(buckets_ptr + (k * B + b)).to(tl.int64)
            hit = in_bounds & (high == bucket)
            row = hist_ptr + (k * B + b) * 65536
            tl.atomic_add(row + low, one, mask=hit, sem="relaxed")


def _check_inputs(
    base: torch.Tensor | None, models: Sequence[torch.Tensor] | torch.Tensor
) -> tuple[list[torch.Tensor], torch.device, int]:
    """Validate the base and models (one shape, one device, float dtypes, contiguous) and
    return (models as a list, their device, numel)."""
    if isinstance(models, torch.Tensor):
        if models.ndim != 2:
            raise ValueError(
                "models given as one tensor must be 2-D [K, n] (one row per model); got "
                f"{tuple(models.shape)}"
            )
        models = list(models.unbind(0))
    models = list(models)
    if not models:
        raise ValueError("the histogram needs at least one model")
    named = ([("base", base)] if base is not None else []) + [
        (f"models[{k}]", m) for k, m in enumerate(models)
    ]
    for what, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"{what} has dtype {t.dtype}; the histogram kernels read torch.float32, "
                "torch.float16 and torch.bfloat16"
            )
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous (call .contiguous() or copy it)")
    shape, device = models[0].shape, models[0].device
    for what, t in named:
        if t.shape != shape:
            raise ValueError(
                f"{what} has shape {tuple(t.shape)}, models[0] has {tuple(shape)}: they must match"
            )
        if t.device != device:
            raise ValueError(
                f"{what} is on {t.device} but models[0] is on {device}; put them on one device"
            )
    if device.type == "cpu" and not _INTERPRETED:
        raise ValueError(
            "the inputs are CPU tensors but Triton is not in interpreter mode: set "
            "TRITON_INTERPRET=1 before triton is imported (the test path), or pass CUDA tensors"
        )
    return models, device, models[0].numel()


def _check_counts(t: object, what: str, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _HIST_DTYPES:
        raise TypeError(f"{what} has dtype {t.dtype}; it must be torch.int64 or torch.int32")
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}; it must be {shape}")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device} but the inputs are on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous")


def hist_high_triton(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor] | torch.Tensor,
    hist: torch.Tensor,
    compute_dtype: str = "F32",
) -> torch.Tensor:
    """Add the high-half histogram of each model's magnitudes into ``hist``:
    ``hist[k, mag_k(i) >> 16] += 1`` for every element i (kernel contract section 2).

    Asynchronous on a GPU (queued on the current stream); synchronous under the interpreter.

    Args:
        base: [n] (any shape) float32 / float16 / bfloat16, or None (x_b = +0.0).
        models: K >= 1 tensors of the base's shape, float32 / float16 / bfloat16 (dtypes may
            differ), or one 2-D tensor [K, n] whose rows are the models.
        hist: [K, 32768] int64 (or int32), contiguous, on the inputs' device; accumulated
            in place.

    Returns:
        ``hist``.

    Raises:
        TypeError: an input that is not a float32 / float16 / bfloat16 tensor, or a hist
            that is not int64 / int32.
        ValueError: shapes or devices that disagree, a non-contiguous tensor, no model, CPU
            tensors without ``TRITON_INTERPRET=1``.
    """
    models, device, n = _check_inputs(base, models)
    if compute_dtype not in FLOAT_CODES:
        raise ValueError(f"compute_dtype must be F32, F16 or BF16, got {compute_dtype!r}")
    _check_counts(hist, "hist", (len(models), HIGH_BINS), device)
    if n == 0:
        return hist
    block, num_warps = _launch_config(n)
    _hist_high_kernel[(triton.cdiv(n, block),)](
        base,
        tuple(models),
        hist,
        n,
        HAS_BASE=base is not None,
        D=FLOAT_CODES[compute_dtype],
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return hist


def hist_low_triton(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor] | torch.Tensor,
    buckets: torch.Tensor,
    hist: torch.Tensor,
    compute_dtype: str = "F32",
) -> torch.Tensor:
    """Add the low-half histogram of the magnitudes in chosen high buckets into ``hist``:
    for every element i, model k and slot b with ``mag_k(i) >> 16 == buckets[k, b]``,
    ``hist[k, b, mag_k(i) & 0xFFFF] += 1`` (kernel contract section 2). A bucket of -1 (or
    any value outside [0, 32768)) counts nothing; equal buckets in one row both count.

    Args:
        base: [n] (any shape) float32 / float16 / bfloat16, or None (x_b = +0.0).
        models: K >= 1 tensors of the base's shape (dtypes may differ), or one 2-D [K, n].
        buckets: [K, B] int64 (or int32), B >= 1, contiguous, on the inputs' device (read
            by the kernel: no host round trip).
        hist: [K, B, 65536] int64 (or int32), contiguous, on the inputs' device; accumulated
            in place.

    Returns:
        ``hist``.

    Raises:
        TypeError, ValueError: as ``hist_high_triton``, and for buckets of another dtype,
            shape or device.
    """
    models, device, n = _check_inputs(base, models)
    if compute_dtype not in FLOAT_CODES:
        raise ValueError(f"compute_dtype must be F32, F16 or BF16, got {compute_dtype!r}")
    k_models = len(models)
    if not isinstance(buckets, torch.Tensor):
        raise TypeError(f"buckets must be a torch.Tensor, got {type(buckets).__name__}")
    if buckets.ndim != 2 or buckets.shape[0] != k_models or buckets.shape[1] < 1:
        raise ValueError(
            f"buckets has shape {tuple(buckets.shape)}; it must be [K, B] with K = {k_models} "
            "models and B >= 1"
        )
    _check_counts(buckets, "buckets", tuple(buckets.shape), device)
    n_slots = buckets.shape[1]
    _check_counts(hist, "hist", (k_models, n_slots, LOW_BINS), device)
    if n == 0:
        return hist
    block, num_warps = _launch_config(n)
    _hist_low_kernel[(triton.cdiv(n, block),)](
        base,
        tuple(models),
        buckets,
        hist,
        n,
        HAS_BASE=base is not None,
        D=FLOAT_CODES[compute_dtype],
        B=n_slots,
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return hist
