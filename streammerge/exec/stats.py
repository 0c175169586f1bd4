"""Exact thresholds for the magnitude sparsifiers, by radix select in bounded memory.

docs/SPEC.md "Magnitudes and thresholds": the magnitude of a task-vector element is the
integer ``mag = bits(float32 d) & 0x7FFFFFFF`` (it orders |d| exactly). TIES keeps the
``k = max(1, int(rho * n))`` largest (every element tied with the k-th largest too);
breadcrumbs keeps the ascending ranks ``n_bot .. n_bot + target - 1`` (again with ties).
Both are order statistics, found without sorting or holding the tensor:

1. ``hist_high`` pass: a histogram of ``mag >> 16`` (32768 buckets) per fine-tune; the
   cumulative counts give the bucket holding each wanted rank.
2. ``hist_low`` pass: a histogram of ``mag & 0xFFFF`` over the elements in that bucket
   (65536 bins; two buckets per fine-tune for breadcrumbs); the rank within the bucket
   gives the low 16 bits. The threshold is exact: ``bucket << 16 | low``.

The kernels fill the histograms (``kernels/cpu_stats.py``, ``kernels/triton_stats.py``);
this module picks the ranks and turns counts into thresholds and keep windows
``lo <= mag <= hi`` for the elementwise kernel. Memory: N x (32768 + 2 x 65536) int64
counts (1.5 MiB per fine-tune).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HIGH_BINS = 1 << 15  # mag < 2**31, so mag >> 16 < 2**15
LOW_BINS = 1 << 16
#: Keep windows: everything / nothing (lo > hi).
KEEP_ALL = (0, 0xFFFFFFFF)
KEEP_NONE = (1, 0)
#: A tensor too large for a slot is read once for its histograms and once to merge when
#: the wanted ranks' high buckets fall within this many buckets of their estimate from the
#: tensor's first chunk (the low histograms of those buckets are counted during the first
#: read); else once more for the low histograms.
GUESS_SPREAD = 1
#: Order statistics per fine-tune: one threshold for magnitude, two for breadcrumbs.
RANKS = {"magnitude": 1, "breadcrumbs": 2}


def guess_slots(sparsifier: str) -> int:
    """Buckets whose low histograms a guessing read counts, per fine-tune."""
    return RANKS[sparsifier] * (2 * GUESS_SPREAD + 1)


def ranks_for(sparsifier: str, n: int, density: float, gamma: float | None) -> list[int] | None:
    """Ascending ranks (0-based) whose values are the thresholds, or None for "no threshold".

    magnitude: ``[n - k]`` with ``k = max(1, int(density * n))``; None when density >= 1 or
    n == 0 (keep all). breadcrumbs: ``[n_bot, min(n - 1, n_bot + target - 1)]`` with
    ``target = int(density * n)``, ``n_top = int(gamma * n)``,
    ``n_bot = max(0, n - target - n_top)``; None when target == 0 (keep none).
    ``int`` truncates the float64 product (docs/SPEC.md).
    """
    if sparsifier == "magnitude":
        if density >= 1.0 or n == 0:
            return None
        k = max(1, int(density * n))
        return [n - k]
    if sparsifier == "breadcrumbs":
        target = int(density * n)
        if target == 0:
            return None
        n_top = int(gamma * n)
        n_bot = max(0, n - target - n_top)
        return [n_bot, min(n - 1, n_bot + target - 1)]
    raise ValueError(f"sparsifier {sparsifier!r} has no thresholds")


def _locate(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin, rank within the bin) of ascending ``rank`` in a histogram."""
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, rank, side="right"))
    before = int(cum[b - 1]) if b else 0
    return b, rank - before


