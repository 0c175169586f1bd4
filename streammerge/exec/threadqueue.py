"""A CPU stand-in for a GPU: ``ThreadQueue`` runs each stream's work on a thread of its own,
in order, each operation after a random delay, so that the GPU backend's real
orchestration (``streammerge.exec.gpu.DeviceBackend``) can be run end to end without a GPU.

Where CUDA would give wrong bytes, so does this queue: a copy or a kernel that is not
ordered after the work it depends on (a missing event wait) runs early and sees stale or
poisoned memory (fresh device buffers are filled with 0xFF: NaN in every float dtype);
a buffer reused while queued work still reads it is overwritten under it. What CUDA would
do silently, the queue records in ``violations``: work that runs after ``close()`` freed
its buffers (a missing drain), and a stream error (raised by the next ``synchronize``, as a
CUDA error is sticky). ``NumbaLauncher`` gives it kernels: the numba ones, on the
"device" buffers (numpy arrays).
"""

from __future__ import annotations

import queue
import random
import threading
import time

import numpy as np

from streammerge.exec.devqueue import pinned_size
from streammerge.exec.layout import page_aligned

#: Poison of fresh device buffers: 0xFF bytes are NaN in bf16, fp16 and fp32.
POISON = 0xFF


class _Event:
    def __init__(self, stream: _Stream | None) -> None:
        self.stream = stream  # the stream that recorded it
        self.done = threading.Event()
        self.t = 0.0


class _Stream:
    """One worker thread running the stream's operations in order."""

    def __init__(self, owner: ThreadQueue, name: str) -> None:
        self.owner, self.name = owner, name
        self.ops: queue.Queue = queue.Queue()
        self.pending = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name=f"fake-{name}", daemon=True)
        self.thread.start()

    def put(self, fn, *args) -> None:
        with self.lock:
            self.pending += 1
        self.ops.put((self.owner.generation, self.owner.delay(self.name), fn, args))

    def _work(self) -> None:
        while True:
            op = self.ops.get()
            if op is None:
                return
            gen, delay, fn, args = op
            try:
                if delay:
                    time.sleep(delay)
                if gen != self.owner.generation and not getattr(fn, "touches_nothing", False):
                    # its buffers were freed by close(): CUDA would corrupt memory silently
                    self.owner.violations.append(f"{self.name}: {fn.__name__} after close()")
                else:
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - sticky, like a CUDA error
                self.owner.violations.append(f"{self.name}: {type(e).__name__}: {e}")
                self.owner.error = self.owner.error or e
            finally:
                with self.lock:
                    self.pending -= 1


