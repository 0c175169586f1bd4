"""The merged tensors of a slices recipe whose method is not passthrough (docs/SPEC.md
"Layer slices", "Per-slice merges"): output layer ``i`` of a slice is the merge of its
sources' layers at the same offset, every tensor planned as a merge of the renamed input
tensors, with the parameters mergekit 0.1.5 resolves for it (``SliceScope``).

Worked example: slices ``[a 0..3, b 2..5]`` then ``[a 4..7, b 4..7]`` with slerp and
base_model a: output layer 1 <- slerp(v0 = a layer 1, v1 = b layer 3) at t(1/3); output
layer 5 <- slerp(a layer 5, b layer 5) at t(1/3) (the gradient restarts per slice);
``model.embed_tokens`` is merged from the first slice's models at t = 0, ``model.norm``
and ``lm_head`` from the last slice's, also at t = 0 (mergekit's ``plan_module``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from streammerge.errors import MergeError
from streammerge.io.reader import TensorInfo
from streammerge.kernels.common import FLOAT_ITEMSIZE, tensor_key
from streammerge.plan.layer_stack import LAYER_PREFIX, OPTIONAL, POST_WEIGHTS, PRE_WEIGHTS, Stack
from streammerge.plan.plan_types import Segment
from streammerge.plan.planner import working_dtype
from streammerge.recipe.recipe import RecipeError
from streammerge.recipe.slices import SliceRecipe, SliceScope


def merge_rows(recipe: SliceRecipe, stacks: Sequence[Stack]) -> tuple[list[tuple], dict, dict]:
    """Every output tensor of a merging slices recipe as a plan row
    (``planner.shard_plans``' form), the model whose tensor fills each row's reference
    slot (``SlicePlan.roles``), and the model of each of its sources
    (``SlicePlan.source_models``), as the journal names inputs (``"0"``, ``"1"``...).

    Raises:
        MergeError: a tensor whose shapes or kinds differ between a slice's sources, a
            dtype the kernels cannot read, a recipe value out of range (named), a tensor
            outside the layers that one of the end slices' models lacks.
    """
    rows, roles, sources, scopes, first = [], {}, {}, [], 0
    for i, sl in enumerate(recipe.slices):
        scopes.append(recipe.scope(i, first))
        first += sl.length
    for o in recipe.out_layers():
        layers = [stacks[m].layers[j] for m, j in o.sources]
        for rest in layers[0]:
            name = f"{LAYER_PREFIX}{o.index}.{rest}"
            infos = [layer[rest] for layer in layers]
            rows.append(_merge_row(recipe, scopes[o.slice], o.slice, name, infos, o.t))
            roles[name], sources[name] = _roles(recipe, o.slice)
    last = len(recipe.slices) - 1
    for i, names in ((0, PRE_WEIGHTS), (last, POST_WEIGHTS)):
        end = recipe.slices[i].sources
        for name in names:
            infos = [stacks[s.model].outside.get(name) for s in end]
            if all(x is None for x in infos) and name in OPTIONAL:
                continue
            if None in infos:
                who = stacks[end[infos.index(None)].model]
                raise MergeError(f"{who.label} has no {name}, which the output merges from "
                                 f"the {'first' if i == 0 else 'last'} slice's models",
                                 who.model.path, name, "merge complete checkpoints of one "
                                 "architecture (tied and untied heads do not mix)")  # fmt: skip
            rows.append(_merge_row(recipe, scopes[i], i, name, infos, 0.0))
            roles[name], sources[name] = _roles(recipe, i)
    return rows, roles, sources


def _roles(recipe: SliceRecipe, slice_index: int) -> tuple[str, tuple[str, ...]]:
    """The models (indices, as the journal names inputs) of a slice's reference tensor
    (the base's source, else the first merge input's) and of its merge inputs."""
    sl = recipe.slices[slice_index]
    ins = recipe.merge_inputs(slice_index)
    k = sl.base if sl.base is not None else ins[0]
    return str(sl.sources[k].model), tuple(str(sl.sources[i].model) for i in ins)


def _merge_row(recipe: SliceRecipe, scope: SliceScope, slice_index: int, name: str,
               infos: list[TensorInfo], t: float) -> tuple:  # fmt: skip
    """The row of output tensor ``name`` merged from ``infos`` (one per source of the
    slice, in source order) at depth ``t``: its reference is the base's tensor (else the
    first merge input's), its sources the merge inputs' tensors in method order.

    Raises:
        MergeError: see ``merge_rows``.
    """
    sl = recipe.slices[slice_index]
    ins = recipe.merge_inputs(slice_index)
    srcs = tuple(infos[k] for k in ins)
    ref = infos[sl.base] if sl.base is not None else srcs[0]
    for k, x in enumerate(infos):
        if x.shape != ref.shape or x.is_float != ref.is_float:
            raise MergeError(f"{sl.sources[k].label}: {x.name} is {x.dtype}{list(x.shape)}, "
                             f"{ref.name} of another source {ref.dtype}{list(ref.shape)}",
                             x.file, name, "merge layers of one configuration")  # fmt: skip
        if x.is_float and x.dtype not in FLOAT_ITEMSIZE:
            raise MergeError(f"cannot merge dtype {x.dtype}", x.file, x.name,
                             "convert the checkpoint to bf16, fp16 or fp32")  # fmt: skip
    if not ref.is_float:  # integer buffers: copied from the reference, as make_plan does
        return (name, "copy", ref.dtype, ref.shape, ref, (None,) * len(srcs), (), None, 0, None)
    try:
        tp = scope.tensor_params(name, t)
    except RecipeError as e:
        raise MergeError(str(e), recipe.source, name, "fix the recipe value") from None
    if recipe.row.uses_base and recipe.row.row_op is None:  # docs/SPEC.md "Working dtype (v3)"
        tp = replace(tp, compute=working_dtype(recipe.compute_dtype, [ref, *srcs]))
    seg = Segment(0, math.prod(ref.shape), recipe.row.uses_base, tuple(range(len(srcs))),
                  tp.w, tp.drop or (0.0,) * len(srcs), tp.scale)  # fmt: skip
    dtype = recipe.dtype or ref.dtype
    return (name, "merge", dtype, ref.shape, ref, srcs, (seg,), None,
            tensor_key(recipe.seed, name), tp)  # fmt: skip
