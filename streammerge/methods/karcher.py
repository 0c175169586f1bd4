"""karcher: the weighted Riemannian (Karcher) mean of the models' directions, scaled by
the weighted mean of their norms (mergekit ``karcher``; docs/SPEC.md "Karcher mean").

mergekit's op chain, op for op in the working dtype W (a recipe's ``dtype:``, else the
stored dtype). Per element, mergekit's iterate depends only on the same element of the
inputs and on per-tensor scalars (norms, dots, ||T||, ||u||) of the rounds before, so each
reduction is a statistics pass that re-reads the inputs and recomputes the chain up to it
from the scalars known (``Program``): the N norms, the mean's norm, then per round the N
dots, ||T|| and ||u'||; the passes after the rounds stop (||T|| < tol, or ``max_iter``)
run no kernel, and a tensor larger than a chunk is not read for them (``RowPass.live``:
the compute stage decides it after each pass, the reader waits for that). A tensor in one
chunk holds the iterate in its slot's output bytes between passes instead (``_held``),
and its unit vectors over the model rows (``_units``); a larger one keeps its iterate in a
temporary file (``_spilled``), so each pass computes one round, not all before it.
M3 multiplies the weights (mergekit's alphas are 1/N).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace

import numpy as np

from streammerge.kernels.common import FLOAT_ITEMSIZE
from streammerge.methods.method import Method, RowPass, held_units, whole_tensor
from streammerge.methods.params import WEIGHT, Param

#: The rounds the passes are declared for (mergekit's default ``max_iter``).
KARCHER_ROUNDS = 10
MAX_ITER = Param("max_iter", default=10.0, lo=0.0, hi=float(KARCHER_ROUNDS), per_model=False,
                 layered=False, integer=True,
                 help="karcher: most rounds of the fixed-point iteration (at most 10: each "
                 "round re-reads every tensor 3 times)")  # fmt: skip
TOL = Param("tol", default=1e-5, lo=0.0, lo_open=True, per_model=False, layered=False,
            help="karcher: norms <= tol are left out, angles < tol skipped, a step < tol "
            "stops the rounds")  # fmt: skip
KARCHER_WEIGHT = replace(WEIGHT, lo=0.0)

#: The statistics block (the chunks are whole blocks): model_stock's.
KARCHER_BLOCK = 1024
#: The passes in order: the norms, the mean's norm, per round the dots, ||T||, ||u'||, and
#: the writing pass (pass names are unique across methods).
PASSES = ("karcher_norms", "karcher_mean",
          *(f"karcher_{what}{r}" for r in range(1, KARCHER_ROUNDS + 1)
            for what in ("dots", "tangent", "step")),
          "karcher")  # fmt: skip
#: Kernel stage of each pass kind (kernels/cpu_karcher.py).
_STAGE = {"norms": 0, "mean": 1, "dots": 2, "tangent": 3, "step": 4}


def _rd(v, work: str) -> np.ndarray:
    """float32 values (an array) rounded to W and widened back."""
    from streammerge.kernels.common import round_host

    v = np.asarray(v, np.float32)
    return np.array([round_host(float(e), work) if np.isfinite(e) else e for e in v.ravel()],
                    np.float32).reshape(v.shape)  # fmt: skip


@dataclass
class Program:
    """A tensor's scalars so far (SPEC "Karcher mean": the kernels' arguments)."""

    work: str
    full: int
    n32: np.ndarray
    valid: np.ndarray
    na32: np.ndarray
    fb: int
    v0: int
    m0: np.float32
    dot: np.ndarray
    coef: np.ndarray
    skip: np.ndarray
    cs: np.ndarray
    sn: np.ndarray
    nt: np.ndarray
    un: np.ndarray
    unapply: np.ndarray
    s32: np.float32

    @staticmethod
    def empty(n: int, work: str) -> "Program":
        r = KARCHER_ROUNDS + 1
        f = np.float32
        return Program(work, 0, np.zeros(n, f), np.zeros(n, np.int8), np.zeros(n, f), 0, 0,
                       f(1.0), np.zeros((r, n), f), np.zeros((r, n), f),
                       np.zeros((r, n), np.int8), np.zeros(r, f), np.zeros(r, f),
                       np.ones(r, f), np.ones(r, f), np.zeros(r, np.int8), f(0.0))  # fmt: skip


def program(sums: dict, op: str, weights, max_iter: int, tol: float, work: str):
    """(Program, stage) for the pass ``op`` from the accumulators of the passes before it
    (``cpu_karcher.zero_accumulators``, by pass name); stage None: the pass runs no kernel
    (the rounds stopped), -1: the writing pass writes zeros (every model left out)."""
    from streammerge.kernels.cpu_karcher import dot_of, norm_of

    f = np.float32
    n = len(weights)
    pr = Program.empty(n, work)
    k = PASSES.index(op)
    if k == 0:
        return pr, 0
    with np.errstate(all="ignore"):
        n32 = [norm_of(sums[PASSES[0]], j) for j in range(n)]
        norms = [0.0 if float(v) == 0.0 else float(v) for v in n32]
        total = 0.0
        for w in weights:
            total = total + float(w)
        alphas = [float(w) / total for w in weights]
        valid = [j for j in range(n) if norms[j] > tol]
        asum = 0.0
        for j in valid:
            asum = asum + alphas[j]
        if not valid or asum == 0.0:
            return pr, (-1 if op == "karcher" else None)
        pr.n32[:] = n32
        for j in valid:
            pr.valid[j] = 1
            pr.na32[j] = f(alphas[j] / asum)
        pr.v0 = valid[0]
        s = f(0.0)  # mergekit's sum(alpha * norm) of 0-dim float32 tensors, cast to W
        for a, v in zip(alphas, norms):
            s = f(s + f(f(a) * f(v)))
        pr.s32 = _rd(np.array([s], f), work)[0]
        if k == 1:
            return pr, 1
        m0 = norm_of(sums[PASSES[1]], 0)
        pr.m0, pr.fb = m0, int(float(m0) < tol)
        for ri in range(min(max_iter, KARCHER_ROUNDS)):
            base = 2 + 3 * ri
            pr.full = ri
            if k == base:
                return pr, 2
            dots = sums[PASSES[base]]
            for j in valid:
                d = _rd(np.array([dot_of(dots, j)], f), work)
                d = np.clip(d, f(-1.0), f(1.0)) if not np.isnan(d[0]) else d
                th = _rd(np.arccos(d), work)
                pr.dot[ri, j] = d[0]
                if float(th[0]) < tol:
                    pr.skip[ri, j] = 1
                    continue
                pr.coef[ri, j] = _rd(pr.na32[j] * _rd(th / _rd(np.sin(th), work), work), work)[0]
            if k == base + 1:
                return pr, 3
            nt = norm_of(sums[PASSES[base + 1]], 0)
            if float(nt) < tol:
                break
            pr.nt[ri] = nt
            pr.cs[ri] = _rd(np.array([np.cos(nt)], f), work)[0]
            pr.sn[ri] = _rd(np.array([np.sin(nt)], f), work)[0]
            if k == base + 2:
                return pr, 4
            un = norm_of(sums[PASSES[base + 2]], 0)
            pr.un[ri], pr.unapply[ri] = un, int(float(un) > tol)
            pr.full = ri + 1
    return pr, (5 if op == "karcher" else None)


def _params(a) -> tuple[int, float]:
    p = dict(a.params)
    return int(p.get("max_iter", 10)), float(p.get("tol", 1e-5))


def work_of(a) -> str:
    """W: the plan's working dtype, else the models' common stored dtype, else F32."""
    dts = [a.dtypes[r] for r in a.model_rows]
    return a.compute_dtype or (dts[0] if len(set(dts)) == 1 else "F32")


#: ``RowArgs.stats`` key of ``program_of``'s results, by pass (and parameters).
PROGRAMS = "karcher_programs"


def program_of(a):
    """(Program, stage) of the pass ``a.op`` from the tensor's sums so far, derived once a
    pass (the chunks of a pass, and ``_live`` before it, ask again: the sums of the passes
    before it are final by then)."""
    memo = a.stats.setdefault(PROGRAMS, {})
    key = (a.op, a.weights, a.params, a.compute_dtype, a.model_rows, a.dtypes)
    if key not in memo:
        sums = {name: acc for name, acc in a.stats.items() if name in PASSES and name != a.op}
        memo[key] = program(sums, a.op or "karcher", a.weights, *_params(a), work_of(a))
    return memo[key]


#: ``RowArgs.stats`` key of the iterate held in a slot's output bytes: (buffer address,
#: weights, state: ``cpu_karcher.karcher_pass``'s).
HELD = "karcher_held"


def _held(out, a, pr: Program, stage: int) -> tuple | None:
    """The iterate held in ``out`` for this pass (``cpu_karcher.karcher_pass``'s ``held``),
    or None. Only a tensor in one chunk, whose passes all run on the same slot one after
    the other, holds it: in the slot's output bytes (unused until the writing pass, which
    writes each element over its own iterate), so W must have the output's itemsize. The
    dots pass of each round stores the iterate; the later passes continue from it instead
    of recomputing the rounds from the inputs (same values: SPEC "Karcher mean"); the
    step pass stores the stepped iterate, so the next round's passes only divide it by its
    norm."""
    if not whole_tensor(a) or not _out_holds(out, a, pr):
        return None
    st = a.stats.get(HELD)
    same = st is not None and st[0] == out.ctypes.data and st[1] == a.weights \
        and st[2] <= 2 * pr.full + 1  # fmt: skip
    state = st[2] if same else -1
    keep = stage in (2, 4)
    if keep:
        a.stats[HELD] = (out.ctypes.data, a.weights, 2 * pr.full + (stage == 4))
    elif state < 0:
        return None
    return out, state, keep


def _out_holds(out, a, pr: Program) -> bool:
    """Whether the chunk's output bytes can hold its iterate: W has the output dtype's
    itemsize, and ``out`` is a byte row of at least the chunk's elements."""
    isz = FLOAT_ITEMSIZE[pr.work]
    return isz == FLOAT_ITEMSIZE[a.out_dtype] and out.ndim == 1 and out.nbytes >= a.count * isz


