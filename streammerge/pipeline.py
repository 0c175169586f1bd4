"""Execute a plan: read, merge and write chunk by chunk with the three overlapped.

Three stages share a fixed ring of buffer slots, allocated once and reused (first writes to
fresh pages ran at ~0.7 GiB/s on the reference machine, to reused pages ~5 GiB/s):

    reader thread  --ready-->  compute (caller's thread)  --done-->  writer thread
         ^                                                                |
         +----------------------------- free slots -----------------------+

File reads (``os.preadv``), the numba kernel (``nogil``) and file writes all release the
GIL, so reading chunk k+1, merging chunk k and writing chunk k-1 run at once. The memory
budget bounds every buffer: slots x (inputs + output) + the writer's staging block.
"""

from __future__ import annotations

import mmap
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from streammerge.errors import MergeError
from streammerge.kernels.common import tensor_key
from streammerge.output import OutputDir
from streammerge.plan import Chunk, Plan, ShardPlan, TensorPlan, iter_chunks
from streammerge.reader import DIRECT_ALIGN, DIRECT_SLACK, DTYPE_ITEMSIZE, RangeReader, align_up
from streammerge.writer import BLOCK_BYTES, ShardWriter, StagingBlock

#: Host slots besides those a backend keeps in flight: one read, one merged, one written.
N_SLOTS = 6
#: Smallest useful chunk (elements); below it per-call overhead dominates.
MIN_CHUNK_ELEMS = 4096


@dataclass
class Slot:
    """One set of reusable buffers and the work item it currently carries.

    Attributes:
        inputs: uint8 [R, cap_in_bytes]; row 0 the base, row 1 + j fine-tune j.
        out: uint8 [cap_out_bytes]; the merged (or copied) bytes to write.
    """

    inputs: np.ndarray
    out: np.ndarray
    tensor: TensorPlan | None = None
    chunk: Chunk | None = None
    out_nbytes: int = 0
    in_nbytes: int = 0


@dataclass(frozen=True)
class Marker:
    """A shard boundary passed down the queues in order with the slots."""

    kind: str  # "open" | "close"
    shard: ShardPlan


