"""``streammerge apply-lora MODEL+ADAPTER -o OUT``: PEFT's ``merge_and_unload`` as a stream.

The adapted model (docs/SPEC.md "LoRA inputs (v3)") is written alone, with the shards,
index, side files and record of any output: it is planned as a merge in which every
tensor is base-only, the base being the adapted input, so every tensor is a ``copy`` of
the adapted input's bytes (an adapted tensor computed as its rows are read, any other
tensor copied unchanged). Memory stays bounded by ``--memory`` as in a merge.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from streammerge.api import execute, finalize, preflight_output, prepare
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


#: What ``streammerge.json`` says under ``apply_lora`` (the merge fields are the copy-only
#: plan's placeholders).
RECORD_NOTE = ("every tensor is the adapted input's: W + scale * (B @ A) for the adapter's "
               "modules (docs/SPEC.md 'LoRA inputs (v3)'), other tensors copied; method, "
               "weights, seed and models are placeholders of the copy-only plan")  # fmt: skip


def card(ref: str, rec: dict) -> str:
    """The output's README.md: what was applied, and the command that repeats it."""
    base = rec.get("base") or {}
    adapter = base.get("adapter") or {}
    shards = rec.get("shards") or []
    return (
        "---\nlibrary_name: transformers\ntags:\n- streammerge\n- lora\n---\n\n"
        f"# {Path(str(base.get('path') or base.get('url') or ref)).name} with a LoRA adapter "
        "merged in\n\n"
        f"The PEFT LoRA adapter `{Path(adapter.get('path', '?')).name}` merged into its model "
        f"by `streammerge apply-lora` (streammerge {rec.get('version')}), as PEFT's "
        "`merge_and_unload` does: W + scale * (B @ A) per adapted tensor, in float32, rounded "
        'to the tensor\'s dtype (docs/SPEC.md "LoRA inputs (v3)").\n\n'
        f"- Input fingerprint (model and adapter): `{base.get('fingerprint')}`\n"
        f"- Adapter fingerprint: `{adapter.get('fingerprint')}`\n"
        f"- Output: {len(shards)} safetensors shard(s), {rec.get('total_size')} bytes of "
        "tensors; sha256 in `streammerge.json`.\n\n"
        "Repeat with:\n\n```bash\n"
        f"streammerge apply-lora MODEL+ADAPTER -o OUT\n```\n"
    )


def _as_apply_lora(prep, ref: str) -> None:
    """Have ``prep``'s output say what it is: ``apply_lora`` in streammerge.json, and
    ``card`` as README.md (``api.finalize`` writes both through ``write_file``)."""
    output = prep.output
    write = output.write_file
    seen: dict = {}

    def write_file(name: str, data: bytes) -> None:
        if name == "streammerge.json":
            rec = json.loads(data)
            rec["apply_lora"] = {
                "note": RECORD_NOTE,
                "adapter": (rec.get("base") or {}).get("adapter"),
            }
            seen["rec"] = rec
            data = (json.dumps(rec, indent=2, sort_keys=True) + "\n").encode()
        elif name == "README.md" and "rec" in seen:
            data = card(ref, seen["rec"]).encode()
        write(name, data)

    output.write_file = write_file


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
    _as_apply_lora(prep, str(ref))
    try:
        engine = make_backend(options.backend, options.device, options.threads, options.vram)
        stats = execute(prep, engine, on_start=on_start, on_bytes=on_bytes)
    except BaseException:
        prep.output.close()
        raise
    return finalize(prep, stats)
