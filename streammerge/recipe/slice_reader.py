"""Reads the ``slices:`` of a mergekit YAML recipe into a ``SliceRecipe``
(``streammerge.recipe.slices``): every key and value checked, one line naming the key and
its YAML line for anything wrong, before any model is opened for its tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from streammerge.methods.method import Method
from streammerge.methods.passthrough import SCALE as PASSTHROUGH_SCALE
from streammerge.recipe.dtypes import normalize_dtype
from streammerge.recipe.slices import (
    SCALE,
    SLICE_KEYS,
    SLICE_TOP_KEYS,
    SOURCE_KEYS,
    Slice,
    SliceRecipe,
    SliceSource,
)


def _model_id(p: Path | str) -> str:
    """Identity of a resolved model: its real path, or its URL."""
    return os.path.realpath(p) if isinstance(p, Path) else str(p)


@dataclass
class SlicesReader:
    """Reads the ``slices`` of a recipe (``streammerge.recipe.mergekit_yaml.load_recipe``
    hands it the parsed document). Each check fails with ``doc.fail``: one line naming the
    key and its line.

    Attributes:
        doc: the parsed YAML; here: the recipe's folder; resolve: ``_resolve_model``;
            check_value: ``_check_value``; known: every parameter's YAML key
            (``yaml_params``); row: the ``merge_method``'s ``Method``.
        models: the distinct models in order of first use; labels: as first written.
        notices: lines to print (settings the method ignores).
        lines: recipe key (recipe names: ``slices[0].parameters.t``) -> its YAML line.
    """

    doc: object
    here: Path
    resolve: object
    check_value: object
    known: dict
    row: Method
    models: list = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    lines: dict = field(default_factory=dict)
    _ids: dict = field(default_factory=dict)
    _base: str | None = None

    def read(self, cfg: dict) -> SliceRecipe:
        """The ``SliceRecipe`` of the whole document ``cfg`` (its slices, parameters and
        dtypes)."""
        doc = self.doc
        for key in cfg:
            if key not in SLICE_TOP_KEYS and not doc.anchor_only(key):
                doc.fail(str(key), "unknown key with slices",
                         f"use {', '.join(sorted(SLICE_TOP_KEYS))}")  # fmt: skip
        if cfg.get("tokenizer_source") is not None:
            doc.fail("tokenizer_source", "not supported with slices (mergekit rebuilds the "
                     "embeddings for the chosen tokenizer; streammerge copies them unchanged)",
                     "drop it: the tokenizer files of base_model, else of the first slice's "
                     "model, are copied")  # fmt: skip
        if cfg.get("base_model") is not None:
            self._base = _model_id(self.resolve(cfg["base_model"], "base_model", doc, self.here))
        entries = cfg.get("slices")
        if not isinstance(entries, list) or not entries:
            doc.fail("slices", "expected a list of {sources: [...]} entries")
        slices = tuple(self._slice(i, e) for i, e in enumerate(entries))
        params = self.params(cfg.get("parameters") or {}, "parameters")
        compute, out = self.dtypes(cfg)
        n = len(self.models)
        if not self.row.slices_only:
            n = self._merge_arity(slices)
        lines = {**dict(doc.lines), **self.lines}
        return SliceRecipe(
            self.row.name, n, 0, None, None, None, tuple({} for _ in range(n)), params,
            "tensor", out, str(doc.path), lines, compute, slices=slices, labels=tuple(self.labels),
        )  # fmt: skip

    def _merge_arity(self, slices: tuple[Slice, ...]) -> int:
        """The merge inputs per slice (every slice the same number, within the method's
        limits)."""
        row, doc = self.row, self.doc
        counts = [len(sl.sources) - (1 if row.uses_base else 0) for sl in slices]
        for sl, k in zip(slices, counts):
            if k != counts[0]:
                doc.fail(f"{sl.key}.sources", f"{k} models to merge, {slices[0].key} has "
                         f"{counts[0]}: streammerge merges as many models in every slice",
                         "give every slice the same sources count")  # fmt: skip
        k = counts[0]
        most = row.max_models
        if k < row.min_models or (most is not None and k > most):
            want = f"{row.min_models}" if most == row.min_models else f"at least {row.min_models}"
            doc.fail(f"{slices[0].key}.sources", f"{row.name} merges {want} models"
                     f"{' besides the base' if row.uses_base else ''}, got {k}",
                     "list the models to merge under each slice's sources")  # fmt: skip
        return k

    def _slice(self, i: int, e) -> Slice:
        doc, key, row = self.doc, f"slices[{i}]", self.row
        if not isinstance(e, dict):
            doc.fail(key, f"expected a mapping with sources:, got {e!r}")
        for k in e:
            if k not in SLICE_KEYS:
                doc.fail(f"{key}.{k}", "unknown key", f"use {', '.join(sorted(SLICE_KEYS))}")
            if k == "residual_weight" or (k == "base_model" and row.slices_only):
                self.notices.append(f"{key}.{k} (line {doc.lines[f'{key}.{k}']}) does nothing "
                                    f"in {row.name}: ignored (as in mergekit)")  # fmt: skip
        sources = e.get("sources")
        if not isinstance(sources, list) or not sources:
            doc.fail(f"{key}.sources", "expected a list of {model, layer_range} entries",
                     line=doc.lines.get(f"{key}.sources") or doc.lines.get(key))  # fmt: skip
        if row.slices_only and len(sources) > 1:
            doc.fail(f"{key}.sources", f"{len(sources)} sources: passthrough takes exactly one "
                     "per slice", "give each slice one source, or name a merge_method to "
                     "merge the sources (slerp, ties, linear...)")  # fmt: skip
        if not row.slices_only and len(sources) < 2:
            doc.fail(f"{key}.sources", f"1 source: merge_method {row.name} merges 2+ sources "
                     "per slice", "list the models to merge, or use merge_method: passthrough "
                     "to stack layers")  # fmt: skip
        srcs = tuple(self._source(f"{key}.sources[{k}]", s) for k, s in enumerate(sources))
        params = self.params(e.get("parameters") or {}, f"{key}.parameters")
        base = None if row.slices_only else self._slice_base(key, e, srcs)
        return Slice(srcs, params, key, base)

    def _slice_base(self, key: str, e: dict, srcs: tuple[SliceSource, ...]) -> int | None:
        """The index of the base's source in a merged slice (the slice's ``base_model``,
        else the recipe's), None for a method without a base. Its sources' models are
        distinct and their layer ranges equally long (as mergekit requires)."""
        doc, row = self.doc, self.row
        for s in srcs[1:]:
            if s.stop - s.start != srcs[0].stop - srcs[0].start:
                doc.fail(f"{s.key}.layer_range", f"{s.stop - s.start} layers, "
                         f"{srcs[0].key} has {srcs[0].stop - srcs[0].start}: the sources of "
                         "a slice hold as many layers (as in mergekit)")  # fmt: skip
        ids = [s.model for s in srcs]
        if len(set(ids)) != len(ids):
            dup = next(s for k, s in enumerate(srcs) if s.model in ids[:k])
            doc.fail(f"{dup.key}.model", f"{dup.label} is already a source of {key}",
                     "merge distinct models in one slice")  # fmt: skip
        if row.base_optional and (self._base is not None or e.get("base_model") is not None):
            doc.fail("base_model" if e.get("base_model") is None else f"{key}.base_model",
                     f"method {row.name} with a base_model in a slices: recipe is not "
                     "supported yet", "remove base_model:, or use a models: recipe")  # fmt: skip
        if not (row.uses_base or row.base_is_input):
            return None
        base = self._base
        if e.get("base_model") is not None:
            base = _model_id(self.resolve(e["base_model"], f"{key}.base_model", doc, self.here))
        if base is None:
            doc.fail("base_model", f"method {row.name} needs a base_model (top level or per "
                     "slice)", "add base_model: (one of each slice's sources)", line=1)  # fmt: skip
        found = [k for k, s in enumerate(srcs) if _model_id(self.models[s.model]) == base]
        if not found:
            doc.fail(f"{key}.sources", f"the base_model is not a source of {key}: {row.name} "
                     "reads the base's layers from the slice", "list the base among the "
                     "slice's sources, with its layer_range")  # fmt: skip
        return found[0]

    def _source(self, key: str, e) -> SliceSource:
        doc = self.doc
        if not isinstance(e, dict):
            doc.fail(key, f"expected a mapping with model and layer_range, got {e!r}")
        for k in e:
            if k not in SOURCE_KEYS:
                doc.fail(f"{key}.{k}", "unknown key", f"use {', '.join(sorted(SOURCE_KEYS))}")
        for k in ("model", "layer_range"):
            if k not in e:
                doc.fail(key, f"missing {k}:")
        rng = e["layer_range"]
        rk = f"{key}.layer_range"
        if not (isinstance(rng, list) and len(rng) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in rng)):  # fmt: skip
            doc.fail(rk, f"expected [start, stop] (two integers), got {rng!r}")
        if not 0 <= rng[0] < rng[1]:
            doc.fail(rk, f"{rng} is empty or negative: need 0 <= start < stop",
                     "give [start, stop) with start < stop")  # fmt: skip
        label = e["model"]
        p = self.resolve(label, f"{key}.model", doc, self.here)
        mid = _model_id(p)
        if mid not in self._ids:
            self._ids[mid] = len(self.models)
            self.models.append(p)
            self.labels.append(str(label))
        params = self.params(e.get("parameters") or {}, f"{key}.parameters", per_model=True)
        return SliceSource(self._ids[mid], str(label), rng[0], rng[1], params, key,
                           doc.lines.get(rk))  # fmt: skip

    def params(self, params, key: str, per_model: bool = False) -> dict:
        """The parameters of a ``parameters`` mapping at ``key`` that the method reads,
        by recipe name (each value checked); a notice for one it does not read (or a
        whole-merge one under a source: mergekit reads those per slice and at the top
        only), one line for an unknown one. passthrough reads ``scale``."""
        doc, row = self.doc, self.row
        if not isinstance(params, dict):
            doc.fail(key, "expected a mapping")
        out = {}
        for k, v in params.items():
            pk = f"{key}.{k}"
            param = PASSTHROUGH_SCALE if row.slices_only and k == SCALE else self.known.get(k)
            if param is None:
                doc.fail(pk, "unknown parameter", f"{row.name} takes "
                         f"{', '.join(p.key for p in row.params) or 'no parameters'}")  # fmt: skip
            self.check_value(v, pk, doc, param.layered, param.kind)
            if param.only is not None and v != param.only:
                doc.fail(pk, f"{param.key}: {str(v).lower()} is not supported",
                         f"drop it ({param.help})")  # fmt: skip
            own = row.param(param.name)
            if own is None or own.key != param.key:  # (passthrough's scale is not lambda)
                self.notices.append(f"{pk} (line {doc.lines[pk]}) does not apply to "
                                    f"{row.name}: ignored")  # fmt: skip
            elif per_model and not param.per_model:
                self.notices.append(f"{pk} (line {doc.lines[pk]}) is ignored: it applies to "
                                    "the whole merge only per slice or at the top level (as "
                                    "in mergekit)")  # fmt: skip
            elif param.affects_values and param.only is None:
                out[param.name] = v
                self.lines[f"{key}.{param.name}"] = doc.lines[pk]
        return out

    def dtypes(self, cfg: dict) -> tuple[str | None, str | None]:
        """(mergekit's compute dtype, the output dtype) as safetensors strings, None when
        not given (the output dtype defaults to the compute dtype, as in mergekit)."""
        from streammerge.recipe.mergekit_yaml import COMPUTE_DTYPES

        names = {}
        for key in ("dtype", "out_dtype"):
            v = cfg.get(key)
            if v is not None:
                name = str(v).removeprefix("torch.")
                if name not in COMPUTE_DTYPES:
                    self.doc.fail(key, f"unsupported dtype {v!r}", "use float32, bfloat16 or float16")
                names[key] = normalize_dtype(name)
        compute = names.get("dtype")
        return compute, names.get("out_dtype") or compute
