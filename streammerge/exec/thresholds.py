"""The compute stage's statistics (TIES, breadcrumbs): per-tensor histograms accumulated as
their passes stream by, or the whole model's thresholds, and the keep windows they give."""

from __future__ import annotations

import numpy as np

from streammerge.exec.layout import Backend, Slot
from streammerge.exec.ops import hist_args, low_from_high
from streammerge.exec.stats import ThresholdStats, windows
from streammerge.plan.plan_types import Plan, Segment, TensorPlan


class TensorThresholds:
    """The compute stage's statistics: per-tensor histograms as their passes stream by, or
    the whole model's thresholds (trim_scope model), and the keep windows they give."""

    def __init__(self, plan: Plan, model_thresholds: list | None) -> None:
        self.sparsifier = plan.recipe.row.sparsifier
        self.model = model_thresholds
        self.model_windows = (
            None if model_thresholds is None else windows(self.sparsifier, model_thresholds)
        )
        self.active: dict[str, ThresholdStats] = {}
        self.windows: dict[str, list] = {}
        self.recorded: dict[str, list] = {}
        self.peak_bytes = 0

    def stats(self, t: TensorPlan) -> ThresholdStats:
        st = self.active.get(t.name)
        if st is None:
            st = self.active[t.name] = ThresholdStats(
                self.sparsifier, t.params.density, t.params.gamma
            )
            st.low_from_high = low_from_high(t)
            self.peak_bytes = max(self.peak_bytes, sum(s.nbytes for s in self.active.values()))
        return st

    def window(self, t: TensorPlan) -> list | None:
        if "hist_high" not in t.ops:
            return self.model_windows
        if t.name not in self.windows:
            st = self.active.pop(t.name)
            th = st.thresholds()
            self.recorded[t.name] = th
            self.windows = {t.name: windows(self.sparsifier, th)}  # one tensor at a time
        return self.windows[t.name]


def accumulate(
    backend: Backend, slot: Slot, st: ThresholdStats, op: str, seg: Segment, guess: bool = False
) -> None:
    """Run one histogram pass over the slot into ``st`` (only the segment's fine-tunes):
    ``hist_high``, or ``hist_low`` of the exact buckets, or with ``guess`` of the guessed
    window's buckets into ``st.low_window``."""
    if op == "hist_low" and st.low_from_high:
        return  # known from the high histogram (``ThresholdStats.low_from_high``)
    args = hist_args(slot.tensor, slot.chunk)
    idx = list(seg.models)
    whole = idx == list(range(st.high.shape[0]))
    if op == "hist_high":
        counts, buckets = st.high, None
    elif guess:
        counts, buckets = st.low_window, st.window_buckets
    else:
        counts, buckets = st.low, st.buckets()
    hist = counts if whole else np.zeros_like(counts[idx])  # kernels add into ``hist``
    if buckets is None:
        backend.run(op, slot, args, hist=hist)
    else:
        backend.run(op, slot, args, hist=hist, buckets=np.ascontiguousarray(buckets[idx]))
    if not whole:
        counts[idx] += hist