#: ``RowArgs.stats`` key of the iterate of a tensor larger than a chunk, kept between its
#: passes in a temporary file (``_scratch_file``): (file, weights, {chunk start: (state,
#: count)}).
SPILL = "karcher_spill"


def _spilled(out, a, pr: Program, stage: int) -> tuple:
    """(held, after) for a chunk of a tensor larger than a chunk: its iterate between passes
    in a temporary file (``_scratch_file``: nameless, in the output's staging directory,
    not TMPDIR, which may be RAM; gone with the process; W's itemsize per element of the
    tensor), read into the chunk's output bytes before the pass and written back after it
    (``after``), as ``_held`` keeps a one-chunk tensor's in place. Each pass then computes
    its own round, not every round before it from the inputs (10 rounds of a 5632 x 2048
    bf16 tensor: 146 -> 47 ns per element). (None, None) when the output bytes cannot hold
    it (``_out_holds``), or nothing is kept yet."""
    if not _out_holds(out, a, pr):
        return None, None
    isz = FLOAT_ITEMSIZE[pr.work]
    nb = a.count * isz
    sp = a.stats.get(SPILL)
    if sp is None or sp[1] != a.weights:
        if sp is not None:
            sp[0].close()
        sp = (_scratch_file(a.scratch), a.weights, {})
        a.stats[SPILL] = sp
    f, _, states = sp
    state, count = states.get(a.start, (-1, 0))
    state = state if count == a.count and state <= 2 * pr.full + 1 else -1
    keep = stage in (2, 4)
    if state < 0 and not keep:
        return None, None
    view = out.view(np.uint8)[:nb]
    if state >= 0:
        _transfer(os.preadv, f.fileno(), view, a.start * isz)

    def after() -> None:
        if keep:
            _transfer(os.pwritev, f.fileno(), view, a.start * isz)
            states[a.start] = (2 * pr.full + (stage == 4), a.count)
        elif stage == 5:
            states.pop(a.start, None)
            if not states:
                f.close()
                a.stats.pop(SPILL, None)

    return (out, state, keep), after


