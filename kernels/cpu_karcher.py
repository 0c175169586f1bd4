"""Karcher mean CPU kernels (numba): mergekit's op chain, one pass at a time.

Contract: docs/SPEC.md "Karcher mean", tested bit for bit against ``tests/spec_reference.py``
(``spec_karcher_chain``).

A chunk is ``n`` elements of N models (slot rows ``model_rows``; no base), raw little-endian
byte rows as in ``cpu_merge``, starting at a multiple of ``STOCK_BLOCK`` elements of the
tensor. Per element, mergekit's iterate depends only on the same element of the inputs and
on per-tensor scalars already known (``Program``), so every pass recomputes the elementwise
chain from the inputs up to its stage, all in float32 with each op rounded to the working
dtype W (``round_work``), then:

- stage 0 (``karcher_norms``): the products ``x_j * x_j`` of each model;
- stage 1 (``karcher_mean``): ``u0 * u0`` (the unnormalized weighted mean);
- stage 2 (``karcher_dots``): ``u * unit_j`` of each model for the round ``full``;
- stage 3 (``karcher_tangent``): ``T * T`` of that round;
- stage 4 (``karcher_step``): ``u' * u'`` (the stepped iterate, before its norm);
- stage 5 (``karcher``): the output ``rW(s * u)`` stored as the output dtype.

The statistics stages return those float32 products [N, n]; ``accumulate`` adds them in
the SPEC's order into the pass's accumulators (torch's 8-lane float32 2-norm; the dots'
float64 block sums), and ``norm_of`` / ``dot_of`` give the values. ``karcher_sums`` runs a
pass as the method does: a dots pass's kernel takes its block sums itself (in parallel),
a norm pass's products are added piece by piece.
"""

from __future__ import annotations

import numba
import numpy as np

from .common import FLOAT_CODES, FLOAT_ITEMSIZE, HELD_UNITS, NO_HELD, STORE_UNITS, checked_held
from .cpu_loops import BF16, F16, F32, launch_parts, part_blocks
from .cpu_merge import _decode_block, _encode_block
from .cpu_nearswap import round_op, round_work
from .cpu_rows import _checked, block_sum
from .cpu_stock import STOCK_BLOCK, add_blocks

__all__ = ["PIECE", "STOCK_BLOCK", "T_HELD", "T_STORE", "accumulate", "dot_of", "karcher_pass",
           "karcher_sums", "norm_of", "warmup", "zero_accumulators"]

#: ``karcher_sums``' ``tangent`` modes: the tangent pass stores ``T`` in the given row, the
#: step pass of the same round reads it there instead of recomputing it.
T_STORE, T_HELD = 1, 2

#: Elements of a statistics pass's products held at once (``karcher_sums``; a multiple of
#: STOCK_BLOCK and of torch's 8 lanes).
PIECE = 1 << 18


@numba.njit(inline="always")
def _tangent(units, valid, u, T, m, ri, dot, coef, skip, w):
    for i in range(STOCK_BLOCK):
        T[i] = np.float32(0.0)
    for j in range(units.shape[0]):
        if valid[j] == 0 or skip[ri, j] != 0:
            continue
        d = dot[ri, j]
        c = coef[ri, j]
        unit = units[j]
        for i in range(m):
            v = round_op(unit[i] - round_op(d * u[i], w), w)
            T[i] = round_op(T[i] + round_op(c * v, w), w)


@numba.njit(inline="always")
def _step(u, T, m, ri, cs, sn, nt, w):
    c, s, t = cs[ri], sn[ri], nt[ri]
    for i in range(m):
        a = round_op(c * u[i], w)
        b = round_op(s * round_op(T[i] / t, w), w)
        u[i] = round_op(a + b, w)


