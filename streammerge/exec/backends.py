"""Compute backends for the streaming pipeline: numba on the CPU, and the Triton kernels on
CPU tensors under ``TRITON_INTERPRET=1`` (the test path for the GPU kernels). The CUDA
streaming backend lives in ``streammerge.exec.gpu``.

A backend is a kernel table: pass name (``merge``, ``convert``, ``hist_high``,
``hist_low``; see ``streammerge.exec.ops``) -> a function of (slot, args) that calls the kernel
with the arguments the plan built; a row-wise method's passes are its own table
(``Method.row_passes``: ``RowPass.cpu`` and ``RowPass.triton``). Nothing here knows a
method by name.
"""

from __future__ import annotations

import gc
import os
import threading

import numpy as np

from streammerge.exec.layout import Slot, page_aligned
from streammerge.exec.ops import ConvertArgs, HistArgs, MergeArgs, is_row_op
from streammerge.methods.registry import row_pass


class _Geometry:
    """What a layout needs of a backend, without starting one (``--plan``)."""

    depth = 0


#: The CPU backends' buffer geometry (no slots in flight beyond the pipeline's own).
CPU_GEOMETRY = _Geometry()


#: Seconds numba takes to compile the CPU kernels on a cold cache (merge and statistics
#: kernels; bench/results/README.md: 2-core VM; the working-dtype BF16 variants of
#: docs/SPEC.md v3 added about half: 90 s measured on the shared 2-core VM under load).
#: Stated by the first run's notice and added to --plan's time estimate while the cache
#: is cold.
COMPILE_S = 60


def kernels_compiled() -> bool:
    """True when numba's on-disk cache holds the CPU kernels (a run loads them in about a
    second instead of compiling them for ``COMPILE_S``). Imports numba (~0.8 s).

    Reads numba's cache index location (``dispatcher._cache._cache_file._index_path``);
    where a numba version has no such attribute, answers True (no notice, no estimate).
    """
    from streammerge.kernels import cpu_merge, cpu_stats

    kernels = (cpu_merge._thin_merge_kernel, cpu_merge._thin_merge_kernel_bf16,
               cpu_merge._convert_kernel, *cpu_stats._KERNELS[cpu_merge._F32],
               *cpu_stats._KERNELS[cpu_merge._BF16])  # fmt: skip
    try:
        return all(os.path.exists(k._cache._cache_file._index_path) for k in kernels)
    except AttributeError:
        return True


