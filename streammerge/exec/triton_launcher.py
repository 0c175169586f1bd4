"""The Triton kernels called on a slot's rows (``TritonLauncher``): the device backend's
kernel table (``streammerge.exec.gpu``), and the Triton CPU backend's under the
interpreter (``streammerge.exec.backends``)."""

from __future__ import annotations

import numpy as np

from streammerge.io.reader import DTYPE_ITEMSIZE

_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class TritonLauncher:
    """Calls the Triton kernels on a slot's uint8 rows (torch tensors on the kernel's
    device: CUDA, or CPU under the interpreter), viewing each row as its dtype. Row r of
    ``inputs`` is the slot's input row r (``streammerge.exec.ops``: 0 the base, 1 + j model j)."""

    def __init__(self, torch) -> None:
        from streammerge.kernels import triton_merge, triton_stats

        self.torch = torch
        self.merge_kernel = triton_merge.merge_chunk_triton
        self.stats = triton_stats
        #: Triton's interpreter (TRITON_INTERPRET=1 when triton was imported): host numpy.
        self.interpreted = triton_merge._INTERPRETED

    def typed(self, buf, dtype: str, n: int):
        """First ``n`` elements of a uint8 buffer viewed as ``dtype``."""
        return buf[: n * DTYPE_ITEMSIZE[dtype]].view(getattr(self.torch, _TORCH_DTYPES[dtype]))

    def _rows(self, inputs, a):
        base = (
            self.typed(inputs[a.base_row], a.dtypes[a.base_row], a.n) if a.base_row >= 0 else None
        )
        models = [self.typed(inputs[r], a.dtypes[r], a.n) for r in a.model_rows]
        return base, models

    def merge(self, inputs, out, a) -> None:
        """The elementwise pass (``streammerge.exec.ops.MergeArgs``) into ``out`` (uint8)."""
        base, models = self._rows(inputs, a)
        self.merge_kernel(
            base,
            models,
            self.typed(out, a.out_dtype, a.n),
            key=a.key,
            start=a.start,
            drop=list(a.drop),
            weights=list(a.weights),
            scale=a.scale,
            model_ids=list(a.model_ids),
            keep_lo=None if a.keep_lo is None else list(a.keep_lo),
            keep_hi=None if a.keep_hi is None else list(a.keep_hi),
            consensus=a.consensus,
            normalize=a.normalize,
            linear=a.linear,
            compute_dtype=a.compute_dtype,
        )

    def convert(self, src: np.ndarray, a, out: np.ndarray) -> None:
        """A base-only chunk cast on the host with numba (``streammerge.exec.ops.ConvertArgs``;
        rare: base-only float tensors with ``--dtype``)."""
        from streammerge.kernels import cpu_merge

        cpu_merge.convert_chunk(src, a.src_dtype, out, a.out_dtype, a.n, a.scale)

    def hist(self, op: str, inputs, a, hist, buckets=None) -> None:
        """A histogram pass (``streammerge.exec.ops.HistArgs``), accumulating into ``hist``."""
        base, models = self._rows(inputs, a)
        if op == "hist_high":
            self.stats.hist_high_triton(base, models, hist, compute_dtype=a.compute_dtype)
        else:
            self.stats.hist_low_triton(base, models, buckets, hist, compute_dtype=a.compute_dtype)
