"""RAM CPU kernels (numba): mergekit's ``ram`` / ``ramplus_tl`` op by op in the working dtype.

Contract: docs/SPEC.md "RAM (ram, ramplus_tl)", tested bit for bit against
``tests/spec_reference.py`` and against the Triton kernels of ``kernels/triton_ram.py``.

A chunk is ``n`` elements of the base (slot row ``base_row``) and of N fine-tunes (slot rows
``model_rows``), raw little-endian byte rows as in ``cpu_merge``.

- ``ram_counts``: ramplus_tl's statistics pass: per fine-tune j, the elements where only j
  changed the base (``unique_j``) and where j and another did (``shared_j``), int64, added
  into the caller's array (exact: any chunking gives the same totals).
- ``ram_chunk``: the merged value, ``ram``'s (every op rounded to the working dtype W) or,
  given the per-model ``lambda`` (float32), ``ramplus_tl``'s (the tail in float32).
"""

from __future__ import annotations

import numba
import numpy as np

from .common import FLOAT_CODES
from .cpu_loops import BF16, F16, F32, base_and_task_vectors
from .cpu_merge import _encode_block
from .cpu_nearswap import _round_host, round_op, round_work
from .cpu_rows import _checked

#: Elements per parallel block.
BLOCK = 4096


def work_dtype(dtypes: list[str]) -> str:
    """SPEC's W: the common stored dtype of the base and the fine-tunes, else ``F32``."""
    return dtypes[0] if len(set(dtypes)) == 1 else "F32"


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _task_vectors(inputs, codes, base_row, model_rows, first, m, e, w_code, xb, tv, cnt):
    """xb = the base block, tv[j] = rW(x_j - x_b), cnt = models with |tv_j| > e (each loop
    over the block's elements, the models outside: ``cpu_loops``' rules)."""
    base_and_task_vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, tv)
    cnt[:m] = 0
    for j in range(model_rows.shape[0]):
        row = tv[j]
        for i in range(m):
            cnt[i] += np.int64(abs(row[i]) > e)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _count_block(inputs, codes, base_row, model_rows, first, m, e, w_code, part_k):
    """part_k[0, j], part_k[1, j] = the block's shared and unique counts of fine-tune j."""
    n_models = model_rows.shape[0]
    xb = np.empty(BLOCK, np.float32)
    tv = np.empty((n_models, BLOCK), np.float32)
    cnt = np.empty(BLOCK, np.int64)
    _task_vectors(inputs, codes, base_row, model_rows, first, m, e, w_code, xb, tv, cnt)
    for j in range(n_models):
        row = tv[j]
        sh = 0
        un = 0
        for i in range(m):
            on = np.int64(abs(row[i]) > e)
            un += on * np.int64(cnt[i] == 1)
            sh += on * np.int64(cnt[i] > 1)
        part_k[0, j] += sh
        part_k[1, j] += un


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _counts_kernel(inputs, codes, base_row, model_rows, n, e, w_code, shared, unique):
    n_blocks = (n + BLOCK - 1) // BLOCK
    n_models = model_rows.shape[0]
    part = np.zeros((n_blocks, 2, n_models), np.int64)
    for k in numba.prange(n_blocks):
        first = k * BLOCK
        _count_block(inputs, codes, base_row, model_rows, first, min(BLOCK, n - first), e,
                     w_code, part[k])  # fmt: skip
    for k in range(n_blocks):
        for j in range(n_models):
            shared[j] += part[k, 0, j]
            unique[j] += part[k, 1, j]


