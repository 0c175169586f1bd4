"""Output dtype names: what ``--dtype`` (or a recipe's ``dtype``) may say."""

from __future__ import annotations

from streammerge.errors import MergeError
from streammerge.kernels.common import FLOAT_ITEMSIZE


#: Output dtype names users may pass to ``--dtype``, mapped to safetensors dtype strings.
DTYPE_ALIASES = {
    "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "f16": "F16", "float16": "F16",
    "fp32": "F32", "f32": "F32", "float32": "F32",
}  # fmt: skip


def normalize_dtype(name: str) -> str:
    """``--dtype`` as a safetensors dtype string: ``bf16``/``bfloat16`` -> ``"BF16"``, etc.

    Raises:
        MergeError: not bf16, fp16 or fp32.
    """
    out = DTYPE_ALIASES.get(name.lower(), name.upper())
    if out not in FLOAT_ITEMSIZE:
        raise MergeError(f"unknown output dtype {name!r}", None, None, "use bf16, fp16 or fp32")
    return out