class ThreadQueue:
    """``streammerge.exec.devqueue.DeviceQueue`` on host threads (see the module docstring).

    Args:
        seed: seed of the random delays.
        max_delay_s: each operation waits uniform(0, max_delay_s x bias) seconds first.
        bias: stream name -> delay multiplier (e.g. ``{"h2d": 20}``: slow copies in).
        free_bytes: what ``mem_get_info`` reports free (and total).

    Attributes:
        violations: what CUDA would have done silently (see the module docstring).
        pinned_bytes / peak_pinned_bytes: host bytes "pinned" now / at most
            (``pinned_size`` per buffer, as ``TorchCudaQueue``).
        device_bytes / peak_device_bytes: device bytes held now / at most (held buffers
            plus the largest short-lived histogram array).
    """

    def __init__(
        self,
        seed: int = 0,
        max_delay_s: float = 0.001,
        bias: dict[str, float] | None = None,
        free_bytes: int = 16 * 2**30,
    ) -> None:
        self.name = "fake:0 (ThreadQueue)"
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.max_delay_s = max_delay_s
        self.bias = dict(bias or {})
        self.free_bytes = free_bytes
        self.streams: list[_Stream] = []
        self.generation = 0
        self.violations: list[str] = []
        self.error: BaseException | None = None
        self.pinned_bytes = 0
        self.peak_pinned_bytes = 0
        self.device_bytes = 0
        self.peak_device_bytes = 0
        self.closed = 0

    def delay(self, stream_name: str) -> float:
        """The random delay of the next operation on ``stream_name``."""
        with self._rng_lock:
            return self._rng.uniform(0, self.max_delay_s * self.bias.get(stream_name, 1.0))

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total): ``free_bytes`` less what is allocated."""
        return self.free_bytes - self.device_bytes, self.free_bytes

    def host_alloc(self, nbytes: int) -> np.ndarray:
        """Page-aligned host memory, counted as pinned (``pinned_size``)."""
        self.pinned_bytes += pinned_size(nbytes)
        self.peak_pinned_bytes = max(self.peak_pinned_bytes, self.pinned_bytes)
        return page_aligned((nbytes,))

    def device_alloc(self, shape: tuple[int, ...]) -> np.ndarray:
        """A poisoned uint8 array standing for device memory (held until ``close``)."""
        self.device_bytes += int(np.prod(shape))
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        return np.full(shape, POISON, dtype=np.uint8)

    def _transient(self, a: np.ndarray) -> np.ndarray:
        """A short-lived device array (histograms, buckets): its bytes count towards
        ``peak_device_bytes`` on top of the held buffers while it lives."""
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes + a.nbytes)
        return a

    def stream(self, name: str) -> _Stream:
        """A stream with its own worker thread."""
        s = _Stream(self, name)
        self.streams.append(s)
        return s

    def copy(self, stream: _Stream, dst: np.ndarray, src: np.ndarray) -> None:
        """Queue ``dst[...] = src`` (bytes)."""

        def copy() -> None:
            dst[...] = src

        stream.put(copy)

    def launch(self, stream: _Stream, fn, *args) -> None:
        """Queue ``fn(*args)``."""
        stream.put(fn, *args)

    def zeros(self, stream: _Stream, shape: tuple[int, ...]) -> np.ndarray:
        """int64 device array, cleared on ``stream`` (poisoned until then)."""
        a = self._transient(np.full(shape, -1, dtype=np.int64))

        def clear() -> None:
            a[...] = 0

        stream.put(clear)
        return a

    def upload(self, stream: _Stream, host: np.ndarray) -> np.ndarray:
        """A device copy of ``host``, made on ``stream``."""
        a = self._transient(np.empty_like(host))
        self.copy(stream, a, host.copy())
        return a

    def download(self, buf: np.ndarray) -> np.ndarray:
        """A host copy of ``buf``."""
        return np.array(buf)

    def record(self, stream: _Stream) -> _Event:
        """An event that completes when ``stream`` reaches it."""
        e = _Event(stream)

        def reach() -> None:
            e.t = time.perf_counter()
            e.done.set()

        reach.touches_nothing = True  # an event completes even after close()
        stream.put(reach)
        return e

    def wait(self, stream: _Stream, event: _Event) -> None:
        """``stream`` holds until ``event`` has completed."""

        def hold() -> None:
            if not event.done.wait(60):
                raise TimeoutError("an event was never reached (a wait on unqueued work)")

        stream.put(hold)

    def synchronize(self, event: _Event) -> None:
        """The host waits for ``event``; a stream error is raised here (sticky).

        Raises:
            RuntimeError: an operation on a stream failed."""
        while not event.done.wait(0.05):
            if self.error is not None:
                break
        if self.error is not None:
            raise RuntimeError(f"fake device error: {self.error}") from self.error

    def elapsed(self, start: _Event, end: _Event) -> float:
        """Seconds between two completed events."""
        return max(0.0, end.t - start.t)

    def pending(self) -> int:
        """Operations queued but not finished, over all streams."""
        return sum(s.pending for s in self.streams)

    def drain(self) -> None:
        """Wait until every stream has run everything queued on it."""
        while self.pending():
            time.sleep(0.001)

    def close(self) -> None:
        """Drain every stream, then free the device buffers (later work on them is a
        violation) and unpin the host memory."""
        self.drain()
        self.generation += 1
        self.device_bytes = 0
        self.pinned_bytes = 0
        self.closed += 1
        self.error = None

    def shutdown(self) -> None:
        """Stop the stream threads (after ``close``)."""
        for s in self.streams:
            s.ops.put(None)
        for s in self.streams:
            s.thread.join()


class NumbaLauncher:
    """The kernel launcher of a ``ThreadQueue``:
    ``streammerge.exec.triton_launcher.TritonLauncher``'s interface over the numba kernels,
    on numpy "device" buffers (uint8 [R, row bytes])."""

    def merge(self, inputs: np.ndarray, out: np.ndarray, a) -> None:
        """The elementwise pass (``streammerge.exec.ops.MergeArgs``) into ``out``."""
        from streammerge.kernels import cpu_merge

        cpu_merge.merge_chunk(
            inputs, list(a.dtypes), a.base_row, list(a.model_rows), list(a.model_ids),
            list(a.drop), list(a.weights), a.scale, out, a.out_dtype, a.n, a.key, a.start,
            keep_lo=a.keep_lo, keep_hi=a.keep_hi, consensus=a.consensus,
            normalize=a.normalize, linear=a.linear, compute_dtype=a.compute_dtype,
        )  # fmt: skip

    def hist(self, op: str, inputs: np.ndarray, a, hist: np.ndarray, buckets=None) -> None:
        """A histogram pass (``streammerge.exec.ops.HistArgs``), accumulating into ``hist``."""
        from streammerge.kernels import cpu_stats

        rows = (inputs, list(a.dtypes), a.base_row, list(a.model_rows), a.n)
        if op == "hist_high":
            cpu_stats.hist_high(*rows, hist, compute_dtype=a.compute_dtype)
        else:
            cpu_stats.hist_low(*rows, buckets, hist, compute_dtype=a.compute_dtype)

    def convert(self, src: np.ndarray, a, out: np.ndarray) -> None:
        """A base-only chunk cast on the host (``streammerge.exec.ops.ConvertArgs``)."""
        from streammerge.kernels import cpu_merge

        cpu_merge.convert_chunk(src, a.src_dtype, out, a.out_dtype, a.n, a.scale)