def page_aligned(shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array of ``shape`` on fresh page-aligned memory (anonymous mmap), as O_DIRECT
    needs."""
    size = max(1, int(np.prod(shape)))
    return np.frombuffer(mmap.mmap(-1, align_up(size)), dtype=np.uint8)[:size].reshape(shape)


@dataclass
class Layout:
    """Buffer sizes derived from the memory budget.

    Attributes:
        rows: R = 1 + number of fine-tunes.
        chunk_elems: elements per merge chunk.
        cap_in_bytes: bytes per input row.
        cap_out_bytes: bytes of the output buffer.
        block_bytes: the writer's staging block (O_DIRECT writes of this size).
        buffer_bytes: total bytes of all slots plus the writer's staging block.
    """

    rows: int
    chunk_elems: int
    cap_in_bytes: int
    cap_out_bytes: int
    block_bytes: int
    buffer_bytes: int = field(default=0)

    @property
    def row_bytes(self) -> int:
        """Stride of an input row: capacity + O_DIRECT slack, a multiple of DIRECT_ALIGN, so
        every row of a page-aligned slot starts page-aligned."""
        return align_up(self.cap_in_bytes + DIRECT_SLACK)

    @property
    def out_row_bytes(self) -> int:
        """Length of the output buffer: capacity + O_DIRECT slack (copies read into it)."""
        return align_up(self.cap_out_bytes + DIRECT_SLACK)

    def max_elems(self, t: TensorPlan) -> int:
        """Largest chunk (elements) of ``t`` that fits the buffers."""
        if t.action == "copy":
            return max(1, self.cap_out_bytes // DTYPE_ITEMSIZE[t.dtype])
        return self.chunk_elems


def make_layout(
    plan: Plan, n_models: int, memory_bytes: int, depth: int = 0, device_limit=None
) -> Layout:
    """Size the slot buffers so that all of them fit ``memory_bytes``.

    Each merge element needs one input element per row (at the widest float itemsize in the
    plan) and one output element, in each of N_SLOTS + depth slots (``depth``: the slots a
    backend keeps in flight).

    ``device_limit(rows, in_itemsize, out_itemsize) -> elems``, when given, caps the chunk
    too (the GPU backend's VRAM budget).

    Raises:
        MergeError: the budget is too small for even MIN_CHUNK_ELEMS elements.
    """
    rows = 1 + n_models
    in_size, out_size = 2, 2
    for t in plan.tensors:
        if t.action != "copy":
            srcs = [s for s in (t.base, *t.sources) if s is not None]
            in_size = max(in_size, *(s.itemsize for s in srcs))
            out_size = max(out_size, DTYPE_ITEMSIZE[t.dtype])
    per_elem = (N_SLOTS + depth) * (rows * in_size + out_size)
    slack = (N_SLOTS + depth) * (rows + 1) * (DIRECT_SLACK + DIRECT_ALIGN)  # row slack
    memory_bytes -= slack
    block = align_up(min(BLOCK_BYTES, max(2**18, memory_bytes // 16)))  # writer staging block
    chunk = (memory_bytes - block) // per_elem
    if device_limit is not None:
        chunk = min(chunk, device_limit(rows, in_size, out_size))
    chunk -= chunk % 1024
    if chunk < MIN_CHUNK_ELEMS:
        need = (MIN_CHUNK_ELEMS * per_elem + block + slack) / 2**20
        raise MergeError(
            f"--memory {(memory_bytes + slack) / 2**10:.0f}KiB is too small",
            None,
            None,
            f"give at least {need:.0f}MiB",
        )
    layout = Layout(rows, chunk, chunk * in_size, chunk * out_size, block)
    layout.buffer_bytes = (N_SLOTS + depth) * (
        rows * layout.row_bytes + layout.out_row_bytes
    ) + block
    return layout


def work_items(
    plan: Plan, shards: list[ShardPlan], layout: Layout
) -> Iterator[tuple[TensorPlan, Chunk] | Marker]:
    """Shard markers and (tensor, chunk) items in output file order."""
    for shard in shards:
        yield Marker("open", shard)
        for t in shard.tensors:
            for chunk in iter_chunks(t, layout.max_elems(t)):
                yield t, chunk
        yield Marker("close", shard)


class Backend(Protocol):
    """Where chunks are merged. ``submit`` starts merging a filled slot and returns a handle;
    ``wait`` blocks until that merge's bytes are in ``slot.out``. Up to ``depth`` submitted
    slots may be in flight before the oldest is waited on (0: ``submit`` finishes the work).
    ``alloc`` makes the slot buffers (pinned host memory for a GPU)."""

    depth: int

    def alloc(self, shape: tuple[int, ...]) -> np.ndarray: ...

    def submit(self, slot: Slot, key: int) -> object: ...

    def wait(self, handle: object) -> None: ...


@dataclass
class RunStats:
    """What ``run`` did: bytes, shard digests, and busy seconds per stage
    (``read_s``: preadv into slots, ``compute_s``: kernel, ``write_s``: staging copy,
    sha256, O_DIRECT writes, fsync)."""

    bytes_read: int
    bytes_written: int
    shards: dict[str, tuple[int, str]]
    busy_s: dict[str, float]


class _Failed(Exception):
    pass


def run(
    plan: Plan,
    shards: list[ShardPlan],
    output: OutputDir,
    layout: Layout,
    backend: Backend,
    on_bytes: Callable[[int], None] | None = None,
    direct_io: bool = True,
) -> RunStats:
    """Stream ``shards`` of ``plan`` into ``output``.

    Args:
        plan: the merge plan.
        shards: the shards still to write (all of them unless resuming).
        output: the open output transaction (staging dir, journal).
        layout: buffer sizes (``make_layout``).
        backend: merges filled slots (``streammerge.backends``, ``streammerge.gpu``).
        on_bytes: called from the writer thread with input bytes done since the last call.
        direct_io: read inputs and write shards with O_DIRECT where allowed.

    Returns:
        RunStats: bytes read and written, shard name -> (size, sha256), and the seconds
        each stage was busy (the profile: the busiest stage is the bottleneck).

    Raises:
        MergeError / OSError: from any stage; the other stages stop, partial shards are
            deleted, finished ones stay in the journal for --resume.
    """
    slots = [
        Slot(backend.alloc((layout.rows, layout.row_bytes)), backend.alloc((layout.out_row_bytes,)))
        for _ in range(N_SLOTS + backend.depth)
    ]
    free_q: queue.Queue = queue.Queue()
    ready_q: queue.Queue = queue.Queue()
    done_q: queue.Queue = queue.Queue()
    for s in slots:
        free_q.put(s)
    stop = threading.Event()
    errors: list[BaseException] = []
    reader = RangeReader(direct=direct_io, hasher=output.input_hasher)
    stats = {"read": 0, "written": 0}
    busy = {"read_s": 0.0, "compute_s": 0.0, "write_s": 0.0}  # seconds each stage worked
    results: dict[str, tuple[int, str]] = {}

    def get(q: queue.Queue):
        while True:
            if stop.is_set():
                raise _Failed
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def fill(pool: ThreadPoolExecutor, slot: Slot, t: TensorPlan, c: Chunk) -> None:
        slot.tensor, slot.chunk = t, c
        slot.out_nbytes = c.count * DTYPE_ITEMSIZE[t.dtype]
        jobs = []
        if t.action == "copy":
            isz = t.base.itemsize
            jobs.append((t.base, c.start * isz, c.count * isz, slot.out))
        else:
            seg = c.segment
            srcs = [(0, t.base)] if (seg is None or seg.has_base) else []
            if seg is not None:
                srcs += [(1 + j, t.sources[j]) for j in seg.models]
            for row, info in srcs:
                isz = info.itemsize
                jobs.append((info, c.start * isz, c.count * isz, slot.inputs[row]))
        slot.in_nbytes = sum(j[2] for j in jobs)
        reader.read_rows(jobs, pool)

    def read_stage() -> None:
        try:
            with ThreadPoolExecutor(
                max_workers=4 * layout.rows, thread_name_prefix="sm-read"
            ) as pool:
                for item in work_items(plan, shards, layout):
                    if isinstance(item, Marker):
                        ready_q.put(item)
                        continue
                    slot = get(free_q)
                    t0 = time.perf_counter()
                    fill(pool, slot, *item)
                    busy["read_s"] += time.perf_counter() - t0
                    ready_q.put(slot)
            ready_q.put(None)
        except _Failed:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            errors.append(e)
            stop.set()

    def write_stage() -> None:
        staging = StagingBlock(layout.block_bytes)
        writer: ShardWriter | None = None
        try:
            while (item := get(done_q)) is not None:
                if isinstance(item, Marker):
                    name = item.shard.filename
                    t0 = time.perf_counter()
                    if item.kind == "open":
                        writer = ShardWriter(
                            output.shard_tmp_path(name),
                            item.shard.header,
                            item.shard.size_bytes,
                            staging,
                            direct_io,
                        )
                    else:
                        assert writer is not None
                        size, sha = writer.finish()
                        writer = None
                        output.commit_shard(name, size, sha)
                        results[name] = (size, sha)
                        stats["written"] += size
                    busy["write_s"] += time.perf_counter() - t0
                    continue
                assert writer is not None
                t0 = time.perf_counter()
                writer.write(memoryview(item.out)[: item.out_nbytes])
                busy["write_s"] += time.perf_counter() - t0
                stats["read"] += item.in_nbytes
                if on_bytes is not None:
                    on_bytes(item.in_nbytes)
                free_q.put(item)
        except _Failed:
            pass
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()
        finally:
            if writer is not None:
                writer.abort()
            staging.close()

    threads = [
        threading.Thread(target=read_stage, name="sm-reader", daemon=True),
        threading.Thread(target=write_stage, name="sm-writer", daemon=True),
    ]
    for th in threads:
        th.start()
    keys: dict[str, int] = {}
    inflight: deque = deque()  # (item, handle) in submission order
    try:
        while (item := get(ready_q)) is not None:
            handle = None
            if isinstance(item, Slot) and item.tensor.action != "copy":
                name = item.tensor.name
                if name not in keys:
                    keys[name] = tensor_key(plan.recipe.seed, name)
                t0 = time.perf_counter()
                handle = backend.submit(item, keys[name])
                busy["compute_s"] += time.perf_counter() - t0
            inflight.append((item, handle))
            while len(inflight) > backend.depth:
                done, handle = inflight.popleft()
                if handle is not None:
                    backend.wait(handle)
                done_q.put(done)
        while inflight:
            done, handle = inflight.popleft()
            if handle is not None:
                backend.wait(handle)
            done_q.put(done)
        done_q.put(None)
    except _Failed:
        pass
    except BaseException:
        stop.set()
        raise
    finally:
        for th in threads:
            while th.is_alive():
                th.join(timeout=0.1)
                if errors:
                    stop.set()
        reader.close()
    if errors:
        raise errors[0]
    return RunStats(stats["read"], stats["written"], results, busy)
