"""The plan of a slices recipe (``streammerge.recipe.slices``), from headers and
config.json alone, checked before a byte is written: with passthrough every output tensor
is a copy (or a cast) of one input tensor (below); with another method each is a merge of
the slice's sources' tensors (``streammerge.plan.slice_merge``).

Output layer i is layer j of model m, renumbered consecutively over the slices, read by
name: ``model.layers.<j>.<rest>`` of m becomes ``model.layers.<i>.<rest>``. A layer used
twice is read twice (two copies; nothing is held). As mergekit 0.1.5's planner
(``MergePlanner.plan_module``): the tensors before the layers (``model.embed_tokens``) come
from the first slice's model, those after them (``model.norm``, ``lm_head``) from the last
slice's; ``lm_head`` is optional (tied embeddings: none is written when that model has
none).

Dtypes as mergekit: a tensor is cast to ``dtype`` when loaded, then to ``out_dtype`` when
saved. streammerge casts once (``convert``), so a recipe whose two casts differ from one
(a lossy ``dtype`` followed by another ``out_dtype``) is refused, as is a ``scale`` other
than 1 (mergekit multiplies the tensor by it; no scaled copy exists yet).

The output's ``config.json`` (``SlicePlan.config_updates``) is the donor's (``base_model``,
else the first slice's model) with ``num_hidden_layers`` and every per-layer list
(``layer_types``, ``no_rope_layers``...; ``layer_types`` derived as transformers does for
Gemma 2/3 and Qwen 2/3 configs without one) rebuilt for the output layers.

Worked example (SOLAR-style): an 8-layer model m, slices [0, 6) then [2, 8) -> 12 output
layers, 0..5 <- m:0..5 and 6..11 <- m:2..7; embed_tokens, norm and lm_head from m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from streammerge.errors import MergeError
from streammerge.io.reader import ModelDir, TensorInfo
from streammerge.kernels.common import FLOAT_ITEMSIZE
from streammerge.names import natural_key
from streammerge.plan.layer_stack import (
    CONFIG_DTYPES,
    LAYER_PREFIX,
    LAYERS_KEY,
    OPTIONAL,
    POST_WEIGHTS,
    PRE_WEIGHTS,
    Stack,
    architecture_of,
    read_stack,  # fmt: skip
)
from streammerge.plan.plan_types import Plan, TensorPlan
from streammerge.plan.planner import shard_plans
from streammerge.plan.slice_merge import merge_rows
from streammerge.recipe.recipe import TensorParams
from streammerge.recipe.slices import OutLayer, SliceRecipe


@dataclass(frozen=True)
class SlicePlan(Plan):
    """A ``Plan`` whose tensors are the slices' layers, copied or merged.

    Attributes:
        layers: every output layer and its source (``OutLayer``).
        roles: output tensor name -> index of the model of its reference tensor (the
            one it copies; a merge: the base's, else the first input's), as the journal
            names inputs: ``"0"``, ``"1"``...
        config_set: (key, value) pairs the output's config.json gets.
        source_models: merged tensor name -> the model index of each of its sources
            (a per-slice merge's input j is not model j).
    """

    layers: tuple[OutLayer, ...] = ()
    roles: dict = field(default_factory=dict)
    config_set: tuple = ()
    source_models: dict = field(default_factory=dict)

    def input_role(self, t: TensorPlan) -> str:
        """The model whose tensor fills ``t``'s reference slot (``t.base``)."""
        return self.roles[t.name]

    def source_roles(self, t: TensorPlan) -> list[str]:
        """The model of each of ``t.sources`` (a per-slice merge's inputs)."""
        return list(self.source_models.get(t.name, ())) or super().source_roles(t)

    def config_updates(self) -> dict:
        """``num_hidden_layers`` and the per-layer lists of the output."""
        return dict(self.config_set)


def _fail(recipe: SliceRecipe, key: str, what: str, todo: str, tensor: str | None = None):
    """Raise the one line of a recipe error at ``key`` (with its YAML line when known)."""
    line = recipe.lines.get(key)
    at = f"line {line}: " if line else ""
    raise MergeError(f"{at}{key}: {what}", recipe.source, tensor, todo)


def _check_ranges(recipe: SliceRecipe, stacks: Sequence[Stack]) -> None:
    """Every source's layer_range within its model (one line naming the slice)."""
    for sl in recipe.slices:
        for s in sl.sources:
            n = len(stacks[s.model].layers)
            if not 0 <= s.start < s.stop <= n:
                _fail(recipe, f"{s.key}.layer_range", f"[{s.start}, {s.stop}] is outside "
                      f"{s.label}'s {n} layers", f"give a range within [0, {n}]")  # fmt: skip


def _check_same_layout(recipe: SliceRecipe, stacks: Sequence[Stack], base: Stack | None) -> None:
    """One architecture for every slice model (and the base); every output layer with the
    tensors and shapes of the first."""
    used = sorted({s.model for sl in recipe.slices for s in sl.sources})
    ref = stacks[used[0]]
    for who in [stacks[j] for j in used[1:]] + ([base] if base is not None else []):
        if architecture_of(who.config) != architecture_of(ref.config):
            raise MergeError(f"{who.label} is {architecture_of(who.config)}, {ref.label} "
                             f"{architecture_of(ref.config)}", who.model.path, None,
                             "stack layers of models of one architecture")  # fmt: skip
    layers = recipe.out_layers()
    first = layers[0]
    want = {k: v.shape for k, v in stacks[first.model].layers[first.layer].items()}
    for o in layers:
        for k, (m, j) in enumerate(o.sources):
            got = {k: v.shape for k, v in stacks[m].layers[j].items()}
            if got != want:
                src = recipe.slices[o.slice].sources[k]
                diff = sorted(set(got) ^ set(want)) or sorted(k for k in got if got[k] != want[k])
                _fail(recipe, f"{src.key}.layer_range", f"layer {j} of {src.label} has other "
                      f"tensors or shapes than output layer 0 ({LAYER_PREFIX}{j}.{diff[0]})",
                      "stack layers of models of one configuration")  # fmt: skip


def _row(recipe: SliceRecipe, out_name: str, info: TensorInfo, slice_index: int, t: float) -> tuple:
    """The plan row (``planner._Walk.rows``' form) of output tensor ``out_name``, a copy of
    ``info``: copied, or converted to the output dtype.

    Raises:
        MergeError: two casts that differ from one, a dtype the kernels cannot convert, an
            integer tensor with a dtype or scale given, a scale other than 1 where mergekit
            would round twice.
    """
    scale, where = recipe.scale(slice_index, info.name, t)
    scaled = scale is not None and scale != 1.0
    src, compute, out = info.dtype, recipe.compute_dtype, recipe.dtype
    if not info.is_float:
        if compute is not None or out is not None or scaled:
            _fail(recipe, "dtype" if not scaled else where, f"{info.name} is {src}: mergekit "
                  "would cast or scale it", "drop dtype, out_dtype and scale for this model",
                  out_name)  # fmt: skip
        return (out_name, "copy", src, info.shape, info, (), (), None, 0, None)
    dtype = out or src
    if dtype != src and src not in FLOAT_ITEMSIZE:
        _fail(recipe, "out_dtype" if recipe.lines.get("out_dtype") else "dtype",
              f"cannot convert {info.name} from {src}", "drop dtype and out_dtype", out_name)  # fmt: skip
    if compute is not None and compute not in (src, "F32") and dtype != compute:
        _fail(recipe, "out_dtype", f"{info.name} ({src}) would be rounded to dtype {compute} "
              f"and then cast to {dtype}: streammerge casts once", "give out_dtype equal to "
              "dtype, or dtype: float32", out_name)  # fmt: skip
    if scaled:
        return _scaled_row(recipe, out_name, info, float(scale), where, dtype)
    action = "copy" if dtype == src else "convert"
    return (out_name, action, dtype, info.shape, info, (), (), None, 0, None)


def _scaled_row(recipe: SliceRecipe, out_name: str, info: TensorInfo, scale: float, where: str,
                dtype: str) -> tuple:  # fmt: skip
    """The ``convert`` row of a tensor multiplied by its ``scale`` (mergekit's ``x * s`` in
    the load dtype: ``round(float32(x) * float32(s))``); refused where mergekit would round
    twice (a load dtype or an output dtype other than the tensor's own)."""
    src, compute = info.dtype, recipe.compute_dtype
    if src not in FLOAT_ITEMSIZE or (compute is not None and compute != src) or dtype != src:
        _fail(recipe, where, f"scale {scale:g} for {info.name} (output {out_name}, {src}) with "
              f"dtype {compute or src} / out_dtype {dtype}: mergekit would round x * scale to "
              "the load dtype, then cast it", "give dtype and out_dtype equal to the models' "
              "dtype (or leave them out) with scale", out_name)  # fmt: skip
    if not math.isfinite(scale):
        _fail(recipe, where, f"scale {scale} for {info.name}: not a finite number",
              "give a finite scale", out_name)  # fmt: skip
    params = TensorParams((), (("scale", scale),))
    return (out_name, "convert", dtype, info.shape, info, (), (), None, 0, params)


def _outside_rows(recipe: SliceRecipe, stacks: Sequence[Stack]) -> list[tuple]:
    """Rows of the tensors before the layers (from the first slice's model) and after them
    (from the last slice's), as mergekit's ``plan_module`` takes them (depth t = 0)."""
    rows = []
    ends = ((0, PRE_WEIGHTS), (len(recipe.slices) - 1, POST_WEIGHTS))
    for i, names in ends:
        src = recipe.slices[i].sources[0]
        stack = stacks[src.model]
        for name in names:
            info = stack.outside.get(name)
            if info is None and name in OPTIONAL:
                continue
            if info is None:
                raise MergeError(f"{src.label} has no {name}, which the output takes from it "
                                 f"(the {'first' if i == 0 else 'last'} slice's model)",
                                 stack.model.path, name, "use a complete checkpoint")  # fmt: skip
            rows.append(_row(recipe, name, info, i, 0.0))
    return rows


def _config_set(recipe: SliceRecipe, stacks: Sequence[Stack], donor: Stack, rows: list) -> tuple:
    """The (key, value) pairs the output's config.json gets: the layer count, each
    per-layer list rebuilt from the output layers' sources, the output dtype.

    Raises:
        MergeError: a per-layer list some source model's config lacks; a donor config
            whose tie_word_embeddings contradicts the lm_head written or not.
    """
    layers = recipe.out_layers()
    used = sorted({o.model for o in layers})
    out: dict = {LAYERS_KEY: len(layers)}
    for key in sorted({k for j in used for k in stacks[j].per_layer} | set(donor.per_layer)):
        lacking = [stacks[j] for j in used if key not in stacks[j].per_layer]
        if lacking:
            raise MergeError(f"config.json of {lacking[0].label} has no per-layer {key} "
                             f"(another input has one)", lacking[0].model.path, None,
                             "stack layers of models of one configuration")  # fmt: skip
        out[key] = [stacks[o.model].per_layer[key][o.layer] for o in layers]
    tied = donor.config.get("tie_word_embeddings")
    head = any(r[0] == "lm_head.weight" for r in rows)
    if isinstance(tied, bool) and tied == head:
        raise MergeError(f"the output's config.json (from {donor.label}) says "
                         f"tie_word_embeddings {str(tied).lower()}, but lm_head.weight is "
                         f"{'' if head else 'not '}written (the last slice's model decides)",
                         donor.model.path, "lm_head.weight",
                         "take the last slice from a model tied as the config says")  # fmt: skip
    if recipe.dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in donor.config:
                out[key] = CONFIG_DTYPES[recipe.dtype]
    return tuple(out.items())


def plan_slices(
    recipe: SliceRecipe, models: Sequence[ModelDir], base: ModelDir | None, shard_size_bytes: int
) -> SlicePlan:
    """Plan a slices recipe (passthrough stack or per-slice merges) from headers and
    config.json alone.

    Args:
        recipe: the slices (``SliceRecipe``; model j of its sources is ``models[j]``).
        models: the distinct slice models, opened, in the recipe's order.
        base: the ``base_model`` (config and tokenizer donor only), or None: the first
            slice's model is the donor.
        shard_size_bytes: greedy output shard limit (as ``make_plan``).

    Returns:
        A ``SlicePlan``: output tensors in natural name order, each a copy or a convert
        (passthrough) or a merge (``slice_merge.merge_rows``).

    Raises:
        MergeError: one line naming the slice (and its YAML line) or the model: a range
            outside its model, an architecture without a known layer layout, models of
            different layouts, a scale other than 1, dtypes cast twice, a merged tensor
            whose sources differ in shape; nothing is written.
    """
    stacks = [read_stack(m, recipe.labels[j]) for j, m in enumerate(models)]
    base_stack = read_stack(base, "base_model") if base is not None else None
    _check_ranges(recipe, stacks)
    _check_same_layout(recipe, stacks, base_stack)
    rows, roles, sources = (merge_rows if recipe.merges else _copy_rows)(recipe, stacks)
    rows.sort(key=lambda r: natural_key(r[0]))
    donor = base_stack if base_stack is not None else stacks[recipe.slices[0].sources[0].model]
    config = _config_set(recipe, stacks, donor, rows)
    shards = shard_plans(rows, recipe.row.passes(recipe.trim_scope), shard_size_bytes,
                         recipe.row.pass_needed)  # fmt: skip
    return SlicePlan(tuple(shards), recipe, (), (), None, None, tuple(recipe.out_layers()),
                     roles, config, sources)  # fmt: skip


def _copy_rows(recipe: SliceRecipe, stacks: Sequence[Stack]) -> tuple[list, dict, dict]:
    """passthrough: the rows of every output tensor (copies of one input tensor), the
    model each comes from (``SlicePlan.roles``), and no merge sources."""
    rows, roles = [], {}
    for o in recipe.out_layers():
        for rest, info in stacks[o.model].layers[o.layer].items():
            name = f"{LAYER_PREFIX}{o.index}.{rest}"
            rows.append(_row(recipe, name, info, o.slice, o.t))
            roles[name] = str(o.model)
    for row in _outside_rows(recipe, stacks):
        rows.append(row)
        end = 0 if row[0] in PRE_WEIGHTS else len(recipe.slices) - 1
        roles[row[0]] = str(recipe.slices[end].sources[0].model)
    return rows, roles, {}
