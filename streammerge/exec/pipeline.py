"""Execute a plan: read, run each chunk's passes and write, with the three stages overlapped.

Three stages share a fixed ring of buffer slots, allocated once and reused (first writes to
fresh pages ran at ~0.7 GiB/s on the reference machine, to reused pages ~5 GiB/s):

    reader thread  --ready-->  compute (caller's thread)  --done-->  writer thread
         ^                          |                                     |
         +---- free slots ----------+ (statistics passes) <---------------+

File reads (``os.preadv``), the kernels (numba ``nogil``) and file writes all release the
GIL, so reading chunk k+1, computing chunk k and writing chunk k-1 run at once.

Each tensor's passes come from the plan (``TensorPlan.ops``, from the method table). A
method with a statistics pass (TIES, breadcrumbs) needs its thresholds before the
elementwise pass: a tensor whose inputs fit one slot is read once and every pass runs on
the held slot ("held"); a larger one (a 128256 x 8192 embedding) is read twice: for its
high histograms and the low histograms of a bucket window guessed from its first chunk,
then to merge (a third read, for the low histograms, only when the guess missed).
Such methods get fewer, larger slots (``make_layout``), so most tensors are held. With
``trim_scope: model`` the thresholds of the whole model come first (``analyze``).

Memory: every buffer is counted against the budget (slots, the writer's staging blocks,
the histograms); ``RunStats.buffer_bytes`` reports what was really allocated.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from streammerge.errors import MergeError
from streammerge.exec.ops import convert_args, hist_args, merge_args, read_rows
from streammerge.output.outdir import OutputDir
from streammerge.plan.planner import Chunk, Plan, Segment, ShardPlan, TensorPlan, iter_chunks
from streammerge.io.reader import DIRECT_ALIGN, DIRECT_SLACK, DTYPE_ITEMSIZE, RangeReader, align_up
from streammerge.io.remote import RemoteFile, read_jobs
from streammerge.exec.stats import HIGH_BINS, LOW_BINS, ThresholdStats, guess_slots, windows
from streammerge.io.writer import BLOCK_BYTES, ShardWriter, StagingBlock

#: Host slots besides those a backend keeps in flight: one read, one merged, one written.
N_SLOTS = 6
#: Slots for methods with a statistics pass: one being read, one being computed and
#: written (the writer copies a slot into its staging blocks and frees it at once), so each
#: slot can hold a whole tensor: at 256 MiB a 5632 x 2048 bf16 MLP matrix of three inputs.
N_SLOTS_STATS = 2
#: Smallest useful chunk (elements); below it per-call overhead dominates.
MIN_CHUNK_ELEMS = 4096
#: Writer staging blocks (``StagingBlock``: one filled while the other is written).
STAGING_BLOCKS = 2


@dataclass
class Slot:
    """One set of reusable buffers and the work item it currently carries.

    Attributes:
        inputs: uint8 [R, row_bytes]; row 0 the base, row 1 + j fine-tune j (``ops``).
        out: uint8 [out_row_bytes]; the merged (or copied) bytes to write.
        outs: the K output buffers of a sweep (``outs[0] is out``); copies and conversions
            fill ``out`` only, the same bytes for every output.
        op: the pass this slot carries: ``copy``, ``convert``, ``merge``, ``hist_high``,
            ``hist_low`` or ``held`` (every pass of a held tensor).
    """

    inputs: np.ndarray
    out: np.ndarray
    tensor: TensorPlan | None = None
    chunk: Chunk | None = None
    op: str = ""
    out_nbytes: int = 0
    in_nbytes: int = 0
    outs: list = field(default_factory=list)
    first: bool = False
    last: bool = False
    offsets: list | None = None  # row -> byte offset of its data (a backend that takes_offsets)
    fill: int = 0  # how many times the reader has filled this slot (a device backend's key)


@dataclass(frozen=True)
class Marker:
    """A shard boundary passed down the queues in order with the slots."""

    kind: str  # "open" | "close"
    shard: ShardPlan


@dataclass(frozen=True)
class Item:
    """One pass over one chunk of one tensor (``first`` / ``last`` chunk of the pass)."""

    tensor: TensorPlan
    chunk: Chunk
    op: str
    first: bool = False
    last: bool = False


def page_aligned(shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array of ``shape`` on fresh page-aligned memory (anonymous mmap), as O_DIRECT
    needs."""
    size = max(1, int(np.prod(shape)))
    return np.frombuffer(mmap.mmap(-1, align_up(size)), dtype=np.uint8)[:size].reshape(shape)


