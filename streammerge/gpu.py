"""The CUDA streaming backend: pinned host slots, a copy stream and a compute stream, and a
VRAM budget that sizes the chunks.

Per chunk k (``depth`` device buffer sets, used round robin, ordered by CUDA events):

    H2D stream:     H2D inputs(k) --.
    compute stream:                 '-> kernel(k) (Triton) --.
    D2H stream:                                              '-> D2H out(k)

H2D and D2H have a stream each: on one shared copy stream, D2H(k)'s wait for kernel(k)
would hold back H2D(k+1) and serialize the whole chain. H2D(k) into buffer set k % depth
waits for D2H(k - depth) from that set (which itself followed kernel(k - depth)).

The reader thread fills pinned host slots from disk while earlier chunks are on the device;
the writer thread drains pinned output slots. ``--vram`` bounds the device buffers:
``depth x (R x in_itemsize + out_itemsize) x chunk_elems <= vram_bytes``, so a 70B merge
(a 128256 x 8192 bf16 embedding is 2.1 GB per input) runs on an 8 GB card: the embedding
is just more chunks.
"""

from __future__ import annotations

import os

import numpy as np

from streammerge.errors import MergeError
from streammerge.pipeline import MIN_CHUNK_ELEMS, Slot
from streammerge.reader import DIRECT_ALIGN

#: Device buffer sets in flight (H2D of k+1 overlaps the kernel of k and D2H of k-1).
GPU_DEPTH = 3
#: Default VRAM budget: this share of the free device memory, at most DEFAULT_VRAM_CAP.
DEFAULT_VRAM_SHARE = 0.25
DEFAULT_VRAM_CAP = 4 * 2**30


def cuda_available() -> bool:
    """True when a CUDA device can be used. Does not import torch on machines without an
    NVIDIA driver, so the CPU path never pays for it."""
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def vram_chunk_elems(
    rows: int, in_itemsize: int, out_itemsize: int, vram_bytes: int, depth: int = GPU_DEPTH
) -> int:
    """Largest chunk (elements) whose ``depth`` device buffer sets fit ``vram_bytes``.

    Each set holds ``rows`` input rows (base + fine-tunes) of ``in_itemsize`` bytes per
    element and one output row of ``out_itemsize`` bytes per element.

    Raises:
        MergeError: the budget cannot hold MIN_CHUNK_ELEMS elements.
    """
    per_elem = depth * (rows * in_itemsize + out_itemsize)
    chunk = vram_bytes // per_elem
    chunk -= chunk % 1024
    if chunk < MIN_CHUNK_ELEMS:
        raise MergeError(
            f"--vram {vram_bytes / 2**20:.0f} MiB is too small",
            None,
            None,
            f"give at least {MIN_CHUNK_ELEMS * per_elem / 2**20:.0f}MiB",
        )
    return chunk


def device_bytes_in_flight(
    rows: int, in_itemsize: int, out_itemsize: int, chunk_elems: int, depth: int = GPU_DEPTH
) -> int:
    """Device bytes the backend allocates for chunks of ``chunk_elems`` elements."""
    return depth * chunk_elems * (rows * in_itemsize + out_itemsize)


def default_vram_bytes() -> int:
    """A modest share of the free device memory (DEFAULT_VRAM_SHARE, capped)."""
    import torch

    free, _total = torch.cuda.mem_get_info()
    return int(min(free * DEFAULT_VRAM_SHARE, DEFAULT_VRAM_CAP))


