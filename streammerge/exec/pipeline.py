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
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from streammerge.exec.layout import (
    STAGING_BLOCKS,
    Backend,
    Item,
    Layout,
    Marker,
    Slot,
    analysis_items,
    mapped_bytes,
    population,
    work_items,
)
from streammerge.exec.ops import convert_args, merge_args, read_rows
from streammerge.exec.thresholds import _Thresholds, accumulate
from streammerge.io.ranges import RangeReader
from streammerge.io.reader import DTYPE_ITEMSIZE
from streammerge.io.remote import RemoteFile, read_jobs
from streammerge.io.writer import ShardWriter, StagingBlock
from streammerge.output.outdir import OutputDir
from streammerge.plan.plan_types import Chunk, Plan, ShardPlan, TensorPlan


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