def mapped_bytes(a: np.ndarray) -> int:
    """Bytes really allocated under ``a``: the length of the mmap (or buffer) it views, for
    the budget check (``page_aligned`` rounds up to pages; pinned buffers may be larger)."""
    obj = a
    while isinstance(obj, np.ndarray) and obj.base is not None:
        obj = obj.base
    if isinstance(obj, memoryview):
        obj = obj.obj
    if isinstance(obj, mmap.mmap):
        return len(obj)
    return obj.nbytes if isinstance(obj, np.ndarray) else a.nbytes


def kernel_scratch_per_model(sparsifier: str) -> int:
    """Scratch of the numba histogram kernels per thread and fine-tune (``kernels/cpu_stats``):
    the larger of hist_high's 4 uint32 lanes of the high histogram and hist_low's 2 uint32
    lanes of each low histogram it counts (``guess_slots`` of them in a guessing read)."""
    return max(4 * HIGH_BINS * 4, max(2, guess_slots(sparsifier)) * 2 * LOW_BINS * 4)


def stats_bytes(n_models: int, threads: int, sparsifier: str = "breadcrumbs") -> int:
    """Histogram bytes of a statistics pass: the population's int64 counts
    (``ThresholdStats``: high, two low, the guessed window's lows) plus the kernels'
    partial histograms, one set per thread."""
    counts = (HIGH_BINS + (2 + guess_slots(sparsifier)) * LOW_BINS) * 8
    return n_models * (counts + threads * kernel_scratch_per_model(sparsifier))


