"""Layer slices with ``merge_method: passthrough``: the recipe, read from mergekit's YAML.

mergekit 0.1.5's schema (``OutputSliceDefinition`` / ``InputSliceDefinition``)::

    merge_method: passthrough
    slices:
      - sources:
          - model: path/or/org/name
            layer_range: [0, 24]          # layers 0..23 of that model
      - sources:
          - model: path/or/org/name
            layer_range: [8, 32]
            parameters: {scale: ...}      # mergekit: tensor * scale (refused unless 1)
    base_model: ...                        # optional: config and tokenizer donor only
    dtype: float32                         # mergekit's load dtype; out_dtype: the output's

The output stacks the slices' layers in order, renumbered from 0 (``streammerge.plan.
slices`` plans every tensor as a copy of one input tensor). Each slice has exactly one
source: a slice that merges several models needs another method, not supported yet.

A parameter resolves as mergekit resolves a per-input one: the source's ``parameters``,
then the slice's, then the top level; filters match the *input* tensor's name; a gradient
runs over the slice's layers (``t = k / (L - 1)``, 1 for a one-layer slice), 0 for the
tensors outside the layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from streammerge.methods.method import Method
from streammerge.recipe.dtypes import normalize_dtype
from streammerge.recipe.recipe import Recipe, TensorParams, evaluate

#: The method of a slices recipe. Not in the registry: it has no kernel and no flag; every
#: output tensor is a copy (or a cast) of one input tensor.
PASSTHROUGH = Method(
    name="passthrough",
    order=1000,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(),
    summary="layers of the inputs stacked as given (mergekit passthrough slices)",
    source="mergekit passthrough",
    m3="none",
    min_models=1,
)
#: Keys of the recipe's top level when it has ``slices``.
SLICE_TOP_KEYS = {"merge_method", "slices", "base_model", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "name"}  # fmt: skip
#: Keys of one slice and of one source (mergekit's ``OutputSliceDefinition`` and
#: ``InputSliceDefinition``); ``base_model`` and ``residual_weight`` do nothing in
#: passthrough (mergekit ignores them too).
SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
#: The one parameter passthrough reads (mergekit: ``PerInput[Optional[float]]``).
SCALE = "scale"


@dataclass(frozen=True)
class SliceSource:
    """One source of a slice: layers ``[start, stop)`` of model ``model``.

    Attributes:
        model: index of the model among the recipe's distinct models (first use first).
        label: the ``model`` string as written.
        start, stop: the ``layer_range``.
        params: its ``parameters`` (only ``scale`` kept).
        key: ``slices[i].sources[k]`` (for messages); line: the line of its layer_range.
    """

    model: int
    label: str
    start: int
    stop: int
    params: dict = field(default_factory=dict)
    key: str = ""
    line: int | None = None


@dataclass(frozen=True)
class Slice:
    """One output slice: its sources (exactly one for passthrough) and its parameters."""

    sources: tuple[SliceSource, ...]
    params: dict = field(default_factory=dict)
    key: str = ""


@dataclass(frozen=True)
class OutLayer:
    """Output layer ``index`` <- layer ``layer`` of model ``model`` (from slice ``slice``,
    at depth ``t`` along it)."""

    index: int
    slice: int
    model: int
    layer: int
    t: float


@dataclass(frozen=True)
class SliceRecipe(Recipe):
    """A passthrough slices recipe: a ``Recipe`` whose method is ``PASSTHROUGH`` (no seed,
    no weights) plus the slices, mergekit's compute dtype and the models' labels.

    ``dtype`` (inherited) is the output dtype (``out_dtype``, else ``dtype``), None to keep
    each tensor's own; ``compute_dtype`` is mergekit's ``dtype`` (each tensor is cast to
    it when loaded, then to the output dtype when saved).
    """

    slices: tuple[Slice, ...] = ()
    compute_dtype: str | None = None
    labels: tuple[str, ...] = ()

    @property
    def row(self) -> Method:
        """``PASSTHROUGH``."""
        return PASSTHROUGH

    def tensor_params(self, name: str, t: float = 0.0) -> TensorParams:
        """No merged tensor: no weights, no parameters."""
        return TensorParams(())

    def out_layers(self) -> list[OutLayer]:
        """Every output layer in order, with its source (the first source of its slice)."""
        out: list[OutLayer] = []
        for i, sl in enumerate(self.slices):
            src = sl.sources[0]
            n = src.stop - src.start
            for k in range(n):
                t = k / (n - 1) if n > 1 else 1.0
                out.append(OutLayer(len(out), i, src.model, src.start + k, t))
        return out

    def scale(self, slice_index: int, in_name: str, t: float) -> tuple[float | None, str]:
        """mergekit's ``scale`` of the tensor ``in_name`` read for slice ``slice_index`` at
        depth ``t``, and the key it came from (None: not given, the tensor is copied).

        Raises:
            RecipeError: a value of the wrong type.
        """
        sl = self.slices[slice_index]
        src = sl.sources[0]
        scopes = ((src.params, f"{src.key}.parameters.{SCALE}"),
                  (sl.params, f"{sl.key}.parameters.{SCALE}"),
                  (self.params, f"parameters.{SCALE}"))  # fmt: skip
        for scope, where in scopes:
            if SCALE in scope:
                v = evaluate(scope[SCALE], in_name, t, where)
                if v is not None:
                    return float(v), where
        return None, SCALE

    def record(self) -> dict:
        """The recipe part of ``streammerge.json``: the slices as given, the compute dtype
        and the output layers (``"output <- label:layer"``)."""
        rec = super().record()
        rec["slices"] = [
            {"sources": [{"model": s.label, "layer_range": [s.start, s.stop],
                          **({"parameters": dict(s.params)} if s.params else {})}
                         for s in sl.sources],
             **({"parameters": dict(sl.params)} if sl.params else {})}
            for sl in self.slices
        ]  # fmt: skip
        rec["compute_dtype"] = self.compute_dtype
        rec["layers"] = [f"{o.index} <- model {o.model}:{o.layer}" for o in self.out_layers()]
        rec["layer_runs"] = self.layer_runs()
        return rec

    def layer_runs(self) -> list[str]:
        """The output layers one line per slice: ``"6-11 <- model 0:2-7"`` (model j as
        ``streammerge.json`` lists the models)."""
        out, first = [], 0
        for sl in self.slices:
            s = sl.sources[0]
            n = s.stop - s.start
            out.append(f"{_span(first, first + n - 1)} <- model {s.model}:"
                       f"{_span(s.start, s.stop - 1)}")  # fmt: skip
            first += n
        return out


def _span(a: int, b: int) -> str:
    """``"a-b"``, or ``"a"`` when a == b."""
    return f"{a}" if a == b else f"{a}-{b}"


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
            (``yaml_params``), for ignored-parameter notices.
        models: the distinct models in order of first use; labels: as first written.
        notices: lines to print (settings passthrough ignores).
    """

    doc: object
    here: Path
    resolve: object
    check_value: object
    known: dict
    models: list = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    _ids: dict = field(default_factory=dict)

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
        entries = cfg.get("slices")
        if not isinstance(entries, list) or not entries:
            doc.fail("slices", "expected a list of {sources: [...]} entries")
        slices = tuple(self._slice(i, e) for i, e in enumerate(entries))
        params = self.params(cfg.get("parameters") or {}, "parameters")
        compute, out = self.dtypes(cfg)
        return SliceRecipe(
            "passthrough", len(self.models), 0, None, None, None, tuple({} for _ in self.models),
            params, "tensor", out, str(doc.path), dict(doc.lines), slices, compute,
            tuple(self.labels),
        )  # fmt: skip

    def _slice(self, i: int, e) -> Slice:
        doc, key = self.doc, f"slices[{i}]"
        if not isinstance(e, dict):
            doc.fail(key, f"expected a mapping with sources:, got {e!r}")
        for k in e:
            if k not in SLICE_KEYS:
                doc.fail(f"{key}.{k}", "unknown key", f"use {', '.join(sorted(SLICE_KEYS))}")
            if k in ("base_model", "residual_weight"):
                self.notices.append(f"{key}.{k} (line {doc.lines[f'{key}.{k}']}) does nothing "
                                    "in passthrough: ignored (as in mergekit)")  # fmt: skip
        sources = e.get("sources")
        if not isinstance(sources, list) or not sources:
            doc.fail(f"{key}.sources", "expected a list of {model, layer_range} entries",
                     line=doc.lines.get(f"{key}.sources") or doc.lines.get(key))  # fmt: skip
        if len(sources) > 1:
            doc.fail(f"{key}.sources", f"{len(sources)} sources: passthrough takes exactly one "
                     "per slice; slices with 2+ sources need a merge method per slice: not yet "
                     "supported", "give each slice one source")  # fmt: skip
        src = self._source(f"{key}.sources[0]", sources[0])
        return Slice((src,), self.params(e.get("parameters") or {}, f"{key}.parameters"), key)

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
        params = self.params(e.get("parameters") or {}, f"{key}.parameters")
        return SliceSource(self._ids[mid], str(label), rng[0], rng[1], params, key,
                           doc.lines.get(rk))  # fmt: skip

    def params(self, params, key: str) -> dict:
        """The ``scale`` of a ``parameters`` mapping at ``key`` (checked); a notice for a
        parameter other methods read, one line for an unknown one."""
        doc = self.doc
        if not isinstance(params, dict):
            doc.fail(key, "expected a mapping")
        out = {}
        for k, v in params.items():
            pk = f"{key}.{k}"
            if k == SCALE:
                self.check_value(v, pk, doc, True, "number")
                out[SCALE] = v
            elif k in self.known:
                self.notices.append(f"{pk} (line {doc.lines[pk]}) does not apply to "
                                    "passthrough: ignored")  # fmt: skip
            else:
                doc.fail(pk, "unknown parameter", "passthrough takes scale")
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
