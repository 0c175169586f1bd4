"""The device backend (``DeviceBackend``): pinned host slots, an H2D, a compute and a D2H
stream ordered by events, and a VRAM budget that sizes the chunks. It reaches the device
only through a ``streammerge.exec.devqueue.DeviceQueue``: CUDA via torch (``cuda_backend``), or
``streammerge.exec.threadqueue.ThreadQueue`` in the tests. See docs/gpu.md.

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
import time
from dataclasses import dataclass

import numpy as np

from streammerge.errors import MergeError
from streammerge.exec.layout import MIN_CHUNK_ELEMS, Slot
from streammerge.exec.ops import is_row_op
from streammerge.exec.triton_launcher import TritonLauncher
from streammerge.io.reader import DTYPE_ITEMSIZE
from streammerge.sizes import format_bytes

#: Device buffer sets in flight (H2D of k+1 overlaps the kernel of k and D2H of k-1).
GPU_DEPTH = 3
#: Default VRAM budget: this share of the free device memory, at most DEFAULT_VRAM_CAP.
DEFAULT_VRAM_SHARE = 0.25
DEFAULT_VRAM_CAP = 4 * 2**30


#: Device nodes of an NVIDIA driver: Linux (/dev/nvidiactl, /proc/driver/nvidia) and WSL2,
#: whose GPUs appear only as /dev/dxg.
DRIVER_NODES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg")


def cuda_available() -> bool:
    """True when a CUDA device can be used. Does not import torch on machines without an
    NVIDIA driver (none of DRIVER_NODES: Linux or WSL2), so the CPU path never pays for it."""
    if not any(os.path.exists(p) for p in DRIVER_NODES):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def vram_chunk_elems(
    rows: int,
    in_itemsize: int,
    out_itemsize: int,
    vram_bytes: int,
    depth: int = GPU_DEPTH,
    reserve: int = 0,
) -> int:
    """Largest chunk (elements) whose ``depth`` device buffer sets fit ``vram_bytes`` less
    ``reserve`` bytes held for other device arrays (the histograms).

    Each set holds ``rows`` input rows (base + fine-tunes) of ``in_itemsize`` bytes per
    element and one output row of ``out_itemsize`` bytes per element.

    Raises:
        MergeError: the budget cannot hold MIN_CHUNK_ELEMS elements (the message names
            ``vram_bytes`` as given and a whole number of MiB that is enough).
    """
    per_elem = depth * (rows * in_itemsize + out_itemsize)
    chunk = max(0, vram_bytes - reserve) // per_elem
    chunk -= chunk % 1024
    if chunk < MIN_CHUNK_ELEMS:
        held = f" (the histograms take {format_bytes(reserve)})" if reserve else ""
        need_mib = -(-(reserve + MIN_CHUNK_ELEMS * per_elem) // 2**20)
        raise MergeError(
            f"--vram {format_bytes(vram_bytes)} is too small for {depth} buffer sets of "
            f"{rows} rows{held}", None, None, f"give at least {need_mib}MiB",
        )  # fmt: skip
    return chunk


def device_bytes_in_flight(
    rows: int, in_itemsize: int, out_itemsize: int, chunk_elems: int, depth: int = GPU_DEPTH
) -> int:
    """Device bytes the backend allocates for chunks of ``chunk_elems`` elements."""
    return depth * chunk_elems * (rows * in_itemsize + out_itemsize)


def default_vram_bytes(free: int) -> int:
    """A modest share of the free device memory (DEFAULT_VRAM_SHARE, at most
    DEFAULT_VRAM_CAP), in bytes."""
    return int(min(free * DEFAULT_VRAM_SHARE, DEFAULT_VRAM_CAP))


def device_chunk_elems(vram_bytes: int, rows: int, in_itemsize: int, out_itemsize: int) -> int:
    """Largest chunk (elements) of a DeviceBackend with ``vram_bytes``: GPU_DEPTH buffer
    sets in what the histograms' reserve (``device_stats_bytes``) leaves.

    Raises:
        MergeError: the budget cannot hold MIN_CHUNK_ELEMS elements."""
    reserve = device_stats_bytes(rows - 1)
    return vram_chunk_elems(rows, in_itemsize, out_itemsize, vram_bytes, GPU_DEPTH, reserve)


@dataclass(frozen=True)
class DeviceGeometry:
    """What ``--plan`` needs of a DeviceBackend without starting one (no stream, no
    compile): its depth and chunk limit for ``vram_bytes`` (as ``layout.make_layout``
    takes them)."""

    vram_bytes: int
    depth: int = GPU_DEPTH

    def max_chunk_elems(self, rows: int, in_itemsize: int, out_itemsize: int) -> int:
        return device_chunk_elems(self.vram_bytes, rows, in_itemsize, out_itemsize)


def plan_geometry(vram_bytes: int | None) -> DeviceGeometry:
    """The geometry a CUDA run would have: ``vram_bytes``, or the default share of the free
    memory of device 0 (one ``mem_get_info`` call).

    Raises:
        MergeError: ``vram_bytes`` is more than the free memory."""
    import torch

    return DeviceGeometry(resolve_vram(vram_bytes, int(torch.cuda.mem_get_info(0)[0]), "cuda:0"))


def resolve_vram(vram_bytes: int | None, free: int, where: str) -> int:
    """The device buffer budget: ``vram_bytes`` checked against ``free`` bytes on device
    ``where``, or ``default_vram_bytes(free)``.

    Raises:
        MergeError: ``vram_bytes`` is not positive or more than ``free`` (one line)."""
    if vram_bytes is None:
        return default_vram_bytes(free)
    if vram_bytes <= 0:
        raise MergeError(f"--vram must be more than 0 bytes, got {vram_bytes}")
    if vram_bytes > free:
        raise MergeError(
            f"--vram {format_bytes(vram_bytes)} is more than the {format_bytes(free)} free "
            f"on {where}", None, None,
            f"give --vram {format_bytes(default_vram_bytes(free))} or less, or leave it out",
        )  # fmt: skip
    return vram_bytes


def pinned_host_bytes(layout) -> int:
    """Host bytes a DeviceBackend pins for ``layout`` (``layout.Layout`` made with
    depth GPU_DEPTH): every slot's input rows and output buffers, each buffer registered
    at page granularity (``devqueue.pinned_size``). At most ``--memory``: the layout
    counts the same buffers (and the writer's staging blocks and histograms, which are not
    pinned)."""
    from streammerge.exec.devqueue import pinned_size

    per_slot = pinned_size(layout.rows * layout.row_bytes)
    per_slot += layout.outputs * pinned_size(layout.out_row_bytes)
    return layout.slots * per_slot


def device_stats_bytes(n_models: int) -> int:
    """Device bytes a statistics pass may hold besides the chunk buffers: the int64 high
    histograms (HIGH_BINS per fine-tune) and the low histograms of the widest guessed
    window (``stats.guess_slots`` of breadcrumbs x LOW_BINS per fine-tune), both alive
    at once in the worst case. Reserved from ``--vram`` for every method (about 3.4 MB per
    fine-tune)."""
    from streammerge.exec.stats import HIGH_BINS, LOW_BINS, guess_slots

    return n_models * (HIGH_BINS + guess_slots("breadcrumbs") * LOW_BINS) * 8


#: Warm-up launch size (elements): compiles the kernel and Triton's driver stub up front.
WARMUP_ELEMS = 16


class DeviceBackend:
    """Merges slots on a device, ``depth`` chunks in flight over three streams (the module
    docstring), through a ``streammerge.exec.devqueue.DeviceQueue``: torch CUDA for real, or
    ``streammerge.exec.threadqueue.ThreadQueue`` in the tests.

    Per chunk k in device buffer set i = k % depth, in queue order:

    1. ``h2d`` waits for the set's previous D2H (``free[i]``: after its kernel, so neither
       the inputs nor the output of the set are still in use), copies the rows in;
    2. ``compute`` waits for that H2D, launches the kernel;
    3. ``d2h`` waits for the kernel, copies the output to the slot;
    4. the host waits (sleeping) for the D2H before the writer reads the slot
       (``wait``), and before the reader refills it.

    Host slots are pinned (``alloc``: ``pinned_size`` bytes each, within ``--memory``);
    device buffers are allocated by ``start`` before the first byte is read, and
    ``close`` drains every stream before anything is freed, on success and on error.

    Args:
        queue: the device queue.
        launcher: kernels: ``merge(inputs, out, args)``, ``hist(op, inputs, args, hist,
            buckets)``, ``convert(src, args, out)`` (``TritonLauncher``, ``NumbaLauncher``).
        vram_bytes: device buffer budget (None: ``default_vram_bytes`` of the free memory).
        warmup: run a WARMUP_ELEMS-element merge now (compiles the kernel).

    Raises:
        MergeError: ``vram_bytes`` is not positive or more than the free device memory; the
            warm-up launch failed (no C compiler for Triton's driver stub, a driver error).
    """

    depth = GPU_DEPTH
    #: The reader may leave each row where its O_DIRECT read landed (``Slot.offsets``):
    #: the H2D copy starts there, no memmove.
    takes_offsets = True

    def __init__(self, queue, launcher, vram_bytes: int | None = None, warmup: bool = True) -> None:
        self.q = queue
        self.launcher = launcher
        self._host = None  # numba, for the passes that run on the host (row-wise methods)
        self.vram_bytes = resolve_vram(vram_bytes, queue.mem_get_info()[0], queue.name)
        self.streams = {name: queue.stream(name) for name in ("h2d", "compute", "d2h")}
        self._sets: list | None = None
        self._free: list = []
        self._k = 0
        self._resident = None
        #: Seconds for --profile: each stream's busy time, and the host's waits on the device.
        self.busy = {"h2d_s": 0.0, "kernel_s": 0.0, "d2h_s": 0.0, "device_wait_s": 0.0}
        if warmup:
            self._warmup()

    def _warmup(self) -> None:
        """A WARMUP_ELEMS-element bf16 merge on the compute stream, synchronized: a missing
        compiler, driver or kernel problem is a MergeError here, before anything is
        written."""
        from streammerge.exec.ops import MergeArgs

        n = WARMUP_ELEMS
        args = MergeArgs(("BF16", "BF16"), 0, (1,), (0,), (0.5,), (1.0,), 1.0, "BF16", n, 1, 0,
                         None, None, "none", False, False)  # fmt: skip
        try:
            self._launch_all([("merge", args)], rows=2)
        finally:
            self.q.close()

    def prewarm(self, plan) -> None:
        """Compile every kernel variant ``plan`` launches (``ops.kernel_variants``) before
        the first read, so that no first chunk stalls the pipeline on a compile and a
        variant that cannot compile fails before anything is written. Call after
        ``start``; the buffers go with ``close``.

        Raises:
            MergeError: a variant could not be compiled or launched."""
        from streammerge.exec.ops import kernel_variants

        variants = kernel_variants(plan, plan.recipe.row)
        if variants:
            rows = 1 + max(max(a.model_rows) for _, a in variants)
            self._launch_all(variants, rows)

    def _launch_all(self, launches, rows: int) -> None:
        """Run ``(op, args)`` launches on zeroed scratch buffers of ``rows`` rows, then wait.

        Raises:
            MergeError: one line naming the device and the first line of the failure."""
        from streammerge.exec.stats import HIGH_BINS

        q, s = self.q, self.streams["compute"]
        # Bytes per row at the widest dtype, rounded to 256 so every row starts 16-byte
        # aligned as in a run (rows at r x cap_in_bytes): Triton specializes pointers on
        # 16-byte alignment, and a misaligned scratch row would compile another variant.
        width = -(-4 * max(a.n for _, a in launches) // 256) * 256
        try:
            inputs, out = q.device_alloc((rows, width)), q.device_alloc((width,))
            q.copy(s, inputs, np.zeros((rows, width), dtype=np.uint8))
            for op, a in launches:
                if op == "merge":
                    q.launch(s, self.launcher.merge, inputs, out, a)
                else:
                    hist = q.zeros(s, (len(a.model_rows), HIGH_BINS))
                    q.launch(s, self.launcher.hist, op, inputs, a, hist, None)
            q.synchronize(q.record(s))
        except MergeError:
            raise
        except Exception as e:  # compiler, driver, kernel: one line
            raise device_error(
                f"the GPU kernel could not be compiled or launched on {q.name}", e,
                "Triton needs a C compiler (gcc) and the CUDA driver; or use --device cpu",
            ) from e  # fmt: skip

    def max_chunk_elems(self, rows: int, in_itemsize: int, out_itemsize: int) -> int:
        """Chunk limit from the VRAM budget (``device_chunk_elems``)."""
        return device_chunk_elems(self.vram_bytes, rows, in_itemsize, out_itemsize)

    def alloc(self, shape: tuple[int, ...]) -> np.ndarray:
        """Pinned, page-aligned host memory (O_DIRECT reads land in it), viewed as numpy."""
        n = max(1, int(np.prod(shape)))
        return self.q.host_alloc(n)[: int(np.prod(shape))].reshape(shape)

    def start(self, layout) -> None:
        """Allocate the ``depth`` device buffer sets for ``layout`` (before the first read:
        out of device memory is a MergeError before anything is written)."""
        in_bytes, out_bytes = layout.cap_in_bytes, layout.cap_out_bytes
        self._sets = [
            (self.q.device_alloc((layout.rows, in_bytes)), self.q.device_alloc((out_bytes,)))
            for _ in range(self.depth)
        ]
        self._free = [None] * self.depth
        self._k = 0
        self._resident = None  # (slot fill and rows, set index, copy event) of the last H2D
        self.busy = dict.fromkeys(self.busy, 0.0)

    def run(self, op: str, slot: Slot, args, **kw):
        """Queue pass ``op`` for the slot: ``merge`` returns a handle for ``wait``;
        ``hist_high`` / ``hist_low`` run synchronously (the host needs their counts before
        the next pass) and add into ``kw["hist"]``; ``convert`` runs on the host (rare:
        base-only float tensors with ``--dtype``)."""
        if op == "convert":
            self.launcher.convert(slot.inputs[0], args, slot.out)
            return None
        if is_row_op(op):  # row-wise methods (slerp) run on the host for now (docs/gpu.md)
            if self._host is None:
                from streammerge.exec.backends import NumbaBackend

                self._host = NumbaBackend()
            return self._host.run(op, slot, args)
        if op == "merge":
            return self.run_sweep(slot, [(slot, args)])
        q, s = self.q, self.streams
        i, h2d, t_in = self._to_device(slot, args)
        q.wait(s["compute"], h2d)
        t_k = q.record(s["compute"])
        try:
            hist = q.zeros(s["compute"], kw["hist"].shape)
            buckets = kw.get("buckets")
            if buckets is not None:
                buckets = q.upload(s["compute"], buckets)
        except Exception as e:  # out of device memory for the histograms: one line
            raise device_error(
                f"no GPU memory for the histograms on {q.name}", e,
                "give a smaller --vram (the histograms are reserved from it), or free the GPU",
            ) from e  # fmt: skip
        q.launch(s["compute"], self.launcher.hist, op, self._sets[i][0], args, hist, buckets)
        done = q.record(s["compute"])
        self._free[i] = done
        self._wait(_Pending(done, (("h2d_s", t_in, h2d), ("kernel_s", t_k, done))))
        kw["hist"] += q.download(hist)
        return None

    def _to_device(self, slot: Slot, args) -> tuple[int, object, object]:
        """Queue the slot's rows (from ``slot.offsets``) into the next device buffer set,
        after that set's last use (``free[i]``). Returns (set index, the event of the
        copies, a timing event before them).

        The passes of a held tensor (``hist_high``, ``hist_low``, then ``merge`` on the same
        fill of the same slot) copy once: when the last copy was of this very fill and rows,
        its set still holds them (kernels only read ``inputs``) and is reused; the timing
        event is then the copy's own (0 s)."""
        rows = ([args.base_row] if args.base_row >= 0 else []) + list(args.model_rows)
        key = (id(slot.inputs), slot.fill, tuple(rows), args.n)
        if self._resident is not None and self._resident[0] == key:
            _, i, h2d = self._resident
            ready = self._free[i] or h2d  # after the set's last kernel / D2H (and the copy)
            return i, ready, ready
        q, s = self.q, self.streams
        i = self._k % self.depth
        self._k += 1
        if self._free[i] is not None:  # the set's last D2H (after its kernel): set free
            q.wait(s["h2d"], self._free[i])
        t_in = q.record(s["h2d"])
        dev_in = self._sets[i][0]
        for r in rows:
            nb = args.n * DTYPE_ITEMSIZE[args.dtypes[r]]
            off = slot.offsets[r] if slot.offsets else 0
            q.copy(s["h2d"], dev_in[r, :nb], slot.inputs[r, off : off + nb])
        h2d = q.record(s["h2d"])
        self._resident = (key, i, h2d)
        return i, h2d, t_in

    def run_sweep(self, slot: Slot, passes: list) -> _Pending:
        """K merges of one slot's inputs (a sweep's outputs; K = 1 is ``run("merge")``):
        ``passes`` is [(Slot view whose ``out`` is output k's buffer, MergeArgs)], all of
        the same chunk and rows. The rows go to the device once; then per output the
        kernel and its D2H, each kernel after the previous output's D2H (one device output
        buffer per set). Returns the handle of the last D2H (``wait``)."""
        q, s = self.q, self.streams
        i, ready, t_in = self._to_device(slot, passes[0][1])
        dev_in, dev_out = self._sets[i]
        timings = [("h2d_s", t_in, ready)]
        for view, a in passes:
            q.wait(s["compute"], ready)  # the inputs, then the previous output's D2H
            t_k = q.record(s["compute"])
            q.launch(s["compute"], self.launcher.merge, dev_in, dev_out, a)
            done = q.record(s["compute"])
            q.wait(s["d2h"], done)
            t_out = q.record(s["d2h"])
            nb = view.out_nbytes
            q.copy(s["d2h"], view.out[:nb], dev_out[:nb])
            ready = q.record(s["d2h"])
            timings += [("kernel_s", t_k, done), ("d2h_s", t_out, ready)]
        self._free[i] = ready
        return _Pending(ready, tuple(timings))

    def _wait(self, p: _Pending) -> None:
        t0 = time.perf_counter()
        try:
            self.q.synchronize(p.event)
        except MergeError:
            raise
        except Exception as e:  # a sticky CUDA error (illegal access, ECC, Xid): one line
            raise device_error(
                f"the GPU failed during the merge on {self.q.name}", e,
                "finished shards are kept: check nvidia-smi / dmesg, then --resume "
                "(or --device cpu)",
            ) from e  # fmt: skip
        self.busy["device_wait_s"] += time.perf_counter() - t0
        for kind, a, b in p.timings:
            self.busy[kind] += self.q.elapsed(a, b)

    def wait(self, handle) -> None:
        """Block (sleeping) until the slot's output bytes are on the host."""
        if handle is not None:
            self._wait(handle)

    def close(self) -> None:
        """Drain every stream, free the device buffers, unpin the host slots (also after an
        error: nothing is freed under a queued copy or kernel). ``start`` again to reuse."""
        self._sets, self._free, self._k, self._resident = None, [], 0, None
        self.q.close()


