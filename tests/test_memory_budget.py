"""The buffers a run really allocates (slots, writer staging blocks, histograms) stay within
``--memory``, whatever the method (issue: the writer's two staging blocks used to be
counted as one, 276.7 MB allocated under --memory 256MiB)."""

from __future__ import annotations

import pytest
from conftest import make_trio

import streammerge
from streammerge.exec.layout import mapped_bytes, page_aligned


def test_mapped_bytes_counts_whole_pages():
    a = page_aligned((3, 5000))
    assert mapped_bytes(a) == 16384 and mapped_bytes(a[1]) == 16384


@pytest.mark.parametrize("method", ["dare_linear", "ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("memory", ["24MiB", "64MiB"])
def test_real_allocation_fits_the_budget(tmp_path, method, memory):
    base, a, b = make_trio(tmp_path, big=900_000)
    kw = {"density": 0.5} if method != "dare_linear" else {}
    s = streammerge.merge([a, b], base, tmp_path / "out", method=method, seed=1,
                          memory=memory, threads=2, **kw)  # fmt: skip
    assert 0.5 * s.memory_bytes < s.buffer_bytes <= s.memory_bytes, (s.buffer_bytes, memory)


def test_scratch_estimate_matches_the_kernels():
    """The budget counts the numba kernels' partial histograms as they allocate them."""
    from streammerge.kernels import cpu_stats

    from streammerge.exec.layout import kernel_scratch_per_model
    from streammerge.exec.stats import guess_slots

    for sparsifier in ("magnitude", "breadcrumbs"):
        high = cpu_stats.LANES * cpu_stats.HIGH_BINS * 4  # [P, K, LANES, HIGH_BINS] uint32
        low = max(2, guess_slots(sparsifier)) * 2 * cpu_stats.LOW_BINS * 4  # [P, K, B, 2, LOW]
        assert kernel_scratch_per_model(sparsifier) == max(high, low)
