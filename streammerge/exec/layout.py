"""The slot ring's geometry and the work it walks: slots (``Slot``), the budget split
(``make_layout``: how many slots, how many rows each, staging blocks, histograms), the
stream of work items per tensor and pass (``work_items``, ``analysis_items``) and the
``Backend`` protocol the compute stage calls. ``streammerge.exec.pipeline`` runs them."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from streammerge.errors import MergeError
from streammerge.exec.ops import is_row_op, low_from_high, read_rows, row_len
from streammerge.exec.stats import HIGH_BINS, LOW_BINS, guess_slots
from streammerge.io.ranges import DIRECT_ALIGN, DIRECT_SLACK, align_up, anon_map
from streammerge.io.reader import DTYPE_ITEMSIZE
from streammerge.io.writer import BLOCK_BYTES
from streammerge.methods.registry import row_pass
from streammerge.plan.plan_types import Chunk, Plan, ShardPlan, TensorPlan, iter_chunks

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
    carved: object = None  # its bytes in a ``SlotArena``'s buffer (None: a fixed slot)


@dataclass(frozen=True)
class Marker:
    """A shard boundary passed down the queues in order with the slots."""

    kind: str  # "open" | "close"
    shard: ShardPlan


@dataclass(frozen=True)
class Item:
    """One pass over one chunk of one tensor (``first`` / ``last`` chunk of the pass;
    ``reads``: the passes planned over the tensor's chunks, a guessed window's second
    statistics pass and a pass a verdict may skip counted as not run and run: ``ReaderStage``
    keeps a tensor read three times or more in the page cache until it is done)."""

    tensor: TensorPlan
    chunk: Chunk
    op: str
    first: bool = False
    last: bool = False
    reads: int = 1


def page_aligned(shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array of ``shape`` on fresh page-aligned memory (``anon_map``), as O_DIRECT
    needs."""
    size = max(1, int(np.prod(shape)))
    return np.frombuffer(anon_map(align_up(size)), dtype=np.uint8)[:size].reshape(shape)


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
        """Largest chunk (elements) of ``t`` that fits the buffers: whole rows for a
        row-wise pass (``make_layout`` checks that one row fits)."""
        if t.action == "copy":
            return max(1, self.cap_out_bytes // DTYPE_ITEMSIZE[t.dtype])
        if t.action == "merge" and is_row_op(t.ops[0]):
            n = row_len(t)
            return max(n, self.chunk_elems // n * n)
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
    depth for a method with statistics passes (TIES' histograms, a row-wise method's
    passes): fewer, larger slots hold whole tensors, read once instead of once a pass.
    The writer's STAGING_BLOCKS blocks and the histograms come off the budget first.

    ``device_limit(rows, in_itemsize, out_itemsize) -> elems``, when given, caps the chunk
    too (the GPU backend's VRAM budget).

    Raises:
        MergeError: the budget is too small for even MIN_CHUNK_ELEMS elements.
    """
    rows = 1 + n_models
    in_size, out_size = 2, 2
    has_hist = multi_pass = False
    for t in plan.tensors:
        if t.action != "copy":
            srcs = [s for s in (t.base, *t.sources) if s is not None]
            in_size = max(in_size, *(s.itemsize for s in srcs))
            out_size = max(out_size, DTYPE_ITEMSIZE[t.dtype])
        has_hist = has_hist or "hist_high" in t.ops
        multi_pass = multi_pass or len(t.ops) > 1
    has_hist = has_hist or plan.model_scope
    n_slots = (N_SLOTS_STATS if has_hist or multi_pass else N_SLOTS) + depth
    sparsifier = plan.recipe.row.sparsifier
    hist = stats_bytes(n_models, threads or default_threads(), sparsifier) if has_hist else 0
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
    _check_rows_fit(plan, chunk, per_elem, slack + staging + hist)
    layout = Layout(rows, n_slots, chunk, chunk * in_size, chunk * out_size, block, hist,
                    outputs=outputs)  # fmt: skip
    layout.buffer_bytes = n_slots * layout.slot_bytes + staging + hist
    return layout


def _check_rows_fit(plan: Plan, chunk: int, per_elem: int, fixed: int) -> None:
    """Refuse a row-wise merge whose longest row does not fit a chunk.

    Raises:
        MergeError: names the tensor, its row length and the --memory that fits it.
    """
    rows = [(row_len(t), t.name) for t in plan.tensors
            if t.action == "merge" and is_row_op(t.ops[0])]  # fmt: skip
    if rows and max(rows)[0] > chunk:
        n, name = max(rows)
        raise MergeError(f"--memory holds chunks of {chunk} elements, but {name} has rows of "
                         f"{n} and a row-wise method reads whole rows", None, name,
                         f"give at least {(n * per_elem + fixed) / 2**20:.0f}MiB")  # fmt: skip


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
    counts, ``--plan``) the window is taken to hit. A tensor whose low histograms follow
    from its high ones (``ops.low_from_high``: working dtype bf16) never misses, and the
    reader does not wait for the verdict.
    """
    if layout.holds(t):
        seg = t.segments[0]
        yield Item(t, Chunk(seg.start, seg.stop - seg.start, seg), "held")
        return
    if is_row_op(t.ops[-1]):  # a row-wise method: one read when one chunk holds the tensor
        yield from _row_items(t, layout, decide)
        return
    if "hist_high" in t.ops:
        chunks = list(_stats_chunks(t, layout))
        for i, c in enumerate(chunks):
            yield Item(t, c, "hist_guess", first=i == 0, last=i == len(chunks) - 1, reads=2)
        if chunks and decide is not None and not low_from_high(t) and not decide(t):
            for c in chunks:
                yield Item(t, c, "hist_low", reads=2)
        for c in iter_chunks(t, layout.max_elems(t)):
            yield Item(t, c, "merge", reads=2 if chunks else 1)
        return
    for op in t.ops:
        for c in iter_chunks(t, layout.max_elems(t)):
            yield Item(t, c, op, reads=len(t.ops))


def _row_items(t: TensorPlan, layout: Layout, decide=None) -> Iterator[Item]:
    """A row-wise method's items: its writing pass alone when the tensor fits one chunk
    (the compute stage runs the statistics passes on the same slot first), else each
    statistics pass over every chunk, then the writing pass over them again (docs/SPEC.md
    "SLERP (v3)" "Tensor statistics"). A pass that may go idle (``RowPass.live``) is
    read only when ``decide(t, op)`` (the compute stage's verdict, waited for) says it is
    live; without ``decide`` (byte counts, ``--plan``) every pass is read."""
    chunks = list(iter_chunks(t, layout.max_elems(t)))
    ops = t.ops[-1:] if len(chunks) <= 1 else t.ops
    for k, op in enumerate(ops):
        if k and decide is not None and row_pass(op).live is not None and not decide(t, op):
            continue
        for i, c in enumerate(chunks):
            yield Item(t, c, op, first=i == 0, last=i == len(chunks) - 1, reads=len(ops))


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
    """trim_scope model: both histogram passes over every merged tensor of the model, or
    only ``hist_high`` when every tensor's low histograms follow from it
    (``ops.low_from_high``)."""
    merged = [t for t in plan.tensors if t.action == "merge"]
    ops = ("hist_high",) if all(low_from_high(t) for t in merged) else ("hist_high", "hist_low")
    for op in ops:
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