@numba.njit(inline="always")
def _ram_loops(tv, cnt, m, e, c, plus, lam, xb, acc):
    """xb = the merged value of the block (SPEC "RAM"), the working dtype ``c`` a constant."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    # acc = s_0 + s_1 + ... in model order, element by element, the models outside
    for j in range(tv.shape[0]):
        lj = lam[j]
        row = tv[j]
        for i in range(m):
            k = cnt[i]
            uniq = one if k == 1 else zero
            ovl = one if k > 1 else zero
            div = np.float32(max(k, 1))
            d = row[i]
            z = round_op(d * (one if abs(d) > e else zero), c)
            u = round_op(z * uniq, c)
            o = round_op(round_op(z * ovl, c) / div, c)
            s = u * lj + o if plus else round_op(u + o, c)
            acc[i] = acc[i] + s
    if plus:
        for i in range(m):
            xb[i] = xb[i] + acc[i]
    else:
        for i in range(m):
            xb[i] = round_op(xb[i] + round_op(acc[i], c), c)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _ram_block(inputs, codes, base_row, model_rows, first, m, e, w_code, plus, lam, out,
               out_code):  # fmt: skip
    """One block of the merged value into the raw byte row ``out``."""
    n_models = model_rows.shape[0]
    xb = np.empty(BLOCK, np.float32)
    tv = np.empty((n_models, BLOCK), np.float32)
    cnt = np.empty(BLOCK, np.int64)
    acc = np.zeros(BLOCK, np.float32)
    _task_vectors(inputs, codes, base_row, model_rows, first, m, e, w_code, xb, tv, cnt)
    if w_code == BF16:
        _ram_loops(tv, cnt, m, e, BF16, plus, lam, xb, acc)
    elif w_code == F16:
        _ram_loops(tv, cnt, m, e, F16, plus, lam, xb, acc)
    else:
        _ram_loops(tv, cnt, m, e, F32, plus, lam, xb, acc)
    _encode_block(xb, out_code, first, m, out)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _ram_kernel(inputs, codes, base_row, model_rows, n, e, w_code, plus, lam, out, out_code):
    for k in numba.prange((n + BLOCK - 1) // BLOCK):
        first = k * BLOCK
        _ram_block(inputs, codes, base_row, model_rows, first, min(BLOCK, n - first), e, w_code,
                   plus, lam, out, out_code)  # fmt: skip


def _slot(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int], n: int,
          work: str | None = None):  # fmt: skip
    """(codes int64 [rows], model rows int64 [N], W's code, W) of a checked slot (W:
    ``work`` when given, mergekit's ``dtype:``)."""
    if not isinstance(inputs, np.ndarray) or inputs.dtype != np.uint8 or inputs.ndim != 2 \
            or not inputs.flags.c_contiguous:  # fmt: skip
        raise ValueError("inputs must be a C-contiguous 2-D np.uint8 array (slot rows)")
    if n < 0 or not model_rows:
        raise ValueError(f"need n >= 0 and at least one model row, got {n}, {model_rows}")
    rows = [base_row, *model_rows]
    if len(dtypes) != inputs.shape[0] or min(rows) < 0 or max(rows) >= inputs.shape[0]:
        raise ValueError(f"rows {rows} / dtypes {dtypes} do not match {inputs.shape[0]} slot rows")
    codes = np.array([FLOAT_CODES.get(d, 0) for d in dtypes], np.int64)
    for r in rows:
        _checked(inputs[r], dtypes[r], n, f"input row {r}")
    w = work or work_dtype([dtypes[r] for r in rows])
    if w not in FLOAT_CODES:
        raise ValueError(f"unsupported working dtype {w!r}")
    return codes, np.array(model_rows, np.int64), FLOAT_CODES[w], w


def epsilon_in_work(epsilon: float, w_dtype: str) -> np.float32:
    """``e = rW(float32(epsilon))`` (SPEC: torch compares a W tensor with a scalar in W)."""
    return np.float32(_round_host(np.float32(epsilon), FLOAT_CODES[w_dtype]))


def ram_counts(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
               n: int, epsilon: float, shared: np.ndarray, unique: np.ndarray,
               work: str | None = None) -> None:  # fmt: skip
    """Add ramplus_tl's per-model counts of ``n`` elements into ``shared`` / ``unique``
    (int64 [N]) (SPEC "RAM": the statistics pass).

    Raises:
        ValueError: bad rows, dtypes or count arrays.
    """
    codes, mr, w_code, w = _slot(inputs, dtypes, base_row, model_rows, n, work)
    for a in (shared, unique):
        if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.shape != (len(model_rows),):
            raise ValueError(f"shared / unique must be int64 arrays of {len(model_rows)} counts")
    if n:
        _counts_kernel(inputs, codes, base_row, mr, n, epsilon_in_work(epsilon, w), w_code,
                       shared, unique)  # fmt: skip


def ram_chunk(inputs: np.ndarray, dtypes: list[str], base_row: int, model_rows: list[int],
              n: int, epsilon: float, out: np.ndarray, out_dtype: str,
              lam: np.ndarray | None = None, work: str | None = None) -> None:  # fmt: skip
    """The merged value of ``n`` elements into the raw byte row ``out`` (SPEC "RAM").

    Args:
        inputs: the slot's input rows (np.uint8 [rows, bytes]); dtypes: each row's dtype.
        base_row, model_rows: the rows of the base and of the N fine-tunes.
        epsilon: the tensor's epsilon (float64; compared in W).
        lam: None for ``ram``; ``ramplus_tl``'s lambda_j (float32 [N], ``ram_lambdas``).
        work: the working dtype W (mergekit's ``dtype:``), or None: ``work_dtype``.

    Raises:
        ValueError: bad rows, dtypes, output or lambda array.
    """
    codes, mr, w_code, w = _slot(inputs, dtypes, base_row, model_rows, n, work)
    co = _checked(out, out_dtype, n, "out")
    plus = lam is not None
    if plus and (not isinstance(lam, np.ndarray) or lam.dtype != np.float32
                 or lam.shape != (len(model_rows),)):  # fmt: skip
        raise ValueError(f"lam must be a float32 array of {len(model_rows)} values")
    lam = np.ascontiguousarray(lam) if plus else np.ones(len(model_rows), np.float32)
    if n:
        _ram_kernel(inputs, codes, base_row, mr, n, epsilon_in_work(epsilon, w), w_code, plus,
                    lam, out, co)  # fmt: skip


def ram_lambdas(shared: np.ndarray, unique: np.ndarray, epsilon: float, r: float,
                alpha: float) -> np.ndarray:  # fmt: skip
    """ramplus_tl's lambda_j (float32 [N]) from the whole tensor's counts, in float32 as
    torch computes mergekit's ``1 + r * (shared / unique.clamp(min=epsilon)).clamp(0, alpha)``
    (SPEC "RAM")."""
    f = np.float32
    out = np.empty(len(shared), np.float32)
    with np.errstate(all="ignore"):
        for j, (sh, un) in enumerate(zip(shared.tolist(), unique.tolist())):
            den = f(un) if un >= epsilon else f(epsilon)
            rho = f(f(sh) / den)
            c = rho if np.isnan(rho) else min(max(rho, f(0.0)), f(alpha))
            out[j] = f(1.0) + f(f(r) * f(c))
    return out


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for each dtype."""
    for dt in FLOAT_CODES:
        s = np.zeros((3, 16), np.uint8)
        sh, un = np.zeros(2, np.int64), np.zeros(2, np.int64)
        ram_counts(s, [dt] * 3, 0, [1, 2], 2, 1e-5, sh, un)
        ram_chunk(s, [dt] * 3, 0, [1, 2], 2, 1e-5, np.zeros(16, np.uint8), dt)
        ram_chunk(s, [dt] * 3, 0, [1, 2], 2, 1e-5, np.zeros(16, np.uint8), dt,
                  np.ones(2, np.float32))  # fmt: skip
