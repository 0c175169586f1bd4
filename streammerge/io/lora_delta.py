"""The adapted bytes of one LoRA-adapted tensor (docs/SPEC.md "LoRA inputs (v3)").

``adapt_range`` rewrites, in place, a byte range of a tensor ``W`` just read from disk into
``W + s * (L @ R)`` rounded to ``W``'s dtype, computing ``L``'s rows of that range only.
The sum over the rank runs k = 0, 1, ..., r-1 in float32, each product and sum rounded on
its own (numpy ufuncs, no FMA), so the bytes do not depend on how ``W`` is cut into chunks.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streammerge.errors import MergeError
from streammerge.io.model_types import TensorInfo

#: Elements of ``W`` per vectorized step (the float32 temporaries stay a few MiB).
BLOCK_ELEMS = 1 << 18


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


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; a NaN stays a quiet NaN
    (as ``kernels.cpu_merge._f32_to_bf16``)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    quiet = (u >> np.uint32(16)) | np.uint32(0x40)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Exact float32 values of ``raw`` (uint8 bytes of F32, F16 or BF16 values)."""
    if dtype == "F32":
        return raw.view(np.float32).copy()
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "BF16":
        return bf16_bits_to_f32(raw.view(np.uint16))
    raise ValueError(f"no LoRA on {dtype} tensors")


def from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (round to nearest even), as that dtype's bytes (uint8)."""
    if dtype == "F32":
        out = x.astype(np.float32)
    elif dtype == "F16":
        with np.errstate(over="ignore"):
            out = x.astype(np.float16)  # numpy rounds float32 -> float16 to nearest even
    else:
        out = f32_to_bf16_bits(x)
    return np.ascontiguousarray(out).view(np.uint8)


@functools.lru_cache(maxsize=8)
def _matrix(file: Path, start: int, nbytes: int, dtype: str, shape: tuple) -> np.ndarray:
    """One adapter matrix as float32 (exact), read with one ``pread`` (a few KB to MB; the
    last few stay cached, so the chunks of one tensor read them once)."""
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
    out = to_f32(np.frombuffer(raw, np.uint8), dtype).reshape(shape)
    out.setflags(write=False)
    return out


def factors(term: LoraTerm) -> tuple[np.ndarray, np.ndarray]:
    """(L, R) as float32: ``W``'s update is s * (L @ R), L with one row per row of ``W``
    (B, or A^T with fan_in_fan_out), R [r, cols] (A, or B^T)."""
    a = _matrix(term.a.file, term.a.start, term.a.nbytes, term.a.dtype, term.a.shape)
    b = _matrix(term.b.file, term.b.start, term.b.nbytes, term.b.dtype, term.b.shape)
    return (a.T, b.T) if term.fan_in_fan_out else (b, a)


def delta_rows(left: np.ndarray, right: np.ndarray, scale: float) -> np.ndarray:
    """float32 ``s * (left @ right)`` ([rows, cols]) with the sum over k in increasing
    order, each product and sum rounded on its own (SPEC "LoRA inputs (v3)")."""
    acc = np.zeros((left.shape[0], right.shape[1]), np.float32)
    for k in range(left.shape[1]):
        acc += left[:, k : k + 1] * right[k : k + 1, :]
    return acc * np.float32(scale)


def adapt_range(info: AdaptedTensorInfo, byte_offset: int, buf) -> None:
    """Turn ``buf`` (the ``len(buf)`` bytes of ``info``'s tensor from ``byte_offset``, as
    stored) into the adapted tensor's bytes at the same place, in place.

    Shapes: ``W`` [rows, cols] of F32/F16/BF16; only the rows the range touches are
    computed, ``BLOCK_ELEMS`` at a time.
    """
    isz = info.itemsize
    raw = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf
    raw = raw[: len(buf)]
    e0, n = byte_offset // isz, len(raw) // isz
    if n == 0:
        return
    cols = info.shape[1]
    left, right = factors(info.lora)
    per = max(1, BLOCK_ELEMS // max(cols, 1))
    row = e0 // cols
    end = e0 + n
    while row * cols < end:
        stop = min(row + per, -(-end // cols))
        lo, hi = max(row * cols, e0), min(stop * cols, end)  # elements of W in this block
        d = delta_rows(left[row:stop], right, info.lora.scale).reshape(-1)
        d = d[lo - row * cols : hi - row * cols]
        seg = raw[(lo - e0) * isz : (hi - e0) * isz]
        seg[:] = from_f32(to_f32(seg, info.dtype) + d, info.dtype)
        row = stop
