"""sce: select the elements where the fine-tunes disagree most, elect a sign, and weight
each fine-tune by the energy of its selected task vector (SCE, "FuseChat", arXiv
2408.07990; mergekit ``sce``; docs/SPEC.md "SCE").

Four row-wise passes over chunks of whole ``SCE_BLOCK`` blocks: two radix-select histogram
passes over the per-element variance keys (``sce_hist_high``: the high bits and the nonzero
count; ``sce_hist_low``: the low bits inside the bucket holding the threshold), skipped
when ``select_topk`` needs no threshold, and ``sce_hist_low`` when W is bf16 (every key's
low 16 bits are 0: the bucket is the threshold); the energy pass (float64 block sums of the squared
selected task vectors, the element count); then the writing pass (the histogram passes run the numba kernels under the Triton
backends; the energy and writing passes have Triton kernels). No weights: M3 has
nothing to draw. Computed op by op in the working dtype as mergekit does.
"""

from __future__ import annotations

import numpy as np

from streammerge.kernels.common import low_bits_vary
from streammerge.methods.method import Method, RowPass
from streammerge.methods.model_stock import round_work, work_dtype_of
from streammerge.methods.params import INT8_MASK, Param

SELECT_TOPK = Param("select_topk", default=1.0, per_model=False,
                    help="sce: fraction of the elements (by variance across the fine-tunes, "
                    "ties kept) whose task vectors are kept; >= 1 keeps all, <= 0 none")  # fmt: skip

#: Elements per statistics block (docs/SPEC.md "SCE"); chunks are whole blocks.
SCE_BLOCK = 1024
HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16
KEEP_NONE = 1 << 32


def _topk(a) -> float:
    return float(dict(a.params)["select_topk"])


def _rank(hist_high: np.ndarray, nonzero: int, topk: float) -> int | None:
    """The ascending rank n - k of the threshold, or None when nothing is kept (k = 0)."""
    n = int(hist_high.sum())
    k = int(np.float32(np.float32(nonzero) * np.float32(topk)))
    if k == 0 or n == 0:
        return None
    return n - min(k, n)


def _bucket(hist_high: np.ndarray, rank: int) -> tuple[int, int]:
    """(high bucket holding ``rank``, elements below it)."""
    cum = np.cumsum(hist_high)
    b = int(np.searchsorted(cum, rank, side="right"))
    return b, int(cum[b - 1]) if b else 0


def selection(a) -> tuple[bool, int]:
    """(keep_all, thr) of the tensor: every element, or those whose key >= thr
    (``KEEP_NONE``: none), from its histogram passes (SPEC "SCE")."""
    topk = _topk(a)
    if topk >= 1:
        return True, 0
    if topk <= 0:
        return False, KEEP_NONE
    hist, nz = a.stats["sce_hist_high"]
    rank = _rank(hist, int(nz[0]), topk)
    if rank is None:
        return False, KEEP_NONE
    b, below = _bucket(hist, rank)
    if not _low_bits(a):
        return False, b << 16
    low = a.stats["sce_hist_low"][0]
    lb = int(np.searchsorted(np.cumsum(low), rank - below, side="right"))
    return False, (b << 16) | lb


def energy_weights(energies: np.ndarray, numel: int, w_dtype: str) -> np.ndarray:
    """float32 [N] values of W: each model's mean squared selected task vector over their
    sum (SPEC "SCE" host step; 1/N each when the sum is below 1e-6)."""
    f, r = np.float32, (lambda v: round_work(v, w_dtype))
    with np.errstate(all="ignore"):
        means = [r(f(f(e) / f(numel))) for e in energies]
        ws = f(0.0)
        for m in means:
            ws = f(ws + m)
        ws = r(ws)
        if abs(float(ws)) < 1e-6:
            return np.array([r(f(1.0) / f(len(means)))] * len(means), f)
        return np.array([r(m / ws) for m in means], f)


def _low_bits(a) -> bool:
    """Whether the variance keys can have low 16 bits (``low_bits_vary``): not when W is
    bf16, so the high bucket holding the threshold is the threshold and ``sce_hist_low``
    is not run (SPEC "SCE")."""
    return low_bits_vary(work_dtype_of(a))


