"""Element loops shared by the CPU kernels, written so that LLVM vectorizes them.

Two things stop LLVM from vectorizing a numba loop that looks simple (measured on the
della and SCE kernels, 2 048-element rows, one thread):

- rW's branch on the working dtype (``round_work``'s code is a run-time value): LLVM must
  unswitch the loop on it first, and gives up once the loop holds a few roundings
  (della's task-vector loop: 2.1 -> 0.2 ns per element once the code is a constant). Each
  function here branches on the code once and runs a copy of the loop (inlined by numba,
  ``inline="always"``) with the code a constant.
- Two-dimensional indexing (``tv[j, i]``) in the loop body: a row view taken outside the
  loop (``row = tv[j]``) vectorizes, the 2-D index did not (sign election over two models:
  14 -> 0.6 ns per element).
- A division under numba's default ``error_model="python"``: each one tests its divisor for
  zero (to raise ZeroDivisionError), a branch LLVM does not vectorize. Every compiled
  kernel of ``kernels/cpu_*.py`` says ``error_model="numpy"`` (IEEE division, as the SPEC
  has it; results are the same wherever the python model did not raise; a test checks
  it): arcee_fusion's row divergence 55 -> 17 ns per element.
- An inner loop, even of a constant trip count (a polynomial's ``for j in range(12, 0,
  -1)``): LLVM vectorizes innermost loops only, and numba's range loop is not unrolled in
  time. Write such a polynomial out (``cpu_fusion.exp64``: 13 -> 3 ns per element).
"""

from __future__ import annotations

import numba

from .common import FLOAT_CODES
from .cpu_merge import _decode_block
from .cpu_nearswap import round_op, round_work

F32, F16, BF16 = FLOAT_CODES["F32"], FLOAT_CODES["F16"], FLOAT_CODES["BF16"]
#: Parts of blocks per parallel kernel launch and thread (``launch_parts``).
PARTS_PER_THREAD = 4


def launch_parts() -> int:
    """Parts a block kernel's ``prange`` runs: PARTS_PER_THREAD per numba thread (a balanced
    schedule), each part making its scratch once for all its blocks (``part_blocks``), not
    once a block."""
    return PARTS_PER_THREAD * numba.get_num_threads()


@numba.njit(inline="always")
def part_blocks(part, n_parts, n_blocks):
    """(first, end) of the contiguous blocks of part ``part`` of ``n_parts``."""
    return part * n_blocks // n_parts, (part + 1) * n_blocks // n_parts


@numba.njit(inline="always")
def power_of_two(k):
    """k = 2**e, e >= 0: then x / k and x * (1 / k) are the same IEEE result for every
    float x (1 / k is exact, and both round the same real number), NaN and infinities
    included; a multiply is several times cheaper than a division."""
    return k > 0 and (k & (k - 1)) == 0


@numba.njit(inline="always")
def _round_loop(x, m, c):
    for i in range(m):
        x[i] = round_work(x[i], c)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def round_all(x, m, w_code):
    """x[:m] = rW(x[:m]) in place. x: float32 [>= m]; w_code: the working dtype's code."""
    if w_code == BF16:
        _round_loop(x, m, BF16)
    elif w_code == F16:
        _round_loop(x, m, F16)
    else:
        _round_loop(x, m, F32)


@numba.njit(inline="always")
def _tv_loop(d, xb, m, c):
    for i in range(m):
        d[i] = round_op(round_work(d[i], c) - xb[i], c)  # d[i]: a stored value


@numba.njit(nogil=True, cache=True, error_model="numpy")
def task_vector(row, code, first, m, xb, w_code, d):
    """d[:m] = rW(rW(x_j) - x_b) (SPEC v3's task vector in W) for stored elements first ..
    first + m - 1 of the raw byte row ``row`` (dtype ``code``). xb: float32 [>= m], the base
    already in W; d: float32 [>= m]."""
    _decode_block(row, code, first, m, d)
    if w_code == BF16:
        _tv_loop(d, xb, m, BF16)
    elif w_code == F16:
        _tv_loop(d, xb, m, F16)
    else:
        _tv_loop(d, xb, m, F32)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def base_and_task_vectors(inputs, codes, base_row, model_rows, first, m, w_code, xb, tv):
    """xb[:m] = rW(base), tv[j, :m] = rW(rW(x_j) - xb) for elements first .. first + m - 1
    of the slot (SPEC "Model Stock", "SCE": the inputs rounded to W at load as mergekit
    does). xb: float32 [>= m]; tv: float32 [n_models, >= m]."""
    _decode_block(inputs[base_row], codes[base_row], first, m, xb)
    round_all(xb, m, w_code)
    for j in range(model_rows.shape[0]):
        r = model_rows[j]
        task_vector(inputs[r], codes[r], first, m, xb, w_code, tv[j])


@numba.njit(inline="always")
def _weigh_loop(d, m, w, c, out):
    for i in range(m):
        out[i] = round_op(w * d[i], c)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def weigh(d, m, w, w_code, out):
    """out[:m] = rW(w * d[:m]). d: float32 [>= m], values of W (rounded: ``round_op``);
    out: float32 [>= m]; w: float32."""
    if w_code == BF16:
        _weigh_loop(d, m, w, BF16, out)
    elif w_code == F16:
        _weigh_loop(d, m, w, F16, out)
    else:
        _weigh_loop(d, m, w, F32, out)