@numba.njit(inline="always")
def _chain_body(x, units, u, T, m, w, stage, full, n32, valid, na32, fb, v0, m0, dot, coef,
                skip, cs, sn, nt, un, unapply, s32, sink, first, held, held_state, keep,
                lo, have_units):  # fmt: skip
    # vals: the products of this block at columns first .. first + m - 1
    """One block of pass ``stage`` with the working dtype ``w`` a constant (``cpu_loops``
    says why). Returns True when ``u`` holds the output values.

    ``held``: a raw byte row holding the iterate in W (elements lo .. lo + m - 1 of this
    block): ``held_state`` 2 r, the iterate after r rounds; 2 r + 1, round r's stepped
    iterate before its division by its norm; -1: none, start from the inputs. ``keep``:
    store the iterate there, after ``full`` rounds (stage 2, state 2 full) or stepped in
    round ``full`` (stage 4, state 2 full + 1). ``have_units``: ``units`` already holds the
    unit vectors (decoded from held rows), not x the inputs. ``sink`` = (vals float32
    [N, *], the products' columns; bsums float64 [blocks, N], 0 rows: none; p float64
    [STOCK_BLOCK] scratch; trow, t_mode): stage 2 stores in bsums the block's N sums
    (SPEC's pairwise tree over the block) instead of its products in vals; stage 3 with
    t_mode T_STORE stores T in the raw byte row trow (as W, at the held iterate's
    elements), stage 4 with T_HELD reads it there instead of recomputing it. (30 arguments
    at most: CPython passes a longer call as *args, which numba cannot inline.)"""
    n_models = x.shape[0]
    vals, bsums, p, trow, t_mode = sink
    for j in range(n_models if not have_units else 0):
        xj = x[j]
        for i in range(m):
            xj[i] = round_work(xj[i], w)  # read from storage
    if stage == 0:
        for j in range(n_models):
            xj = x[j]
            dst = vals[j, first:first + m]
            for i in range(m):
                dst[i] = xj[i] * xj[i]
        return False
    for j in range(n_models if not have_units else 0):
        if n32[j] != np.float32(0.0):
            xj, unit, nj = x[j], units[j], n32[j]
            for i in range(m):
                unit[i] = round_op(xj[i] / nj, w)
    start = 0
    if held_state >= 0:
        _decode_block(held, w, lo, m, u)  # exact: every iterate is a W value
        start = held_state // 2
        if held_state % 2 == 1:  # round start's stepped iterate: divide by its norm
            if unapply[start] != 0:
                q = un[start]
                for i in range(m):
                    u[i] = round_op(u[i] / q, w)
            start += 1
    else:
        for j in range(n_models):
            if valid[j] != 0:
                unit, a = units[j], na32[j]
                for i in range(m):
                    u[i] = round_op(u[i] + round_op(a * unit[i], w), w)
        if stage == 1:
            dst = vals[0, first:first + m]
            for i in range(m):
                dst[i] = u[i] * u[i]
            return False
        if fb != 0:
            u0 = units[v0]
            for i in range(m):
                u[i] = u0[i]
        else:
            for i in range(m):
                u[i] = round_op(u[i] / m0, w)
    for ri in range(start, full):
        _tangent(units, valid, u, T, m, ri, dot, coef, skip, w)
        _step(u, T, m, ri, cs, sn, nt, w)
        if unapply[ri] != 0:
            q = un[ri]
            for i in range(m):
                u[i] = round_op(u[i] / q, w)
    if keep and stage == 2:
        _encode_block(u, w, lo, m, held)  # W values: the round trip is exact, NaN included
    if stage == 2 and bsums.shape[0] > 0:  # the block's sums, not its products
        for j in range(n_models):
            unit = units[j]
            for i in range(m):  # T: free scratch in this stage
                T[i] = u[i] * unit[i]
            bsums[first // STOCK_BLOCK, j] = block_sum(p, T, m)
        return False
    if stage == 2:
        for j in range(n_models):
            unit = units[j]
            dst = vals[j, first:first + m]
            for i in range(m):
                dst[i] = u[i] * unit[i]
        return False
    if stage == 3 or stage == 4:
        if stage == 4 and t_mode == T_HELD:
            _decode_block(trow, w, lo, m, T)  # exact: T's elements are W values
        else:
            _tangent(units, valid, u, T, m, full, dot, coef, skip, w)
        if stage == 3 and t_mode == T_STORE:
            _encode_block(T, w, lo, m, trow)
        dst = vals[0, first:first + m]
        if stage == 4:
            _step(u, T, m, full, cs, sn, nt, w)
            for i in range(m):
                dst[i] = u[i] * u[i]
            if keep:
                _encode_block(u, w, lo, m, held)
        else:
            for i in range(m):
                dst[i] = T[i] * T[i]
        return False
    for i in range(m):
        u[i] = round_op(s32 * u[i], w)
    return True


@numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=False)
def _chain_block(inputs, codes, model_rows, first, m, w, stage, full, n32, valid, na32, fb, v0,
                 m0, dot, coef, skip, cs, sn, nt, un, unapply, s32, vals, vo, out, out_code,
                 held_state, keep, units_mode, x, units, u, T, bsums, p, trow, t_mode):  # fmt: skip
    """One block (elements first .. first + m - 1) of pass ``stage``; its products go to
    columns vo .. vo + m - 1 of ``vals``; ``out`` holds the iterate (``_chain_body``).
    ``units_mode`` (``karcher_pass``'s ``units``): STORE_UNITS writes the unit vectors over
    the model rows as W, HELD_UNITS reads them there. Scratch (float32, the caller's, reused
    block after block): x, units [N, STOCK_BLOCK] (units zeroed once: a zero-norm model's
    stays 0), u, T [STOCK_BLOCK]; p float64 [STOCK_BLOCK]. ``bsums``, ``trow``, ``t_mode``:
    ``_chain_body``'s."""
    n_models = model_rows.shape[0]
    u[:m] = np.float32(0.0)
    # a step pass with T and the iterate held reads neither the units nor the inputs
    bare = stage == 4 and t_mode == T_HELD and held_state == 2 * full
    have = units_mode == HELD_UNITS or bare
    for j in range(n_models if not bare else 0):  # held units: W values, decoded exactly
        if have:
            _decode_block(inputs[model_rows[j]], w, first, m, units[j])
        else:
            _decode_block(inputs[model_rows[j]], codes[model_rows[j]], first, m, x[j])
    sink = (vals, bsums, p, trow, t_mode)
    if w == BF16:
        done = _chain_body(x, units, u, T, m, BF16, stage, full, n32, valid, na32, fb, v0, m0,
                           dot, coef, skip, cs, sn, nt, un, unapply, s32, sink, vo, out,
                           held_state, keep, first, have)  # fmt: skip
    elif w == F16:
        done = _chain_body(x, units, u, T, m, F16, stage, full, n32, valid, na32, fb, v0, m0,
                           dot, coef, skip, cs, sn, nt, un, unapply, s32, sink, vo, out,
                           held_state, keep, first, have)  # fmt: skip
    else:
        done = _chain_body(x, units, u, T, m, F32, stage, full, n32, valid, na32, fb, v0, m0,
                           dot, coef, skip, cs, sn, nt, un, unapply, s32, sink, vo, out,
                           held_state, keep, first, have)  # fmt: skip
    if units_mode == STORE_UNITS:  # each block rewrites only its own elements: no race
        for j in range(n_models):
            _encode_block(units[j], w, first, m, inputs[model_rows[j]])
    if done:
        _encode_block(u, out_code, first, m, out)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _chain_kernel(inputs, codes, model_rows, lo, n, w, stage, full, n32, valid, na32, fb, v0,
                  m0, dot, coef, skip, cs, sn, nt, un, unapply, s32, vals, out, out_code,
                  held_state, keep, units_mode, n_parts, bsums, trow, t_mode):  # fmt: skip
    # elements lo .. n - 1 (lo a multiple of STOCK_BLOCK); vals' column 0 is element lo.
    # Parts of contiguous blocks, each with its scratch made once (not once a block).
    n_blocks = (n - lo + STOCK_BLOCK - 1) // STOCK_BLOCK
    n_parts = max(1, min(n_blocks, n_parts))
    n_models = model_rows.shape[0]
    for p in numba.prange(n_parts):
        x = np.empty((n_models, STOCK_BLOCK), np.float32)
        units = np.zeros((n_models, STOCK_BLOCK), np.float32)
        u = np.empty(STOCK_BLOCK, np.float32)
        T = np.empty(STOCK_BLOCK, np.float32)
        pt = np.empty(STOCK_BLOCK, np.float64)
        lo_b, hi_b = part_blocks(p, n_parts, n_blocks)
        for b in range(lo_b, hi_b):
            vo = b * STOCK_BLOCK
            _chain_block(inputs, codes, model_rows, lo + vo, min(STOCK_BLOCK, n - lo - vo), w,
                         stage, full, n32, valid, na32, fb, v0, m0, dot, coef, skip, cs, sn, nt,
                         un, unapply, s32, vals, vo, out, out_code, held_state, keep,
                         units_mode, x, units, u, T, bsums, pt, trow, t_mode)  # fmt: skip