def _scratch_file(scratch: str | None):
    """A binary read-write file object: nameless (``O_TMPFILE``) in ``scratch`` (the
    output's staging directory, ``RowArgs.scratch``), so that not even a kill leaves it
    there; TMPDIR's ``TemporaryFile`` where ``scratch`` is None or its filesystem has no
    nameless files (NFS, FUSE, CIFS: a named file there could be left in the output).

    Raises:
        OSError: TMPDIR cannot hold a file either."""
    if scratch is not None and hasattr(os, "O_TMPFILE"):
        try:
            return open(os.open(scratch, os.O_TMPFILE | os.O_RDWR, 0o600), "w+b")
        except OSError:
            pass
    return tempfile.TemporaryFile(prefix="streammerge-karcher-")


def _transfer(call, fd: int, view: np.ndarray, offset: int) -> None:
    """Every byte of ``view`` through ``os.preadv`` / ``os.pwritev`` at ``offset``.

    Raises:
        OSError: the temporary file ends early (a read) or the disk is full.
    """
    done = 0
    while done < view.nbytes:
        k = call(fd, [memoryview(view[done:])], offset + done)
        if k <= 0:
            raise OSError(f"karcher's temporary iterate: {done} of {view.nbytes} bytes")
        done += k


def _holding(out, a, pr: Program, stage: int) -> tuple:
    """(held, after): the iterate kept in place (``_held``: a tensor in one chunk) or in a
    temporary file (``_spilled``: a larger one)."""
    if whole_tensor(a):
        return _held(out, a, pr, stage), None
    return _spilled(out, a, pr, stage)


