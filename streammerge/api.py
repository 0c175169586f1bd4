"""``streammerge.merge``: the whole job as one Python call (the CLI is a thin layer on it)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from streammerge import __version__
from streammerge.checks import check_merge_args
from streammerge.errors import MergeError
from streammerge.methods import Recipe, make_recipe
from streammerge.output import OutputDir
from streammerge.plan import Plan, make_plan, normalize_dtype
from streammerge.reader import INDEX_FILE, ModelDir, open_model
from streammerge.side_files import copy_side_files
from streammerge.sizes import parse_size
from streammerge.sysinfo import peak_rss_bytes

#: Default memory budget for buffers (bytes): fits a 1 GiB machine with room to spare.
DEFAULT_MEMORY = "256MiB"
DEFAULT_SHARD_SIZE = "5GB"


@dataclass
class MergeSummary:
    """What a merge did.

    Attributes:
        out: the output directory.
        seed, method, weights, drop, scale, alpha: the recipe (weights as drawn: w_j).
        bytes_read: input bytes read; bytes_written: output shard bytes written (this run).
        seconds: wall time of the whole call; gb_per_s: bytes_read / seconds / 1e9.
        peak_rss_bytes: the process's peak resident memory (bytes).
        shards: [{"file", "size_bytes", "sha256"}] of every output shard.
        resumed_shards: shards found finished in a journal and not rewritten.
        base_only: tensors copied from the base because no fine-tune has them.
        vocab_rules: one line per tensor the vocabulary rule shaped.
        stage_seconds: seconds each pipeline stage was busy (read_s, compute_s, write_s).
    """

    out: Path
    seed: int
    method: str
    alpha: float
    weights: tuple[float, ...]
    drop: tuple[float, ...]
    scale: float
    bytes_read: int
    bytes_written: int
    seconds: float
    gb_per_s: float
    peak_rss_bytes: int
    shards: list[dict] = field(default_factory=list)
    resumed_shards: int = 0
    base_only: tuple[str, ...] = ()
    vocab_rules: tuple[str, ...] = ()
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _parse_list(value) -> list[float] | float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        parts = [float(x) for x in value.split(",") if x.strip()]
        return parts[0] if len(parts) == 1 else parts
    return [float(x) for x in value]


def fingerprint(
    recipe: Recipe, base: ModelDir, models: Sequence[ModelDir], shard_size_bytes: int
) -> str:
    """Hash of everything that decides the output bytes (journal check for --resume).

    Besides the headers it covers each input file's size and modification time, so an input
    rewritten with other values under the same names and shapes is caught too.
    """
    blob = json.dumps(
        {
            "version": __version__,
            "recipe": asdict(recipe),
            "base": base.fingerprint,
            "models": [m.fingerprint for m in models],
            "shard_size_bytes": shard_size_bytes,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def record(plan: Plan, base: ModelDir, models: Sequence[ModelDir], shards: list[dict]) -> dict:
    """The ``streammerge.json`` content (SPEC "Output")."""
    r = plan.recipe
    return {
        "format": "streammerge/1",
        "spec": "streammerge merge contract v1",
        "version": __version__,
        "method": r.method,
        "seed": r.seed,
        "alpha": r.alpha,
        "lambda": r.lam,
        "weights": list(r.weights),
        "drop": list(r.drop),
        "scale": r.scale,
        "dtype": r.dtype,
        "base": {"path": str(base.path.resolve()), "fingerprint": base.fingerprint},
        "models": [{"path": str(m.path.resolve()), "fingerprint": m.fingerprint} for m in models],
        "base_only": list(plan.base_only),
        "vocab_rules": list(plan.vocab_rules),
        "total_size": plan.total_bytes,
        "shards": shards,
    }


def make_backend(backend: str, device: str, threads: int | None, vram: int | str | None = None):
    """The compute backend for ``--backend`` / ``--device`` (see ``merge``).

    Raises:
        MergeError: cuda asked for but not available; ValueError: unknown names.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r} (use auto, cpu or cuda)")
    if backend not in ("auto", "numba", "triton"):
        raise ValueError(f"unknown backend {backend!r} (use numba or triton)")
    if device in ("auto", "cuda") and backend in ("auto", "triton"):
        from streammerge import gpu

        if gpu.cuda_available():
            try:
                return gpu.CudaBackend(None if vram is None else parse_size(vram))
            except MergeError:
                if device == "cuda" or backend == "triton":
                    raise  # asked for explicitly: say why it cannot run
                # auto: a GPU without a usable Triton falls back to the CPU kernel
        if device == "cuda":
            raise MergeError(
                "--device cuda but no CUDA device is available", None, None, "use --device cpu"
            )
    if backend == "triton":
        from streammerge.backends import TritonCpuBackend

        return TritonCpuBackend()
    from streammerge.backends import NumbaBackend

    return NumbaBackend(threads)


