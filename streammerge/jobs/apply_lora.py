"""``streammerge apply-lora MODEL+ADAPTER -o OUT``: PEFT's ``merge_and_unload`` as a stream.

The adapted model (docs/SPEC.md "LoRA inputs (v3)") is written alone, with the shards,
index, side files and record of any output: it is planned as a merge in which every
tensor is base-only, the base being the adapted input, so every tensor is a ``copy`` of
the adapted input's bytes (an adapted tensor computed as its rows are read, any other
tensor copied unchanged). Memory stays bounded by ``--memory`` as in a merge.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from streammerge.api import execute, finalize, prepare, preflight_output
from streammerge.api_types import MergeSummary, Options, Provenance
from streammerge.errors import MergeError
from streammerge.exec.choose import make_backend
from streammerge.io.lora import adapter_of
from streammerge.io.model_types import ModelDir
from streammerge.plan.planner import make_plan


def _copy_plan(prep):
    """``prep``'s plan redone with fine-tunes that have no tensors: every tensor of the
    adapted base is base-only, a ``copy`` (same shards and names as the base's plan)."""
    empty = [ModelDir(prep.base.path, [], {}, "") for _ in prep.models]
    return make_plan(prep.base, empty, prep.recipe, prep.shard_size_bytes)


def apply_lora(
    ref: str | Path,
    out: str | Path,
    options: Options | None = None,
    provenance: Provenance | None = None,
    on_start: Callable | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> MergeSummary:
    """Write ``ref`` (``MODEL+ADAPTER``) with its LoRA adapter merged into ``out``.

    Returns:
        MergeSummary (``base_only`` lists every tensor: all are the adapted input's).

    Raises:
        MergeError: ``ref`` has no adapter, or any refusal of the adapter, the model or the
            output location (one line, before anything is written).
    """
    options = options or Options()
    recipe = {"method": "task_arithmetic", "seed": 0}  # placeholders: nothing is merged
    prep = prepare([ref, ref], ref, out, recipe, options, provenance, preflight=False)
    if adapter_of(prep.base) is None:
        raise MergeError(f"{ref} names no LoRA adapter", str(ref), None,
                         "give MODEL+ADAPTER, ADAPTER a PEFT adapter folder")  # fmt: skip
    prep.plan = _copy_plan(prep)
    preflight_output(prep)
    try:
        engine = make_backend(options.backend, options.device, options.threads, options.vram)
        stats = execute(prep, engine, on_start=on_start, on_bytes=on_bytes)
    except BaseException:
        prep.output.close()
        raise
    return finalize(prep, stats)