def _threshold_topk(tp) -> bool:
    """Whether ``select_topk`` of a tensor (``TensorParams``) needs a threshold."""
    return 0 < float(tp.get("select_topk", 1.0)) < 1


def _low_live(a) -> bool:
    """``sce_hist_low`` computes something: a threshold inside a bucket with low bits."""
    if not (0 < _topk(a) < 1 and _low_bits(a)):
        return False
    hist, nz = a.stats["sce_hist_high"]
    return _rank(hist, int(nz[0]), _topk(a)) is not None


def _hist_cpu(inputs, out, a) -> None:
    from streammerge.kernels import cpu_sce

    topk = _topk(a)
    if not 0 < topk < 1:
        return
    rows = (inputs, list(a.dtypes), a.base_row, list(a.model_rows), a.count)
    if a.op == "sce_hist_high":
        cpu_sce.sce_hist(*rows, -1, a.counts[0], a.counts[1], work=a.compute_dtype)
        return
    if not _low_live(a):
        return
    hist, nz = a.stats["sce_hist_high"]
    rank = _rank(hist, int(nz[0]), topk)
    if rank is not None:
        cpu_sce.sce_hist(*rows, _bucket(hist, rank)[0], a.counts[0], work=a.compute_dtype)


def _energy_cpu(inputs, out, a) -> None:
    from streammerge.kernels import cpu_sce, cpu_stock

    keep_all, thr = selection(a)
    blocks = cpu_sce.sce_energy(inputs, list(a.dtypes), a.base_row, list(a.model_rows),
                                a.count, keep_all, thr, a.compute_dtype)  # fmt: skip
    cpu_stock.add_blocks(a.counts[0], blocks)  # the blocks left to right (SPEC's order)
    a.counts[1][0] += a.count


def _energy_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import cpu_stock, triton_sce

    keep_all, thr = selection(a)
    n = a.count
    base = launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n)
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    blocks = triton_sce.sce_energy_triton(base, models, n, keep_all, thr, a.compute_dtype)
    cpu_stock.add_blocks(a.counts[0], blocks.cpu().numpy())  # left to right (SPEC's order)
    a.counts[1][0] += a.count


def weights_of(a) -> np.ndarray:
    """The tensor's energy weights (float32 [N]) from its ``sce_energy`` sums."""
    sums, numel = a.stats["sce_energy"]
    return energy_weights(sums, int(numel[0]), work_dtype_of(a))


def _sce_cpu(inputs, out, a) -> None:
    from streammerge.kernels import cpu_sce

    keep_all, thr = selection(a)
    cpu_sce.sce_chunk(inputs, list(a.dtypes), a.base_row, list(a.model_rows), a.count,
                      keep_all, thr, weights_of(a), out, a.out_dtype, a.compute_dtype)  # fmt: skip


def _sce_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_sce

    keep_all, thr = selection(a)
    n = a.count
    base = launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n)
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    lo = round_work(np.float32(1e-6), work_dtype_of(a))
    triton_sce.sce_triton(base, models, n, keep_all, thr, weights_of(a), lo,
                          launch.typed(out, a.out_dtype, n), a.compute_dtype)  # fmt: skip


METHOD = Method(
    name="sce",
    order=97,
    uses_base=True,
    sparsifier="none",
    consensus="none",
    params=(SELECT_TOPK, INT8_MASK),
    summary="top-variance elements, sign election, task vectors weighted by their energy",
    source="SCE (FuseChat), arXiv 2408.07990; mergekit sce",
    working_dtype="inputs",
    m3="none",
    min_models=2,
    row_passes=(RowPass("sce_hist_high", _hist_cpu,
                        accumulators=lambda n: (np.zeros(HIGH_BINS, np.int64),
                                                np.zeros(1, np.int64)),
                        needed=_threshold_topk),
                RowPass("sce_hist_low", _hist_cpu,
                        accumulators=lambda n: (np.zeros(LOW_BINS, np.int64),),
                        needed=lambda tp: _threshold_topk(tp) and low_bits_vary(tp.compute),
                        live=_low_live),
                RowPass("sce_energy", _energy_cpu, _energy_triton,
                        accumulators=lambda n: (np.zeros(n, np.float64), np.zeros(1, np.int64))),
                RowPass("sce", _sce_cpu, _sce_triton)),
    row_block=SCE_BLOCK,
)
