"""multislerp: barycentric interpolation of N models on the hypersphere (mergekit
``multislerp``, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; docs/SPEC.md
"Multi-SLERP").

streammerge follows mergekit's chain op for op in the working dtype W (every elementwise
op float32 rounded to W, torch's order): four statistics passes, each needing the scalars
of the one before (``msl_norms``: the norms; ``msl_mean``: the weighted unit mean's norm;
``msl_dots``: the projections onto the mean; ``msl_tangent``: the tangent sum's norm),
float64 sums in a fixed block order rounded to W on the host (``scalars``), then the
writing pass. A tensor in one chunk holds the unit vectors and the normalized mean its dots
pass computed for the passes after it (``_held``). A base is optional: with one
(``base_optional``) the vectors are the task vectors and the base is added back. M3
multiplies the weights (Dirichlet).
"""

from __future__ import annotations

import numpy as np

from streammerge.methods.method import Method, RowPass, held_units
from streammerge.methods.model_stock import round_work, work_dtype_of
from streammerge.methods.params import WEIGHT, Param

NORMALIZE_WEIGHTS = Param("normalize_weights", kind="bool", default=True, per_model=False,
                          help="multislerp: divide the weights by their sum")  # fmt: skip
EPS = Param("eps", default=1e-8, lo=0.0, per_model=False,
            help="multislerp: added to every norm; a weighted unit mean shorter than eps "
            "falls back to the weighted sum")  # fmt: skip

#: multislerp's statistics block (docs/SPEC.md "Multi-SLERP"): its chunks are whole blocks.
MSL_BLOCK = 1024
#: The four statistics passes, in order (stage 0..3 of the kernels), then the writing pass.
MSL_PASSES = ("msl_norms", "msl_mean", "msl_dots", "msl_tangent")


def _r(v, w_dtype: str) -> np.float32:
    return round_work(np.float32(v), w_dtype)


def _sqrt32(s: float) -> np.float32:
    """float32 of the float64 square root of a float64 sum (NaN stays NaN)."""
    with np.errstate(all="ignore"):
        return np.float32(np.sqrt(np.float64(s)))


def scalars(sums: list, weights, normalize: bool, eps: float, w_dtype: str) -> np.ndarray:
    """The host scalars ``sc`` (float32 [3N + 5]) from the totals of the statistics passes
    done so far (SPEC "Multi-SLERP": mergekit's scalar ops in W).

    Args:
        sums: the float64 totals of the first 0..4 statistics passes, in order (``msl_norms``
            [N], ``msl_mean`` [1], ``msl_dots`` [N], ``msl_tangent`` [1]); the scalars of the
            missing passes stay 0.
        weights: the N weights (float64); normalize: ``normalize_weights``; eps: mergekit's
            eps; w_dtype: the working dtype W.
    """
    n = len(weights)
    f32 = np.float32
    sc = np.zeros(3 * n + 5, f32)
    with np.errstate(all="ignore"):
        w = [_r(f32(x), w_dtype) for x in weights]  # torch.tensor(weight, dtype=W)
        if normalize:  # weights / weights.sum()
            s = f32(0.0)
            for x in w:
                s = f32(s + x)
            s = _r(s, w_dtype)
            w = [_r(x / s, w_dtype) for x in w]
        sc[:n] = w
        fe = f32(eps)
        if len(sums) < 1:
            return sc
        norms = [_r(_sqrt32(x), w_dtype) for x in sums[0]]
        sc[n : 2 * n] = [_r(x + fe, w_dtype) for x in norms]
        if len(sums) < 2:
            return sc
        mn = _r(_sqrt32(sums[1][0]), w_dtype)
        sc[2 * n] = mn
        if mn < _r(fe, w_dtype):  # mergekit: linear for 2 models, an error for more
            sc[3 * n + 4] = 1.0
            return sc
        if len(sums) < 3:
            return sc
        sc[2 * n + 1 : 3 * n + 1] = [_r(f32(x), w_dtype) for x in sums[2]]
        if len(sums) < 4:
            return sc
        tn = _r(_r(_sqrt32(sums[3][0]), w_dtype) + fe, w_dtype)
        sc[3 * n + 1] = _r(np.float32(np.cos(np.float64(tn))), w_dtype)
        sin = _r(np.float32(np.sin(np.float64(tn))), w_dtype)
        sc[3 * n + 2] = _r(sin / tn, w_dtype)
        avg = f32(0.0)  # (norms * weights).sum()
        for j in range(n):
            avg = f32(avg + _r(norms[j] * w[j], w_dtype))
        sc[3 * n + 3] = _r(avg, w_dtype)
    return sc