def _rows(inputs: np.ndarray, dtypes: list[str], model_rows: list[int], n: int):
    """(codes int64 [rows], model rows int64 [N]) of a checked slot."""
    if not isinstance(inputs, np.ndarray) or inputs.dtype != np.uint8 or inputs.ndim != 2 \
            or not inputs.flags.c_contiguous:  # fmt: skip
        raise ValueError("inputs must be a C-contiguous 2-D np.uint8 array (slot rows)")
    if n < 0 or not model_rows:
        raise ValueError(f"need n >= 0 and at least one model row, got {n}, {model_rows}")
    if len(dtypes) != inputs.shape[0] or min(model_rows) < 0 or max(model_rows) >= inputs.shape[0]:
        raise ValueError(f"rows {model_rows} / dtypes {dtypes} do not match {inputs.shape[0]} "
                         "slot rows")  # fmt: skip
    for r in model_rows:
        _checked(inputs[r], dtypes[r], n, f"input row {r}")
    codes = np.array([FLOAT_CODES.get(d, 0) for d in dtypes], np.int64)
    return codes, np.array(model_rows, np.int64)


def _held_row(held, prog, n: int) -> tuple[np.ndarray, int, bool]:
    """(byte row, rounds in it or -1, keep) of a ``held`` argument (None: none)."""
    if held is None:
        return np.zeros(4, np.uint8), -1, False
    row, state, keep = held
    _checked(row, prog.work, n, "held iterate")
    if not -1 <= state <= 2 * prog.full + 1:
        raise ValueError(f"the held iterate (state {state}) is ahead of this pass "
                         f"({prog.full} rounds)")  # fmt: skip
    return row, int(state), bool(keep)


