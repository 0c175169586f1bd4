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

from streammerge.api import execute, finalize, preflight_output, prepare
from streammerge.api_types import MergeSummary, Options, Provenance
from streammerge.errors import MergeError
from streammerge.exec.choose import make_backend
from streammerge.io.inputs import input_record
from streammerge.io.lora import adapter_of

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
    prep = prepare([ref, ref], ref, out, recipe, options, provenance, preflight=False,
                   copy_only=True)  # fmt: skip
    if adapter_of(prep.base) is None:
        raise MergeError(f"{ref} names no LoRA adapter", str(ref), None,
                         "give MODEL+ADAPTER, ADAPTER a PEFT adapter folder")  # fmt: skip
    preflight_output(prep)
    prep.record_extra = {"apply_lora": {"note": RECORD_NOTE,
                                        "adapter": input_record(prep.base).get("adapter")}}
    prep.card = lambda rec: card(str(ref), rec)
    try:
        engine = make_backend(options.backend, options.device, options.threads, options.vram)
        stats = execute(prep, engine, on_start=on_start, on_bytes=on_bytes)
    except BaseException:
        prep.output.close()
        raise
    return finalize(prep, stats)
