"""The merge plan: a pure function from headers and a recipe to what the streamer executes.

No I/O happens here. Given the validated headers of the base and the fine-tunes, the plan
says which tensors are merged and which copied, each tensor's output dtype, shard and byte
offset, each shard's header, and (through ``iter_chunks``) the element ranges each pass
walks. A method that needs a per-tensor statistic first (TIES) walks the same chunks twice.

Worked example (HF-style greedy sharding, ``shard_size_bytes=10``, tensors of 4, 4, 4
and 12 bytes in name order): shard 1 gets the first two (8 bytes; a third would make 12),
shard 2 gets the third, shard 3 the 12-byte one alone -> ``model-00001-of-00003.safetensors``
... ``model-00003-of-00003.safetensors``.

Vocabulary rule (issue 5; printed by the CLI when it applies): tensors whose shapes differ
only in the first dimension get as many rows as the largest fine-tune. A row the base and
every fine-tune have is merged per SPEC; a row only some fine-tunes have is merged over
those, their weights renormalized to keep the full weights' sum; a row the base lacks is
the weighted mean of the fine-tunes that have it, no drop. See ``_row_segments``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.io.reader import DTYPE_ITEMSIZE, ModelDir, TensorInfo
from streammerge.kernels.common import FLOAT_ITEMSIZE, tensor_key
from streammerge.names import natural_key
from streammerge.plan.plan_types import Plan, Segment, ShardPlan, TensorPlan
from streammerge.recipe.dtypes import normalize_dtype
from streammerge.recipe.recipe import Recipe, RecipeError, TensorParams, layer_positions


def shard_names(k: int) -> list[str]:
    """HF shard file names: ``model.safetensors`` for one, else ``model-0000i-of-0000K``."""
    if k == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{k:05d}.safetensors" for i in range(1, k + 1)]


def greedy_shards(sizes: Sequence[int], shard_size_bytes: int) -> list[list[int]]:
    """HF-style greedy sharding: indices of ``sizes`` grouped in order into shards.

    A shard is closed when adding the next item would exceed ``shard_size_bytes``; an item
    larger than the limit gets a shard of its own. Example: sizes (4, 4, 4, 12), limit 10
    -> [[0, 1], [2], [3]].
    """
    shards: list[list[int]] = []
    current: list[int] = []
    current_size = 0
    for i, size in enumerate(sizes):
        if current and current_size + size > shard_size_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(i)
        current_size += size
    if current:
        shards.append(current)
    return shards


def _names(names: Sequence[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _row_segments(
    name: str, base: TensorInfo, srcs: Sequence[TensorInfo], tp: TensorParams
) -> tuple[tuple[int, ...], tuple[Segment, ...], str]:
    """Vocabulary rule for a tensor whose shapes differ only in dim 0 (issue 5).

    Output rows R = max rows over the fine-tunes. Rows are cut where any model's or the
    base's row count ends. Over rows every fine-tune and the base have: SPEC unchanged.
    Over rows only some fine-tunes have: those fine-tunes only, weights w_j / sum(w_active)
    * sum(w_all) (so M3's weights still sum to 1). Over rows the base lacks: x_b = 0, p = 0,
    s = 1, the same renormalized weights: the weighted mean of the fine-tunes that have them.
    """
    row = math.prod(base.shape[1:])
    rows = [s.shape[0] for s in srcs]
    out_rows = max(rows)
    cuts = sorted({0, out_rows, *(r for r in (*rows, base.shape[0]) if r < out_rows)})
    weights_all = tp.w
    drop_all = tp.drop or (0.0,) * len(srcs)
    total_w = sum(weights_all)
    segs = []
    for r0, r1 in itertools.pairwise(cuts):
        active = tuple(j for j, r in enumerate(rows) if r >= r1)
        has_base = base.shape[0] >= r1
        w_act = sum(weights_all[j] for j in active)
        if len(active) == len(rows):
            weights = tuple(weights_all)
        else:
            if w_act == 0:
                raise MergeError(
                    f"rows {r0}..{r1 - 1} are in fine-tunes {list(active)} whose weights sum to 0",
                    None,
                    name,
                    "give weights that do not cancel, or align the vocabularies",
                )
            weights = tuple(weights_all[j] * total_w / w_act for j in active)
        if has_base:
            drop, scale = tuple(drop_all[j] for j in active), tp.scale
        else:
            if w_act == 0:
                raise MergeError(
                    f"rows {r0}..{r1 - 1}: fine-tune weights sum to 0",
                    None,
                    name,
                    "give other weights",
                )
            weights = tuple(weights_all[j] / w_act for j in active)
            drop, scale = (0.0,) * len(active), 1.0
        segs.append(Segment(r0 * row, r1 * row, has_base, active, weights, drop, scale))
    rule = (
        f"{name}: rows base={base.shape[0]}, fine-tunes={rows} -> {out_rows}; rows all have: SPEC; "
        "rows some fine-tunes have: merged over those, weights renormalized; "
        "rows the base lacks: weighted mean of the fine-tunes that have them (no drop)"
    )
    return (out_rows, *base.shape[1:]), tuple(segs), rule


def _params(recipe: Recipe, name: str, t: float) -> TensorParams:
    try:
        return recipe.tensor_params(name, t)
    except RecipeError as e:
        raise MergeError(str(e), None, name, "fix the recipe value") from None


def _check_model_scope(plans: list[tuple], recipe: Recipe) -> None:
    """trim_scope model: one population per fine-tune, so one density (and gamma) per fine-tune
    across every merged tensor (docs/SPEC.md "Magnitudes and thresholds")."""
    seen: dict[tuple, tuple[str, tuple]] = {}
    for p in plans:
        tp: TensorParams | None = p[9]
        if tp is None:
            continue
        for what in ("density", "gamma"):
            val = getattr(tp, what)
            if what not in seen:
                seen[what] = (p[0], val)
            elif seen[what][1] != val:
                raise MergeError(
                    f"trim_scope model needs one {what} per fine-tune for every tensor, but "
                    f"{seen[what][0]} has {list(seen[what][1] or ())} and this one {list(val or ())}",
                    None,
                    p[0],
                    "use trim_scope tensor, or give the fine-tune one value",
                )


def _check_no_extra_tensors(ref: ModelDir, models: Sequence[ModelDir], uses_base: bool) -> None:
    """Refuse a tensor some fine-tune has and the reference (the base, or model 0 for
    ``linear``) lacks.

    Raises:
        MergeError: naming the first fine-tune with such a tensor and the tensors.
    """
    extra: list[tuple[str, int]] = []
    for j, m in enumerate(models):
        for name in m.tensors:
            if name not in ref.tensors:
                extra.append((name, j))
    if extra:
        names = sorted({n for n, _ in extra}, key=natural_key)
        raise MergeError(
            _differ(ref, models[extra[0][1]])
            + f"{len(names)} tensor(s) in a fine-tune are not in "
            + ("the base" if uses_base else f"model 0 ({ref.path})"),
            models[extra[0][1]].path,
            _names(names),
            "merge fine-tunes of the same base (the base must have every tensor)",
        )


@dataclass
class _Walk:
    """What ``_walk_tensors`` collects over the reference's tensors, in natural name order.

    Attributes:
        rows: one tuple per output tensor: (name, action, dtype, shape, base, sources,
            segments, rule, key, params), the fields of ``TensorPlan`` but its offset and ops.
        base_only: tensors no fine-tune has, copied (or converted) from the base.
        vocab_rules: one line per tensor the vocabulary rule shaped.
        vocab_rows: the most output rows of such a tensor (None when there is none).
        tokenizer_model: index j of the fine-tune with the most rows (None likewise).
        missing: fine-tune index j -> the tensors it is the first to lack.
    """

    rows: list[tuple] = field(default_factory=list)
    base_only: list[str] = field(default_factory=list)
    vocab_rules: list[str] = field(default_factory=list)
    vocab_rows: int | None = None
    tokenizer_model: int | None = None
    missing: dict[int, list[str]] = field(default_factory=dict)


def _base_only_row(name: str, b: TensorInfo, out_dtype: str | None, nones: tuple) -> tuple:
    """The row of a tensor only the base has: copied, or converted to ``--dtype``.

    Raises:
        MergeError: a float dtype the kernels cannot convert.
    """
    dtype = b.dtype
    action = "copy"
    if b.is_float and out_dtype is not None and out_dtype != b.dtype:
        if b.dtype not in FLOAT_ITEMSIZE:
            raise MergeError(
                f"cannot convert {b.dtype} to {out_dtype}", b.file, name, "drop --dtype"
            )
        dtype, action = out_dtype, "convert"
    return (name, action, dtype, b.shape, b, nones, (), None, 0, None)


def _check_same_kind(name: str, b: TensorInfo, srcs: Sequence[TensorInfo]) -> None:
    """Refuse a tensor that is float in some models and integer in others."""
    kinds = {s.is_float for s in srcs} | {b.is_float}
    if len(kinds) > 1:
        who = next(s for s in srcs if s.is_float != b.is_float)
        raise MergeError(
            f"float in one model, integer in another (base {b.dtype}, {who.file.parent}: {who.dtype})",
            who.file,
            name,
            "merge checkpoints of the same architecture",
        )


def _check_non_float_equal(
    name: str, b: TensorInfo, srcs: Sequence[TensorInfo], shapes: set[tuple[int, ...]]
) -> None:
    """Refuse a non-float tensor whose dtype or shape differs between the models (such a
    tensor is copied from the base, so every model must have the same one)."""
    if len({s.dtype for s in srcs} | {b.dtype}) > 1 or len(shapes) > 1:
        who = next(s for s in srcs if s.dtype != b.dtype or s.shape != b.shape)
        raise MergeError(
            f"non-float tensor differs (base {b.dtype}{list(b.shape)}, "
            f"{who.file.parent}: {who.dtype}{list(who.shape)})",
            who.file,
            name,
            "merge checkpoints of the same architecture",
        )


def _check_mergeable_dtypes(name: str, b: TensorInfo, srcs: Sequence[TensorInfo]) -> None:
    """Refuse a float dtype the kernels cannot merge (they read F32, F16 and BF16)."""
    for t in (b, *srcs):
        if t.dtype not in FLOAT_ITEMSIZE:
            raise MergeError(
                f"cannot merge dtype {t.dtype}",
                t.file,
                name,
                "convert the checkpoint to bf16, fp16 or fp32",
            )


def _check_vocab_shapes(
    name: str, b: TensorInfo, srcs: Sequence[TensorInfo], shapes: set, uses_base: bool
) -> None:
    """Refuse shapes the vocabulary rule does not cover: any mismatch without a base
    (``linear``), a 0-d tensor, or shapes that differ beyond the first dimension."""
    if not uses_base or len({s[1:] for s in shapes}) != 1 or len(b.shape) == 0:
        who = next(s for s in srcs if s.shape != b.shape)
        raise MergeError(
            f"shape mismatch: {'base' if uses_base else 'model 0'} {list(b.shape)}, "
            f"{who.file.parent} {list(who.shape)}",
            who.file,
            name,
            "merge fine-tunes of the same base architecture",
        )


def _walk_tensors(
    ref: ModelDir, models: Sequence[ModelDir], recipe: Recipe, out_dtype: str | None
) -> _Walk:
    """Plan every tensor of ``ref`` in natural name order: copy, convert or merge, with
    its dtype, shape, segments, key and resolved parameters (a tensor some fine-tune
    lacks is only noted in ``missing``).

    Raises:
        MergeError: as ``make_plan``, for the first tensor in name order that fails a check.
    """
    uses_base = recipe.row.uses_base
    positions = layer_positions(ref.tensors)
    walk = _Walk()
    nones = (None,) * len(models)
    for name in sorted(ref.tensors, key=natural_key):
        b = ref.tensors[name]
        srcs = [m.tensors.get(name) for m in models]
        have = [j for j, s in enumerate(srcs) if s is not None]
        # mergekit's base_model as model 0 (nearswap, slerp): a tensor only it has is copied
        # (mergekit's PASSTHROUGH_*SINGLETON policies; SPEC "NearSwap" "Edges")
        if (not have and uses_base) or (recipe.row.base_is_input and have == [0]):
            walk.base_only.append(name)
            walk.rows.append(_base_only_row(name, b, out_dtype, nones))
            continue
        if len(have) != len(models):
            lacking = [j for j in range(len(models)) if srcs[j] is None]
            walk.missing.setdefault(lacking[0], []).append(name)
            continue
        _check_same_kind(name, b, srcs)
        shapes = {s.shape for s in srcs} | {b.shape}
        if not b.is_float:
            _check_non_float_equal(name, b, srcs, shapes)
            walk.rows.append((name, "copy", b.dtype, b.shape, b, nones, (), None, 0, None))
            continue
        _check_mergeable_dtypes(name, b, srcs)
        dtype = out_dtype or b.dtype
        tp = _params(recipe, name, positions[name])
        if (uses_base and recipe.row.row_op is None) or recipe.row.working_dtype == "inputs":
            tp = replace(tp, compute=working_dtype(recipe.compute_dtype, [b, *srcs]))
        key = tensor_key(recipe.seed, name)
        if len(shapes) == 1:
            seg = Segment(
                0,
                b.numel,
                uses_base,
                tuple(range(len(models))),
                tp.w,
                tp.drop or (0.0,) * len(models),
                tp.scale,
            )
            walk.rows.append((name, "merge", dtype, b.shape, b, tuple(srcs), (seg,), None, key, tp))
            continue
        # a row-wise method (slerp, nearswap, ram: mergekit refuses any mismatch) has no
        # vocabulary rule
        _check_vocab_shapes(name, b, srcs, shapes, uses_base and recipe.row.row_op is None)
        shape, segs, rule = _row_segments(name, b, srcs, tp)
        walk.vocab_rules.append(rule)
        walk.vocab_rows = max(walk.vocab_rows or 0, shape[0])
        rows = [s.shape[0] for s in srcs]
        walk.tokenizer_model = rows.index(max(rows))
        walk.rows.append((name, "merge", dtype, shape, b, tuple(srcs), segs, rule, key, tp))
    return walk


def working_dtype(given: str | None, infos: Sequence[TensorInfo]) -> str:
    """The working dtype D of a task-vector merge of one tensor (docs/SPEC.md "Working dtype
    (v3)", mergekit 0.1.5's ``promoted_dtype``): ``given`` (the recipe's ``dtype:``, a
    safetensors string) when set, else torch.promote_types over the inputs' dtypes (one
    dtype: itself; BF16 with F16, or anything with F32: F32)."""
    if given is not None:
        return given
    dtypes = {i.dtype for i in infos}
    return dtypes.pop() if len(dtypes) == 1 else "F32"


def _raise_missing(ref: ModelDir, models: Sequence[ModelDir], missing: dict[int, list[str]]):
    """Refuse tensors some fine-tunes lack, naming the first such fine-tune (lowest j).

    Raises:
        MergeError: always.
    """
    j, names = next(iter(sorted(missing.items())))
    raise MergeError(
        f"{_differ(ref, models[j])}{sum(map(len, missing.values()))} tensor(s) missing from fine-tune "
        f"{models[j].path} (the base and other fine-tunes have them)",
        models[j].path,
        _names(names),
        "merge fine-tunes saved with the same tensors",
    )


def _shard_plan(fname: str, members: list[tuple], merge_ops: tuple[str, ...],
                needed=None) -> ShardPlan:  # fmt: skip
    """One output shard: its tensors (``members``, rows as ``_Walk.rows``, in the shard's
    order) laid out back to back from byte 0 of its data area, and its header (JSON
    padded with spaces to a multiple of 8 bytes, after its 8-byte little-endian length)."""
    tensors, header, offset = [], {"__metadata__": {"format": "pt"}}, 0
    for name, action, dtype, shape, b, srcs, segs, rule, key, tp in members:
        ops = merge_ops if action == "merge" else (action,)
        if action == "merge" and needed is not None:
            ops = tuple(op for op in ops if needed(op, tp))
        t = TensorPlan(
            name, action, dtype, tuple(shape), offset, b, srcs, segs, rule, key, tp, ops
        )
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
        tensors.append(t)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return ShardPlan(fname, tuple(tensors), len(text).to_bytes(8, "little") + text)


#: The order of the safetensors format's dtypes (its ``Dtype`` enum); its writer puts a
#: file's tensors in descending rank, then by name (``safetensors.serialize``).
SAFETENSORS_DTYPE_RANK = {d: i for i, d in enumerate((
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
    "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"))}  # fmt: skip


def shard_plans(
    plans: list[tuple], merge_ops: tuple[str, ...], shard_size_bytes: int, needed=None
) -> list[ShardPlan]:
    """The output shards of a plan's tensors (docs/SPEC.md "Output").

    Args:
        plans: one row per output tensor, in natural name order: (name, action, dtype,
            shape, base TensorInfo, sources, segments, rule, key, params), the fields of
            ``TensorPlan`` but its offset and ops (action ``merge``, ``copy`` or
            ``convert``; dtype a safetensors string).
        merge_ops: the passes of a merged tensor (``Method.passes``).
        needed: ``needed(op, params)`` False drops a pass for a tensor of those
            ``TensorParams`` (``Method.pass_needed``); None keeps every pass.
        shard_size_bytes: greedy limit per shard (HF ``max_shard_size``; a larger tensor
            gets a shard of its own).

    Returns:
        The ``ShardPlan``s in file order; within a shard, the order ``safetensors``' own
        writer uses (``SAFETENSORS_DTYPE_RANK`` descending, then the names as strings, so
        ``layers.10`` before ``layers.2``), laid out back to back from byte 0: a shard
        holding the same tensors as one written by ``safetensors.torch.save_file`` (as
        mergekit's) has the same header and bytes.
    """
    sizes = [math.prod(s[3]) * DTYPE_ITEMSIZE[s[2]] for s in plans]
    groups = greedy_shards(sizes, shard_size_bytes)
    names = shard_names(len(groups))
    shards = []
    for fname, group in zip(names, groups):
        members = sorted(
            (plans[i] for i in group), key=lambda s: (-SAFETENSORS_DTYPE_RANK[s[2]], s[0])
        )
        shards.append(_shard_plan(fname, members, merge_ops, needed))
    return shards


def make_plan(
    base: ModelDir | None, models: Sequence[ModelDir], recipe: Recipe, shard_size_bytes: int
) -> Plan:
    """Plan a merge from headers alone (docs/SPEC.md "Tensors that are not merged", "Output",
    "Per-tensor parameters").

    Args:
        base: the validated base directory (None for ``linear``, which has no base; given
            with ``linear`` it is not read: only its side files are used).
        models: the validated fine-tunes, in command-line order (model j).
        recipe: the recipe; its parameters are resolved here for every merged tensor.
        shard_size_bytes: greedy output shard limit in bytes (HF ``max_shard_size``).

    Returns:
        The Plan; output tensors in natural name order, so the output does not depend on
        how the inputs are sharded. Every merged tensor carries its key, its resolved
        parameters and its ops (the passes, from the method table).

    Raises:
        MergeError: a tensor some fine-tunes lack, a tensor the base lacks, a shape
            mismatch other than the vocabulary rule's (any mismatch for ``linear``), a float
            tensor that is an integer elsewhere, a float dtype the kernels cannot merge, an
            unknown ``--dtype``, a recipe value out of range for some tensor (named), or
            trim_scope model with per-tensor densities.
    """
    row = recipe.row
    uses_base = row.uses_base
    if uses_base and base is None:
        raise MergeError(f"method {row.name} needs a base model", None, None, "pass --base DIR")
    ref = base if uses_base else models[0]
    out_dtype = None if recipe.dtype is None else normalize_dtype(recipe.dtype)
    merge_ops = row.passes(recipe.trim_scope)
    _check_no_extra_tensors(ref, models, uses_base)
    walk = _walk_tensors(ref, models, recipe, out_dtype)
    if walk.missing:
        _raise_missing(ref, models, walk.missing)
    if row.sparse.stats and recipe.trim_scope == "model":  # Plan.model_scope, before a Plan exists
        _check_model_scope(walk.rows, recipe)
    shards = shard_plans(walk.rows, merge_ops, shard_size_bytes, row.pass_needed)
    return Plan(
        tuple(shards), recipe, tuple(walk.base_only), tuple(walk.vocab_rules), walk.vocab_rows,
        walk.tokenizer_model,
    )


def architecture(m) -> str | None:
    """The ``architectures`` a model's ``config.json`` names (``"LlamaForCausalLM"``), or
    None when it has no readable config (messages only: merging never depends on it)."""
    path = Path(m.path) / "config.json"
    try:
        if path.stat().st_size > 1 << 20:
            return None
        archs = json.loads(path.read_text("utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs):
        return ",".join(archs)
    return None


def _differ(ref, model) -> str:
    """``"the architectures differ (A vs B): "`` when the configs say so, else ``""``."""
    archs = (architecture(model), architecture(ref))
    if None in archs or archs[0] == archs[1]:
        return ""
    return f"the architectures differ ({archs[0]} vs {archs[1]}): "
