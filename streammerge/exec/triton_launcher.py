"""The Triton kernels called on a slot's rows (``TritonLauncher``): the device backend's
kernel table (``streammerge.exec.gpu``), and the Triton CPU backend's under the
interpreter (``streammerge.exec.backends``)."""

from __future__ import annotations

import numpy as np

from streammerge.io.reader import DTYPE_ITEMSIZE

_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class TritonLauncher:
    """Calls the Triton kernels on a slot's uint8 rows (torch tensors on the kernel's
    device: CUDA, or CPU under the interpreter), viewing each row as its dtype. Row r of
    ``inputs`` is the slot's input row r (``streammerge.exec.ops``: 0 the base, 1 + j model j)."""

    def __init__(self, torch) -> None:
        from streammerge.kernels import triton_merge, triton_stats

        self.torch = torch
        self.merge_kernel = triton_merge.merge_chunk_triton
        self.stats = triton_stats
        #: Triton's interpreter (TRITON_INTERPRET=1 when triton was imported): host numpy.
        self.interpreted = triton_merge._INTERPRETED

    def _typed(self, buf, dtype: str, n: int):
        """First ``n`` elements of a uint8 buffer viewed as ``dtype``."""
        return buf[: n * DTYPE_ITEMSIZE[dtype]].view(getattr(self.torch, _TORCH_DTYPES[dtype]))

    def _rows(self, inputs, a):
        base = (
            self._typed(inputs[a.base_row], a.dtypes[a.base_row], a.n) if a.base_row >= 0 else None
        )
        models = [self._typed(inputs[r], a.dtypes[r], a.n) for r in a.model_rows]
        return base, models

    def merge(self, inputs, out, a) -> None:
        """The elementwise pass (``streammerge.exec.ops.MergeArgs``) into ``out`` (uint8)."""
        base, models = self._rows(inputs, a)
        self.merge_kernel(
            base,
            models,
            self._typed(out, a.out_dtype, a.n),
            key=a.key,
            start=a.start,
            drop=list(a.drop),
            weights=list(a.weights),
            scale=a.scale,
            model_ids=list(a.model_ids),
            keep_lo=None if a.keep_lo is None else list(a.keep_lo),
            keep_hi=None if a.keep_hi is None else list(a.keep_hi),
            consensus=a.consensus,
            normalize=a.normalize,
            linear=a.linear,
            compute_dtype=a.compute_dtype,
        )

    def rows(self, inputs, out, a):
        """A row-wise pass (``streammerge.exec.ops.RowArgs``): ``row_dots`` returns the rows'
        sums (float64 numpy [n_rows, 3]); the method's pass combines the rows into ``out``
        (uint8) with the tensor's coefficients, worked out on the host."""
        from streammerge.exec.ops import combine_coefficients
        from streammerge.kernels import triton_rows
        from streammerge.methods.method import ROW_DOTS

        torch, n = self.torch, a.n_rows * a.row_len
        if a.op in ("ram", "ramplus_tl", "ram_counts"):
            return self._ram(inputs, out, a, n)
        if a.op in ("model_stock", "stock_dots"):
            return self._stock(inputs, out, a)
        v0, v1 = (self._typed(inputs[r], a.dtypes[r], n) for r in a.model_rows)
        if a.op == "nearswap":  # elementwise, no host step (SPEC "NearSwap")
            from streammerge.exec.backends import work_of
            from streammerge.kernels import triton_nearswap

            triton_nearswap.nearswap_triton(v0, v1, n, a.t, self._typed(out, a.out_dtype, n),
                                            work_of(a))  # fmt: skip
            return None
        stats = None
        if a.op == ROW_DOTS or a.totals is None:
            stats = triton_rows.row_dots_triton(v0, v1, a.n_rows, a.row_len).cpu().numpy()
            if a.op == ROW_DOTS:
                return stats
        ca, cb = combine_coefficients(a, stats)
        dev = v0.device
        triton_rows.rows_combine_triton(v0, v1, a.n_rows, a.row_len,
                                        torch.from_numpy(ca).to(dev), torch.from_numpy(cb).to(dev),
                                        self._typed(out, a.out_dtype, n))  # fmt: skip
        return None

    def _ram(self, inputs, out, a, n: int) -> None:
        """ram, ramplus_tl or its statistics pass over the base and N fine-tunes (SPEC
        "RAM"); the counts come back to the host arrays ``a.counts``."""
        from streammerge.exec.backends import ramplus_lambdas, work_of
        from streammerge.kernels import triton_ram

        torch, eps = self.torch, dict(a.params)["epsilon"]
        base = self._typed(inputs[a.base_row], a.dtypes[a.base_row], n)
        models = [self._typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
        if a.op == "ram_counts":
            got = [torch.zeros(len(models), dtype=torch.int64, device=base.device) for _ in range(2)]
            triton_ram.ram_counts_triton(base, models, n, eps, *got, work_of(a))
            for acc, g in zip(a.counts, got):
                acc += g.cpu().numpy()
            return
        lam = None if a.op == "ram" else ramplus_lambdas(a)
        triton_ram.ram_triton(base, models, n, eps, self._typed(out, a.out_dtype, n), lam,
                              work_of(a))  # fmt: skip

    def _stock(self, inputs, out, a) -> None:
        """model_stock or its statistics pass (SPEC "Model Stock"): the blocks' sums come
        back to the host and are added left to right into ``a.counts``."""
        from streammerge.exec.backends import stock_t_of, work_dtype_of, work_of
        from streammerge.kernels import cpu_stock, triton_stock
        from streammerge.methods.model_stock import round_work

        n = a.count
        base = self._typed(inputs[a.base_row], a.dtypes[a.base_row], n)
        models = [self._typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
        if a.op == "stock_dots":
            sums = triton_stock.stock_dots_triton(base, models, n, work_of(a))
            cpu_stock.add_blocks(a.counts[0], sums.cpu().numpy())
            return
        t = stock_t_of(a)
        q = round_work(np.float32(1.0) - t, work_dtype_of(a))
        triton_stock.stock_triton(base, models, n, t, q, self._typed(out, a.out_dtype, n),
                                  work_of(a))  # fmt: skip

    def convert(self, src: np.ndarray, a, out: np.ndarray) -> None:
        """A base-only chunk cast on the host with numba (``streammerge.exec.ops.ConvertArgs``;
        rare: base-only float tensors with ``--dtype``)."""
        from streammerge.kernels import cpu_merge

        cpu_merge.convert_chunk(src, a.src_dtype, out, a.out_dtype, a.n, a.scale)

    def hist(self, op: str, inputs, a, hist, buckets=None) -> None:
        """A histogram pass (``streammerge.exec.ops.HistArgs``), accumulating into ``hist``."""
        base, models = self._rows(inputs, a)
        if op == "hist_high":
            self.stats.hist_high_triton(base, models, hist, compute_dtype=a.compute_dtype)
        else:
            self.stats.hist_low_triton(base, models, buckets, hist, compute_dtype=a.compute_dtype)
