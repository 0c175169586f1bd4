"""What a validated model is made of: ``TensorInfo`` (where one tensor's bytes lie),
``ModelDir`` (a model directory's files and tensors) and the safetensors dtype tables.
``streammerge.io.reader.open_model`` builds them (and re-exports these names)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

#: Bytes per element of every safetensors dtype (huggingface/safetensors, ``Dtype``).
DTYPE_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
#: Floating dtypes; the merge kernels read and write F32, F16 and BF16.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"})


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor's bytes lie.

    Attributes:
        name: tensor name as stored.
        dtype: safetensors dtype string (``"BF16"``, ``"F32"``, ``"I64"``...).
        shape: dimensions, row-major.
        file: the shard file holding it.
        start: absolute byte offset of its first byte in ``file``.
        nbytes: byte length (= numel * itemsize).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def is_float(self) -> bool:
        """True for floating dtypes."""
        return self.dtype in FLOAT_DTYPES


@dataclass
class ModelDir:
    """A validated Hugging Face model directory (single file or index + shards).

    Attributes:
        path: the directory.
        files: the safetensors files, in index order.
        tensors: name -> TensorInfo, for every tensor of every file.
        fingerprint: sha256 (hex) of every file's name, size and header bytes; changes when
            any header or size changes.
        stamp: sha256 (hex) of every file's name, size and modification time (ns) (not
            recorded in the output, which must not depend on it; ``--resume`` checks
            content, see ``streammerge.io.fingerprints``).
        file_fingerprints: file name -> sha256 (hex) of its name, size and header bytes
            (so a refused resume can name the file whose header changed).
    """

    path: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    fingerprint: str
    total_bytes: int = field(default=0)
    stamp: str = field(default="")
    file_fingerprints: dict[str, str] = field(default_factory=dict)