class ThresholdStats:
    """Histograms and thresholds of one population (a tensor, or a whole model).

    Args:
        sparsifier: ``magnitude`` or ``breadcrumbs``.
        density, gamma: rho_j (and gamma_j) of each fine-tune (N values).

    Usage: ``add_high`` over every element (``n`` counted from the histogram), then
    ``buckets()`` and ``add_low`` over every element again, then ``thresholds()`` and
    ``windows()``.
    """

    def __init__(
        self, sparsifier: str, density: Sequence[float], gamma: Sequence[float] | None
    ) -> None:
        self.sparsifier = sparsifier
        self.density = tuple(density)
        self.gamma = tuple(gamma) if gamma is not None else (None,) * len(self.density)
        n_models = len(self.density)
        self.high = np.zeros((n_models, HIGH_BINS), np.int64)  # [N, 32768]
        self.low = np.zeros((n_models, 2, LOW_BINS), np.int64)  # [N, 2, 65536]
        self._buckets: np.ndarray | None = None  # [N, 2] int64, -1 unused
        self._within: list[list[int]] = []
        self._ranks: list[list[int] | None] = []
        #: Every magnitude's low 16 bits are zero (working dtype bf16: each is a bf16
        #: value), so a bucket's low histogram is its whole count in bin 0: the hist_low
        #: passes are skipped (``thresholds.accumulate``) and ``low`` filled from ``high``.
        self.low_from_high = False

    @property
    def nbytes(self) -> int:
        """Bytes of the histograms."""
        window = getattr(self, "low_window", None)
        return self.high.nbytes + self.low.nbytes + (0 if window is None else window.nbytes)

    def buckets(self) -> np.ndarray:
        """[N, 2] int64 high buckets the hist_low pass must resolve (-1: none). Call after
        every ``hist_high`` chunk was counted."""
        if self._buckets is None:
            n_models = len(self.density)
            self._buckets = np.full((n_models, 2), -1, np.int64)
            for j in range(n_models):
                n = int(self.high[j].sum())
                ranks = ranks_for(self.sparsifier, n, self.density[j], self.gamma[j])
                self._ranks.append(ranks)
                within = []
                for i, r in enumerate(ranks or ()):
                    b, w = _locate(self.high[j], r)
                    self._buckets[j, i] = b
                    within.append(w)
                self._within.append(within)
        return self._buckets

    def guess_window(self, population: Sequence[int]) -> np.ndarray:
        """[N, guess_slots] int64 high buckets (-1 unused) around each wanted rank, estimated
        from the high histogram counted so far (a tensor's first chunk) scaled to the whole
        ``population`` (elements per fine-tune); their low histograms are then counted in
        ``low_window`` as the rest of the tensor streams by."""
        n_models = len(self.density)
        per = 2 * GUESS_SPREAD + 1
        slots = guess_slots(self.sparsifier)
        self.window_buckets = np.full((n_models, slots), -1, np.int64)
        self.low_window = np.zeros((n_models, slots, LOW_BINS), np.int64)
        for j in range(n_models):
            seen = int(self.high[j].sum())
            ranks = ranks_for(self.sparsifier, population[j], self.density[j], self.gamma[j])
            if not ranks or seen == 0:
                continue
            for i, r in enumerate(ranks):
                b, _ = _locate(self.high[j], min(seen - 1, r * seen // population[j]))
                for w in range(-GUESS_SPREAD, GUESS_SPREAD + 1):
                    if 0 <= b + w < HIGH_BINS:
                        self.window_buckets[j, i * per + w + GUESS_SPREAD] = b + w
        return self.window_buckets

    def resolve_window(self) -> bool:
        """Once every element was counted (high histogram and ``low_window``): True when each
        wanted rank's exact bucket was in the window, its low histogram taken from there
        (``thresholds()`` is then exact); False when another pass must count it."""
        buckets = self.buckets()
        if self.low_from_high:
            return True  # nothing to find: ``thresholds`` takes the low bins from ``high``
        found = []
        for j in range(len(self.density)):
            for i in range(buckets.shape[1]):
                if buckets[j, i] < 0:
                    continue
                hits = np.flatnonzero(self.window_buckets[j] == buckets[j, i])
                if hits.size == 0:
                    return False  # nothing copied: the extra hist_low pass counts from zero
                found.append((j, i, hits[0]))
        for j, i, k in found:
            self.low[j, i] = self.low_window[j, k]
        return True

    def thresholds(self) -> list[list[int]]:
        """Per fine-tune ``[T]`` (magnitude), ``[L, H]`` (breadcrumbs), or ``[]`` when no
        threshold applies (magnitude keeps all, breadcrumbs keeps none): docs/SPEC.md's
        recorded form. Call after every ``hist_low`` chunk was counted."""
        buckets = self.buckets()
        out = []
        for j, within in enumerate(self._within):
            vals = []
            for i, w in enumerate(within):
                if self.low_from_high:
                    self.low[j, i] = 0
                    self.low[j, i, 0] = self.high[j, buckets[j, i]]
                low, _ = _locate(self.low[j, i], w)
                vals.append(int(buckets[j, i]) << 16 | low)
            out.append(vals)
        return out


def windows(sparsifier: str, thresholds: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Keep windows ``(lo, hi)`` (keep iff ``lo <= mag <= hi``) from recorded thresholds.

    magnitude ``[T]`` -> (T, 0xFFFFFFFF), ``[]`` -> keep all; breadcrumbs ``[L, H]`` -> (L, H),
    ``[]`` -> keep none.
    """
    out = []
    for th in thresholds:
        if sparsifier == "magnitude":
            out.append((int(th[0]), 0xFFFFFFFF) if th else KEEP_ALL)
        elif sparsifier == "breadcrumbs":
            out.append((int(th[0]), int(th[1])) if th else KEEP_NONE)
        else:
            raise ValueError(f"sparsifier {sparsifier!r} has no thresholds")
    return out
