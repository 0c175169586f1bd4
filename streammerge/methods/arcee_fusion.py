"""arcee_fusion: the other model's value where its importance is high, the base elsewhere
(mergekit ``arcee_fusion``; docs/SPEC.md "Arcee Fusion").

Two models, no parameters: mergekit's ``base_model`` is model 0 (``a``), the other model 1
(``b``). Row-wise over the last dimension (``Method.last_dim_rows``: mergekit's softmax
over ``dim=-1``), in three passes over chunks of whole rows: ``fusion_k`` (each row's
divergence k, kept for the tensor, and the histogram of the high 16 bits of the
importances' order keys, row by row once the row's k is known), ``fusion_low`` (the low
16 bits inside the buckets holding q1, the median and q3: exact quantiles whatever the
chunking; not run when W is bf16, whose keys are whole in their high 16 bits), then the
writing pass ``arcee_fusion`` (``x + d * (imp >= thr)``). M3 has nothing to draw.
"""

from __future__ import annotations

import numpy as np

from streammerge.kernels.common import low_bits_vary
from streammerge.methods.method import Method, RowPass

K_PASS, LOW_PASS = "fusion_k", "fusion_low"


def _work(a) -> str:
    from streammerge.kernels import cpu_fusion

    (ra, rb) = a.model_rows
    return a.compute_dtype or cpu_fusion.work_dtype(a.dtypes[ra], a.dtypes[rb])


def _chunk_k(a) -> np.ndarray:
    """The chunk's rows' k (float32 [n_rows]) from the tensor's ``fusion_k`` pass."""
    parts, cache, _ = a.stats[K_PASS]
    if "k" not in cache:
        rows = {s // a.row_len: k for s, k in parts.items()}
        full = np.full(max(r + len(k) for r, k in rows.items()), np.nan, np.float32)
        for r, k in rows.items():
            full[r : r + len(k)] = k
        cache["k"] = full
    r0 = a.start // a.row_len
    return cache["k"][r0 : r0 + a.n_rows]


def _rows(a, inputs):
    (ra, rb) = a.model_rows
    return inputs[ra], a.dtypes[ra], inputs[rb], a.dtypes[rb], a.n_rows, a.row_len


def _k_cpu(inputs, out, a) -> None:
    """``fusion_k``: the chunk's rows' k, kept by the chunk's first element, and the
    high histogram of the chunk's importance keys."""
    from streammerge.kernels import cpu_fusion

    a.counts[0][a.start] = cpu_fusion.fusion_k(*_rows(a, inputs), _work(a), high=a.counts[2])


def _found(a) -> list[tuple[int, int]]:
    """``cpu_fusion.find_buckets`` of the tensor's high histogram: the (bucket, rank inside
    it) of q1, the median and q3 (cached per tensor)."""
    from streammerge.kernels import cpu_fusion

    _, cache, high = a.stats[K_PASS]
    if "found" not in cache:
        cache["found"] = cpu_fusion.find_buckets(high, cpu_fusion.ranks(int(high.sum())))
    return cache["found"]


def _buckets(a) -> np.ndarray:
    """The buckets (high 16 bits) of the keys at q1, median, q3."""
    return np.array([b for b, _ in _found(a)], np.int64)


def _low_bits(a) -> bool:
    """Whether ``fusion_low`` runs: not when W is bf16 (``low_bits_vary``)."""
    return low_bits_vary(_work(a))


def _low_cpu(inputs, out, a) -> None:
    from streammerge.kernels import cpu_fusion

    if not _low_bits(a):
        return
    cpu_fusion.fusion_hist(*_rows(a, inputs), _chunk_k(a), a.counts[0], _buckets(a), _work(a))


def tensor_threshold(a) -> np.float32:
    """thr of the tensor (float32, in W) from its two histograms (cached)."""
    from streammerge.kernels import cpu_fusion

    cache = a.stats[K_PASS][1]
    if "thr" not in cache:
        low = a.stats[LOW_PASS][0] if _low_bits(a) else None
        vals = cpu_fusion.quartile_values(_found(a), low)
        cache["thr"] = cpu_fusion.threshold(vals, _work(a))
    return cache["thr"]


def _typed(launch, inputs, a):
    """The chunk's two models as typed device tensors, and the rows' k on the device."""
    (ra, rb), n = a.model_rows, a.n_rows * a.row_len
    va, vb = (launch.typed(inputs[r], a.dtypes[r], n) for r in (ra, rb))
    return va, vb


def _k_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_fusion

    va, vb = _typed(launch, inputs, a)
    k = triton_fusion.fusion_k_triton(va, vb, a.n_rows, a.row_len, _work(a))
    a.counts[0][a.start] = k.cpu().numpy()
    a.counts[2][:] += triton_fusion.fusion_hist_triton(va, vb, a.n_rows, a.row_len, k, None,
                                                       _work(a))  # fmt: skip


def _device_k(launch, a, device):
    return launch.torch.from_numpy(np.ascontiguousarray(_chunk_k(a))).to(device)


def _low_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_fusion

    if not _low_bits(a):
        return
    va, vb = _typed(launch, inputs, a)
    a.counts[0][:] += triton_fusion.fusion_hist_triton(va, vb, a.n_rows, a.row_len,
                                                       _device_k(launch, a, va.device),
                                                       _buckets(a), _work(a))  # fmt: skip


def _write_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_fusion

    va, vb = _typed(launch, inputs, a)
    triton_fusion.fusion_write_triton(va, vb, a.n_rows, a.row_len,
                                      _device_k(launch, a, va.device), tensor_threshold(a),
                                      launch.typed(out, a.out_dtype, a.n_rows * a.row_len),
                                      _work(a))  # fmt: skip


def _write_cpu(inputs, out, a) -> None:
    from streammerge.kernels import cpu_fusion

    cpu_fusion.fusion_write(*_rows(a, inputs), _chunk_k(a), tensor_threshold(a), out,
                            a.out_dtype, _work(a))  # fmt: skip


METHOD = Method(
    name="arcee_fusion",
    order=87,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(),
    summary="the other model's value where its importance (|a - b| times the row's softmax "
    "KL divergence) is above median + 1.5 IQR, the base elsewhere",
    source="Arcee AI; mergekit arcee_fusion",
    working_dtype="inputs",
    m3="none",
    min_models=2,
    max_models=2,
    row_passes=(
        RowPass(K_PASS, _k_cpu, _k_triton,
                accumulators=lambda n: ({}, {}, np.zeros(65536, np.int64))),
        RowPass(LOW_PASS, _low_cpu, _low_triton,
                accumulators=lambda n: (np.zeros((3, 65536), np.int64), {}),
                needed=lambda tp: low_bits_vary(tp.compute), live=_low_bits),
        RowPass("arcee_fusion", _write_cpu, _write_triton),
    ),
    last_dim_rows=True,
    base_is_input=True,
)
