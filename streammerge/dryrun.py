"""``streammerge --plan``: the dry run. Headers only, nothing written (issue 9 part 3).

``describe(prep, layout)`` turns a ``Prepared`` merge (``api.prepare``: every header, name,
shape, dtype, recipe and output-location check a real run does) and the buffer layout the
run would use (``api.layout_for``; a budget too small fails there too) into a
JSON-serializable dict; ``format_plan`` renders it as text. Contents:

- the recipe: method, trim scope, seed, the mixup ratios m (λ for two models) and α;
- per tensor group (``embedding/other``, ``layer N``, ``head/final``): tensor count, output
  bytes, input bytes read, the passes (``passes_of``), and the resolved w / density / drop /
  gamma / scale / normalize, once per distinct set with the tensors that share it;
- the output shards (file, size in bytes, tensor count);
- ``bytes_read``: what the real run reads when every guessed threshold window hits
  (``layout.read_bytes`` over the same ``work_items``, plus the model-wide histogram passes
  of trim_scope model, as ``api.execute`` counts them); ``bytes_read_max``: the most it can
  read, every guess missing (the run never reads more); ``bytes_read_cached``: of
  ``bytes_read``, what the page cache serves (``exec.reread``: the later passes of a tensor
  read ``CACHE_READS`` times or more); ``bytes_written``: the shard files' bytes;
- peak buffer memory (``Layout.buffer_bytes``) against the ``--memory`` budget;
- the disk's read speed from a short read (``streammerge.io.measure``) of the largest input
  file, and ``expected_seconds = (bytes_read - bytes_read_cached) / speed``: a lower bound
  (compute and writes overlap the reads), plus ``compile_seconds``
  (``backends.COMPILE_S``) while numba's cache of the CPU kernels is cold;
- ``base_only`` tensors and the vocabulary rules from the plan.

Units: bytes are integers (bytes), speeds bytes per second, times seconds.
"""

from __future__ import annotations

from streammerge.errors import MergeError
from streammerge.exec.gpu import pinned_host_bytes
from streammerge.exec.layout import (
    STAGING_BLOCKS,
    Layout,
    analysis_items,
    read_bytes,
    tensor_items,
    work_items,
)
from streammerge.exec.ops import is_row_op, low_from_high
from streammerge.exec.reread import CACHE_READS, cache_limit, cached_bytes
from streammerge.io.measure import measure_read_speed
from streammerge.names import natural_key
from streammerge.plan.plan_types import ShardPlan, TensorPlan
from streammerge.recipe.recipe import LAYER_PATTERN
from streammerge.sizes import format_bytes

#: Format tag of the ``--plan --json`` document.
PLAN_FORMAT = "streammerge-plan/1"
#: Group names of tensors outside the numbered layers.
EMBED_GROUP = "embedding/other"
HEAD_GROUP = "head/final"
#: Name parts that put a tensor outside the layers into the head / embedding group
#: whatever its place in name order (``lm_head.weight`` sorts before ``model.layers``).
HEAD_PARTS = ("lm_head", "head", "embed_out", "classifier", "score", "output", "cls")
EMBED_PARTS = ("embed", "embeddings", "embed_tokens", "wte", "wpe", "word_embeddings")


def _layer(name: str) -> int | None:
    m = LAYER_PATTERN.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str, first_layer_key: tuple | None) -> str:
    """The group of tensor ``name``: ``layer N`` (``recipe.LAYER_PATTERN``), else
    ``embedding/other`` for names before the first layer tensor in natural order and
    ``head/final`` for names after it (names with a head part such as ``lm_head`` are
    always head, names with an embedding part always embedding)."""
    layer = _layer(name)
    if layer is not None:
        return f"layer {layer}"
    parts = name.split(".")
    if any(p in HEAD_PARTS for p in parts):
        return HEAD_GROUP
    if any(p in EMBED_PARTS or p.startswith("embed") for p in parts):
        return EMBED_GROUP
    if first_layer_key is None or natural_key(name) < first_layer_key:
        return EMBED_GROUP
    return HEAD_GROUP


def _group_order(label: str) -> tuple:
    if label == EMBED_GROUP:
        return (0, 0)
    if label == HEAD_GROUP:
        return (2, 0)
    return (1, int(label.split()[1]))