def _units(inputs, a, pr: Program, stage: int) -> int:
    """The pass's ``units`` (``cpu_karcher.karcher_pass``): the mean's pass stores the unit
    vectors over the model rows, every later pass reads them instead of decoding the inputs
    and dividing by the norms (the same values: SPEC "Karcher mean"; ``held_units``)."""
    return held_units(inputs, a, pr.work, stage, 1, a.stats)


#: ``RowArgs.stats`` key of the tangent T held in a spare slot row between the tangent and
#: step passes of one round (``_held_tangent``): (row address, weights, round).
TANGENT = "karcher_tangent_held"


def _held_tangent(inputs, a, pr: Program, stage: int) -> tuple | None:
    """The pass's ``tangent`` (``cpu_karcher.karcher_sums``): a tensor in one chunk keeps
    round r's T from its tangent pass for its step pass, which then does not recompute it
    (the same values: SPEC "Karcher mean"), in a slot row no model uses (karcher has no
    base: the base row is free) with room for the chunk in W. None: recompute."""
    from streammerge.kernels.cpu_karcher import T_HELD, T_STORE

    if stage not in (3, 4) or not whole_tensor(a):
        return None
    spare = [r for r in range(inputs.shape[0]) if r not in a.model_rows and r != a.base_row]
    if not spare or inputs[spare[0]].nbytes < a.count * FLOAT_ITEMSIZE[pr.work]:
        return None
    row = inputs[spare[0]]
    mark = (row.ctypes.data, a.weights, pr.full)
    if stage == 3:
        a.stats[TANGENT] = mark
        return row, T_STORE
    return (row, T_HELD) if a.stats.get(TANGENT) == mark else None


