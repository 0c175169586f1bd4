"""The three stages of ``pipeline._stream_body``: a reader thread fills slots, the compute
stage (the caller's thread) runs their passes, a writer thread writes them out.

They share a ``Stream``: the three queues the slots go round (free -> ready -> done -> free),
the stop flag and the stages' errors, the busy seconds of each stage, the verdicts on
guessed threshold windows (the compute stage's answer the reader waits for) and the
journal extras of each shard (compute -> writer).

Errors: a thread records its error in ``Stream.errors`` (the first one is the one reported)
and sets ``Stream.stop``; every stage waiting on the stream then leaves with ``StageFailed``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from streammerge.exec.arena import SlotArena
from streammerge.exec.layout import STAGING_BLOCKS, Backend, Item, Layout, Marker, Slot, population
from streammerge.exec.ops import convert_args, is_row_op, merge_args, read_rows, row_args
from streammerge.exec.reread import RereadCache
from streammerge.exec.thresholds import TensorThresholds, accumulate
from streammerge.io.lora_delta import AdaptedTensorInfo, adapt_jobs
from streammerge.io.ranges import RangeReader
from streammerge.io.reader import DTYPE_ITEMSIZE
from streammerge.io.remote import RemoteFile, read_jobs
from streammerge.io.writer import ShardWriter, StagingBlock
from streammerge.methods.registry import row_pass
from streammerge.output.outdir import OutputDir
from streammerge.plan.plan_types import Chunk, Plan, TensorPlan


class StageFailed(Exception):
    """Raised in a stage waiting on the stream once ``stop`` is set: another stage failed,
    and its error is the one reported."""


def _no_busy() -> dict[str, float]:
    return {"read_s": 0.0, "compute_s": 0.0, "write_s": 0.0}


def thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds (user + sys) thread ``native_id`` of this process has run so far
    (``/proc/self/task/ID/schedstat``; 0.0 where there is none)."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Stream:
    """What the three stages share.

    Attributes:
        free_q: slots free to be filled (the reader takes them; compute and writer return them)
            where the slots are fixed; arena: the ``SlotArena`` the slots are carved from
            instead (``take_slot`` / ``give_slot`` hide which).
        ready_q: filled slots and shard markers in file order, then None (reader -> compute).
        done_q: computed slots and shard markers, then None (compute -> writer).
        stop: set once a stage failed: the others leave at their next wait.
        errors: the reader's and writer's errors, the first one first (the one reported).
        busy: seconds each stage worked (``read_s``, ``compute_s``, ``write_s``), and the
            CPU seconds of the reader's and writer's threads (``read_cpu_s``: the reader and
            its pool of read threads; ``write_cpu_s``) and of the compute thread's
            statistics passes and other passes (``stats_thread_cpu_s``,
            ``compute_thread_cpu_s``; numba's worker threads are the pipeline's, see
            ``pipeline._stream_body``).
        verdicts: tensor name -> [Event, window hit]: the compute stage's verdict on a guessed
            threshold window, set after the tensor's last chunk; the reader waits for it.
        meta: shard file name -> journal extras (the thresholds of its tensors).
    """

    free_q: queue.Queue = field(default_factory=queue.Queue)
    ready_q: queue.Queue = field(default_factory=queue.Queue)
    done_q: queue.Queue = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    busy: dict[str, float] = field(default_factory=_no_busy)
    verdicts: dict[str, list] = field(default_factory=dict)
    verdict_lock: threading.Lock = field(default_factory=threading.Lock)
    meta: dict[str, dict] = field(default_factory=dict)
    arena: SlotArena | None = None

    def take_slot(self, item: Item) -> Slot:
        """A free slot for ``item`` (the reader's), waiting for one; raises
        ``StageFailed`` once ``stop`` is set."""
        if self.arena is None:
            return self.get(self.free_q)
        while True:  # stop first, as ``get``: a failed run reads nothing more
            if self.stop.is_set():
                raise StageFailed
            if (slot := self.arena.take(item, 0.1)) is not None:
                return slot

    def give_slot(self, slot: Slot) -> None:
        """Return a slot the compute stage or the writer is done with."""
        if self.arena is None:
            self.free_q.put(slot)
        else:
            self.arena.give(slot)

    def get(self, q: queue.Queue):
        """The next entry of ``q``, waiting for it; raises ``StageFailed`` once ``stop`` is set."""
        while True:
            if self.stop.is_set():
                raise StageFailed
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def verdict(self, name: str, op: str | None = None) -> list:
        """The [Event, verdict] entry of tensor ``name``'s window guess, or (``op``) of its
        row pass ``op`` being live (created on first use)."""
        key = name if op is None else f"{name}\0{op}"
        with self.verdict_lock:
            return self.verdicts.setdefault(key, [threading.Event(), None])

    def decide(self, t: TensorPlan, op: str | None = None) -> bool:
        """Whether the guessed low-histogram window of ``t`` held its thresholds, or (``op``)
        whether its row pass ``op`` is live (``RowPass.live``): waits for the compute
        stage's verdict; raises ``StageFailed`` once ``stop`` is set."""
        v = self.verdict(t.name, op)
        while not v[0].wait(0.1):
            if self.stop.is_set():
                raise StageFailed
        return v[1]

    def fail(self, e: BaseException) -> None:
        """Record a thread's error (handed to the caller's thread) and stop the others."""
        self.errors.append(e)
        self.stop.set()


@dataclass
class ReaderStage:
    """The reader thread: reads each work item's byte ranges into a free slot, in order.

    Attributes:
        items: ``items(decide)``: the work items and shard markers, in file order.
        reader: reads (and fingerprints) the input ranges.
        offsets_ok: the backend takes each row from where its O_DIRECT read landed
            (``Slot.offsets``) instead of a memmove into place.
        cache: which items are read through the page cache (``RereadCache``; None:
            none).
    """

    stream: Stream
    items: Callable[[Callable | None], Iterable[Item | Marker]]
    layout: Layout
    reader: RangeReader
    offsets_ok: bool
    cache: RereadCache | None = None

    def run(self) -> None:
        """Fill a free slot per item and queue it (markers pass through), then None."""
        s = self.stream
        try:
            with ThreadPoolExecutor(
                max_workers=4 * self.layout.rows, thread_name_prefix="sm-read"
            ) as pool:
                for item in self.items(s.decide):
                    if isinstance(item, Marker):
                        s.ready_q.put(item)
                        continue
                    slot = s.take_slot(item)
                    t0 = time.perf_counter()
                    self.fill(pool, slot, item)
                    s.busy["read_s"] += time.perf_counter() - t0
                    s.ready_q.put(slot)
                s.ready_q.put(None)
                # the read threads' CPU, while they live (--profile)
                s.busy["read_cpu_s"] = time.thread_time() + sum(
                    thread_cpu_s(th.native_id) for th in list(getattr(pool, "_threads", ()))
                )
        except StageFailed:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            s.fail(e)
        finally:
            if self.cache is not None:
                self.cache.release()

    def fill(self, pool: ThreadPoolExecutor, slot: Slot, item: Item) -> None:
        """Read ``item``'s input ranges into ``slot`` (a copy: straight into its output) and
        label the slot with the item's tensor, chunk and pass."""
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
            self.reader.hash_ranges(remote, pool)
        local = [(r, j) for r, j in zip(rows, jobs) if not isinstance(j[0].file, RemoteFile)]
        # A GPU backend copies each row from where its O_DIRECT read landed: no memmove
        # (unless a LoRA adapts a row: its bytes are rewritten where they start).
        adapted = [j for j in jobs if isinstance(j[0], AdaptedTensorInfo)]
        in_place = (not self.offsets_ok or item.op in ("copy", "convert")
                    or is_row_op(item.op) or bool(adapted))  # fmt: skip
        buffered = self.cache is not None and self.cache.use(item)
        deltas = self.reader.read_rows(
            [j for _, j in local], pool, in_place=in_place, buffered=buffered
        )
        if adapted:  # docs/SPEC.md "LoRA inputs (v3)"
            adapt_jobs(adapted, pool)
        if not in_place:
            slot.offsets = [0] * self.layout.rows
            for (r, _), d in zip(local, deltas):
                slot.offsets[r] = d


@dataclass
class WriterStage:
    """The writer thread: writes each computed slot into the open shard of every output.

    Attributes:
        results: per output, shard name -> (size, sha256) of the shards it committed.
        written: per output, bytes of the shards it committed.
        staging_bytes: bytes of the staging blocks it allocated.
    """

    stream: Stream
    outputs: list[OutputDir]
    layout: Layout
    direct_io: bool
    results: list[dict[str, tuple[int, str]]] = field(init=False)
    written: list[int] = field(init=False)
    staging_bytes: int = 0

    def __post_init__(self) -> None:
        self.results = [{} for _ in self.outputs]
        self.written = [0] * len(self.outputs)

    def run(self) -> None:
        """Open, fill and commit each output's shards as the markers and slots come, returning
        each slot to the free queue; a shard left open (an error) is aborted."""
        s, outputs = self.stream, self.outputs
        stagings = [StagingBlock(self.layout.block_bytes, STAGING_BLOCKS) for _ in outputs]
        self.staging_bytes = sum(len(m) for st in stagings for m in st.mems)
        writers: list[ShardWriter | None] = [None] * len(outputs)
        try:
            while (item := s.get(s.done_q)) is not None:
                t0 = time.perf_counter()
                if isinstance(item, Marker):
                    self.shard_marker(item, stagings, writers)
                    s.busy["write_s"] += time.perf_counter() - t0
                    continue
                merged = item.op in ("merge", "held") or is_row_op(item.op)
                for k, writer in enumerate(writers):
                    buf = item.outs[k] if merged else item.out
                    writer.write(memoryview(buf)[: item.out_nbytes])
                s.busy["write_s"] += time.perf_counter() - t0
                s.give_slot(item)
            s.busy["write_cpu_s"] = time.thread_time() + sum(  # and the staging's I/O threads
                thread_cpu_s(th.native_id) for st in stagings
                for th in list(getattr(st.io, "_threads", ()))
            )  # fmt: skip
        except StageFailed:
            pass
        except BaseException as e:  # noqa: BLE001
            s.fail(e)
        finally:
            for writer in writers:
                if writer is not None:
                    writer.abort()
            for st in stagings:
                st.close()

    def shard_marker(self, item: Marker, stagings: list[StagingBlock],
                     writers: list[ShardWriter | None]) -> None:  # fmt: skip
        """Open the marker's shard in every output (``writers[k]``), or finish and commit it."""
        name = item.shard.filename
        for k, output in enumerate(self.outputs):
            if item.kind == "open":
                writers[k] = ShardWriter(
                    output.shard_tmp_path(name),
                    item.shard.header,
                    item.shard.size_bytes,
                    stagings[k],
                    self.direct_io,
                )
            else:
                shard = writers[k].finish()
                writers[k] = None
                output.commit_shard(name, shard, self.stream.meta.get(name))
                self.results[k][name] = (shard.size, shard.sha256)
                self.written[k] += shard.size


@dataclass(frozen=True)
class _Handles:
    """The handles of one slot's passes for every output of a sweep."""

    handles: list


@dataclass
class ComputeStage:
    """The compute stage, on the caller's thread: runs each slot's passes on the backend and
    hands the slot to the writer once its kernels are done (at most ``backend.depth`` in
    flight), or back to the reader (statistics passes).

    Attributes:
        variants: one plan per output (a sweep), the same tensors with other weights.
        on_bytes: called with each slot's input bytes.
        scratch: the directory for the passes' temporary files (``ops.RowArgs.scratch``).
        bytes_read: input bytes of the slots computed so far.
    """

    stream: Stream
    plan: Plan
    variants: list[Plan]
    backend: Backend
    thresholds: TensorThresholds
    on_bytes: Callable[[int], None] | None
    scratch: str | None = None
    bytes_read: int = 0
    by_name: list[dict[str, TensorPlan]] = field(init=False)
    inflight: deque = field(default_factory=deque)  # (item, handle) in submission order
    #: (tensor name, pass name -> accumulators) of the current tensor's statistics passes
    row_stats: tuple = (None, {})

    def __post_init__(self) -> None:
        self.by_name = [{t.name: t for t in v.tensors} for v in self.variants]

    def run(self) -> None:
        """Compute every ready slot until the reader's None, then drain the kernels in flight
        and send the writer its None; raises ``StageFailed`` once ``stop`` is set."""
        s = self.stream
        while (item := s.get(s.ready_q)) is not None:
            handle, to_writer = None, True
            if isinstance(item, Marker):
                if item.kind == "close":
                    self.record_thresholds(item)
            else:
                t0, c0 = time.perf_counter(), time.thread_time()
                handle, to_writer = self.compute(item)
                s.busy["compute_s"] += time.perf_counter() - t0
                # CPU of this thread: statistics passes (the slot goes back to the reader)
                # apart from the passes that write
                key = "compute_thread_cpu_s" if to_writer else "stats_thread_cpu_s"
                s.busy[key] = s.busy.get(key, 0.0) + time.thread_time() - c0
                self.bytes_read += item.in_nbytes
                if self.on_bytes is not None:
                    self.on_bytes(item.in_nbytes)
                if not to_writer:
                    s.give_slot(item)
                    continue
            self.inflight.append((item, handle))
            while len(self.inflight) > self.backend.depth:
                self.retire(*self.inflight.popleft())
        while self.inflight:
            self.retire(*self.inflight.popleft())
        s.done_q.put(None)

    def record_thresholds(self, item: Marker) -> None:
        """Note the thresholds of the closing shard's tensors for its journal entry."""
        th = {
            t.name: self.thresholds.recorded[t.name]
            for t in item.shard.tensors
            if t.name in self.thresholds.recorded
        }
        if th:
            self.stream.meta[item.shard.filename] = {"thresholds": th}

    def retire(self, done, handle) -> None:
        """Wait for ``handle``'s kernels, then hand ``done`` (a slot or marker) to the writer."""
        for h in handle.handles if isinstance(handle, _Handles) else (handle,):
            if h is not None:
                self.backend.wait(h)
        self.stream.done_q.put(done)

    def row_args(self, t: TensorPlan, c: Chunk, op: str | None, stats: dict):
        """``ops.row_args`` of the plan's method, with this run's ``scratch`` directory."""
        return row_args(self.plan.recipe.row, t, c, op, stats, self.scratch)

    def tensor_stats(self, slot: Slot) -> dict:
        """The accumulators of the slot's tensor's statistics passes so far, by pass name
        (``RowArgs.stats``): started afresh at a new tensor, or at the first chunk of its
        first statistics pass."""
        t, row = slot.tensor, self.plan.recipe.row
        if self.row_stats[0] != t.name or (slot.first and slot.op == row.row_stats):
            self.row_stats = (t.name, {})
        return self.row_stats[1]

    def stats_pass(self, slot: Slot, op: str, stats: dict) -> None:
        """A row-wise method's statistics pass ``op`` on the slot: adds into its
        accumulators (made at its first use); nothing is written."""
        t = slot.tensor
        if op not in stats:
            stats[op] = row_pass(op).accumulators(len(t.sources))
        self.backend.run(op, slot, self.row_args(t, slot.chunk, op, stats))

    def live_verdicts(self, slot: Slot, stats: dict) -> None:
        """After a statistics pass's last chunk: the verdicts the reader waits for
        (``Stream.decide(t, op)``) of the passes after it that may go idle, up to the first
        live one (an idle pass adds nothing, so the sums stay those of this pass)."""
        t, method = slot.tensor, self.plan.recipe.row
        names = [p.name for p in method.row_passes]
        for name in names[names.index(slot.op) + 1:]:
            p = row_pass(name)
            if p.live is None or name not in t.ops:
                return
            live = bool(p.live(self.row_args(t, slot.chunk, name, stats)))
            v = self.stream.verdict(t.name, name)
            v[1] = live
            v[0].set()
            if live:
                return

    def row_pass(self, slot: Slot):
        """A row-wise method's pass on the slot (``Method.row_passes``): a statistics pass
        adds into the tensor's accumulators (nothing written); the writing pass runs for
        every output (a sweep: each output's own tensor parameters over the same rows),
        after the statistics passes on this very slot when it holds the whole tensor."""
        t, method = slot.tensor, self.plan.recipe.row
        stats = self.tensor_stats(slot)
        if row_pass(slot.op).is_stats:
            self.stats_pass(slot, slot.op, stats)
            if slot.last:
                self.live_verdicts(slot, stats)
            return None
        if slot.first and slot.last:  # the tensor in one chunk: one read for every pass
            for p in method.row_passes[:-1]:
                self.stats_pass(slot, p.name, stats)
        if len(self.variants) == 1:
            return self.backend.run(slot.op, slot, self.row_args(t, slot.chunk, None, stats))
        handles = []
        for k, names in enumerate(self.by_name):
            tk, c = names[t.name], slot.chunk
            ck = Chunk(c.start, c.count, tk.segments[t.segments.index(c.segment)])
            view = Slot(slot.inputs, slot.outs[k], tk, ck, slot.op, slot.out_nbytes,
                        offsets=slot.offsets)  # fmt: skip
            handles.append(self.backend.run(slot.op, view, self.row_args(tk, ck, None, stats)))
        return _Handles(handles)

    def compute(self, slot: Slot):
        """Run the slot's passes; returns (handle, goes_to_writer)."""
        backend, thresholds, plan = self.backend, self.thresholds, self.plan
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
            if slot.first and not st.low_from_high:
                st.guess_window(population(t, plan.recipe.n_models))
            accumulate(backend, slot, st, "hist_low", slot.chunk.segment, guess=True)
            if slot.last:
                v = self.stream.verdict(t.name)
                v[1] = st.resolve_window()
                v[0].set()
            return None, False
        if is_row_op(op):
            return self.row_pass(slot), not row_pass(op).is_stats
        if op == "held":
            st = thresholds.stats(t)
            accumulate(backend, slot, st, "hist_high", slot.chunk.segment)
            accumulate(backend, slot, st, "hist_low", slot.chunk.segment)
        win = thresholds.window(t) if plan.recipe.row.sparse.stats else None
        if len(self.variants) == 1:
            return backend.run("merge", slot, merge_args(plan.recipe.row, t, slot.chunk, win)), True
        passes = []
        for k, names in enumerate(self.by_name):  # a sweep: one pass per output, same inputs
            tk = names[t.name]  # the same tensor with this output's weights
            c = slot.chunk
            ck = Chunk(c.start, c.count, tk.segments[t.segments.index(c.segment)])
            view = Slot(slot.inputs, slot.outs[k], tk, ck, slot.op, slot.out_nbytes,
                        offsets=slot.offsets)  # fmt: skip
            passes.append((view, merge_args(plan.recipe.row, tk, ck, win)))
        if hasattr(backend, "run_sweep"):  # a device backend: the inputs go over once
            return _Handles([backend.run_sweep(slot, passes)]), True
        return _Handles([backend.run("merge", v, a) for v, a in passes]), True
