"""The data of ``streammerge.api``: ``Options`` (how a merge runs), ``Provenance`` (where its
recipe came from), ``Prepared`` (a merge planned, its output checked) and ``MergeSummary``
(what it did), with the defaults and the keyword names ``merge`` takes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from streammerge.io.reader import ModelDir
from streammerge.io.remote import DEFAULT_HTTP_TIMEOUT_S
from streammerge.output.outdir import OutputDir
from streammerge.plan.plan_types import Plan, ShardPlan
from streammerge.recipe.parser import FLAG_RECIPE_KEYS
from streammerge.recipe.recipe import Recipe

#: Default memory budget for buffers (bytes): fits a 1 GiB machine with room to spare.
DEFAULT_MEMORY = "256MiB"
DEFAULT_SHARD_SIZE = "5GB"
#: Format of streammerge.json (v2: adds method, trim_scope and the per-tensor record).
RECORD_FORMAT = "streammerge/2"


@dataclass(frozen=True)
class Options:
    """How a merge runs (never what it computes: the bytes do not depend on these).

    Attributes:
        shard_size: output shard limit (bytes or ``"5GB"``); memory: buffer budget (bytes or
            ``"256MiB"``); threads: compute threads (default all cores).
        backend: ``auto`` (Triton on a CUDA device when there is one, else numba), ``numba``
            or ``triton`` (without a GPU: under ``TRITON_INTERPRET=1``, the test path).
        device: ``auto``, ``cpu`` or ``cuda``; vram: device buffer budget on a GPU.
        overwrite: replace a non-empty output; resume: continue an interrupted merge.
        copy_files: copy config / tokenizer / module files; direct_io: O_DIRECT reads/writes.
        allow_nonfinite: keep NaN/Inf values the merge produced (else they stop it).
        http_timeout: seconds an HTTP(S) request of an input by URL may wait to connect or
            for the next bytes before it is retried (a few times, then the run stops).
    """

    shard_size: int | str = DEFAULT_SHARD_SIZE
    memory: int | str = DEFAULT_MEMORY
    threads: int | None = None
    backend: str = "auto"
    device: str = "auto"
    vram: int | str | None = None
    overwrite: bool = False
    resume: bool = False
    copy_files: bool = True
    direct_io: bool = True
    allow_nonfinite: bool = False
    http_timeout: float = DEFAULT_HTTP_TIMEOUT_S


@dataclass
class MergeSummary:
    """What a merge did.

    Attributes:
        out: the output directory.
        seed, method, alpha, weights, drop, scale: the recipe (weights w_j and DARE drop
            rates p_j as resolved for a tensor without per-tensor overrides).
        mixup: the mixup ratios m (M3 draw or λ), or None.
        bytes_read: input bytes read (statistics passes included); bytes_written: output
            shard bytes written (this run).
        seconds: wall time of the whole call; gb_per_s: bytes_read / seconds / 1e9.
        peak_rss_bytes: the process's peak resident memory (bytes).
        buffer_bytes: bytes of the buffers the run really allocated (<= memory_bytes).
        memory_bytes: the ``--memory`` budget (bytes).
        shards: [{"file", "size_bytes", "sha256"}] of every output shard.
        resumed_shards: shards found finished in a journal and not rewritten.
        base_only: tensors copied from the base because no fine-tune has them.
        vocab_rules: one line per tensor the vocabulary rule shaped.
        stage_seconds: seconds each pipeline stage was busy (read_s, compute_s, write_s).
        already_complete: the output was already this merge (``--resume`` on a finished
            output): nothing was read or written.
    """

    out: Path
    seed: int
    method: str
    alpha: float | None
    weights: tuple[float, ...]
    drop: tuple[float, ...]
    scale: float
    bytes_read: int
    bytes_written: int
    seconds: float
    gb_per_s: float
    peak_rss_bytes: int
    mixup: tuple[float, ...] | None = None
    buffer_bytes: int = 0
    memory_bytes: int = 0
    shards: list[dict] = field(default_factory=list)
    resumed_shards: int = 0
    base_only: tuple[str, ...] = ()
    vocab_rules: tuple[str, ...] = ()
    stage_seconds: dict[str, float] = field(default_factory=dict)
    already_complete: bool = False


@dataclass(frozen=True)
class Provenance:
    """Where a merge came from, for the record and the model card (never the values).

    Attributes:
        recipe_yaml: the YAML recipe's text when one was given.
        labels: how the inputs were named (repo ids stay names), base first if any.
        command: the one command that repeats the merge.
        tokenizer_model: fine-tune whose tokenizer files are copied (recipe
            ``tokenizer_source``), or None (the base, or the vocabulary rule's choice).
    """

    recipe_yaml: str | None = None
    labels: tuple[str, ...] = ()
    command: str | None = None
    tokenizer_model: int | None = None


@dataclass
class Prepared:
    """A merge planned and its output location checked; no weight has been read.

    Attributes:
        recipe, plan: what is computed; base (None for linear without ``--base``), models:
            the validated inputs; output: the output transaction (preflighted, not opened).
        options: how it runs; shard_size_bytes, memory_bytes: parsed options.
        done: shard name -> journal record of shards an interrupted run finished
            (filled by ``open_output``).
        record_extra: fields added to ``streammerge.json`` (``apply-lora``: what it is).
        card: the output's README.md from its record, instead of the merge's model card
            (``apply-lora``), or None.
    """

    recipe: Recipe
    plan: Plan
    base: ModelDir | None
    models: list[ModelDir]
    output: OutputDir
    options: Options
    shard_size_bytes: int
    memory_bytes: int
    provenance: Provenance = field(default_factory=Provenance)
    done: dict[str, dict] = field(default_factory=dict)
    opened: bool = False
    t0: float = field(default_factory=time.perf_counter)
    record_extra: dict = field(default_factory=dict)
    card: Callable[[dict], str] | None = None

    def todo(self) -> list[ShardPlan]:
        """Shards not finished yet, in order."""
        return [s for s in self.plan.shards if s.filename not in self.done]


#: ``streammerge.merge`` keyword arguments that build the recipe: the flags' (one per
#: declared method parameter, ``streammerge.methods``) and the YAML reader's.
RECIPE_KEYS = (*FLAG_RECIPE_KEYS, "compute_dtype", "model_params", "params", "lines", "source",
               "slices")
OPTION_KEYS = tuple(f.name for f in fields(Options))