def passes_of(t: TensorPlan, layout: Layout) -> str:
    """How ``t`` is executed, as a short label: ``copy``, ``convert``, ``merge`` (one read),
    ``held: hist_high+hist_low+merge`` (one read, every pass on the held slot) or
    ``multi-pass: ...`` (a histogram read that also counts the low histograms of a window
    guessed from the first chunk, then the merge read; a third read when the guess missed;
    histogram reads read only the rows the base has; bf16: no low histograms,
    ``ops.low_from_high``); a row-wise method (slerp): ``slerp`` (one read: the tensor
    fits a chunk) or ``row_dots, then slerp (2 reads)``."""
    if t.action != "merge":
        return t.action
    if len(t.ops) == 1:
        return "merge"
    if is_row_op(t.ops[-1]):  # a row-wise method: statistics passes, then its own
        if sum(1 for _ in tensor_items(t, layout)) == 1:
            return t.ops[-1] if len(t.ops) == 1 else f"{'+'.join(t.ops)} (1 read)"
        return f"{', then '.join(t.ops)} ({len(t.ops)} reads)"
    bf16 = low_from_high(t)  # bf16 magnitudes: no low histograms
    if layout.holds(t) or bf16:
        ops = "+".join(op for op in t.ops if not (bf16 and op == "hist_low"))
        return f"held: {ops}" if layout.holds(t) else "multi-pass: hist_high, then merge (2 reads)"
    return "multi-pass: hist_high+hist_low(guessed window), then merge (2 reads; 3 if missed)"


def _params(t: TensorPlan) -> dict:
    if t.action != "merge" or t.params is None:
        return {"action": t.action}
    return {"action": "merge", **t.params.record()}


def _todo(prep) -> tuple[list[ShardPlan], list[str]]:
    """Shards the real run would write, and those a ``--resume`` journal already holds.

    With ``--resume`` the journal is read (read only; the recipe fingerprint checked as
    ``OutputDir.open`` does), a journaled shard counts as done when its file has the
    recorded size (the real run also checks its sha256 and redoes it on a mismatch).
    """
    if prep.opened:
        return prep.todo(), sorted(prep.done)
    out = prep.output
    if not prep.options.resume or not out.staging.is_dir():
        return list(prep.plan.shards), []
    from streammerge.api import fingerprint
    from streammerge.output.journal import Journal

    journal = Journal.read(out.journal_path)
    head, shards = (journal.head, journal.shards) if journal is not None else ({}, {})
    if head and head.get("recipe") != fingerprint(prep):
        raise MergeError(
            "the recipe or the inputs changed since the interrupted merge",
            out.staging,
            None,
            "re-run with the same inputs and options (and --seed), or --overwrite to start over",
        )
    done = []
    if head:
        for name, rec in shards.items():
            p = out.staging / name
            if p.is_file() and p.stat().st_size == rec.get("size"):
                done.append(name)
    return [s for s in prep.plan.shards if s.filename not in done], sorted(done)


def _read_totals(plan, todo: list[ShardPlan], layout: Layout) -> tuple[int, int, int]:
    """(bytes_read, bytes_read_max, analysis_read) of writing the shards ``todo``, in bytes:
    what the run reads when every guessed threshold window hits, when every guess misses,
    and of those the two model-wide histogram passes of trim_scope model (0 otherwise)."""
    work_read = read_bytes(work_items(plan, todo, layout))
    analysis_read = read_bytes(analysis_items(plan, layout)) if plan.model_scope and todo else 0
    # every TIES window guess misses; every row pass that may go idle is read
    every_guess_misses = read_bytes(work_items(plan, todo, layout,
                                               decide=lambda t, op=None: op is not None))
    return work_read + analysis_read, every_guess_misses + analysis_read, analysis_read


def _add_params(g: dict, t: TensorPlan) -> None:
    """Count ``t`` in group ``g``'s entry of its parameters (``_params``), or start one."""
    p = _params(t)
    for entry in g["params"]:
        if {k: v for k, v in entry.items() if k not in ("tensors", "count")} == p:
            entry["tensors"].append(t.name)
            entry["count"] += 1
            break
    else:
        g["params"].append({**p, "tensors": [t.name], "count": 1})


