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
            from streammerge.kernels.triton_merge import merge_chunk_triton  # noqa: F401 - fail early
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

    def submit(self, slot: Slot, key: int):
        """Queue H2D, kernel and D2H for the slot; returns the CUDA event of its D2H."""
        torch = self.torch
        t, c = slot.tensor, slot.chunk
        if t.action == "convert":  # rare (base-only float tensor with --dtype): on the CPU
            from streammerge.kernels import cpu_merge

            cpu_merge.convert_chunk(slot.inputs[0], t.base.dtype, slot.out, t.dtype, c.count)
            return None
        if self._dev is None:
            self._device_buffers(slot)
        i = self._k % self.depth
        self._k += 1
        dev_in, dev_out = self._dev[i]
        seg = c.segment
        rows = ([0] if seg.has_base else []) + [1 + j for j in seg.models]
        host_in = torch.from_numpy(slot.inputs)
        with torch.cuda.stream(self.h2d_stream):
            if self._free[i] is not None:  # D2H of the set's last chunk (after its kernel)
                self.h2d_stream.wait_event(self._free[i])
            for r in rows:
                info = t.base if r == 0 else t.sources[r - 1]
                nb = c.count * info.itemsize
                dev_in[r, :nb].copy_(host_in[r, :nb], non_blocking=True)
            h2d = torch.cuda.Event()
            h2d.record(self.h2d_stream)
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(h2d)
            launch_triton(torch, dev_in, dev_out, t, c, key)
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


def _typed(torch, buf, dtype: str, n: int):
    """First ``n`` elements of a uint8 buffer viewed as ``dtype``."""
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    return buf[: n * itemsize].view(getattr(torch, _TORCH_DTYPES[dtype]))


def _typed_rows(torch, dev_in, t, n: int) -> list:
    """Row r of the device input buffer as its input's dtype (row 0 base, 1 + j model j)."""
    infos = [t.base, *t.sources]
    return [
        None if info is None else _typed(torch, dev_in[r], info.dtype, n)
        for r, info in enumerate(infos)
    ]


def launch_triton(torch, inputs, out, t, c, key: int) -> None:
    """Merge chunk ``c`` of tensor ``t`` with the Triton kernel: ``inputs`` is the uint8
    [R, >= bytes] buffer (row 0 the base, 1 + j fine-tune j), ``out`` the uint8 output
    buffer; both torch tensors on the kernel's device (CPU under the interpreter)."""
    from streammerge.kernels.triton_merge import merge_chunk_triton

    seg = c.segment
    view = _typed_rows(torch, inputs, t, c.count)
    merge_chunk_triton(
        view[0] if seg.has_base else None,
        [view[1 + j] for j in seg.models],
        _typed(torch, out, t.dtype, c.count),
        key=key,
        start=c.start,
        drop=list(seg.drop),
        weights=list(seg.weights),
        scale=seg.scale,
        model_ids=list(seg.models),
    )