def merge(
    models: Sequence[str | Path],
    base: str | Path,
    out: str | Path,
    *,
    alpha: float = 1.0,
    lam: float | None = None,
    weights: Sequence[float] | str | None = None,
    drop: float | Sequence[float] | str = 0.5,
    scale: float = 1.0,
    seed: int | None = None,
    dtype: str | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    memory: int | str = DEFAULT_MEMORY,
    threads: int | None = None,
    backend: str = "auto",
    device: str = "auto",
    vram: int | str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    copy_files: bool = True,
    direct_io: bool = True,
    allow_nonfinite: bool = False,
    on_start: Callable[[Plan, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> MergeSummary:
    """Merge fine-tunes ``models`` of ``base`` into ``out`` with M3 + DARE (shared/SPEC.md).

    Args:
        models: N >= 2 fine-tune directories (model j in this order).
        base: the base model directory.
        out: output directory (created; must not be, contain or lie inside an input).
        alpha: Beta(α, α) / Dirichlet(α) concentration of the mixup ratio λ (M3).
        lam: fixed λ (N = 2): w = (λ, 1 - λ). weights: fixed w (task arithmetic).
        drop: DARE drop rate p, one for all or one per model (``"0.3,0.6"`` accepted).
        scale: scaling coefficient s of the mixed task vector.
        seed: 0 <= seed < 2**64; drawn from the OS when None (or taken from the journal
            when resuming).
        dtype: output dtype of float tensors (``bf16``, ``fp16``, ``fp32``); default the base's.
        shard_size: output shard limit (bytes or ``"5GB"``); memory: buffer budget
            (bytes or ``"256MiB"``); threads: numba threads (default all cores).
        backend: ``"auto"`` (Triton on a CUDA device when there is one, else numba),
            ``"numba"`` (CPU) or ``"triton"`` (the Triton kernel; without a GPU it runs on CPU
            tensors under ``TRITON_INTERPRET=1``: the test path).
        device: ``"auto"`` (cuda when available), ``"cpu"`` or ``"cuda"``.
        vram: device buffer budget on a GPU (bytes or ``"2GB"``; default a modest share
            of free device memory, see ``streammerge.gpu``).
        overwrite: replace a non-empty output; resume: continue an interrupted merge.
        copy_files: copy config / tokenizer / module files from the base.
        direct_io: write shards with O_DIRECT where the filesystem allows.
        on_start: called with (plan, bytes to read) before streaming starts.
        on_bytes: called with input bytes done, as the writer progresses.

    Returns:
        MergeSummary.

    Raises:
        MergeError: bad input or output location (before any byte is written where it can
            be known then); ValueError: a bad option value.
    """
    check_merge_args(**locals())
    t0 = time.perf_counter()
    from streammerge import pipeline

    if len(models) < 2:
        raise MergeError(
            f"need at least 2 fine-tunes, got {len(models)}",
            None,
            None,
            "pass two or more model directories",
        )
    base_dir = open_model(base)
    model_dirs = [open_model(m) for m in models]
    shard_size_bytes = parse_size(shard_size)
    memory_bytes = parse_size(memory)
    output = OutputDir(
        out,
        [base_dir.path] + [m.path for m in model_dirs],
        overwrite=overwrite,
        resume=resume,
        allow_nonfinite=allow_nonfinite,
    )
    if seed is None:
        seed = output.journal_seed()
    weights_v = _parse_list(weights)
    if isinstance(weights_v, float):
        weights_v = [weights_v]
    dtype = None if dtype is None else normalize_dtype(dtype)
    recipe = make_recipe(
        len(model_dirs),
        seed=seed,
        alpha=alpha,
        lam=lam,
        weights=weights_v,
        drop=_parse_list(drop),
        scale=scale,
        dtype=dtype,
    )
    plan = make_plan(base_dir, model_dirs, recipe, shard_size_bytes)
    output.preflight(plan, base_dir, model_dirs, copy_files)  # before a backend starts
    engine = make_backend(backend, device, threads, vram)
    layout = pipeline.make_layout(
        plan, len(model_dirs), memory_bytes, engine.depth, getattr(engine, "max_chunk_elems", None)
    )
    done = output.open(fingerprint(recipe, base_dir, model_dirs, shard_size_bytes), recipe.seed)
    try:
        todo = [s for s in plan.shards if s.filename not in done]
        if on_start is not None:
            skipped = [s for s in plan.shards if s.filename in done]
            total_read = plan.read_bytes - sum(s.read_bytes for s in skipped)
            on_start(plan, total_read)
        run = pipeline.run(
            plan, todo, output, layout, engine, on_bytes=on_bytes, direct_io=direct_io
        )
        results = run.shards
        shards = []
        for s in plan.shards:
            size, sha = (
                results[s.filename]
                if s.filename in results
                else (done[s.filename]["size"], done[s.filename]["sha256"])
            )
            shards.append({"file": s.filename, "size_bytes": size, "sha256": sha})
        weight_map = {t.name: s.filename for s in plan.shards for t in s.tensors}
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}
        output.write_file(INDEX_FILE, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        if copy_files:
            copy_side_files(output, plan, base_dir, model_dirs)
        rec = record(plan, base_dir, model_dirs, shards)
        rec.update(output.record_extra())
        output.write_file(
            "streammerge.json", (json.dumps(rec, indent=2, sort_keys=True) + "\n").encode()
        )
        output.finish()
    finally:
        output.close()
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return MergeSummary(
        out=output.out,
        seed=recipe.seed,
        method=recipe.method,
        alpha=recipe.alpha,
        weights=recipe.weights,
        drop=recipe.drop,
        scale=recipe.scale,
        bytes_read=run.bytes_read,
        bytes_written=run.bytes_written,
        seconds=seconds,
        gb_per_s=run.bytes_read / seconds / 1e9 if seconds > 0 else 0.0,
        peak_rss_bytes=peak,
        shards=shards,
        resumed_shards=len(done),
        base_only=plan.base_only,
        vocab_rules=plan.vocab_rules,
        stage_seconds=run.busy_s,
    )
