"""Kernel arguments: what one pass over one chunk asks of a backend, from the plan alone.

The plan says, per tensor, which passes run (``TensorPlan.ops``, from the method table);
this module turns (tensor, chunk, pass) into backend-neutral arguments, so every backend
(numba, Triton under the interpreter, CUDA) only looks the pass up in its kernel table and
calls it. The slot layout lives here too: input row 0 holds the base, row 1 + j fine-tune j.

Passes (docs/SPEC.md):
- ``copy``: base bytes unchanged (no kernel); ``convert``: a base-only float tensor cast to
  ``--dtype``.
- ``hist_high`` / ``hist_low``: the statistics passes of a magnitude sparsifier (TIES,
  breadcrumbs): histograms of the task vectors' magnitudes (``streammerge.exec.stats``).
- ``merge``: the elementwise pass (DARE masks, keep windows, sign election, normalization).
- a row-wise method's passes (``Method.row_passes``, looked up in
  ``streammerge.methods.registry.ROW_PASSES``): its statistics passes over the whole
  tensor (``row_dots``, ...), then its writing pass, over chunks of whole rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streammerge.exec.stats import KEEP_ALL
from streammerge.kernels.common import low_bits_vary
from streammerge.methods.method import Method
from streammerge.methods.registry import ROW_PASSES
from streammerge.plan.plan_types import Chunk, Segment, TensorPlan


def is_row_op(op: str) -> bool:
    """True for a row-wise method's passes (``Method.row_passes``: ``row_dots``, ``slerp``,
    ...): chunks of whole rows."""
    return op in ROW_PASSES


#: Input row of the base in a slot; fine-tune j is row MODEL_ROW0 + j.
BASE_ROW = 0
MODEL_ROW0 = 1


def model_row(j: int) -> int:
    """Slot input row of fine-tune j."""
    return MODEL_ROW0 + j


def row_dtypes(t: TensorPlan) -> list[str]:
    """The stored dtype of every input row of ``t`` (rows a segment does not read get the
    base's, so a kernel that checks every row's dtype accepts them)."""
    return [t.base.dtype] + [s.dtype if s is not None else t.base.dtype for s in t.sources]


def read_rows(t: TensorPlan, seg: Segment | None) -> list[tuple[int, object]]:
    """(row, TensorInfo) pairs a chunk of ``t`` in ``seg`` reads (copy/convert: the base)."""
    if seg is None:
        return [(BASE_ROW, t.base)]
    rows = [(BASE_ROW, t.base)] if seg.has_base else []
    return rows + [(model_row(j), t.sources[j]) for j in seg.models]


@dataclass(frozen=True)
class HistArgs:
    """One histogram pass over a chunk (``kernels.cpu_stats.hist_high`` / ``hist_low``).

    Attributes:
        dtypes: safetensors dtype of each slot row; base_row: BASE_ROW (stats only run where
            the base has the rows); model_rows: rows of the participating fine-tunes.
        models: their SPEC indices j (which rows of the [N, ...] histograms they feed).
        n: elements in the chunk.
        compute_dtype: the working dtype D (docs/SPEC.md "Working dtype (v3)"): the
            magnitudes are those of rd(x_j - x_b).
    """

    dtypes: tuple[str, ...]
    base_row: int
    model_rows: tuple[int, ...]
    models: tuple[int, ...]
    n: int
    compute_dtype: str = "F32"


@dataclass(frozen=True)
class MergeArgs:
    """The elementwise pass over a chunk: exactly ``kernels.cpu_merge.merge_chunk``'s
    arguments (and ``merge_chunk_triton``'s), see that docstring for shapes and dtypes."""

    dtypes: tuple[str, ...]
    base_row: int
    model_rows: tuple[int, ...]
    model_ids: tuple[int, ...]
    drop: tuple[float, ...]
    weights: tuple[float, ...]
    scale: float
    out_dtype: str
    n: int
    key: int
    start: int
    keep_lo: tuple[int, ...] | None
    keep_hi: tuple[int, ...] | None
    consensus: str
    normalize: bool
    linear: bool
    compute_dtype: str = "F32"


@dataclass(frozen=True)
class ConvertArgs:
    """A base-only float chunk cast to the output dtype (``cpu_merge.convert_chunk``), times
    ``scale`` when it is not 1 (a layer stack's ``scale``)."""

    src_dtype: str
    out_dtype: str
    n: int
    scale: float = 1.0


def hist_args(t: TensorPlan, c: Chunk) -> HistArgs:
    """Arguments of a histogram pass over chunk ``c`` (a segment the base has)."""
    seg = c.segment
    return HistArgs(
        tuple(row_dtypes(t)),
        BASE_ROW,
        tuple(model_row(j) for j in seg.models),
        seg.models,
        c.count,
        compute_dtype(t),
    )


def compute_dtype(t: TensorPlan) -> str:
    """The working dtype D of a merged tensor (docs/SPEC.md "Working dtype (v3)"), as the
    plan resolved it into ``t.params`` (F32 when it holds none: linear, slerp)."""
    return (t.params.compute if t.params is not None else None) or "F32"


def low_from_high(t: TensorPlan) -> bool:
    """Whether ``t``'s low histograms follow from its high ones, so no ``hist_low`` pass
    runs (nor re-reads the tensor): with working dtype D = BF16 every magnitude is a bf16
    value as a float32 (low 16 bits zero, NaN included: ``rd`` quiets it), so the low
    histogram of a high bucket is that bucket's count in bin 0 and the thresholds are the
    ones the pass would give (docs/SPEC.md "Magnitudes and thresholds"; ``low_bits_vary``)."""
    return not low_bits_vary(compute_dtype(t))


def merge_args(
    method: Method, t: TensorPlan, c: Chunk, windows: list[tuple[int, int]] | None
) -> MergeArgs:
    """Arguments of the elementwise pass over chunk ``c`` (docs/SPEC.md "The merged value").

    ``windows``: the keep window (lo, hi) of each fine-tune j from the statistics pass, or
    None for sparsifiers without thresholds. Rows the base lacks (vocabulary rule) are the
    weighted mean of the fine-tunes that have them: no sparsifier, no consensus, weights
    already normalized.
    """
    seg = c.segment
    if seg.has_base or not method.uses_base:
        consensus, normalize = method.consensus, t.params.normalize
        win = [windows[j] for j in seg.models] if windows is not None else None
    else:
        consensus, normalize, win = "none", False, None
    return MergeArgs(
        tuple(row_dtypes(t)),
        BASE_ROW if seg.has_base else -1,
        tuple(model_row(j) for j in seg.models),
        seg.models,
        seg.drop,
        seg.weights,
        seg.scale,
        t.dtype,
        c.count,
        t.key,
        c.start,
        None if win is None or all(w == KEEP_ALL for w in win) else tuple(w[0] for w in win),
        None if win is None or all(w == KEEP_ALL for w in win) else tuple(w[1] for w in win),
        consensus,
        normalize,
        not method.uses_base,
        compute_dtype(t),
    )


@dataclass(frozen=True)
class RowArgs:
    """A row-wise pass over a chunk of whole rows (``Method.row_passes``: the pass ``op``'s
    ``RowPass.cpu`` / ``RowPass.triton`` reads these).

    Attributes:
        op: the pass (a statistics pass, or the method's writing pass).
        dtypes: safetensors dtype of each slot row; model_rows: the rows of the models.
        n_rows, row_len: whole rows (or ``Method.row_block`` blocks) in the chunk, and
            their length (elements).
        t: the tensor's interpolation factor; out_dtype: the stored output dtype.
        base_row: BASE_ROW when the segment has the base, else -1.
        params: every resolved value the method declares, (name, value) pairs: a float or
            bool for a shared parameter, a tuple of N floats (by SPEC index j) for a
            per-model one.
        counts: the accumulators of the current statistics pass (``RowPass.accumulators``),
            which it adds into; for the writing pass those of the last statistics pass;
            None for a method without one.
        count: elements in the chunk (model_stock's last chunk is not whole blocks).
        compute_dtype: the working dtype as the plan resolved it (docs/SPEC.md "Working
            dtype (v3)"), or None.
        model_ids: SPEC index j of each model row; weights: the segment's w_j of each.
        key: the tensor's 64-bit RNG key (SPEC v1 "Masks"); start: the tensor index of the
            chunk's first element (counter-based random numbers whatever the chunking).
        stats: pass name -> accumulators of every statistics pass of the tensor so far.
        shape: the tensor's shape (nuslerp: its vectors are the last axis).
        scratch: the directory for a pass's temporary files (karcher's iterate of a tensor
            larger than a chunk): the output's staging directory, on the output's disk
            (TMPDIR may be RAM, a tmpfs); None: TMPDIR (statistics-only runs, distributed
            workers).
    """

    op: str
    dtypes: tuple[str, ...]
    model_rows: tuple[int, ...]
    n_rows: int
    row_len: int
    t: float
    out_dtype: str
    base_row: int = -1
    params: tuple = ()
    counts: tuple | None = None
    count: int = 0
    compute_dtype: str | None = None
    model_ids: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    key: int = 0
    start: int = 0
    stats: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    scratch: str | None = None


def row_len(t: TensorPlan) -> int:
    """Elements per row of ``t``: numel / shape[0] (a 1-D tensor: rows of one element, a
    0-d tensor: one row of one); docs/SPEC.md "SLERP (v3)" "Rows". A method whose unit is
    a block (``Method.row_block``: model_stock) has chunks of whole blocks; one whose rows
    are the last dimension (``Method.last_dim_rows``: arcee_fusion) rows of shape[-1];
    ``Method.row_unit`` may choose per tensor (model_stock's ``filter_wise``)."""
    method = ROW_PASSES[t.ops[-1]][0] if t.ops and t.ops[-1] in ROW_PASSES else None
    if method is not None and method.row_unit is not None and t.params is not None \
            and (unit := method.row_unit(tuple(t.shape), t.params)) is not None:  # fmt: skip
        return unit
    if method is not None and method.row_block is not None:
        return min(method.row_block, max(1, t.numel))
    if method is not None and method.vector_row and len(t.shape) == 1:
        return max(1, t.numel)
    if method is not None and method.last_dim_rows:
        return t.shape[-1] if t.shape and t.shape[-1] else 1
    return t.numel // t.shape[0] if t.shape and t.shape[0] else 1


def row_args(method: Method, t: TensorPlan, c: Chunk, op: str | None = None,
             stats: dict | None = None, scratch: str | None = None) -> RowArgs:  # fmt: skip
    """Arguments of a row-wise pass ``op`` (default the method's writing pass) over chunk
    ``c`` (whole rows of ``t``); ``stats``: the tensor's statistics accumulators so far,
    by pass name (``RowArgs.stats``); ``scratch``: ``RowArgs.scratch``."""
    n, tt, op = row_len(t), t.params.get("t"), op or method.row_op
    stats = {} if stats is None else stats
    # the writing pass: the last statistics pass's (not a method's own entry, e.g. karcher's
    # temporary iterate, which is not a pass)
    last = next((v for k, v in reversed(stats.items()) if k in ROW_PASSES), None)
    counts = stats.get(op) if op in stats else last
    seg = c.segment
    return RowArgs(op, tuple(row_dtypes(t)), tuple(model_row(j) for j in seg.models),
                   c.count // n, n, 0.0 if tt is None else float(tt), t.dtype,
                   BASE_ROW if seg.has_base else -1, t.params.values, counts, c.count,
                   t.params.compute, seg.models, seg.weights, t.key, c.start,
                   stats, tuple(t.shape), scratch)  # fmt: skip


def convert_args(t: TensorPlan, c: Chunk) -> ConvertArgs:
    """Arguments of a conversion chunk (``scale``: the tensor's, docs/SPEC.md "Stacks
    (passthrough)")."""
    scale = t.params.get("scale", 1.0) if t.params is not None else 1.0
    return ConvertArgs(t.base.dtype, t.dtype, c.count, float(scale))


#: Chunk lengths a device kernel is compiled for: Triton specializes an integer argument
#: equal to 1 (a one-element tensor), and one divisible by 16 (full chunks), apart from
#: the others (tails).
VARIANT_LENGTHS = (1, 16, 17)


def kernel_variants(plan, method: Method) -> list[tuple[str, MergeArgs | HistArgs]]:
    """One ("merge" | "hist_high", args) per distinct compiled kernel the plan launches
    (row dtypes, rows, model ids, which models are masked, window / consensus / normalize
    / linear flags), for chunks of VARIANT_LENGTHS elements from element 0; a keep window
    that excludes something stands for the thresholds still unknown. A device backend
    compiles them before the first read (``DeviceBackend.prewarm``); ``hist_low``
    (compiled per bucket count) is left to its first chunk."""
    out: dict[tuple, tuple[str, MergeArgs | HistArgs]] = {}
    # With thresholds: a window that excludes something, and keep-all (a density of 1, or
    # a tensor whose window keeps everything: no window flag).
    excludes = [(1, 0xFFFFFFFE)] * plan.recipe.n_models
    windows = (excludes, None) if method.sparse.stats else (None,)
    for t in plan.tensors:
        if "merge" not in t.ops:
            continue
        for seg in t.segments:
            for n in VARIANT_LENGTHS:
                c = Chunk(0, n, seg)
                for wins in windows:
                    a = merge_args(method, t, c, wins)
                    sig = (a.dtypes, a.base_row, a.model_rows, a.model_ids,
                           tuple(p > 0 for p in a.drop), a.keep_lo is None, a.consensus,
                           a.normalize, a.linear, a.out_dtype, a.compute_dtype, n)  # fmt: skip
                    out.setdefault(("merge", *sig), ("merge", a))
                if "hist_high" in t.ops and seg.has_base:
                    h = hist_args(t, c)
                    out.setdefault(("hist", h.dtypes, h.model_rows, h.compute_dtype, n),
                                   ("hist_high", h))  # fmt: skip
    return list(out.values())
