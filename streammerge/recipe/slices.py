"""Layer slices (mergekit's ``slices:`` recipes): layers stacked, or merged slice by slice.

mergekit 0.1.5's schema (``OutputSliceDefinition`` / ``InputSliceDefinition``)::

    merge_method: passthrough             # or any method streammerge has (slerp, ties...)
    slices:
      - sources:
          - model: path/or/org/name
            layer_range: [0, 24]          # layers 0..23 of that model
      - sources:                          # 2+ sources: merged with merge_method
          - model: a
            layer_range: [8, 16]
            parameters: {weight: 0.7}     # per-source (per-model) parameters
          - model: b
            layer_range: [4, 12]          # the same number of layers
        parameters: {t: [0, 1]}           # per-slice parameters; gradients run over the slice
        base_model: a                     # per-slice base (else the top-level one)
    base_model: ...                       # base of the merges; config and tokenizer donor
    parameters: {...}                     # top level, lowest precedence
    dtype: float32                        # mergekit's load dtype; out_dtype: the output's

The output stacks the slices' layers in order, renumbered from 0 (``streammerge.plan.
slices`` plans every tensor). With ``passthrough`` each slice has exactly one source and
every output tensor is a copy of one input tensor; with another method every slice has
2+ sources of equal length, and output layer ``i`` is the merge of the sources' layers at
the same offset (docs/SPEC.md "Layer slices").

A parameter resolves as mergekit resolves it (``SliceScope.lookup``): a per-model one
from the source's ``parameters``, then the slice's, then the top level, its filters
matching that source's *input* tensor name; a whole-merge one (``t``, ``lambda``,
``normalize``) from the slice's, then the top level, its filters matching the *output*
name. A gradient runs over the slice's layers (``t = k / (n - 1)``, 1 for a one-layer
slice), 0 for the tensors outside the layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from streammerge.methods.passthrough import SCALE as PASSTHROUGH_SCALE
from streammerge.recipe.recipe import Recipe, TensorParams, first_value

#: Keys of the recipe's top level when it has ``slices``.
SLICE_TOP_KEYS = {"merge_method", "slices", "base_model", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "name"}  # fmt: skip
#: Keys of one slice and of one source (mergekit's ``OutputSliceDefinition`` and
#: ``InputSliceDefinition``); ``residual_weight`` does nothing (mergekit 0.1.5 ignores it
#: too), nor does ``base_model`` in passthrough.
SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
#: The one parameter passthrough reads (mergekit: ``PerInput[Optional[float]]``).
SCALE = PASSTHROUGH_SCALE.key
#: A tensor of layer N: ``model.layers.N.<rest>``.
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class SliceSource:
    """One source of a slice: layers ``[start, stop)`` of model ``model``.

    Attributes:
        model: index of the model among the recipe's distinct models (first use first).
        label: the ``model`` string as written.
        start, stop: the ``layer_range``.
        params: its ``parameters`` by recipe name (passthrough: only ``scale``; a merge:
            the method's per-model parameters).
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
    """One output slice: its sources (one for passthrough, 2+ of equal length for a
    merge), its parameters and, for a method with a base, the index in ``sources`` of
    the base's source (the slice's ``base_model``, else the recipe's), else None."""

    sources: tuple[SliceSource, ...]
    params: dict = field(default_factory=dict)
    key: str = ""
    base: int | None = None

    @property
    def length(self) -> int:
        """Its number of layers (every source has as many)."""
        return self.sources[0].stop - self.sources[0].start


@dataclass(frozen=True)
class OutLayer:
    """Output layer ``index`` <- layer ``layer`` of model ``model`` (the slice's first
    source; ``sources``: (model, layer) of every source of slice ``slice``), at depth
    ``t`` along the slice."""

    index: int
    slice: int
    model: int
    layer: int
    t: float
    sources: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class SliceScope(Recipe):
    """One slice of a merging slices recipe, as a ``Recipe`` of its merge inputs: input
    ``j`` is source ``inputs[j]`` of the slice (``SliceRecipe.merge_inputs``), ``models``
    their ``parameters``, ``params`` the top level's; ``tensor_params(output name, t)``
    resolves every parameter as mergekit does for this slice (``lookup``).

    Attributes:
        slice_params: the slice's ``parameters``; slice_key: ``slices[i]``.
        source_keys: ``slices[i].sources[k]`` of each input (messages).
        starts: the first input layer of each input; first: the slice's first output layer.
    """

    slice_params: dict = field(default_factory=dict)
    slice_key: str = ""
    source_keys: tuple[str, ...] = ()
    starts: tuple[int, ...] = ()
    first: int = 0

    def input_name(self, j: int, name: str) -> str:
        """The name in input ``j`` of the output tensor ``name``: ``model.layers.<i>.<rest>``
        -> ``model.layers.<starts[j] + i - first>.<rest>``; a tensor outside the layers
        keeps its name."""
        hit = _LAYER_NAME.match(name)
        if hit is None:
            return name
        return f"model.layers.{self.starts[j] + int(hit.group(1)) - self.first}.{hit.group(2)}"

    def lookup(self, j: int | None, key: str, name: str, t: float) -> tuple[object, str]:
        """mergekit 0.1.5's resolution in a slice (``ConfigReader``, ``ParameterResolver``):
        a per-model parameter (``j`` given) from input ``j``'s source, then the slice, then
        the top level, each filter matched on input ``j``'s tensor name
        (``input_name``); a whole-merge one (``j`` None) from the slice, then the top level,
        matched on the output name. The first scope that evaluates to a value wins.

        Returns:
            (value or None, the recipe key it came from with its YAML line when known).

        Raises:
            RecipeError: a value of the wrong type.
        """
        scopes = [(self.slice_params, f"{self.slice_key}.parameters.{key}"),
                  (self.params, f"parameters.{key}")]  # fmt: skip
        if j is not None:
            scopes.insert(0, (self.models[j], f"{self.source_keys[j]}.parameters.{key}"))
            name = self.input_name(j, name)
        return first_value(scopes, key, name, t, self.lines)


@dataclass(frozen=True)
class SliceRecipe(Recipe):
    """A slices recipe: a ``Recipe`` whose method is ``passthrough`` (copies: no seed, no
    weights) or the method each slice is merged with, plus the slices, mergekit's compute
    dtype and the models' labels. For a merge, ``n_models`` is the number of merge inputs
    of every slice (``merge_inputs``); for passthrough, the distinct models.

    ``dtype`` (inherited) is the output dtype (``out_dtype``, else ``dtype``), None to keep
    each tensor's own; ``compute_dtype`` (inherited) is mergekit's ``dtype`` (passthrough
    casts each tensor to it when loaded, then to the output dtype when saved; a merge with a
    task-vector method computes in it, docs/SPEC.md "Working dtype (v3)").
    """

    slices: tuple[Slice, ...] = ()
    labels: tuple[str, ...] = ()

    @property
    def merges(self) -> bool:
        """True when the slices are merged (a method other than passthrough)."""
        return not self.row.slices_only

    def merge_inputs(self, slice_index: int) -> tuple[int, ...]:
        """The merge inputs of slice ``slice_index``, as indices into its sources, in the
        order the method numbers its models: the fine-tunes (sources but the base) for a
        method with a base; the base first (slerp's v0), then the other source, for a
        method whose base is an input; every source in order for ``linear``."""
        sl = self.slices[slice_index]
        others = tuple(k for k in range(len(sl.sources)) if k != sl.base)
        if self.row.uses_base:
            return others
        if self.row.base_is_input:
            return (sl.base, *others)
        return tuple(range(len(sl.sources)))

    def scope(self, slice_index: int, first: int) -> SliceScope:
        """The ``SliceScope`` of slice ``slice_index``, whose first output layer is
        ``first``: its merge inputs' parameters and layer starts."""
        sl = self.slices[slice_index]
        ins = [sl.sources[k] for k in self.merge_inputs(slice_index)]
        return SliceScope(
            self.method, len(ins), self.seed, None, None, None, tuple(s.params for s in ins),
            self.params, self.trim_scope, self.dtype, self.source, self.lines,
            self.compute_dtype, slice_params=sl.params, slice_key=sl.key,
            source_keys=tuple(s.key for s in ins), starts=tuple(s.start for s in ins),
            first=first,
        )  # fmt: skip

    def tensor_params(self, name: str, t: float = 0.0) -> TensorParams:
        """No tensor is resolved at the recipe level (``scope`` resolves a slice's)."""
        return TensorParams(())

    def out_layers(self) -> list[OutLayer]:
        """Every output layer in order, with its sources."""
        out: list[OutLayer] = []
        for i, sl in enumerate(self.slices):
            n = sl.length
            for k in range(n):
                t = k / (n - 1) if n > 1 else 1.0
                srcs = tuple((s.model, s.start + k) for s in sl.sources)
                out.append(OutLayer(len(out), i, srcs[0][0], srcs[0][1], t, srcs))
        return out

    def scale(self, slice_index: int, in_name: str, t: float) -> tuple[float | None, str]:
        """passthrough's ``scale`` of the tensor ``in_name`` read for slice
        ``slice_index`` at depth ``t``, and the key it came from (None: not given, the
        tensor is copied).

        Raises:
            RecipeError: a value of the wrong type.
        """
        sl = self.slices[slice_index]
        src = sl.sources[0]
        scopes = ((src.params, f"{src.key}.parameters.{SCALE}"),
                  (sl.params, f"{sl.key}.parameters.{SCALE}"),
                  (self.params, f"parameters.{SCALE}"))  # fmt: skip
        v, where = first_value(scopes, SCALE, in_name, t)
        return (None if v is None else float(v)), where

    def record(self) -> dict:
        """The recipe part of ``streammerge.json``: the slices as given, the compute dtype
        and the output layers (``"output <- model j:layer"``)."""
        rec = super().record()
        rec["slices"] = [
            {"sources": [{"model": s.label, "layer_range": [s.start, s.stop],
                          **({"parameters": dict(s.params)} if s.params else {})}
                         for s in sl.sources],
             **({"parameters": dict(sl.params)} if sl.params else {}),
             **({"base": sl.sources[sl.base].label} if sl.base is not None else {})}
            for sl in self.slices
        ]  # fmt: skip
        rec["compute_dtype"] = self.compute_dtype
        rec["layers"] = [f"{o.index} <- " + " + ".join(f"model {m}:{j}" for m, j in o.sources)
                         for o in self.out_layers()]  # fmt: skip
        rec["layer_runs"] = self.layer_runs()
        return rec

    def layer_runs(self) -> list[str]:
        """The output layers one line per slice: ``"6-11 <- model 0:2-7"``, or
        ``"0-3 <- model 0:0-3 + model 1:4-7"`` for a merged slice (model j as
        ``streammerge.json`` lists the models)."""
        out, first = [], 0
        for sl in self.slices:
            n = sl.length
            ins = " + ".join(f"model {s.model}:{_span(s.start, s.stop - 1)}" for s in sl.sources)
            out.append(f"{_span(first, first + n - 1)} <- {ins}")
            first += n
        return out


def _span(a: int, b: int) -> str:
    """``"a-b"``, or ``"a"`` when a == b."""
    return f"{a}" if a == b else f"{a}-{b}"