def karcher_pass(inputs: np.ndarray, dtypes: list[str], model_rows: list[int], n: int,
                 prog, stage: int, out: np.ndarray | None = None, out_dtype: str = "F32",
                 held: tuple | None = None, units: int = NO_HELD) -> np.ndarray | None:  # fmt: skip
    """One pass of the chain over ``n`` elements (SPEC "Karcher mean").

    Args:
        prog: the tensor's scalars so far (``streammerge.methods.karcher.Program``).
        stage: 0 .. 4 a statistics pass (returns the float32 products [N, n] its reduction
            adds: ``accumulate``), 5 the writing pass (into the raw byte row ``out``).
        held: ``(row, state, keep)``: a raw byte row of n elements of W (``prog.work``)
            holding the iterate (``state`` 2 r: after r rounds; 2 r + 1: round r's stepped
            iterate, not yet divided by its norm; -1: nothing yet), from which the pass
            continues instead of recomputing the rounds from the inputs (the same values
            bit for bit); ``keep``: store the iterate in it, after ``prog.full`` rounds
            (stage 2: state 2 full) or stepped (stage 4: state 2 full + 1). The writing
            pass may hold it in ``out`` itself (element i of both at the same bytes: W's
            itemsize is the output's). None: recompute every round.
        units: ``common.NO_HELD``; ``STORE_UNITS`` (stage 1): store the unit vectors
            u_j = rW(rW(x_j) / n_j) over the model rows, as W; ``HELD_UNITS`` (stages 2 ..
            5): the model rows hold them (no decode of the inputs, no division).

    Raises:
        ValueError: bad rows, dtypes, output, held row or ``units``.
    """
    codes, mr = _rows(inputs, dtypes, model_rows, n)
    held_row, rounds, keep = _held_row(held, prog, n)
    um = checked_held(units, stage, 1, prog.work, dtypes, model_rows)
    if stage == 5:
        co = _checked(out, out_dtype, n, "out")
        if held is not None and (held_row is not out
                                 or FLOAT_ITEMSIZE[prog.work] != FLOAT_ITEMSIZE[out_dtype]):
            raise ValueError("the writing pass's held iterate must be out, with the output's "
                             "itemsize")  # fmt: skip
        _run_chain(inputs, codes, mr, 0, n, prog, stage, np.zeros((1, 1), np.float32), out, co,
                   rounds, False, um)  # fmt: skip
        return None
    vals = np.zeros((len(model_rows), n), np.float32)
    _run_chain(inputs, codes, mr, 0, n, prog, stage, vals, held_row, 0, rounds, keep, um)
    return vals


