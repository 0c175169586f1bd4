"""The device queue: every call the GPU backend makes to a device, behind one small interface.

``streammerge.exec.gpu.DeviceBackend`` orders chunks over three streams (H2D, compute, D2H)
with events; it reaches the device only through a ``DeviceQueue``:

========================================  ============================================
``mem_get_info()``                        (free, total) device bytes
``host_alloc(nbytes)``                    pinned, page-aligned uint8 host memory
``device_alloc(shape)``                   a uint8 device buffer, sliced like numpy
``stream(name)``                          a stream (``h2d``, ``compute``, ``d2h``)
``copy(stream, dst, src)``                H2D (src a host ndarray) or D2H (dst one)
``launch(stream, fn, *args)``             ``fn(*args)`` queued on the stream (a kernel)
``zeros(stream, n)`` / ``upload(...)``    small int64 device arrays (histograms, buckets)
``download(buf)``                         a device array's values on the host (synchronous)
``record(stream)`` / ``wait(stream, e)``  events: ``wait`` holds the stream until ``e``
``synchronize(event)``                    the host blocks (sleeps) until ``event``
``elapsed(a, b)``                         seconds between two completed events
``close()``                               drain every stream, free device buffers, unpin
========================================  ============================================

Two implementations: ``TorchCudaQueue`` (torch's CUDA runtime) here, and
``streammerge.exec.threadqueue.ThreadQueue``, a CPU stand-in with one thread per stream and
random delays, on which the tests run the real orchestration end to end.

Pinned host memory is page-aligned anonymous memory registered with ``cudaHostRegister``
(``pinned_size``: the bytes rounded up to a page), not torch's pinned allocator, which
rounds every request up to a power of two (256 MiB asked -> 360 MiB pinned in a merge's
slots; 8 GiB -> 11.25 GiB) and so would pin more than ``--memory``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from streammerge.errors import MergeError
from streammerge.exec.layout import page_aligned
from streammerge.io.ranges import align_up
from streammerge.sizes import format_bytes


def pinned_size(nbytes: int) -> int:
    """Bytes pinned for a host buffer of ``nbytes`` (``host_alloc``): rounded up to a page
    (4096 B), as ``cudaHostRegister`` pins whole pages of an anonymous mapping."""
    return align_up(max(1, nbytes))


def torch_pinned_size(nbytes: int) -> int:
    """Bytes torch's caching pinned allocator (``pin_memory=True``) takes for ``nbytes``:
    the next power of two (c10 ``CachingHostAllocator``). Not used for slots; kept to show
    what ``host_alloc`` avoids (``tests/test_device_queue.py``)."""
    return 1 << max(0, int(nbytes - 1).bit_length())


class DeviceQueue(Protocol):
    """What ``DeviceBackend`` needs of a device (see the module docstring)."""

    name: str
    pinned_bytes: int

    def mem_get_info(self) -> tuple[int, int]: ...
    def host_alloc(self, nbytes: int) -> np.ndarray: ...
    def device_alloc(self, shape: tuple[int, ...]) -> object: ...
    def stream(self, name: str) -> object: ...
    def copy(self, stream, dst, src) -> None: ...
    def launch(self, stream, fn, *args) -> None: ...
    def zeros(self, stream, shape: tuple[int, ...]) -> object: ...
    def upload(self, stream, host: np.ndarray) -> object: ...
    def download(self, buf) -> np.ndarray: ...
    def record(self, stream) -> object: ...
    def wait(self, stream, event) -> None: ...
    def synchronize(self, event) -> None: ...
    def elapsed(self, start, end) -> float: ...
    def close(self) -> None: ...


class TorchCudaQueue:
    """``DeviceQueue`` on torch's CUDA runtime (device ``index``).

    Events are created ``blocking=True`` (``cudaEventBlockingSync``): ``synchronize``
    sleeps instead of spinning a core that the reader, the memmoves and sha256 need (2
    cores on the reference machine, few on many workstations), and with ``enable_timing``
    so ``--profile`` can report each stream's busy seconds.

    Args:
        index: CUDA device index.
        torch: the torch module (a stand-in in the unit tests).

    Raises:
        MergeError: (``host_alloc``) pinning failed; (``device_alloc``) out of device memory.
    """

    def __init__(self, index: int = 0, torch=None) -> None:
        if torch is None:
            import torch
        self.torch = torch
        self.device = torch.device("cuda", index)
        self.name = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
        self.pinned_bytes = 0
        self._host: list[tuple[np.ndarray, int]] = []  # (buffer, registered bytes)
        self._dev: list = []
        self._streams: list = []

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        free, total = self.torch.cuda.mem_get_info(self.device)
        return int(free), int(total)

    def host_alloc(self, nbytes: int) -> np.ndarray:
        """``nbytes`` of page-aligned host memory, pinned with ``cudaHostRegister``
        (``pinned_size(nbytes)`` bytes page-locked). Where registration is refused the
        buffer stays pageable: copies are then synchronous, the bytes the same."""
        buf = page_aligned((nbytes,))
        size = pinned_size(nbytes)
        torch = self.torch
        try:  # as torch.cuda._pin_memory_utils.pin_memory does (1: cudaHostRegisterPortable)
            with torch.cuda.device(self.device):
                code = int(torch.cuda.cudart().cudaHostRegister(buf.ctypes.data, size, 1))
        except Exception:  # noqa: BLE001 - pageable memory works, only slower
            code = -1
        if code != 0:
            return buf
        self._host.append((buf, size))
        self.pinned_bytes += size
        return buf

    def device_alloc(self, shape: tuple[int, ...]) -> object:
        """A uint8 device tensor of ``shape``.

        Raises:
            MergeError: out of device memory (one line, with the --vram advice)."""
        torch = self.torch
        try:
            buf = torch.empty(shape, dtype=torch.uint8, device=self.device)
        except torch.cuda.OutOfMemoryError as e:
            n = int(np.prod(shape))
            raise MergeError(
                f"out of GPU memory allocating {format_bytes(n)} of buffers on {self.name}",
                None,
                None,
                "give a smaller --vram, or free the GPU",
            ) from e
        self._dev.append(buf)
        return buf

    def stream(self, name: str) -> object:
        """A new CUDA stream on the device."""
        s = self.torch.cuda.Stream(self.device)
        self._streams.append(s)
        return s

    def _t(self, a):
        return self.torch.from_numpy(a) if isinstance(a, np.ndarray) else a

    def copy(self, stream, dst, src) -> None:
        """Asynchronous copy of ``src`` into ``dst`` (same byte length) on ``stream``."""
        with self.torch.cuda.stream(stream):
            self._t(dst).copy_(self._t(src), non_blocking=True)

    def launch(self, stream, fn, *args) -> None:
        """``fn(*args)`` with ``stream`` current: Triton launches queue there."""
        with self.torch.cuda.stream(stream):
            fn(*args)

    def zeros(self, stream, shape: tuple[int, ...]) -> object:
        """int64 zeros on the device, allocated and cleared on ``stream``."""
        torch = self.torch
        with torch.cuda.stream(stream):
            return torch.zeros(shape, dtype=torch.int64, device=self.device)

    def upload(self, stream, host: np.ndarray) -> object:
        """A device copy of a small host array, made on ``stream``."""
        with self.torch.cuda.stream(stream):
            return self.torch.from_numpy(host).to(self.device, non_blocking=False)

    def download(self, buf) -> np.ndarray:
        """``buf``'s values on the host (after the event that wrote it completed)."""
        return buf.cpu().numpy()

    def record(self, stream) -> object:
        """A blocking, timed event recorded on ``stream``."""
        e = self.torch.cuda.Event(enable_timing=True, blocking=True)
        e.record(stream)
        return e

    def wait(self, stream, event) -> None:
        """Work queued on ``stream`` after this starts when ``event`` has completed."""
        stream.wait_event(event)

    def synchronize(self, event) -> None:
        """Block the host (sleeping) until ``event`` has completed."""
        event.synchronize()

    def elapsed(self, start, end) -> float:
        """Seconds between two completed events."""
        return start.elapsed_time(end) / 1e3

    def close(self) -> None:
        """Drain every stream, then free the device buffers and unpin the host memory (no
        copy can still be reading or writing them). The queue can be used again."""
        try:
            for s in self._streams:
                s.synchronize()
        finally:  # after a sticky CUDA error too: release what can be released
            self._dev.clear()
            host, self._host, self.pinned_bytes = self._host, [], 0
            cudart = self.torch.cuda.cudart()
            for buf, _size in host:
                cudart.cudaHostUnregister(buf.ctypes.data)