class CudaBackend:
    """Merges slots on a CUDA device with the Triton kernel, ``depth`` chunks in flight.

    Host slots are pinned (``alloc``), so the copies are asynchronous DMA. The chunk size
    the pipeline uses must not exceed ``max_chunk_elems`` (``make_layout`` is given it).

    Args:
        vram_bytes: device memory budget for buffers (default ``default_vram_bytes()``).
        rows, in_itemsize, out_itemsize: buffer geometry (set by ``configure``).
    """

    depth = GPU_DEPTH

    def __init__(self, vram_bytes: int | None = None) -> None:
        import torch

        try:
            self._launch = TritonLauncher(torch)  # fails early without triton
        except ImportError as e:
            raise MergeError(
                f"the CUDA backend needs triton ({e})",
                None,
                None,
                "pip install 'streammerge[gpu]', or use --backend numba",
            ) from e
        self.torch = torch
        self.vram_bytes = vram_bytes or default_vram_bytes()
        self.h2d_stream = torch.cuda.Stream()
        self.compute_stream = torch.cuda.Stream()
        self.d2h_stream = torch.cuda.Stream()
        self._dev: list | None = None
        self._free: list = []
        self._k = 0

    def max_chunk_elems(self, rows: int, in_itemsize: int, out_itemsize: int) -> int:
        """Chunk limit from the VRAM budget."""
        return vram_chunk_elems(rows, in_itemsize, out_itemsize, self.vram_bytes, self.depth)

    def alloc(self, shape: tuple[int, ...]) -> np.ndarray:
        """Pinned host memory, viewed as numpy, starting DIRECT_ALIGN-aligned (O_DIRECT reads
        land in it; ``RangeReader.read_rows`` reads O_DIRECT into aligned rows)."""
        torch = self.torch
        size = max(1, int(np.prod(shape)))
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy()
        if buf.ctypes.data % DIRECT_ALIGN:  # cudaHostAlloc gives pages; make sure of it
            buf = torch.empty(size + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=True).numpy()
            off = -buf.ctypes.data % DIRECT_ALIGN
            buf = buf[off : off + size]
        return buf[: int(np.prod(shape))].reshape(shape)

    def _device_buffers(self, slot: Slot) -> None:
        torch = self.torch
        rows, cap_in = slot.inputs.shape
        self._dev = [
            (
                torch.empty((rows, cap_in), dtype=torch.uint8, device="cuda"),
                torch.empty(slot.out.shape[0], dtype=torch.uint8, device="cuda"),
            )
            for _ in range(self.depth)
        ]
        self._free = [None] * self.depth

    def run(self, op: str, slot: Slot, args, **kw):
        """Run pass ``op`` for the slot: ``merge`` queues H2D, kernel and D2H and returns the
        CUDA event of its D2H; ``convert`` runs on the CPU (rare: base-only float tensors
        with ``--dtype``); the histogram passes run synchronously (their counts are small
        and the host needs them before the next pass)."""
        if op == "convert":
            from streammerge.kernels import cpu_merge

            cpu_merge.convert_chunk(
                slot.inputs[0], args.src_dtype, slot.out, args.out_dtype, args.n
            )
            return None
        if self._dev is None:
            self._device_buffers(slot)
        torch = self.torch
        i = self._k % self.depth
        self._k += 1
        dev_in, dev_out = self._dev[i]
        rows = ([args.base_row] if args.base_row >= 0 else []) + list(args.model_rows)
        host_in = torch.from_numpy(slot.inputs)
        with torch.cuda.stream(self.h2d_stream):
            if self._free[i] is not None:  # D2H of the set's last chunk (after its kernel)
                self.h2d_stream.wait_event(self._free[i])
            for r in rows:
                nb = args.n * _ITEMSIZE[args.dtypes[r]]
                dev_in[r, :nb].copy_(host_in[r, :nb], non_blocking=True)
            h2d = torch.cuda.Event()
            h2d.record(self.h2d_stream)
        if op in ("hist_high", "hist_low"):
            with torch.cuda.stream(self.compute_stream):
                self.compute_stream.wait_event(h2d)
                hist = torch.zeros(kw["hist"].shape, dtype=torch.int64, device="cuda")
                buckets = kw.get("buckets")
                if buckets is not None:
                    buckets = torch.from_numpy(buckets).to("cuda")
                self._launch.hist(op, dev_in, args, hist, buckets)
                done = torch.cuda.Event()
                done.record(self.compute_stream)
            self._free[i] = done
            done.synchronize()
            kw["hist"] += hist.cpu().numpy()
            return None
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(h2d)
            self._launch.merge(dev_in, dev_out, args)
            done = torch.cuda.Event()
            done.record(self.compute_stream)
        with torch.cuda.stream(self.d2h_stream):
            self.d2h_stream.wait_event(done)
            nb = slot.out_nbytes
            torch.from_numpy(slot.out)[:nb].copy_(dev_out[:nb], non_blocking=True)
            d2h = torch.cuda.Event()
            d2h.record(self.d2h_stream)
        self._free[i] = d2h
        return d2h

    def wait(self, handle) -> None:
        """Block until the slot's output bytes are on the host."""
        if handle is not None:
            handle.synchronize()


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


class TritonLauncher:
    """Calls the Triton kernels on a slot's uint8 rows (torch tensors on the kernel's
    device: CUDA, or CPU under the interpreter), viewing each row as its dtype. Row r of
    ``inputs`` is the slot's input row r (``streammerge.ops``: 0 the base, 1 + j model j)."""

    def __init__(self, torch) -> None:
        from streammerge.kernels import triton_merge, triton_stats

        self.torch = torch
        self.merge_kernel = triton_merge.merge_chunk_triton
        self.stats = triton_stats

    def _typed(self, buf, dtype: str, n: int):
        """First ``n`` elements of a uint8 buffer viewed as ``dtype``."""
        return buf[: n * _ITEMSIZE[dtype]].view(getattr(self.torch, _TORCH_DTYPES[dtype]))

    def _rows(self, inputs, a):
        base = (
            self._typed(inputs[a.base_row], a.dtypes[a.base_row], a.n) if a.base_row >= 0 else None
        )
        models = [self._typed(inputs[r], a.dtypes[r], a.n) for r in a.model_rows]
        return base, models

    def merge(self, inputs, out, a) -> None:
        """The elementwise pass (``streammerge.ops.MergeArgs``) into ``out`` (uint8)."""
        base, models = self._rows(inputs, a)
        self.merge_kernel(
            base,
            models,
            self._typed(out, a.out_dtype, a.n),
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
        )

    def hist(self, op: str, inputs, a, hist, buckets=None) -> None:
        """A histogram pass (``streammerge.ops.HistArgs``), accumulating into ``hist``."""
        base, models = self._rows(inputs, a)
        if op == "hist_high":
            self.stats.hist_high_triton(base, models, hist)
        else:
            self.stats.hist_low_triton(base, models, buckets, hist)
