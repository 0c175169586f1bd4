"""Merges partitioned over a Ray cluster (``--ray [ADDRESS]``).

streammerge's output bytes do not depend on how the work is cut (masks are keyed by seed,
tensor name and element index; thresholds are per tensor, or computed once per model), so
output shards can be merged anywhere, in any order, and still give the one-machine bytes:

1. The driver prepares the plan and recipe once (seed and M3 draw fixed there), opens the
   output's staging directory (the journal, ``--resume``), and checks that every node of
   the cluster sees it (a node that cannot is reported by host name).
2. The shards still to write are partitioned into tasks balanced by bytes to read
   (longest first onto the lightest task). Each task runs the same execute step as a local
   merge (``pipeline.run``) on its worker, with its own ``--memory`` buffers, and renames
   each finished shard into the staging directory.
3. As workers finish shards, the driver journals them (size, sha256, thresholds); a task
   lost with its worker is retried by Ray (``max_retries``). One progress bar sums all
   tasks' bytes (workers report to a small actor). The driver alone finalizes (index,
   ``streammerge.json``, model card, atomic rename).

Ray is an optional extra: ``pip install "streammerge[ray]"``.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streammerge.api import finalize, layout_for, open_output, prepare
from streammerge.api_types import MergeSummary, Options, Prepared, Provenance
from streammerge.errors import MergeError
from streammerge.exec.choose import make_backend
from streammerge.exec.pipeline import RunStats, analyze, run
from streammerge.io.writer import WrittenShard
from streammerge.plan.plan_types import Plan, ShardPlan

#: Retries of a task whose worker died (Ray ``max_retries``).
MAX_RETRIES = 3
#: Workers report progress every this many input bytes.
PROGRESS_STEP_BYTES = 32 * 2**20


def partition(shards: Sequence[ShardPlan], n_tasks: int) -> list[list[ShardPlan]]:
    """Shards grouped into at most ``n_tasks`` tasks balanced by bytes to read: longest
    first, each onto the task with the fewest bytes so far (LPT). Each task keeps file order.

    Example: read bytes (9, 5, 4, 3), 2 tasks -> [[9, 3], [5, 4]] (12 and 9 bytes).
    """
    n_tasks = max(1, min(n_tasks, len(shards)))
    bins: list[list[ShardPlan]] = [[] for _ in range(n_tasks)]
    load = [0] * n_tasks
    order = {s.filename: i for i, s in enumerate(shards)}
    for s in sorted(shards, key=lambda s: -s.read_bytes):
        k = load.index(min(load))
        bins[k].append(s)
        load[k] += s.read_bytes
    return [sorted(b, key=lambda s: order[s.filename]) for b in bins if b]


class StagingOutput:
    """What a worker writes into: the driver's staging directory (seen by every node).
    Shards are written as ``*.tmp``, fsync'd and renamed, then reported to the driver
    (through the progress actor), which journals them."""

    def __init__(self, staging: Path, plan: Plan | None = None, progress=None,
                 allow_nonfinite: bool = False) -> None:  # fmt: skip
        from streammerge.io.fingerprints import InputHasher

        self.allow_nonfinite = allow_nonfinite
        self.staging = Path(staging)
        self.plan = plan
        self.progress = progress
        self.input_hasher = InputHasher()  # the reader hashes every input range it reads
        self.reports: list = []  # refs of the shard reports sent to the driver's actor

    def shard_tmp_path(self, name: str) -> Path:
        """Where a shard is written before it is whole."""
        return self.staging / f"{name}.tmp"

    def commit_shard(self, name: str, shard: WrittenShard, meta: dict | None = None) -> None:
        """Rename a finished shard (``ShardWriter.finish``'s ``shard``) into place and report
        it, with its input hashes, non-finite counts and thresholds, to the driver, which
        journals it."""
        from streammerge.io.nonfinite import check_shard
        from streammerge.output.files import input_digests

        nonfinite = shard.nonfinite
        check_shard(self.plan, name, self.shard_tmp_path(name), nonfinite, self.allow_nonfinite)
        os.replace(self.shard_tmp_path(name), self.staging / name)
        fd = os.open(self.staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        extra = {"inputs": input_digests(self.plan, self.input_hasher, name),
                 "nonfinite": nonfinite, **(meta or {})}  # fmt: skip
        if self.progress is not None:
            self.reports.append(self.progress.shard.remote(name, shard.size, shard.sha256, extra))


@dataclass
class TaskResult:
    """What one task returns to the driver."""

    host: str
    stats: RunStats


def _run_task(plan: Plan, names: list[str], staging: str, prep_options: Options,
              memory_bytes: int, model_thresholds, progress) -> TaskResult:  # fmt: skip
    """A task's body, on its worker: the local execute step over some shards."""
    from streammerge.exec.layout import make_layout

    engine = make_backend(prep_options.backend, prep_options.device, task_cpus(prep_options),
                          prep_options.vram)  # fmt: skip
    layout = make_layout(plan, plan.recipe.n_models, memory_bytes, engine.depth,
                         getattr(engine, "max_chunk_elems", None), prep_options.threads)  # fmt: skip
    shards = [s for s in plan.shards if s.filename in set(names)]
    pending = [0]

    def on_bytes(n: int) -> None:
        pending[0] += n
        if pending[0] >= PROGRESS_STEP_BYTES and progress is not None:
            progress.add.remote(pending[0])
            pending[0] = 0

    output = StagingOutput(Path(staging), plan, progress, prep_options.allow_nonfinite)
    stats = run(plan, shards, output, layout, engine, on_bytes=on_bytes,
                direct_io=prep_options.direct_io, model_thresholds=model_thresholds)  # fmt: skip
    if progress is not None and pending[0]:
        progress.add.remote(pending[0])
    if output.reports:
        # Actor calls from different callers are not ordered: the driver's take() after
        # this task returns could run before these reports. Wait until they are in.
        import ray

        ray.get(output.reports)
    return TaskResult(socket.gethostname(), stats)


def task_cpus(options: Options) -> int:
    """CPUs (and kernel threads) of one task: ``--threads``, else 1, so that the cluster
    runs one task per CPU without oversubscribing its cores."""
    return max(1, options.threads or 1)


def task_options(options: Options) -> dict:
    """Ray options of a merge task: its CPUs, a GPU with ``--device cuda``, retries when its
    worker dies, and SPREAD scheduling (tasks go to every node, not first to the driver's)."""
    return {
        "num_cpus": task_cpus(options),
        "num_gpus": 1 if options.device == "cuda" else 0,
        "max_retries": MAX_RETRIES,
        "scheduling_strategy": "SPREAD",
    }


def _sees(path: str) -> tuple[str, bool]:
    return socket.gethostname(), os.path.exists(path)


def check_visible(ray, staging: Path) -> None:
    """Every alive node sees the staging directory (a probe file written by the driver).

    Raises:
        MergeError: naming the hosts that cannot see it.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = staging / f".probe-{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    try:
        sees = ray.remote(num_cpus=0)(_sees)
        refs = [
            sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(probe))
            for n in ray.nodes()
            if n.get("Alive")
        ]
        blind = sorted({h for h, ok in ray.get(refs) if not ok})
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise MergeError(
            f"the output's staging directory is not visible from {', '.join(blind)}",
            staging,
            None,
            "put the output on storage every node mounts at the same path (NFS, a shared disk)",
        )


#: Seconds a Ray address (host:port) has to accept a TCP connection: ray.init itself
#: retries an unreachable address for minutes.
RAY_CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) Ray address that does not accept a
    TCP connection within ``timeout`` seconds; ``auto`` and other forms are left to Ray.

    Raises:
        MergeError: one line naming the address and the socket error.
    """
    import socket

    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise MergeError(f"cannot reach the Ray cluster at {address} ({e.strerror or e})",
                         None, None, "start it (ray start --head), or pass --ray auto for "
                         "the running one or --ray alone for a local one") from None  # fmt: skip


def connect_ray(address: str | None):
    """The ``ray`` module, connected: a local Ray started for ``None`` / ``""`` / ``local``,
    else the cluster at ``address`` (checked reachable first).

    Raises:
        MergeError: the cluster cannot be reached or refuses the connection (one line).
    """
    import ray

    if not ray.is_initialized():
        if address in (None, "", "local"):
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            return ray
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MergeError(f"cannot join the Ray cluster at {address}: {first}", None, None,
                             "check the address (ray status), or pass --ray alone for a "
                             "local Ray instance") from None  # fmt: skip
    return ray


def merge_ray(
    models: Sequence[str | Path],
    base: str | Path | None,
    out: str | Path,
    *,
    address: str | None = None,
    tasks: int | None = None,
    options: Options | None = None,
    provenance: Provenance | None = None,
    on_start: Callable[[Plan, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    **recipe,
) -> MergeSummary:
    """``streammerge.merge`` over a Ray cluster (see the module docstring).

    Args:
        address: ``None`` / ``"local"`` starts a local Ray instance, ``"auto"`` joins a
            running cluster, else a Ray address.
        tasks: number of tasks (default: the cluster's CPUs / CPUs per task; at most the
            shards).
        options: as ``merge``; ``--memory`` applies to each task's buffers, ``--threads`` is
            each task's CPUs (default 1), ``--device cuda`` asks Ray for one GPU per task.
        recipe: the recipe keyword arguments of ``merge``.

    Returns:
        MergeSummary (bytes summed over the tasks; peak RSS of the driver).

    Raises:
        MergeError: as ``merge``, or a node that cannot see the staging directory.
    """
    options = options or Options()
    prep = prepare(models, base, out, recipe, options, provenance)
    ray = connect_ray(address)
    open_output(prep)
    try:
        return _drive(ray, prep, tasks, on_start, on_bytes)
    except BaseException:
        prep.output.close()
        raise


def _drive(ray, prep: Prepared, tasks, on_start, on_bytes) -> MergeSummary:
    """The driver's side of ``merge_ray`` once the output is open: checks, the model's
    thresholds (trim_scope model), the tasks submitted and awaited, their shards journaled;
    returns ``finalize``'s summary."""
    check_visible(ray, prep.output.staging)
    todo = prep.todo()
    model_th = _before_tasks(ray, prep, todo, on_start, on_bytes)
    progress = ray.remote(Progress).remote()
    refs = _submit_tasks(ray, prep, todo, tasks, model_th, progress)
    merged = _Collector(ray, prep, progress, on_bytes).wait_all(refs)
    if model_th is not None:
        merged.thresholds = prep.plan.per_tensor(model_th)
    return finalize(prep, merged)


def _before_tasks(ray, prep: Prepared, todo: list[ShardPlan], on_start, on_bytes):
    """What the driver does before any task: the budget must fit a layout, the whole model's
    thresholds are computed (trim_scope model, when shards remain), ``on_start(plan, bytes to
    read)`` is called.

    Returns:
        the model's thresholds per fine-tune (``analyze``), or None (per-tensor thresholds).
    """
    from streammerge.exec.backends import CPU_GEOMETRY
    from streammerge.exec.layout import read_bytes, work_items

    options = prep.options
    layout = layout_for(prep, CPU_GEOMETRY)  # before any task: a bad budget fails here
    model_th = None
    if prep.plan.model_scope and todo:
        engine = make_backend(options.backend, options.device, options.threads, options.vram)
        model_th, _ = analyze(prep.plan, layout, engine, on_bytes, options.direct_io)
    if on_start is not None:
        on_start(prep.plan, read_bytes(work_items(prep.plan, todo, layout)))
    return model_th


def _submit_tasks(ray, prep: Prepared, todo: list[ShardPlan], tasks: int | None, model_th,
                  progress) -> list:  # fmt: skip
    """Partition ``todo`` into ``tasks`` tasks (default: the cluster's CPUs / CPUs per task)
    and submit them; returns their object refs, in submission order."""
    options = prep.options
    per_task = task_cpus(options)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    groups = partition(todo, tasks or max(1, cpus // per_task))
    remote = ray.remote(_run_task).options(**task_options(options))
    plan_ref = ray.put(prep.plan)
    staging = str(prep.output.staging)
    refs = []
    for g in groups:
        names = [s.filename for s in g]
        ref = remote.remote(
            plan_ref, names, staging, options, prep.memory_bytes, model_th, progress
        )
        refs.append(ref)
    return refs


class Progress:
    """The driver's actor (``ray.remote(Progress)``) the workers report to: input bytes done
    (summed over the tasks) and the shards they committed, until the driver takes them."""

    def __init__(self) -> None:
        self.n = 0
        self.shards: list = []

    def add(self, n: int) -> None:
        self.n += n

    def total(self) -> int:
        return self.n

    def shard(self, name: str, size: int, sha: str, meta) -> None:
        self.shards.append((name, size, sha, meta))

    def take(self) -> tuple[int, list]:
        out, self.shards = self.shards, []
        return self.n, out


@dataclass
class _Collector:
    """The driver while the tasks run: journals the shards the workers report (through the
    ``Progress`` actor), forwards their bytes to ``on_bytes``, and sums the tasks' RunStats.

    Attributes:
        merged: the tasks' RunStats summed (shards: those journaled so far).
        reported: input bytes already passed to ``on_bytes``.
    """

    ray: Any
    prep: Prepared
    progress: Any
    on_bytes: Callable[[int], None] | None
    merged: RunStats = field(default_factory=lambda: RunStats(
        0, 0, {}, {"read_s": 0.0, "compute_s": 0.0, "write_s": 0.0}))  # fmt: skip
    reported: int = 0

    def wait_all(self, refs: list) -> RunStats:
        """Wait for every task in ``refs``, journaling shards as workers finish them; returns
        the summed RunStats.

        Raises:
            MergeError: a task finished shards it never reported.
        """
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1, timeout=0.2)
            self.drain()  # shards journaled as workers finish them, not only as tasks return
            for ref in done:
                self.add(self.ray.get(ref))
        return self.merged

    def journal(self, name: str, size: int, sha: str, meta) -> None:
        """Journal a finished shard unless it already was."""
        if name not in self.merged.shards:  # a retried task may report a shard twice
            self.prep.output.journal_shard(name, size, sha, meta)
            self.merged.shards[name] = (size, sha)

    def drain(self) -> None:
        """Journal the shards reported since the last call and pass on the new bytes."""
        total, shards = self.ray.get(self.progress.take.remote())
        for rec in shards:
            self.journal(*rec)
        if self.on_bytes is not None and total > self.reported:
            self.on_bytes(total - self.reported)
            self.reported = total

    def add(self, res: TaskResult) -> None:
        """Add a returned task's RunStats, after journaling what its worker reported."""
        merged, st = self.merged, res.stats
        self.drain()
        merged.bytes_read += st.bytes_read
        merged.bytes_written += st.bytes_written
        merged.thresholds.update(st.thresholds)
        merged.buffer_bytes = max(merged.buffer_bytes, st.buffer_bytes)
        for k, v in st.busy_s.items():
            merged.busy_s[k] = merged.busy_s.get(k, 0.0) + v
        missing = set(st.shards) - set(merged.shards)
        if missing:
            raise MergeError(f"task on {res.host} finished shards it never reported: "
                             f"{sorted(missing)}", self.prep.output.staging, None,
                             "re-run with --resume")  # fmt: skip