@dataclass
class Layout:
    """Buffer sizes derived from the memory budget.

    Attributes:
        rows: R = 1 + number of fine-tunes.
        slots: host slots (besides none: this includes the backend's in-flight depth).
        chunk_elems: elements per chunk (a held tensor has at most this many).
        cap_in_bytes: bytes per input row; cap_out_bytes: bytes of the output buffer.
        block_bytes: one writer staging block (STAGING_BLOCKS of them).
        stats_bytes: histogram bytes (0 for methods without a statistics pass).
        buffer_bytes: slots + staging blocks + histograms: what the run allocates.
        outputs: K output buffers per slot (and K writers): a sweep writes K merges of
            the same inputs at once.
    """

    rows: int
    slots: int
    chunk_elems: int
    cap_in_bytes: int
    cap_out_bytes: int
    block_bytes: int
    stats_bytes: int = 0
    buffer_bytes: int = field(default=0)
    outputs: int = 1

    @property
    def row_bytes(self) -> int:
        """Stride of an input row: capacity + O_DIRECT slack, a multiple of DIRECT_ALIGN, so
        every row of a page-aligned slot starts page-aligned."""
        return align_up(self.cap_in_bytes + DIRECT_SLACK)

    @property
    def out_row_bytes(self) -> int:
        """Length of the output buffer: capacity + O_DIRECT slack (copies read into it)."""
        return align_up(self.cap_out_bytes + DIRECT_SLACK)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot."""
        return self.rows * self.row_bytes + self.outputs * self.out_row_bytes

    def max_elems(self, t: TensorPlan) -> int:
        """Largest chunk (elements) of ``t`` that fits the buffers."""
        if t.action == "copy":
            return max(1, self.cap_out_bytes // DTYPE_ITEMSIZE[t.dtype])
        return self.chunk_elems

    def holds(self, t: TensorPlan) -> bool:
        """True when ``t`` has statistics passes and fits one slot: read once, all passes
        run on the held slot."""
        return "hist_high" in t.ops and len(t.segments) == 1 and t.numel <= self.chunk_elems


def default_threads() -> int:
    """Compute threads when none are given: the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_layout(
    plan: Plan,
    n_models: int,
    memory_bytes: int,
    depth: int = 0,
    device_limit=None,
    threads: int | None = None,
    outputs: int = 1,
) -> Layout:
    """Size the buffers so that all of them fit ``memory_bytes``.

    ``outputs``: K outputs written at once (a sweep): K output buffers per slot and K
    writers' staging blocks share the same budget.

    Each chunk element needs one input element per row (at the widest float itemsize in the
    plan) and one output element, in each slot: N_SLOTS + depth slots, or N_SLOTS_STATS +
    depth for a method with a statistics pass (fewer, larger slots hold whole tensors).
    The writer's STAGING_BLOCKS blocks and the histograms come off the budget first.

    ``device_limit(rows, in_itemsize, out_itemsize) -> elems``, when given, caps the chunk
    too (the GPU backend's VRAM budget).

    Raises:
        MergeError: the budget is too small for even MIN_CHUNK_ELEMS elements.
    """
    rows = 1 + n_models
    in_size, out_size = 2, 2
    has_stats = False
    for t in plan.tensors:
        if t.action != "copy":
            srcs = [s for s in (t.base, *t.sources) if s is not None]
            in_size = max(in_size, *(s.itemsize for s in srcs))
            out_size = max(out_size, DTYPE_ITEMSIZE[t.dtype])
        has_stats = has_stats or "hist_high" in t.ops
    has_stats = has_stats or plan.model_scope
    n_slots = (N_SLOTS_STATS if has_stats else N_SLOTS) + depth
    sparsifier = plan.recipe.row.sparsifier
    hist = stats_bytes(n_models, threads or default_threads(), sparsifier) if has_stats else 0
    per_elem = n_slots * (rows * in_size + outputs * out_size)
    slack = n_slots * (rows + outputs) * (DIRECT_SLACK + DIRECT_ALIGN)  # row rounding, slack
    block = align_up(min(BLOCK_BYTES, max(2**18, memory_bytes // (32 * outputs))))
    staging = outputs * STAGING_BLOCKS * block  # each writer's staging blocks
    room = memory_bytes - slack - staging - hist
    chunk = max(0, room) // per_elem
    if device_limit is not None:
        chunk = min(chunk, device_limit(rows, in_size, out_size))
    chunk -= chunk % 1024
    if chunk < MIN_CHUNK_ELEMS:
        need = MIN_CHUNK_ELEMS * per_elem + slack + staging + hist
        raise MergeError(
            f"--memory {memory_bytes / 2**20:.1f}MiB is too small for these buffers",
            None,
            None,
            f"give at least {need / 2**20:.0f}MiB",
        )
    layout = Layout(rows, n_slots, chunk, chunk * in_size, chunk * out_size, block, hist,
                    outputs=outputs)  # fmt: skip
    layout.buffer_bytes = n_slots * layout.slot_bytes + staging + hist
    return layout


def _stats_chunks(t: TensorPlan, layout: Layout) -> Iterator[Chunk]:
    """Chunks of ``t`` a statistics pass reads: the segments the base has (the population)."""
    for c in iter_chunks(t, layout.max_elems(t)):
        if c.segment.has_base:
            yield c


def tensor_items(t: TensorPlan, layout: Layout, decide=None) -> Iterator[Item]:
    """The passes over ``t`` in order (held: one item for all passes).

    A tensor with statistics that does not fit a slot is read for ``hist_guess`` (high
    histograms, plus the low histograms of a window of buckets guessed from its first
    chunk), then, when ``decide(t)`` (the compute stage's verdict, waited for) says the
    window missed, once more for ``hist_low``, then for ``merge``. Without ``decide`` (byte
    counts, ``--plan``) the window is taken to hit.
    """
    if layout.holds(t):
        seg = t.segments[0]
        yield Item(t, Chunk(seg.start, seg.stop - seg.start, seg), "held")
        return
    if "hist_high" in t.ops:
        chunks = list(_stats_chunks(t, layout))
        for i, c in enumerate(chunks):
            yield Item(t, c, "hist_guess", first=i == 0, last=i == len(chunks) - 1)
        if chunks and decide is not None and not decide(t):
            for c in chunks:
                yield Item(t, c, "hist_low")
        for c in iter_chunks(t, layout.max_elems(t)):
            yield Item(t, c, "merge")
        return
    for op in t.ops:
        for c in iter_chunks(t, layout.max_elems(t)):
            yield Item(t, c, op)


def population(t: TensorPlan, n_models: int) -> list[int]:
    """Elements of each fine-tune's task vector in ``t``'s statistics: the rows the base
    has and the fine-tune has (docs/SPEC.md "Magnitudes and thresholds")."""
    return [
        sum(s.stop - s.start for s in t.segments if s.has_base and j in s.models)
        for j in range(n_models)
    ]


def work_items(
    plan: Plan, shards: list[ShardPlan], layout: Layout, decide=None
) -> Iterator[Item | Marker]:
    """Shard markers and items in output file order (``decide``: see ``tensor_items``)."""
    for shard in shards:
        yield Marker("open", shard)
        for t in shard.tensors:
            yield from tensor_items(t, layout, decide)
        yield Marker("close", shard)


def analysis_items(plan: Plan, layout: Layout) -> Iterator[Item]:
    """trim_scope model: both histogram passes over every merged tensor of the model."""
    merged = [t for t in plan.tensors if t.action == "merge"]
    for op in ("hist_high", "hist_low"):
        for t in merged:
            for c in _stats_chunks(t, layout):
                yield Item(t, c, op)


def _item_read_bytes(item: Item) -> int:
    t, c = item.tensor, item.chunk
    if item.op == "copy" or item.op == "convert":
        return c.count * t.base.itemsize
    return sum(c.count * info.itemsize for _, info in read_rows(t, c.segment))


def read_bytes(items: Iterable[Item | Marker]) -> int:
    """Input bytes the items read (statistics passes of tensors not held count each time)."""
    return sum(_item_read_bytes(i) for i in items if isinstance(i, Item))


class Backend(Protocol):
    """Where chunks are computed.

    ``run(op, slot, args, **kw)`` looks the pass up in the backend's kernel table and
    starts it (``merge``, ``convert``: into ``slot.out``; ``hist_high`` / ``hist_low``:
    accumulating into ``kw["hist"]``, synchronously) and returns a handle; ``wait`` blocks
    until that pass's bytes are in ``slot.out``. Up to ``depth`` slots may be in flight
    before the oldest is waited on (0: ``run`` finishes the work). ``alloc`` makes the slot
    buffers (pinned host memory for a GPU).

    Optional (a device backend, ``streammerge.exec.gpu.DeviceBackend``): ``start(layout)`` and
    ``prewarm(plan)`` before the first read, ``close()`` after the last wait or on error
    (drains the device), ``run_sweep(slot, passes)`` (a sweep's K merges of one slot, its
    inputs sent once), ``takes_offsets`` (rows arrive at ``slot.offsets``, not memmoved to
    0) and ``busy`` (seconds for ``--profile``)."""

    depth: int

    def alloc(self, shape: tuple[int, ...]) -> np.ndarray: ...

    def run(self, op: str, slot: Slot, args, **kw) -> object: ...

    def wait(self, handle: object) -> None: ...


@dataclass
class RunStats:
    """What ``run`` did: bytes, shard digests, thresholds, buffers, busy seconds per stage
    (``read_s``: preadv into slots, ``compute_s``: kernels, ``write_s``: staging copy,
    sha256, O_DIRECT writes, fsync).

    Attributes:
        thresholds: tensor name -> recorded thresholds of each fine-tune (statistics
            methods), for the tensors this run computed.
        buffer_bytes: bytes of the buffers really allocated (slots, staging, histograms).
        moved_bytes: bytes memmoved into place after O_DIRECT reads (0 on a GPU backend,
            which copies each row to the device from where it landed).
    """

    bytes_read: int
    bytes_written: int
    shards: dict[str, tuple[int, str]]
    busy_s: dict[str, float]
    thresholds: dict[str, list] = field(default_factory=dict)
    buffer_bytes: int = 0
    moved_bytes: int = 0


class _Failed(Exception):
    pass


class _Thresholds:
    """The compute stage's statistics: per-tensor histograms as their passes stream by, or
    the whole model's thresholds (trim_scope model), and the keep windows they give."""

    def __init__(self, plan: Plan, model_thresholds: list | None) -> None:
        self.sparsifier = plan.recipe.row.sparsifier
        self.model = model_thresholds
        self.model_windows = (
            None if model_thresholds is None else windows(self.sparsifier, model_thresholds)
        )
        self.active: dict[str, ThresholdStats] = {}
        self.windows: dict[str, list] = {}
        self.recorded: dict[str, list] = {}
        self.peak_bytes = 0

    def stats(self, t: TensorPlan) -> ThresholdStats:
        st = self.active.get(t.name)
        if st is None:
            st = self.active[t.name] = ThresholdStats(
                self.sparsifier, t.params.density, t.params.gamma
            )
            self.peak_bytes = max(self.peak_bytes, sum(s.nbytes for s in self.active.values()))
        return st

    def window(self, t: TensorPlan) -> list | None:
        if "hist_high" not in t.ops:
            return self.model_windows
        if t.name not in self.windows:
            st = self.active.pop(t.name)
            th = st.thresholds()
            self.recorded[t.name] = th
            self.windows = {t.name: windows(self.sparsifier, th)}  # one tensor at a time
        return self.windows[t.name]


def accumulate(
    backend: Backend, slot: Slot, st: ThresholdStats, op: str, seg: Segment, guess: bool = False
) -> None:
    """Run one histogram pass over the slot into ``st`` (only the segment's fine-tunes):
    ``hist_high``, or ``hist_low`` of the exact buckets, or with ``guess`` of the guessed
    window's buckets into ``st.low_window``."""
    args = hist_args(slot.tensor, slot.chunk)
    idx = list(seg.models)
    whole = idx == list(range(st.high.shape[0]))
    if op == "hist_high":
        counts, buckets = st.high, None
    elif guess:
        counts, buckets = st.low_window, st.window_buckets
    else:
        counts, buckets = st.low, st.buckets()
    hist = counts if whole else np.zeros_like(counts[idx])  # kernels add into ``hist``
    if buckets is None:
        backend.run(op, slot, args, hist=hist)
    else:
        backend.run(op, slot, args, hist=hist, buckets=np.ascontiguousarray(buckets[idx]))
    if not whole:
        counts[idx] += hist


def _stream(plan: Plan, items, outputs: list[OutputDir], layout: Layout, backend: Backend,
            *args, **kwargs) -> list[RunStats]:  # fmt: skip
    """``_stream_body`` between the backend's ``start(layout)`` and ``prewarm(plan)``
    (device buffers, kernel variants compiled: before the first read) and its ``close()``
    (every queued copy and kernel drained before any buffer is freed: on success, on error,
    on Ctrl-C)."""
    start, close = getattr(backend, "start", None), getattr(backend, "close", None)
    prewarm = getattr(backend, "prewarm", None)
    try:
        if start is not None:
            start(layout)
        if prewarm is not None:  # compile the plan's kernel variants before the first read
            prewarm(plan)
        result = _stream_body(plan, items, outputs, layout, backend, *args, **kwargs)
    except BaseException:
        if close is not None:
            with contextlib.suppress(Exception):  # the first error is the one to report
                close()
        raise
    if close is not None:
        close()
    return result


def _stream_body(
    plan: Plan,
    items: Callable[[Callable | None], Iterable[Item | Marker]],
    outputs: list[OutputDir],
    layout: Layout,
    backend: Backend,
    on_bytes: Callable[[int], None] | None,
    direct_io: bool,
    thresholds: _Thresholds,
    variants: list[Plan] | None = None,
) -> list[RunStats]:
    """The streaming core: ``items(decide)`` read once into the slots, each output k's
    elementwise pass with ``variants[k]``'s parameters (a sweep; default: ``plan`` alone),
    written to ``outputs[k]``. No outputs: statistics only (``analyze``). ``decide`` lets
    the reader wait for the compute stage's verdict on a guessed threshold window."""
    variants = variants or [plan]
    by_name = [{t.name: t for t in v.tensors} for v in variants]
    slots = []
    for _ in range(layout.slots):
        outs = [backend.alloc((layout.out_row_bytes,)) for _ in range(max(1, len(outputs)))]
        slots.append(Slot(backend.alloc((layout.rows, layout.row_bytes)), outs[0], outs=outs))
    free_q: queue.Queue = queue.Queue()
    ready_q: queue.Queue = queue.Queue()
    done_q: queue.Queue = queue.Queue()
    for s in slots:
        free_q.put(s)
    stop = threading.Event()
    errors: list[BaseException] = []
    hasher = getattr(outputs[0], "input_hasher", None) if outputs else None
    for o in outputs[1:]:  # a sweep: every output records the same inputs' hashes
        o.input_hasher = hasher
    reader = RangeReader(direct=direct_io, hasher=hasher)
    offsets_ok = getattr(backend, "takes_offsets", False)
    stats = {"read": 0, "staging": 0}
    written = [0] * len(outputs)
    busy = {"read_s": 0.0, "compute_s": 0.0, "write_s": 0.0}  # seconds each stage worked
    results: list[dict[str, tuple[int, str]]] = [{} for _ in outputs]
    meta: dict[str, dict] = {}  # shard -> journal extras (thresholds of its tensors)

    def get(q: queue.Queue):
        while True:
            if stop.is_set():
                raise _Failed
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    verdicts: dict[str, list] = {}  # tensor -> [Event, window hit]
    verdict_lock = threading.Lock()

    def verdict(name: str) -> list:
        with verdict_lock:
            return verdicts.setdefault(name, [threading.Event(), None])

    def decide(t: TensorPlan) -> bool:
        v = verdict(t.name)
        while not v[0].wait(0.1):
            if stop.is_set():
                raise _Failed
        return v[1]

    def fill(pool: ThreadPoolExecutor, slot: Slot, item: Item) -> None:
        t, c = item.tensor, item.chunk
        slot.tensor, slot.chunk, slot.op = t, c, item.op
        slot.first, slot.last = item.first, item.last
        slot.out_nbytes = c.count * DTYPE_ITEMSIZE[t.dtype]
        slot.offsets = None
        slot.fill += 1
        if item.op == "copy":
            isz = t.base.itemsize
            jobs = [(t.base, c.start * isz, c.count * isz, slot.out)]
            rows = [-1]
        else:
            pairs = read_rows(t, c.segment)
            rows = [row for row, _ in pairs]
            jobs = [
                (info, c.start * info.itemsize, c.count * info.itemsize, slot.inputs[row])
                for row, info in pairs
            ]
        slot.in_nbytes = sum(j[2] for j in jobs)
        remote = [j for j in jobs if isinstance(j[0].file, RemoteFile)]
        if remote:  # inputs by URL: ranged reads (streammerge.io.remote), fingerprinted too
            read_jobs(remote, pool)
            reader.hash_ranges(remote, pool)
        local = [(r, j) for r, j in zip(rows, jobs) if not isinstance(j[0].file, RemoteFile)]
        # A GPU backend copies each row from where its O_DIRECT read landed: no memmove.
        in_place = not offsets_ok or item.op in ("copy", "convert")
        deltas = reader.read_rows([j for _, j in local], pool, in_place=in_place)
        if not in_place:
            slot.offsets = [0] * layout.rows
            for (r, _), d in zip(local, deltas):
                slot.offsets[r] = d

    def read_stage() -> None:
        try:
            with ThreadPoolExecutor(
                max_workers=4 * layout.rows, thread_name_prefix="sm-read"
            ) as pool:
                for item in items(decide):
                    if isinstance(item, Marker):
                        ready_q.put(item)
                        continue
                    slot = get(free_q)
                    t0 = time.perf_counter()
                    fill(pool, slot, item)
                    busy["read_s"] += time.perf_counter() - t0
                    ready_q.put(slot)
            ready_q.put(None)
        except _Failed:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            errors.append(e)
            stop.set()

    def write_stage() -> None:
        stagings = [StagingBlock(layout.block_bytes, STAGING_BLOCKS) for _ in outputs]
        stats["staging"] = sum(len(m) for st in stagings for m in st.mems)
        writers: list[ShardWriter | None] = [None] * len(outputs)
        try:
            while (item := get(done_q)) is not None:
                t0 = time.perf_counter()
                if isinstance(item, Marker):
                    name = item.shard.filename
                    for k, output in enumerate(outputs):
                        if item.kind == "open":
                            writers[k] = ShardWriter(
                                output.shard_tmp_path(name),
                                item.shard.header,
                                item.shard.size_bytes,
                                stagings[k],
                                direct_io,
                            )
                        else:
                            size, sha = writers[k].finish()
                            writers[k] = None
                            output.commit_shard(name, size, sha, meta.get(name))
                            results[k][name] = (size, sha)
                            written[k] += size
                    busy["write_s"] += time.perf_counter() - t0
                    continue
                merged = item.op in ("merge", "held")
                for k, writer in enumerate(writers):
                    buf = item.outs[k] if merged else item.out
                    writer.write(memoryview(buf)[: item.out_nbytes])
                busy["write_s"] += time.perf_counter() - t0
                free_q.put(item)
        except _Failed:
            pass
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()
        finally:
            for writer in writers:
                if writer is not None:
                    writer.abort()
            for st in stagings:
                st.close()

    def compute(slot: Slot):
        """Run the slot's passes; returns (handle, goes_to_writer)."""
        t, op = slot.tensor, slot.op
        if op == "copy":
            return None, True
        if op == "convert":
            return backend.run(op, slot, convert_args(t, slot.chunk)), True
        if op in ("hist_high", "hist_low"):
            accumulate(backend, slot, thresholds.stats(t), op, slot.chunk.segment)
            return None, False
        if op == "hist_guess":
            st = thresholds.stats(t)
            accumulate(backend, slot, st, "hist_high", slot.chunk.segment)
            if slot.first:
                st.guess_window(population(t, plan.recipe.n_models))
            accumulate(backend, slot, st, "hist_low", slot.chunk.segment, guess=True)
            if slot.last:
                v = verdict(t.name)
                v[1] = st.resolve_window()
                v[0].set()
            return None, False
        if op == "held":
            st = thresholds.stats(t)
            accumulate(backend, slot, st, "hist_high", slot.chunk.segment)
            accumulate(backend, slot, st, "hist_low", slot.chunk.segment)
        win = thresholds.window(t) if plan.recipe.row.sparse.stats else None
        if len(variants) == 1:
            return backend.run("merge", slot, merge_args(plan.recipe.row, t, slot.chunk, win)), True
        passes = []
        for k, names in enumerate(by_name):  # a sweep: one pass per output, same inputs
            tk = names[t.name]  # the same tensor with this output's weights
            c = slot.chunk
            ck = Chunk(c.start, c.count, tk.segments[t.segments.index(c.segment)])
            view = Slot(slot.inputs, slot.outs[k], tk, ck, slot.op, slot.out_nbytes,
                        offsets=slot.offsets)  # fmt: skip
            passes.append((view, merge_args(plan.recipe.row, tk, ck, win)))
        if hasattr(backend, "run_sweep"):  # a device backend: the inputs go over once
            return _Handles([backend.run_sweep(slot, passes)]), True
        return _Handles([backend.run("merge", v, a) for v, a in passes]), True

    threads = [threading.Thread(target=read_stage, name="sm-reader", daemon=True)]
    if outputs:
        threads.append(threading.Thread(target=write_stage, name="sm-writer", daemon=True))
    for th in threads:
        th.start()
    inflight: deque = deque()  # (item, handle) in submission order

    def retire(done, handle) -> None:
        for h in handle.handles if isinstance(handle, _Handles) else (handle,):
            if h is not None:
                backend.wait(h)
        done_q.put(done)

    try:
        while (item := get(ready_q)) is not None:
            handle, to_writer = None, True
            if isinstance(item, Marker):
                if item.kind == "close":
                    th = {
                        t.name: thresholds.recorded[t.name]
                        for t in item.shard.tensors
                        if t.name in thresholds.recorded
                    }
                    if th:
                        meta[item.shard.filename] = {"thresholds": th}
            else:
                t0 = time.perf_counter()
                handle, to_writer = compute(item)
                busy["compute_s"] += time.perf_counter() - t0
                stats["read"] += item.in_nbytes
                if on_bytes is not None:
                    on_bytes(item.in_nbytes)
                if not to_writer:
                    free_q.put(item)
                    continue
            inflight.append((item, handle))
            while len(inflight) > backend.depth:
                retire(*inflight.popleft())
        while inflight:
            retire(*inflight.popleft())
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
    busy.update(getattr(backend, "busy", {}))  # a device backend: streams and waits
    allocated = sum(mapped_bytes(s.inputs) + sum(map(mapped_bytes, s.outs)) for s in slots)
    allocated += stats["staging"] + (layout.stats_bytes if thresholds.peak_bytes else 0)
    moved = reader.moved_bytes
    if not outputs:  # statistics only
        return [RunStats(stats["read"], 0, {}, busy, thresholds.recorded, allocated, moved)]
    return [
        RunStats(stats["read"], written[k], results[k], busy, thresholds.recorded, allocated, moved)
        for k in range(len(outputs))
    ]


@dataclass(frozen=True)
class _Handles:
    """The handles of one slot's passes for every output of a sweep."""

    handles: list


def run(
    plan: Plan,
    shards: list[ShardPlan],
    output: OutputDir,
    layout: Layout,
    backend: Backend,
    on_bytes: Callable[[int], None] | None = None,
    direct_io: bool = True,
    model_thresholds: list | None = None,
) -> RunStats:
    """Stream ``shards`` of ``plan`` into ``output``.

    Args:
        plan: the merge plan.
        shards: the shards still to write (all of them unless resuming).
        output: the open output transaction (staging dir, journal).
        layout: buffer sizes (``make_layout``).
        backend: runs the passes (``streammerge.exec.backends``, ``streammerge.exec.gpu``).
        on_bytes: called with input bytes done since the last call.
        direct_io: read inputs and write shards with O_DIRECT where allowed.
        model_thresholds: trim_scope model: the whole model's thresholds (``analyze``).

    Returns:
        RunStats: bytes read and written, shard name -> (size, sha256), the thresholds of
        the tensors it merged, the buffers it allocated, and the seconds each stage was busy.

    Raises:
        MergeError / OSError: from any stage; the other stages stop, partial shards are
            deleted, finished ones stay in the journal (with their thresholds) for --resume.
    """
    return _stream(
        plan,
        lambda decide: work_items(plan, shards, layout, decide),
        [output],
        layout,
        backend,
        on_bytes,
        direct_io,
        _Thresholds(plan, model_thresholds),
    )[0]


def run_many(
    plans: list[Plan],
    outputs: list[OutputDir],
    layout: Layout,
    backend: Backend,
    on_bytes: Callable[[int], None] | None = None,
    direct_io: bool = True,
    model_thresholds: list | None = None,
) -> list[RunStats]:
    """A sweep: K plans that differ only in their weights, written to K outputs from one
    read of the inputs. Statistics (thresholds) and masks do not depend on the weights, so
    they are shared; each output gets its own elementwise pass. ``layout`` must have
    ``outputs == K``.

    Returns:
        one RunStats per output (bytes_read is the one shared read).
    """
    if layout.outputs != len(plans) or len(outputs) != len(plans):
        raise ValueError("run_many needs one plan and one output per layout output")
    plan = plans[0]
    return _stream(
        plan,
        lambda decide: work_items(plan, list(plan.shards), layout, decide),
        outputs,
        layout,
        backend,
        on_bytes,
        direct_io,
        _Thresholds(plan, model_thresholds),
        plans,
    )


def analyze(
    plan: Plan,
    layout: Layout,
    backend: Backend,
    on_bytes: Callable[[int], None] | None = None,
    direct_io: bool = True,
) -> tuple[list, RunStats]:
    """trim_scope model: the thresholds of every fine-tune over every merged tensor (the
    TIES and M3 papers' global trim) in the same bounded buffers: both histogram passes
    stream the whole model, nothing is written.

    Returns:
        (thresholds per fine-tune in the recorded form, RunStats of the two passes).
    """
    th = _Thresholds(plan, None)
    first = next((t for t in plan.tensors if t.action == "merge"), None)
    if first is None:
        return [[] for _ in range(plan.recipe.n_models)], RunStats(0, 0, {}, {})
    shared = th.stats(first)  # one population: every tensor feeds the same histograms
    th.stats = lambda t: shared  # type: ignore[method-assign]
    stats = _stream(plan, lambda decide: analysis_items(plan, layout), [], layout, backend,
                    on_bytes, direct_io, th)[0]  # fmt: skip
    return shared.thresholds(), stats