def _tensor_groups(plan, todo: list[ShardPlan], layout: Layout) -> list[dict]:
    """One dict per tensor group (``group_of``), in order embedding, layers, head: tensor
    and merged counts, output bytes, bytes read (only for tensors of shards in ``todo``),
    passes (label -> count), parameter sets with their tensors, vocabulary rules."""
    tensors = sorted(plan.tensors, key=lambda t: natural_key(t.name))
    layer_keys = [natural_key(t.name) for t in tensors if _layer(t.name) is not None]
    first_layer = min(layer_keys) if layer_keys else None
    todo_names = {t.name for s in todo for t in s.tensors}
    groups: dict[str, dict] = {}
    for t in tensors:
        label = group_of(t.name, first_layer)
        g = groups.setdefault(
            label,
            {"group": label, "tensors": 0, "merged": 0, "bytes": 0, "read_bytes": 0,
             "passes": {}, "params": [], "rules": []},
        )  # fmt: skip
        g["tensors"] += 1
        g["merged"] += t.action == "merge"
        g["bytes"] += t.nbytes
        if t.name in todo_names:
            g["read_bytes"] += read_bytes(tensor_items(t, layout))
        how = passes_of(t, layout)
        g["passes"][how] = g["passes"].get(how, 0) + 1
        _add_params(g, t)
        if t.rule:
            g["rules"].append(t.rule)
    return [groups[k] for k in sorted(groups, key=_group_order)]


def _recipe_fields(r) -> dict:
    """The plan's first keys: its format, the method and its row, the weighting (seed, α,
    λ or mixup ratios), dtype, the parameters of a tensor without overrides, the recipe."""
    row = r.row
    tp0 = r.tensor_params("")
    return {
        "format": PLAN_FORMAT,
        "method": r.method,
        "method_row": {
            "sparsifier": row.sparsifier,
            "consensus": row.consensus,
            "normalize": row.normalize,
            "uses_base": row.uses_base,
            "source": row.source,
            **({"note": row.plan_note} if row.plan_note else {}),
        },
        "trim_scope": r.trim_scope,
        "seed": r.seed,
        "alpha": r.alpha,
        "lambda": r.lam
        if r.lam is not None
        else (r.mixup[0] if r.mixup and len(r.mixup) == 2 else None),
        "mixup": list(r.mixup) if r.mixup is not None else None,
        "dtype": r.dtype,
        "resolved": tp0.record(),
        "recipe": r.record(),
    }


def _memory(prep, layout: Layout, device: str) -> dict:
    """The plan's ``memory`` entry: the budget and the buffers of ``layout``, in bytes."""
    return {
        "budget_bytes": prep.memory_bytes,
        "buffer_bytes": layout.buffer_bytes,
        "slots": layout.slots,
        "slot_bytes": layout.slot_bytes,
        "chunk_elems": layout.chunk_elems,
        "staging_bytes": STAGING_BLOCKS * layout.block_bytes,
        "stats_bytes": layout.stats_bytes,
        "device": device,
        "pinned_bytes": pinned_host_bytes(layout) if device == "cuda" else 0,
    }


def _input_name(m) -> str:
    """An input's resolved path, ``+ADAPTER`` appended for a LoRA input."""
    adapter = getattr(m, "adapter", None)
    name = str(m.path.resolve())
    return name if adapter is None else f"{name}+{adapter['path']}"


def describe(prep, layout: Layout, measure_read: bool = True, device: str = "cpu") -> dict:
    """The dry run of ``prep`` (an ``api.Prepared``) with the buffers of ``layout``.

    Reads no weight except the short speed read (``measure_read``), writes nothing.

    Args:
        prep: from ``api.prepare`` (which already made every check of a real run that
            needs no weight bytes, the output location's included).
        layout: the run's buffer layout (``api.layout_for(prep, engine)``); whether a
            statistics tensor is held or multi-pass, hence the bytes read, depends on it.
        measure_read: time a short read of the largest input file (else no speed and no
            expected time).
        device: ``cpu`` or ``cuda`` (the layout is then a GPU run's: its pinned host
            bytes and VRAM budget are reported too).

    Returns:
        A JSON-serializable dict (module docstring; key ``format`` = PLAN_FORMAT).

    Raises:
        MergeError: with ``--resume``, a journal written for another recipe or other inputs.
    """
    r, plan = prep.recipe, prep.plan
    todo, resumed = _todo(prep)
    bytes_read, bytes_read_max, analysis_read = _read_totals(plan, todo, layout)
    limit = cache_limit(prep.options.direct_io)
    from_cache = cached_bytes(work_items(plan, todo, layout), limit)
    kernels = any(t.action != "copy" for t in plan.tensors)  # copies run no kernel
    compile_s = _compile_seconds(device) if kernels else 0
    bytes_written = sum(s.size_bytes for s in todo)
    ordered = _tensor_groups(plan, todo, layout)

    disk = None
    if measure_read:
        inputs = ([prep.base] if prep.base is not None else []) + list(prep.models)
        disk = measure_read_speed(f for m in inputs for f in m.files)
    speed = disk["bytes_per_s"] if disk else None
    return {
        **_recipe_fields(r),
        "base": None if prep.base is None else _input_name(prep.base),
        "models": [_input_name(m) for m in prep.models],
        "output": str(prep.output.out),
        "staging": str(prep.output.staging),
        "groups": ordered,
        "analysis": {"passes": ["hist_high", "hist_low"], "bytes_read": analysis_read}
        if plan.model_scope else None,  # fmt: skip
        "shards": [{"file": s.filename, "size_bytes": s.size_bytes, "tensors": len(s.tensors)}
                   for s in plan.shards],  # fmt: skip
        "resumed_shards": resumed,
        "bytes_read": bytes_read,
        "bytes_read_max": bytes_read_max,
        "bytes_read_analysis": analysis_read,
        "bytes_read_cached": from_cache,
        "bytes_written": bytes_written,
        "total_size": plan.total_bytes,
        "memory": _memory(prep, layout, device),
        "disk": disk,
        "expected_seconds": (bytes_read - from_cache) / speed + compile_s if speed else None,
        "compile_seconds": compile_s,
        "expected_note": "lower bound: bytes read from the disk / the measured read speed "
        "(compute and writes overlap the reads; a slower stage makes the run longer)"
        + (f", plus about {compile_s} s to compile the CPU kernels (first run only)"
           if compile_s else ""),
        "base_only": list(plan.base_only),
        "vocab_rules": list(plan.vocab_rules),
    }