def _pass_cpu(inputs, out, a) -> None:
    """One statistics pass: each block's sums, added into ``a.counts[0]`` left to right."""
    from streammerge.kernels import cpu_karcher

    pr, stage = program_of(a)
    if stage is None:
        return
    held, after = _holding(out, a, pr, stage) if stage >= 2 else (None, None)
    cpu_karcher.karcher_sums(inputs, list(a.dtypes), list(a.model_rows), a.count, pr, stage,
                             a.counts, held, _units(inputs, a, pr, stage),
                             _held_tangent(inputs, a, pr, stage))  # fmt: skip
    if after is not None:
        after()


def _karcher_cpu(inputs, out, a) -> None:
    """``karcher``: the output ``rW(s * u)`` in the output dtype (zeros: no model left)."""
    from streammerge.kernels import cpu_karcher

    pr, stage = program_of(a)
    if stage == -1:
        out[...] = 0
        return
    held, after = _holding(out, a, pr, 5)
    cpu_karcher.karcher_pass(inputs, list(a.dtypes), list(a.model_rows), a.count, pr, 5, out,
                             a.out_dtype, held, _units(inputs, a, pr, 5))  # fmt: skip
    if after is not None:
        after()


def _models(launch, inputs, a) -> list:
    return [launch.typed(inputs[r], a.dtypes[r], a.count) for r in a.model_rows]


def _pass_triton(launch, inputs, out, a) -> None:
    """A statistics pass on the device: the products come back to the host's sums."""
    from streammerge.kernels import cpu_karcher, triton_karcher

    pr, stage = program_of(a)
    if stage is None:
        return
    vals = triton_karcher.karcher_pass_triton(_models(launch, inputs, a), a.count, pr, stage)
    cpu_karcher.accumulate(a.counts, vals.cpu().numpy(), stage)


def _karcher_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_karcher

    pr, stage = program_of(a)
    o = launch.typed(out, a.out_dtype, a.count)
    if stage == -1:
        o.zero_()
        return
    triton_karcher.karcher_pass_triton(_models(launch, inputs, a), a.count, pr, 5, o)


def _live(a) -> bool:
    """Whether the pass ``a.op`` computes anything (the rounds have not stopped)."""
    return program_of(a)[1] is not None


def _zero_sums(n_models: int) -> tuple:
    """The pass's accumulators (``cpu_karcher.zero_accumulators``)."""
    from streammerge.kernels.cpu_karcher import zero_accumulators

    return zero_accumulators(n_models)


def _check_weights(per_model: dict) -> str | None:
    w = per_model.get("weight")
    if w is not None and not sum(w) > 0:
        return f"karcher: the weights {list(w)} must have a positive sum"
    return None


METHOD = Method(
    name="karcher",
    order=84,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(KARCHER_WEIGHT, MAX_ITER, TOL),
    summary="Riemannian (Karcher) mean of the models' directions, times their mean norm",
    source="mergekit karcher (Karcher mean)",
    m3="weights",
    min_models=2,
    base_unsupported=True,
    working_dtype="inputs",
    row_passes=(*(RowPass(name, _pass_cpu, _pass_triton, accumulators=_zero_sums,
                          live=None if i < 2 else _live)
                  for i, name in enumerate(PASSES[:-1])),
                RowPass("karcher", _karcher_cpu, _karcher_triton)),
    row_block=KARCHER_BLOCK,
    check_params=_check_weights,
    weighted_stats=True,
    plan_note=f"mergekit's chain: {len(PASSES) - 1} statistics passes (the norms, the "
    f"mean's norm, then per round the dots, ||T||, ||u'|| for up to {KARCHER_ROUNDS} rounds; "
    "those after the rounds stop are not read) and 1 writing pass: at most "
    f"{len(PASSES)} reads of each tensor larger than a chunk (its iterate kept between passes "
    "in a nameless temporary file in the output's staging directory, W's itemsize per "
    "element), 1 of a smaller one (its iterate held between passes)"
)