def _sc(a, stage: int) -> np.ndarray:
    """The scalars known before stage ``stage`` (0..4), cached per tensor."""
    cache = a.stats[MSL_PASSES[0]][1]
    if stage not in cache:
        p = dict(a.params)
        cache[stage] = scalars([a.stats[name][0] for name in MSL_PASSES[:stage]], a.weights,
                               bool(p.get("normalize_weights", True)), float(p.get("eps", 1e-8)),
                               work_dtype_of(a))  # fmt: skip
    return cache[stage]


def _skip(a, stage: int) -> bool:
    """After the fallback is known (stage >= 2) the later statistics are not needed."""
    return stage >= 2 and _sc(a, stage)[3 * len(a.model_rows) + 4] != 0


#: Key, in the tensor's cache (``_sc``'s), of the address of the output bytes holding the
#: normalized mean (``cpu_multislerp.msl_stats``' ``mh``), or None.
MH = "mh"


def _held(inputs, out, a, stage: int) -> tuple[int, np.ndarray | None]:
    """The pass's ``held`` and ``mh`` (``cpu_multislerp.msl_stats``): the dots pass stores
    the unit vectors over the model rows (``held_units``), and the normalized mean in the
    slot's output bytes (unused until the writing pass, which writes each element over its
    own mean) when the output dtype has W's itemsize; the tangent and writing passes read
    them instead of recomputing the task vectors, the divisions and the mean (the same
    values: SPEC "Multi-SLERP")."""
    from streammerge.kernels.common import FLOAT_ITEMSIZE, NO_HELD, STORE_UNITS

    work, cache = work_dtype_of(a), a.stats[MSL_PASSES[0]][1]
    held = held_units(inputs, a, work, stage, 2, cache)
    if held == NO_HELD:
        return held, None
    if held == STORE_UNITS:
        fits = out.ndim == 1 and FLOAT_ITEMSIZE[a.out_dtype] == FLOAT_ITEMSIZE[work] \
            and out.nbytes >= a.count * FLOAT_ITEMSIZE[work]  # fmt: skip
        cache[MH] = out.ctypes.data if fits else None
    return held, out if cache.get(MH) == out.ctypes.data else None


def _stats_cpu(stage: int):
    def run(inputs, out, a) -> None:
        from streammerge.kernels import cpu_multislerp, cpu_stock

        if _skip(a, stage):
            return
        held, mh = _held(inputs, out, a, stage)
        blocks = cpu_multislerp.msl_stats(inputs, list(a.dtypes), a.base_row,
                                          list(a.model_rows), a.count, stage, _sc(a, stage),
                                          a.compute_dtype, held, mh)  # fmt: skip
        cpu_stock.add_blocks(a.counts[0], blocks)

    return run


def _rows(launch, inputs, a):
    n = a.count
    base = launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n) if a.base_row >= 0 else None
    return base, [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]


def _stats_triton(stage: int):
    def run(launch, inputs, out, a) -> None:
        from streammerge.kernels import cpu_stock, triton_multislerp

        if _skip(a, stage):
            return
        base, models = _rows(launch, inputs, a)
        sums = triton_multislerp.msl_stats_triton(base, models, a.count, stage, _sc(a, stage),
                                                  a.compute_dtype)  # fmt: skip
        cpu_stock.add_blocks(a.counts[0], sums.cpu().numpy())

    return run


def _msl_cpu(inputs, out, a) -> None:
    from streammerge.kernels import cpu_multislerp

    cpu_multislerp.msl_chunk(inputs, list(a.dtypes), a.base_row, list(a.model_rows), a.count,
                             _sc(a, 4), out, a.out_dtype, a.compute_dtype,
                             *_held(inputs, out, a, 4))  # fmt: skip


def _msl_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_multislerp

    base, models = _rows(launch, inputs, a)
    out_t = launch.typed(out, a.out_dtype, a.count)
    triton_multislerp.msl_triton(base, models, a.count, _sc(a, 4), out_t, a.compute_dtype)


def _stats_pass(stage: int) -> RowPass:
    """Statistics pass ``stage``: float64 [N] sums (stages 0, 2) or [1] (1, 3); the first
    also holds the tensor's scalar cache."""

    def acc(n_models: int) -> tuple:
        z = np.zeros(n_models if stage in (0, 2) else 1, np.float64)
        return (z, {}) if stage == 0 else (z,)

    return RowPass(MSL_PASSES[stage], _stats_cpu(stage), _stats_triton(stage), accumulators=acc)


METHOD = Method(
    name="multislerp",
    order=84,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(WEIGHT, NORMALIZE_WEIGHTS, EPS),
    summary="spherical barycentre of N weighted models (one angle set per tensor)",
    source="mergekit multislerp (goddard.blog, Multi-SLERP)",
    working_dtype="inputs",
    m3="weights",
    min_models=2,
    base_optional=True,
    row_passes=(*(_stats_pass(s) for s in range(4)), RowPass("multislerp", _msl_cpu, _msl_triton)),
    row_block=MSL_BLOCK,
    weighted_stats=True,
)
