"""Compute backends for the streaming pipeline: numba on the CPU, and the Triton kernel on
CPU tensors under ``TRITON_INTERPRET=1`` (the test path for the GPU kernel). The CUDA
streaming backend lives in ``streammerge.gpu``."""

from __future__ import annotations

import threading

import numpy as np

from streammerge.pipeline import Slot, page_aligned


class NumbaBackend:
    """Merges each slot in place with ``streammerge.kernels.cpu_merge`` (synchronous).

    Args:
        threads: numba threads (None: numba's default, all cores).
    """

    depth = 0

    def __init__(self, threads: int | None = None) -> None:
        # Importing numba and loading the cached kernels takes ~0.8 s: do it in the
        # background while the pipeline starts reading; the first submit waits for it.
        self._threads = threads
        self._threads_set = False
        self._k = None
        self._error: BaseException | None = None
        self._loader = threading.Thread(target=self._load, name="sm-numba-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            from streammerge.kernels import cpu_merge

            cpu_merge.warmup()
            self._k = cpu_merge
        except BaseException as e:  # noqa: BLE001 - re-raised by the first submit
            self._error = e

    def _kernels(self):
        if self._k is None:
            self._loader.join()
            if self._error is not None:
                raise self._error
        if self._threads and not self._threads_set:  # numba's thread count is per thread
            import numba

            numba.set_num_threads(max(1, min(self._threads, numba.config.NUMBA_NUM_THREADS)))
            self._threads_set = True
        return self._k

    def alloc(self, shape: tuple[int, ...]) -> np.ndarray:
        """Page-aligned host memory (O_DIRECT reads land in it)."""
        return page_aligned(shape)

    def submit(self, slot: Slot, key: int) -> None:
        """Merge (or convert) the slot's chunk into ``slot.out``."""
        k = self._kernels()
        t, c = slot.tensor, slot.chunk
        if t.action == "convert":
            k.convert_chunk(slot.inputs[0], t.base.dtype, slot.out, t.dtype, c.count)
            return
        seg = c.segment
        dtypes = [t.base.dtype] + [s.dtype if s is not None else t.base.dtype for s in t.sources]
        k.merge_chunk(
            slot.inputs,
            dtypes,
            0 if seg.has_base else -1,
            [1 + j for j in seg.models],
            list(seg.models),
            list(seg.drop),
            list(seg.weights),
            seg.scale,
            slot.out,
            t.dtype,
            c.count,
            key,
            c.start,
        )

    def wait(self, handle: object) -> None:
        """Nothing to wait for."""


class TritonCpuBackend:
    """Runs the Triton kernel on CPU tensors that view the slot buffers (no copies).

    Only meaningful under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton
    is imported): the test path that proves the GPU kernel equals the numba one bit for
    bit. Slow (the interpreter runs numpy per block); for small models.

    Raises:
        MergeError: (at construction) TRITON_INTERPRET is not set or triton/torch is missing.
    """

    depth = 0

    def __init__(self) -> None:
        import os

        from streammerge.errors import MergeError

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise MergeError(
                "--backend triton without a GPU needs Triton's interpreter",
                None,
                None,
                "set TRITON_INTERPRET=1 (the test path) or use --backend numba",
            )
        try:
            import torch

            from streammerge.kernels.triton_merge import merge_chunk_triton  # noqa: F401 - fail early
        except ImportError as e:
            raise MergeError(
                f"--backend triton needs torch and triton ({e})",
                None,
                None,
                "pip install 'streammerge[gpu]'",
            ) from e
        self.torch = torch
        self._cpu = NumbaBackend()

    def alloc(self, shape: tuple[int, ...]) -> np.ndarray:
        """Page-aligned host memory (O_DIRECT reads land in it)."""
        return page_aligned(shape)

    def submit(self, slot: Slot, key: int) -> None:
        """Merge the slot's chunk with the Triton kernel into ``slot.out``."""
        from streammerge.gpu import launch_triton

        t, c = slot.tensor, slot.chunk
        if t.action == "convert":
            self._cpu.submit(slot, key)
            return
        launch_triton(
            self.torch,
            self.torch.from_numpy(slot.inputs),
            self.torch.from_numpy(slot.out),
            t,
            c,
            key,
        )

    def wait(self, handle: object) -> None:
        """Nothing to wait for."""
