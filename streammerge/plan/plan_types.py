"""What a plan is made of: ``Segment`` (an element range merged with one set of models),
``TensorPlan``, ``ShardPlan``, the ``Plan`` itself, and the ``Chunk`` ranges a pass walks
(``iter_chunks``). ``streammerge.plan.planner.make_plan`` builds them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from streammerge.io.reader import DTYPE_ITEMSIZE, TensorInfo
from streammerge.recipe.recipe import Recipe, TensorParams


@dataclass(frozen=True)
class Segment:
    """Element range ``[start, stop)`` of an output tensor merged with one set of models.

    Attributes:
        has_base: the base has these rows (else x_b = +0.0, p = 0, s = 1: weighted mean).
        models: SPEC index j of each participating fine-tune, ascending.
        weights: w_j of each (float64; renormalized when not all fine-tunes take part).
        drop: DARE's p_j of each (0.0 for methods without DARE, and where the base lacks
            the rows).
        scale: s.
    """

    start: int
    stop: int
    has_base: bool
    models: tuple[int, ...]
    weights: tuple[float, ...]
    drop: tuple[float, ...]
    scale: float


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor.

    Attributes:
        name: tensor name.
        action: ``"merge"`` (the fused kernel), ``"copy"`` (base bytes unchanged) or
            ``"convert"`` (a base-only float tensor cast to another ``--dtype``).
        dtype: output safetensors dtype.
        shape: output shape.
        offset: byte offset of its data within its shard's data area.
        base: the base tensor, or None (never None for copy / convert).
        sources: each fine-tune's tensor (None when that model does not take part).
        segments: for merges, element ranges with their models and weights, covering
            ``[0, numel)`` in order.
        rule: a one-line description when the vocabulary rule shaped this tensor.
        key: the tensor's Philox key key_t (merges; docs/SPEC.md "Per-tensor key").
        params: the resolved per-tensor parameters (merges), recorded in streammerge.json.
        ops: the passes the executor runs, in order, from the method table: ``copy``,
            ``convert``, ``merge``, or ``hist_high``, ``hist_low``, ``merge`` for a method
            whose sparsifier needs thresholds of this tensor (trim_scope tensor).
    """

    name: str
    action: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    base: TensorInfo | None
    sources: tuple[TensorInfo | None, ...]
    segments: tuple[Segment, ...]
    rule: str | None = None
    key: int = 0
    params: TensorParams | None = None
    ops: tuple[str, ...] = ()

    @property
    def has_base_row(self) -> bool:
        """True when any segment reads the base (row 0)."""
        return any(s.has_base for s in self.segments)

    @property
    def numel(self) -> int:
        """Elements in the output tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Output bytes."""
        return self.numel * DTYPE_ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its file name, its tensors in file order, and its header bytes.

    ``header`` is the whole prefix of the file (8-byte length + JSON padded with spaces to a
    multiple of 8), so data byte ``k`` lies at file offset ``len(header) + k``.
    """

    filename: str
    tensors: tuple[TensorPlan, ...]
    header: bytes

    @property
    def data_bytes(self) -> int:
        """Bytes after the header."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def size_bytes(self) -> int:
        """Whole file size in bytes."""
        return len(self.header) + self.data_bytes

    @property
    def read_bytes(self) -> int:
        """Input bytes read to produce this shard (base + participating fine-tunes)."""
        total = 0
        for t in self.tensors:
            if t.action != "merge":
                total += t.base.nbytes  # type: ignore[union-attr]
                continue
            for seg in t.segments:
                n = seg.stop - seg.start
                if seg.has_base:
                    total += n * t.base.itemsize  # type: ignore[union-attr]
                total += sum(n * t.sources[j].itemsize for j in seg.models)  # type: ignore[union-attr]
        return total


@dataclass(frozen=True)
class Plan:
    """The whole merge, from headers alone.

    Attributes:
        shards: output shards in order.
        recipe: the resolved recipe.
        base_only: names of tensors only the base has (copied from it, SPEC).
        vocab_rules: one line per tensor the vocabulary rule shaped.
        vocab_rows: output rows of the vocabulary-shaped tensors (None when none), and
            ``tokenizer_model``: index of the fine-tune with the most rows.
    """

    shards: tuple[ShardPlan, ...]
    recipe: Recipe
    base_only: tuple[str, ...]
    vocab_rules: tuple[str, ...]
    vocab_rows: int | None
    tokenizer_model: int | None

    @property
    def model_scope(self) -> bool:
        """True when thresholds are taken over the whole model (a magnitude sparsifier with
        trim_scope model): computed before any shard (``pipeline.analyze``)."""
        return self.recipe.row.sparse.stats and self.recipe.trim_scope == "model"

    def per_tensor(self, thresholds: list) -> dict[str, list]:
        """The whole model's thresholds recorded for every merged tensor."""
        return {t.name: thresholds for t in self.tensors if t.action == "merge"}

    def input_role(self, t: TensorPlan) -> str:
        """The input ``t.base`` lies in, as the journal names inputs: ``base``, or ``0``
        for ``linear`` (model 0 is its reference). A slices plan names each tensor's model."""
        return "base" if self.recipe.row.uses_base else "0"

    def source_roles(self, t: TensorPlan) -> list[str]:
        """The input each of ``t.sources`` lies in, as the journal names inputs: fine-tune
        ``j`` is ``"j"``. A slices plan names each source's model."""
        return [str(j) for j in range(len(t.sources))]

    def config_updates(self) -> dict:
        """Top-level keys the output's ``config.json`` gets besides the vocabulary rule's
        ``vocab_size``: none here; a slices plan sets the layer count and per-layer lists."""
        return {}

    @property
    def tensors(self) -> Iterator[TensorPlan]:
        """Every output tensor, shard by shard."""
        for shard in self.shards:
            yield from shard.tensors

    @property
    def total_bytes(self) -> int:
        """Sum of output tensor bytes (``metadata.total_size`` of the index)."""
        return sum(s.data_bytes for s in self.shards)

    @property
    def output_bytes(self) -> int:
        """Bytes of every shard file, headers included."""
        return sum(s.size_bytes for s in self.shards)

    @property
    def read_bytes(self) -> int:
        """Input bytes one pass reads (base + every participating fine-tune)."""
        return sum(s.read_bytes for s in self.shards)


@dataclass(frozen=True)
class Chunk:
    """``count`` elements of a tensor starting at element ``start``, within one segment."""

    start: int
    count: int
    segment: Segment | None


def iter_chunks(t: TensorPlan, max_elems: int) -> Iterator[Chunk]:
    """Element ranges of ``t`` of at most ``max_elems``, never crossing a segment boundary.

    Copies and conversions have no segments and are cut only by size. The same call gives
    the same chunks, so a method's statistics pass and its merge pass walk alike.
    """
    if max_elems < 1:
        raise ValueError(f"max_elems must be >= 1, got {max_elems}")
    ranges = [(s.start, s.stop, s) for s in t.segments] or [(0, t.numel, None)]
    for lo, hi, seg in ranges:
        for start in range(lo, hi, max_elems):
            yield Chunk(start, min(max_elems, hi - start), seg)