def quiet_omp_workers() -> None:
    """Let numba's OpenMP workers sleep between kernels (``OMP_WAIT_POLICY=PASSIVE``, unless
    the environment says otherwise; read once, when libgomp loads with numba's first
    parallel kernel). By default GNU OpenMP spins each idle worker for some 300000
    iterations after every parallel region: the pipeline calls a kernel per chunk, so the
    workers spun through the gaps while the reader and writer waited for the disk (2 GB
    trio, dare_linear, 2 cores: 1.9 of 9.8 CPU s in libgomp, ``perf``). Results do not
    depend on it (the kernels' blocks are fixed, whatever the threads)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class NumbaBackend:
    """Runs each pass on the slot in place with ``streammerge.kernels`` (synchronous).

    Args:
        threads: numba threads (None: numba's default, all cores).
        preload: load the kernels in the background from the start (False: at the first
            pass that needs them; a plan that only copies tensors, such as a passthrough
            stack, never loads numba and LLVM, about 70 MiB of RSS).
    """

    depth = 0
    #: The merge and histogram kernels read each row where its O_DIRECT read landed
    #: (``Slot.offsets``): the reader moves no input byte into place.
    takes_offsets = True
    #: its slots are carved per chunk from one buffer (``exec.arena.SlotArena``): host memory
    #: that no kernel keeps a handle on between slots
    elastic_slots = True

    def __init__(self, threads: int | None = None, preload: bool = True) -> None:
        # Importing numba and loading the cached kernels takes ~0.8 s: do it in the
        # background while the pipeline starts reading; the first pass waits for it.
        self._threads = threads
        self._threads_set = False
        self._k = None
        self._error: BaseException | None = None
        self._cold: bool | None = None  # numba's cache was cold (known once checked)
        self._checked = threading.Event()
        self._loader = threading.Thread(target=self._load, name="sm-numba-load", daemon=True)
        if preload:
            self._loader.start()
        self.kernels = {
            "merge": self._merge,
            "convert": self._convert,
            "hist_high": self._hist_high,
            "hist_low": self._hist_low,
        }

    def _load(self) -> None:
        try:
            quiet_omp_workers()
            from streammerge.kernels import cpu_merge

            self._cold = not kernels_compiled()
            self._checked.set()
            cpu_merge.warmup()
            self._k = cpu_merge
        except BaseException as e:  # noqa: BLE001 - re-raised by the first pass
            self._error = e
        finally:
            self._checked.set()

    def _modules(self):
        if self._k is None and self._loader.ident is None:  # not preloaded: load now
            self._loader.start()
        if self._k is None:
            # announced when the first pass has to wait for a cold compile, not when the
            # backend is made: a run refused before its first pass prints its one line only
            self._checked.wait()
            if self._cold:
                from streammerge.notices import notice

                notice(f"compiling the CPU kernels: about {COMPILE_S} s, first run only "
                       "(cached on disk for later runs)")  # fmt: skip
                self._cold = False
            self._loader.join()
            if self._error is not None:
                raise self._error
            # numba and LLVM's objects live as long as the process: out of the collector's
            # way (its full passes walked them all, ~0.25 CPU s on a 2 GB merge, perf)
            gc.freeze()
        if self._threads and not self._threads_set:  # numba's thread count is per thread
            import numba

            numba.set_num_threads(max(1, min(self._threads, numba.config.NUMBA_NUM_THREADS)))
            self._threads_set = True
        return self._k

    def _stats(self):
        """The histogram kernels, loaded at the first statistics pass (DARE runs skip it)."""
        self._modules()
        from streammerge.kernels import cpu_stats

        return cpu_stats

    def alloc(self, shape: tuple[int, ...]) -> np.ndarray:
        """Page-aligned host memory (O_DIRECT reads land in it)."""
        return page_aligned(shape)

    def run(self, op: str, slot: Slot, args, **kw) -> None:
        """Run pass ``op`` (a key of ``self.kernels``, or a row-wise method's pass: its
        ``RowPass.cpu``, ``streammerge.methods.registry.row_pass``) on the slot."""
        if is_row_op(op):
            self._modules()
            return row_pass(op).cpu(slot.inputs, slot.out, args)
        return self.kernels[op](slot, args, **kw)

    def _merge(self, slot: Slot, a: MergeArgs) -> None:
        self._modules().merge_chunk(
            slot.inputs, list(a.dtypes), a.base_row, list(a.model_rows), list(a.model_ids),
            list(a.drop), list(a.weights), a.scale, slot.out, a.out_dtype, a.n, a.key, a.start,
            keep_lo=a.keep_lo, keep_hi=a.keep_hi, consensus=a.consensus,
            normalize=a.normalize, linear=a.linear, compute_dtype=a.compute_dtype,
            offsets=slot.offsets,
        )  # fmt: skip

    def _convert(self, slot: Slot, a: ConvertArgs) -> None:
        self._modules().convert_chunk(slot.inputs[0], a.src_dtype, slot.out, a.out_dtype, a.n,
                                      a.scale)  # fmt: skip

    def _hist_high(self, slot: Slot, a: HistArgs, hist: np.ndarray) -> None:
        self._stats().hist_high(
            slot.inputs, list(a.dtypes), a.base_row, list(a.model_rows), a.n, hist,
            compute_dtype=a.compute_dtype, offsets=slot.offsets,
        )

    def _hist_low(self, slot: Slot, a: HistArgs, hist: np.ndarray, buckets: np.ndarray) -> None:
        self._stats().hist_low(
            slot.inputs, list(a.dtypes), a.base_row, list(a.model_rows), a.n, buckets, hist,
            compute_dtype=a.compute_dtype, offsets=slot.offsets,
        )

    def wait(self, handle: object) -> None:
        """Nothing to wait for."""


class TritonCpuBackend:
    """Runs the Triton kernels on CPU tensors that view the slot buffers (no copies).

    Only meaningful under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton
    is imported): the test path that proves the GPU kernels equal the numba ones bit for
    bit. Slow (the interpreter runs numpy per block); for small models. Conversions (rare:
    base-only float tensors with ``--dtype``) run on numba.

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

            from streammerge.exec.triton_launcher import TritonLauncher
        except ImportError as e:
            raise MergeError(
                f"--backend triton needs torch and triton ({e})",
                None,
                None,
                "pip install 'streammerge[gpu]'",
            ) from e
        self.torch = torch
        self._launch = TritonLauncher(torch)
        self._cpu = NumbaBackend()
        self.kernels = {
            "merge": self._merge,
            "convert": self._cpu.kernels["convert"],
            "hist_high": self._hist,
            "hist_low": self._hist,
        }

    def alloc(self, shape: tuple[int, ...]) -> np.ndarray:
        """Page-aligned host memory (O_DIRECT reads land in it)."""
        return page_aligned(shape)

    def run(self, op: str, slot: Slot, args, **kw) -> None:
        """Run pass ``op`` (a key of ``self.kernels``, or a row-wise method's pass) on the
        slot."""
        if is_row_op(op):  # the method's Triton pass, or its numba pass on the host
            p = row_pass(op)
            if p.triton is None:
                return self._cpu.run(op, slot, args)
            torch = self.torch
            return p.triton(self._launch, torch.from_numpy(slot.inputs),
                            torch.from_numpy(slot.out), args)  # fmt: skip
        if op.startswith("hist_"):
            kw["op"] = op
        return self.kernels[op](slot, args, **kw)

    def _merge(self, slot: Slot, a: MergeArgs) -> None:
        torch = self.torch
        self._launch.merge(torch.from_numpy(slot.inputs), torch.from_numpy(slot.out), a)

    def _hist(self, slot: Slot, a: HistArgs, op: str, hist: np.ndarray, buckets=None) -> None:
        torch = self.torch
        self._launch.hist(
            op,
            torch.from_numpy(slot.inputs),
            a,
            torch.from_numpy(hist),
            None if buckets is None else torch.from_numpy(buckets),
        )

    def wait(self, handle: object) -> None:
        """Nothing to wait for."""