@dataclass(frozen=True)
class _Pending:
    """A queued chunk: the event the host waits for, and (kind, start, end) timing events."""

    event: object
    timings: tuple


def cuda_backend(vram_bytes: int | None = None, index: int = 0) -> DeviceBackend:
    """The CUDA backend: ``DeviceBackend`` on ``TorchCudaQueue`` with the Triton kernels.

    Raises:
        MergeError: triton missing, Triton in interpreter mode (``TRITON_INTERPRET=1``
            would run the kernel on the host, copying every buffer there and back), --vram
            more than the free memory, or the warm-up launch failed.
    """
    from streammerge.exec.devqueue import TorchCudaQueue

    try:
        import torch

        launcher = TritonLauncher(torch)
    except ImportError as e:
        raise MergeError(
            f"the CUDA backend needs triton ({e})",
            None,
            None,
            "pip install 'streammerge[gpu]', or use --device cpu",
        ) from e
    if launcher.interpreted:
        raise MergeError(
            "TRITON_INTERPRET=1 is set: Triton would interpret the kernel on the host, not "
            "run it on the GPU",
            None,
            None,
            "unset TRITON_INTERPRET (it is the tests' CPU path), or use --device cpu",
        )
    try:
        queue = TorchCudaQueue(index)
        return DeviceBackend(queue, launcher, vram_bytes)
    except MergeError:
        raise
    except Exception as e:  # a busy exclusive-process GPU, no memory for a context: one line
        raise device_error(
            f"the CUDA device {index} cannot be used", e, "check nvidia-smi, or use --device cpu"
        ) from e


def device_error(what: str, e: BaseException, todo: str) -> MergeError:
    """A one-line MergeError: ``what``, then the first line of ``e`` (a CUDA, driver or
    compiler message, often many lines), cut at 200 characters."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return MergeError(f"{what}: {first[:200]}", None, None, todo)