def _fmt_values(v) -> str:
    if isinstance(v, list):
        return "(" + ", ".join(f"{x:.6g}" for x in v) + ")"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _fmt_params(p: dict, source: str = "the base") -> str:
    if p["action"] != "merge":  # ``source``: where copies come from (slices: the layer map)
        return f"copied from {source}" if p["action"] == "copy" else f"converted from {source}"
    return ", ".join(f"{k} {_fmt_values(v)}" for k, v in p.items()
                     if k not in ("action", "tensors", "count"))  # fmt: skip


def _names(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _group_body(g: dict, source: str = "the base") -> list[str]:
    passes = ", ".join(f"{k} x{v}" for k, v in g["passes"].items())
    lines = [f"    passes: {passes}"]
    if len(g["params"]) == 1:
        lines.append(f"    {_fmt_params(g['params'][0], source)}")
    else:
        for p in g["params"]:
            lines.append(f"    {_fmt_params(p, source)}: {p['count']} tensor(s): "
                         f"{_names(p['tensors'])}")  # fmt: skip
    lines += [f"    vocabulary rule: {rule}" for rule in g["rules"]]
    return lines


def _heading_lines(d: dict) -> list[str]:
    """The plan's first lines: method, weighting and seed, the resolved parameters, the
    inputs and the output."""
    out = []
    if d["method"] == "passthrough":  # layer slices: copies, nothing drawn
        out.append("streammerge plan: method passthrough (layer slices: every tensor a copy "
                   "of one input tensor)")  # fmt: skip
        return out + _inputs_lines(d)
    mix = ""
    if d["mixup"] is not None:
        mix = f", λ {d['mixup'][0]!r}" if len(d["mixup"]) == 2 else f", m {_fmt_values(d['mixup'])}"
        mix += f" (α {d['alpha']:g})" if d["alpha"] is not None else " (fixed)"
    out.append(
        f"streammerge plan: method {d['method']} ({d['method_row']['sparsifier']} sparsifier, "
        f"{d['method_row']['consensus']} consensus), trim_scope {d['trim_scope']}, "
        f"seed {d['seed']}{mix}"
    )
    out.append(
        f"  resolved (tensors without overrides): {_fmt_params({'action': 'merge', **d['resolved']})}"
    )
    if d["method_row"].get("note"):
        out.append(f"  {d['method']}: {d['method_row']['note']}")
    return out + _inputs_lines(d)


def _inputs_lines(d: dict) -> list[str]:
    """The base, the models and the output."""
    out = [f"  base: {d['base']}"]
    for j, m in enumerate(d["models"]):
        out.append(f"  model {j}: {m}")
    out.append(f"  output: {d['output']} (nothing written by --plan)")
    return out


def _groups_lines(groups: list[dict], source: str = "the base") -> list[str]:
    """The tensor groups, each a heading line and its body (``_group_body``); a run of
    consecutive layers that read alike is printed once, as ``layers A-B (each)``."""
    out = []
    i = 0
    while i < len(groups):
        g = groups[i]
        body = _group_body(g, source)
        key = (g["tensors"], g["bytes"], g["read_bytes"], tuple(body))
        k = i + 1
        if g["group"].startswith("layer "):
            while (
                k < len(groups)
                and groups[k]["group"].startswith("layer ")
                and (groups[k]["tensors"], groups[k]["bytes"], groups[k]["read_bytes"],
                     tuple(_group_body(groups[k], source))) == key
            ):  # fmt: skip
                k += 1
        if k - i > 1:
            last = groups[k - 1]["group"].split()[1]
            label = f"layers {g['group'].split()[1]}-{last} (each)"
        else:
            label = g["group"]
        out.append(
            f"  {label}: {g['tensors']} tensor(s), {g['merged']} merged, "
            f"{format_bytes(g['bytes'])} out, {format_bytes(g['read_bytes'])} read"
        )
        out += body
        i = k
    return out


def _totals_lines(d: dict) -> list[str]:
    """The plan's last lines: the output shards, bytes to read and write, peak buffer
    memory, the measured disk speed and the expected time."""
    out = [f"output shards ({len(d['shards'])}):"]
    for s in d["shards"]:
        out.append(f"  {s['file']}: {s['size_bytes']} bytes, {s['tensors']} tensor(s)")
    if d["resumed_shards"]:
        out.append(f"  already finished (--resume): {_names(d['resumed_shards'], 8)}")
    mem = d["memory"]
    most = d["bytes_read_max"]
    out.append(
        f"bytes to read: {d['bytes_read']} ({format_bytes(d['bytes_read'])})"
        + (f", at most {most} ({format_bytes(most)}) if guessed threshold windows miss"
           if most != d["bytes_read"] else "")
        + f"; to write: {d['bytes_written']} ({format_bytes(d['bytes_written'])})"
    )
    if d.get("bytes_read_cached"):
        cached = format_bytes(d["bytes_read_cached"])
        out.append(f"  of the bytes read, {cached} from the page cache: the later passes of "
                   f"tensors read {CACHE_READS}+ times")  # fmt: skip
    out.append(
        f"peak buffer memory: {mem['buffer_bytes'] / 2**20:.1f} MiB of the "
        f"{mem['budget_bytes'] / 2**20:.1f} MiB budget ({mem['slots']} slots of "
        f"{mem['slot_bytes'] / 2**20:.1f} MiB, chunk {mem['chunk_elems']} elements)"
    )
    if mem.get("device") == "cuda":
        out.append(f"on the GPU: {mem['pinned_bytes'] / 2**20:.1f} MiB of the buffers pinned")
    disk = d["disk"]
    if disk is None:
        out.append("disk speed: not measured")
    elif disk["bytes_per_s"] is None:
        out.append(f"disk speed: nothing read from {disk['file']}")
    else:
        out.append(
            f"disk read speed: {disk['bytes_per_s'] / 1e9:.2f} GB/s ({format_bytes(disk['bytes'])} "
            f"in {disk['seconds']:.3f} s, {disk['how']}, {disk['file']})"
        )
        out.append(f"expected time: >= {d['expected_seconds']:.1f} s; {d['expected_note']}")
    return out


def format_plan(d: dict) -> str:
    """``describe``'s dict as readable plain text (what ``--plan`` prints).

    Consecutive layers that read alike (same tensor count, bytes, passes and parameters)
    are printed once, as ``layers A-B``.
    """
    out = _heading_lines(d)
    runs = d["recipe"].get("layer_runs")
    if runs is not None:  # layer slices: where each output layer comes from
        how = "a copy" if d["method"] == "passthrough" else "a merge of its sources' layers"
        out.append(f"output layers <- model:layer (each layer {how}, read once per use):")
        out += [f"  {r}" for r in runs]
    out.append("tensor groups:")
    out += _groups_lines(d["groups"], "the base" if runs is None else "its source model")
    if d["analysis"] is not None:
        out.append(
            f"  model-wide thresholds first (trim_scope model): "
            f"{'+'.join(d['analysis']['passes'])}, {format_bytes(d['analysis']['bytes_read'])} read"
        )
    if d["base_only"]:
        out.append(f"copied from the base (no fine-tune has them): {_names(d['base_only'], 8)}")
    for rule in d["vocab_rules"]:
        out.append(f"vocabulary rule: {rule}")
    out += _totals_lines(d)
    return "\n".join(out) + "\n"


def _compile_seconds(device: str) -> int:
    """Seconds the run will spend compiling CPU kernels first (0 when numba's cache holds
    them, or on a GPU)."""
    if device != "cpu":
        return 0
    from streammerge.exec.backends import COMPILE_S, kernels_compiled

    return 0 if kernels_compiled() else COMPILE_S
