"""Execute a plan: read, run each chunk's passes and write, with the three stages overlapped.

Three stages share buffer slots, allocated once and reused (first writes to fresh pages
ran at ~0.7 GiB/s on the reference machine, to reused pages ~5 GiB/s):

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
Such methods get fewer, larger slots (``make_layout``), so most tensors are held; on
the CPU the slots' bytes are one buffer, carved per chunk (``arena.SlotArena``), so the
reader reads ahead as far as the chunks' sizes allow. With
``trim_scope: model`` the thresholds of the whole model come first (``analyze``).

Memory: every buffer is counted against the budget (slots, the writer's staging blocks,
the histograms); ``RunStats.buffer_bytes`` reports what was really allocated.
"""

from __future__ import annotations

import contextlib
import resource
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from streammerge.exec.arena import SlotArena
from streammerge.exec.layout import (
    Backend,
    Item,
    Layout,
    Marker,
    Slot,
    analysis_items,
    mapped_bytes,
    work_items,
)
from streammerge.exec.ops import low_from_high
from streammerge.exec.reread import RereadCache, cache_limit
from streammerge.exec.stages import ComputeStage, ReaderStage, Stream, WriterStage, StageFailed
from streammerge.exec.thresholds import TensorThresholds
from streammerge.io.ranges import RangeReader
from streammerge.output.outdir import OutputDir
from streammerge.plan.plan_types import Plan, ShardPlan


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


def _slots(layout: Layout, backend: Backend, outputs: int) -> tuple[Stream, list]:
    """The stream and its slots' buffers: on the CPU (``elastic_slots``) one buffer the
    slots are carved from, each the size of its chunk (``SlotArena``); on a device
    ``layout.slots`` fixed slots (pinned buffers, reused by address). Carving needs a
    backend that holds no slot while the reader waits (``depth`` 0): slots held in flight
    could leave no free range a whole chunk fits."""
    k = max(1, outputs)
    if getattr(backend, "elastic_slots", False) and backend.depth == 0:
        arena = SlotArena(layout, backend.alloc, k)
        return Stream(arena=arena), [arena.buffer]
    stream, buffers = Stream(), []
    for _ in range(layout.slots):
        outs = [backend.alloc((layout.out_row_bytes,)) for _ in range(k)]
        slot = Slot(backend.alloc((layout.rows, layout.row_bytes)), outs[0], outs=outs)
        stream.free_q.put(slot)
        buffers += [slot.inputs, *outs]
    return stream, buffers


def _stream_body(
    plan: Plan,
    items: Callable[[Callable | None], Iterable[Item | Marker]],
    outputs: list[OutputDir],
    layout: Layout,
    backend: Backend,
    on_bytes: Callable[[int], None] | None,
    direct_io: bool,
    thresholds: TensorThresholds,
    variants: list[Plan] | None = None,
) -> list[RunStats]:
    """The streaming core: ``items(decide)`` read once into the slots, each output k's
    elementwise pass with ``variants[k]``'s parameters (a sweep; default: ``plan`` alone),
    written to ``outputs[k]``. No outputs: statistics only (``analyze``). ``decide`` lets
    the reader wait for the compute stage's verdict on a guessed threshold window.

    The reader and writer stages run on their own threads, the compute stage on this one
    (``streammerge.exec.stages``); the first error of any stage is the one raised."""
    variants = variants or [plan]
    stream, buffers = _slots(layout, backend, len(outputs))
    hasher = getattr(outputs[0], "input_hasher", None) if outputs else None
    for o in outputs[1:]:  # a sweep: every output records the same inputs' hashes
        o.input_hasher = hasher
    reader = RangeReader(direct=direct_io, hasher=hasher)
    cache = RereadCache(reader, cache_limit(direct_io))
    read = ReaderStage(stream, items, layout, reader, getattr(backend, "takes_offsets", False),
                       cache)  # fmt: skip
    write = WriterStage(stream, outputs, layout, direct_io)
    scratch = getattr(outputs[0], "scratch_dir", None) if outputs else None  # output's disk
    compute = ComputeStage(stream, plan, variants, backend, thresholds, on_bytes, scratch)
    threads = [threading.Thread(target=read.run, name="sm-reader", daemon=True)]
    cpu0 = _process_cpu_s()
    if outputs:
        threads.append(threading.Thread(target=write.run, name="sm-writer", daemon=True))
    for th in threads:
        th.start()
    try:
        compute.run()
    except StageFailed:
        pass
    except BaseException:
        stream.stop.set()
        raise
    finally:
        for th in threads:
            while th.is_alive():
                th.join(timeout=0.1)
                if stream.errors:
                    stream.stop.set()
        reader.close()
    if stream.errors:
        raise stream.errors[0]
    busy = stream.busy
    _split_cpu(busy, _process_cpu_s() - cpu0)
    busy.update(getattr(backend, "busy", {}))  # a device backend: streams and waits
    allocated = sum(map(mapped_bytes, buffers))
    allocated += write.staging_bytes + (layout.stats_bytes if thresholds.peak_bytes else 0)
    moved, read_bytes = reader.moved_bytes, compute.bytes_read
    if not outputs:  # statistics only
        return [RunStats(read_bytes, 0, {}, busy, thresholds.recorded, allocated, moved)]
    return [
        RunStats(read_bytes, write.written[k], write.results[k], busy, thresholds.recorded,
                 allocated, moved)  # fmt: skip
        for k in range(len(outputs))
    ]


def _process_cpu_s() -> float:
    """User + sys CPU seconds of this process (every thread, the ended ones included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _split_cpu(busy: dict[str, float], total: float) -> None:
    """The stream's CPU seconds per stage into ``busy`` (``--profile``): ``read_cpu_s`` and
    ``write_cpu_s`` are those stages' threads' own; ``compute_cpu_s`` is the rest of the
    process's CPU over the stream (the compute thread and numba's worker threads), of which
    ``stats_cpu_s`` is the statistics passes' share (by the compute thread's own CPU split:
    numba's workers run the same kernels beside it)."""
    stats_t = busy.pop("stats_thread_cpu_s", 0.0)
    comp_t = busy.pop("compute_thread_cpu_s", 0.0)
    rest = max(0.0, total - busy.get("read_cpu_s", 0.0) - busy.get("write_cpu_s", 0.0))
    busy["compute_cpu_s"] = rest
    busy["stats_cpu_s"] = rest * stats_t / (stats_t + comp_t) if stats_t + comp_t > 0 else 0.0


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
        TensorThresholds(plan, model_thresholds),
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
        TensorThresholds(plan, model_thresholds),
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
    th = TensorThresholds(plan, None)
    first = next((t for t in plan.tensors if t.action == "merge"), None)
    if first is None:
        return [[] for _ in range(plan.recipe.n_models)], RunStats(0, 0, {}, {})
    shared = th.stats(first)  # one population: every tensor feeds the same histograms
    shared.low_from_high = all(low_from_high(t) for t in plan.tensors if t.action == "merge")
    th.stats = lambda t: shared  # type: ignore[method-assign]
    stats = _stream(plan, lambda decide: analysis_items(plan, layout), [], layout, backend,
                    on_bytes, direct_io, th)[0]  # fmt: skip
    return shared.thresholds(), stats