def karcher_sums(inputs: np.ndarray, dtypes: list[str], model_rows: list[int], n: int, prog,
                 stage: int, acc: tuple, held: tuple | None = None, units: int = NO_HELD,
                 tangent: tuple | None = None) -> None:  # fmt: skip
    """``accumulate(acc, karcher_pass(...), stage)`` for a statistics pass (0 .. 4), the
    same sums: a dots pass's kernel takes the block sums itself (float64 [blocks, N], in
    parallel; the host adds them left to right); a norm pass's products come in pieces of
    PIECE elements (memory stays small however large the chunk). (A worker thread adding a
    piece's products while the next piece's are computed gained nothing measurable: the
    lanes take ~0.2 ns an element.) ``held``, ``units``: as ``karcher_pass``.
    ``tangent``: ``(row, T_STORE)`` in a tangent pass (stage 3): store round ``prog.full``'s
    T (W values, exactly) in the raw byte row ``row`` of n elements of W, a row no model
    uses; ``(row, T_HELD)`` in the step pass (stage 4) of the same round of the same
    chunk: read T there instead of recomputing it (the same values bit for bit). None:
    neither.

    Raises:
        ValueError: bad rows, dtypes, held row, ``units`` or ``tangent``.
    """
    codes, mr = _rows(inputs, dtypes, model_rows, n)
    held_row, rounds, keep = _held_row(held, prog, n)
    um = checked_held(units, stage, 1, prog.work, dtypes, model_rows)
    trow, t_mode = _tangent_row(tangent, prog, stage, n)
    if stage == 2:  # the kernel's block sums, all blocks at once (8 bytes a block a model)
        bsums = np.empty(((n + STOCK_BLOCK - 1) // STOCK_BLOCK, len(model_rows)), np.float64)
        _run_chain(inputs, codes, mr, 0, n, prog, stage, np.zeros((1, 1), np.float32),
                   held_row, 0, rounds, keep, um, bsums)  # fmt: skip
        add_blocks(acc[3], bsums)
        return
    part = np.zeros(len(model_rows) * min(n, PIECE), np.float32)
    for lo in range(0, n, PIECE):
        hi = min(n, lo + PIECE)
        vals = part[: len(model_rows) * (hi - lo)].reshape(len(model_rows), hi - lo)
        _run_chain(inputs, codes, mr, lo, hi, prog, stage, vals, held_row, 0, rounds, keep, um,
                   trow=trow, t_mode=t_mode)  # fmt: skip
        accumulate(acc, vals, stage)


#: No held tangent (``_chain_kernel``'s ``trow`` with ``t_mode`` 0).
_NO_T = np.zeros(4, np.uint8)


def _tangent_row(tangent, prog, stage: int, n: int) -> tuple[np.ndarray, int]:
    """(byte row, mode) of a ``tangent`` argument (None: ``_NO_T``, mode 0)."""
    if tangent is None:
        return _NO_T, 0
    row, mode = tangent
    if (stage, mode) not in ((3, T_STORE), (4, T_HELD)):
        raise ValueError(f"tangent mode {mode} in stage {stage}: T_STORE is the tangent "
                         "pass's (3), T_HELD the step pass's (4)")  # fmt: skip
    _checked(row, prog.work, n, "held tangent")
    return row, int(mode)


#: No block sums (``_chain_kernel``'s ``bsums`` with 0 rows): the products go to ``vals``.
_NO_BSUMS = np.zeros((0, 1), np.float64)


def _run_chain(inputs, codes, mr, lo, hi, prog, stage, vals, out, co, rounds=-1,
               keep=False, units=NO_HELD, bsums=_NO_BSUMS, trow=_NO_T,
               t_mode=0) -> None:  # fmt: skip
    if hi > lo:
        _chain_kernel(inputs, codes, mr, lo, hi, FLOAT_CODES[prog.work], stage, prog.full,
                      prog.n32, prog.valid, prog.na32, prog.fb, prog.v0, prog.m0, prog.dot,
                      prog.coef, prog.skip, prog.cs, prog.sn, prog.nt, prog.un, prog.unapply,
                      prog.s32, vals, out, co, np.int64(rounds), keep, np.int64(units),
                      np.int64(launch_parts()), bsums, trow, np.int64(t_mode))  # fmt: skip


@numba.njit(inline="always")
def _lanes8(row, k, lanes):
    """lanes[l] += row[i] for i = l, l + 8, .. < k, in that order: eight local sums (one
    vector register), not eight loads and stores a step (1.3-3 ns -> ~0.2 ns per element)."""
    a0, a1, a2, a3 = lanes[0], lanes[1], lanes[2], lanes[3]
    a4, a5, a6, a7 = lanes[4], lanes[5], lanes[6], lanes[7]
    for i in range(0, k, 8):
        a0 = a0 + row[i]
        a1 = a1 + row[i + 1]
        a2 = a2 + row[i + 2]
        a3 = a3 + row[i + 3]
        a4 = a4 + row[i + 4]
        a5 = a5 + row[i + 5]
        a6 = a6 + row[i + 6]
        a7 = a7 + row[i + 7]
    lanes[0], lanes[1], lanes[2], lanes[3] = a0, a1, a2, a3
    lanes[4], lanes[5], lanes[6], lanes[7] = a4, a5, a6, a7


@numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=False)
def _accumulate(vals, q, dot, lanes, tail, ntail, dsum):
    m = vals.shape[1]
    k = m - m % 8
    if dot:
        p = np.empty(STOCK_BLOCK, np.float64)
        for j in range(q):  # each block's tree added in turn, left to right
            row = vals[j]
            for lo in range(0, m, STOCK_BLOCK):
                dsum[j] = dsum[j] + block_sum(p, row[lo:], min(m - lo, STOCK_BLOCK))
    else:
        for j in range(q):
            row = vals[j]
            _lanes8(row, k, lanes[j])
            for i in range(k, m):
                tail[j, i - k] = row[i]
    if k < m:
        ntail[0] = m - k


def accumulate(acc: tuple, vals: np.ndarray, stage: int) -> None:
    """Add a chunk's products (``karcher_pass``) into the pass's accumulators in the
    SPEC's order ("Karcher mean": the reductions): the dots (stage 2) as float64 block sums
    (blocks of STOCK_BLOCK from the chunk's first element, each a pairwise tree, added
    left to right); the norms as torch's float32 2-norm: 8 float32 lanes (element i into
    lane i mod 8) and the tensor's last n mod 8 products. Chunks are whole blocks (only the
    tensor's last is not)."""
    lanes, tail, ntail, dsum = acc
    q = vals.shape[0] if stage in (0, 2) else 1
    _accumulate(np.ascontiguousarray(vals, np.float32), q, stage == 2, lanes, tail, ntail, dsum)


def zero_accumulators(n_models: int) -> tuple:
    """(lanes float32 [N, 8], tail float32 [N, 8], tail length int64 [1], float64 [N])."""
    return (np.zeros((n_models, 8), np.float32), np.zeros((n_models, 8), np.float32),
            np.zeros(1, np.int64), np.zeros(n_models, np.float64))  # fmt: skip


def norm_of(acc: tuple, j: int) -> np.float32:
    """torch's float32 2-norm from the lanes: lane 0 plus lanes 1..7, then the tail, each
    add in float32, then the float32 square root."""
    lanes, tail, ntail, _ = acc
    b = lanes[j, 0]
    for e in (*lanes[j, 1:], *tail[j, : int(ntail[0])]):
        b = np.float32(b + e)
    return np.float32(np.sqrt(b))


def dot_of(acc: tuple, j: int) -> np.float32:
    """The float64 block sums of the products, added left to right, rounded to float32."""
    return np.float32(acc[3][j])


def warmup() -> None:
    """Compile (or load from numba's cache) the kernel."""
    from streammerge.methods.karcher import Program

    s = np.zeros((2, 16), np.uint8)
    karcher_pass(s, ["BF16"] * 2, [0, 1], 2, Program.empty(2, "BF16"), 0)
