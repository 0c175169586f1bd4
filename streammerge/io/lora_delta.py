"""The adapted bytes of one LoRA-adapted tensor (docs/SPEC.md "LoRA inputs (v3)").

``adapt_range`` rewrites, in place, a byte range of a tensor ``W`` just read from disk into
``W + s * (L @ R)`` rounded to ``W``'s dtype, computing ``L``'s rows of that range only.
The sum over the rank runs k = 0, 1, ..., r-1 in float32, each product and sum rounded on
its own (the numba kernel ``streammerge.kernels.cpu_lora``, no FMA), so the bytes do not
depend on how ``W`` is cut into chunks. ``adapt_jobs`` runs a chunk's ranges in parallel.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streammerge.errors import MergeError
from streammerge.io.model_types import TensorInfo


@dataclass(frozen=True, slots=True)
class LoraTerm:
    """The LoRA update of one tensor ``W`` ([rows, cols]).

    Attributes:
        a, b: where ``lora_A.weight`` ([r, in]) and ``lora_B.weight`` ([out, r]) lie in the
            adapter's ``adapter_model.safetensors`` (F32, F16 or BF16).
        scale: float32(alpha / r), or float32(alpha / sqrt(r)) with rsLoRA (SPEC).
        fan_in_fan_out: ``W`` is stored [in, out] (GPT-2 Conv1D): delta = (B @ A)^T.
        adapter: the adapter folder (messages).
    """

    a: TensorInfo
    b: TensorInfo
    scale: float
    fan_in_fan_out: bool
    adapter: Path


@dataclass(frozen=True, slots=True)
class AdaptedTensorInfo(TensorInfo):
    """A tensor of the model whose bytes, once read, get its adapter's update (``lora``).
    Same name, dtype, shape and file span as the model's tensor: the hashes and checks of
    the inputs see the model's own bytes; ``adapt_range`` gives the adapted ones."""

    lora: LoraTerm | None = None


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact float32 values of bfloat16 bit patterns (uint16)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Exact float32 values of ``raw`` (uint8 bytes of F32, F16 or BF16 values)."""
    if dtype == "F32":
        return raw.view(np.float32).copy()
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "BF16":
        return bf16_bits_to_f32(raw.view(np.uint16))
    raise ValueError(f"no LoRA on {dtype} tensors")


def _matrix(file: Path, start: int, nbytes: int, dtype: str, shape: tuple) -> np.ndarray:
    """One adapter matrix as float32 (exact), read with one ``pread`` (a few KB to MB)."""
    try:
        fd = os.open(file, os.O_RDONLY)
        try:
            raw = os.pread(fd, nbytes, start)
        finally:
            os.close(fd)
    except OSError as e:
        raise MergeError(f"cannot read the adapter: {e.strerror}", file, None,
                         "check the adapter file") from e  # fmt: skip
    if len(raw) != nbytes:
        raise MergeError("the adapter file is truncated", file, None, "re-save the adapter")
    return to_f32(np.frombuffer(raw, np.uint8), dtype).reshape(shape)


@functools.lru_cache(maxsize=4)
def factors(term: LoraTerm) -> tuple[np.ndarray, np.ndarray]:
    """(L, R) as C-contiguous float32: ``W``'s update is s * (L @ R), L with one row per
    row of ``W`` (B, or A^T with fan_in_fan_out), R [r, cols] (A, or B^T). The last few
    stay cached, so the chunks of one tensor read them once; nothing else of the adapter
    is held."""
    a = _matrix(term.a.file, term.a.start, term.a.nbytes, term.a.dtype, term.a.shape)
    b = _matrix(term.b.file, term.b.start, term.b.nbytes, term.b.dtype, term.b.shape)
    left, right = (a.T, b.T) if term.fan_in_fan_out else (b, a)
    left, right = np.ascontiguousarray(left), np.ascontiguousarray(right)
    left.setflags(write=False)
    right.setflags(write=False)
    return left, right


def adapt_range(info: AdaptedTensorInfo, byte_offset: int, buf) -> None:
    """Turn ``buf`` (uint8 array: the ``len(buf)`` bytes of ``info``'s tensor from
    ``byte_offset``, as stored) into the adapted tensor's bytes at the same place, in place.

    Shapes: ``W`` [rows, cols] of F32/F16/BF16; only the rows the range touches are
    computed (``streammerge.kernels.cpu_lora.lora_apply``, GIL released).
    """
    from streammerge.kernels.common import FLOAT_CODES
    from streammerge.kernels.cpu_lora import lora_apply

    isz = info.itemsize
    n = len(buf) // isz
    if n == 0:
        return
    left, right = factors(info.lora)
    lora_apply(buf, FLOAT_CODES[info.dtype], byte_offset // isz, n, info.shape[1], left, right,
               np.float32(info.lora.scale))  # fmt: skip


#: Elements of one piece ``adapt_jobs`` hands a thread (about 1 M: a few ms of work).
PIECE_ELEMS = 1 << 20


def adapt_jobs(jobs, pool=None) -> None:
    """``adapt_range`` on every (info, byte_offset, nbytes, row) read job, the bytes at
    ``row[:nbytes]``, cut in pieces of whole-row multiples that ``pool`` (an executor, or
    None: this thread) runs in parallel (the kernel releases the GIL). The bytes do not
    depend on the cut (SPEC "LoRA inputs (v3)")."""
    pieces = []
    for info, byte_offset, nbytes, row in jobs:
        cols = info.shape[1]
        step = max(1, PIECE_ELEMS // cols) * cols * info.itemsize
        for s in range(0, nbytes, step):
            pieces.append((info, byte_offset + s, row[s : min(nbytes, s + step)]))
    if pool is None or len(pieces) < 2:
        for p in pieces:
            adapt_range(*p)
        return
    for fut in [pool.submit(adapt_range, *p) for p in pieces]:
        fut.result()
